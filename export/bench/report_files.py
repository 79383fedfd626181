"""The report files `mirasol-bench --json FILE --markdown FILE` writes, through the ownership rule: a path is new,
or a report of ours (the JSON's "format", the Markdown's last line), checked before the run and again when written.
"""
from __future__ import annotations

import os
from pathlib import Path

from mirasol.runtime.files.atomic import write_file
from mirasol.runtime.files.ownership import check_output_file, has_json_format

REPORT_FORMAT = "mirasol-bench"  # the JSON report's "format"
# the Markdown report's last line (a comment: invisible where it is rendered), by which a later run knows it
MARKDOWN_MARK = "<!-- written by mirasol-bench: a later run given this path as --markdown replaces this file -->"
MAX_REPORT_BYTES = 64 << 20
JSON_REPORT = "benchmark JSON report"
MARKDOWN_REPORT = "benchmark Markdown report"


def is_json_report(path: Path) -> bool:
    """Whether `path` holds a JSON report of mirasol-bench (its "format" says so); never raises."""
    return has_json_format(path, REPORT_FORMAT, MAX_REPORT_BYTES)


def is_markdown_report(path: Path) -> bool:
    """Whether `path` holds a Markdown report of mirasol-bench (its last line is our mark); never raises."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 4096))
            tail = f.read().decode("utf-8", "replace")
    except OSError:
        return False
    return tail.rstrip("\n").rpartition("\n")[2] == MARKDOWN_MARK


def check_report_paths(json_path: Path | None, markdown_path: Path | None) -> None:
    """Refuse, before any work, a report path that is not new and not a report of ours (or whose folder is missing)."""
    if json_path is not None:
        check_output_file(json_path, is_json_report, JSON_REPORT)
    if markdown_path is not None:
        check_output_file(markdown_path, is_markdown_report, MARKDOWN_REPORT)


def write_reports(json_path: Path | None, json_text: str, markdown_path: Path | None, markdown: str) -> None:
    """Write the reports asked for, atomically (the rule checked again as each is put in place)."""
    if json_path is not None:
        write_file(json_path, json_text, is_json_report, JSON_REPORT)
    if markdown_path is not None:
        write_file(markdown_path, markdown, is_markdown_report, MARKDOWN_REPORT)
