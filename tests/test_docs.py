"""README.md and docs/ hold together: Markdown that renders as meant, links that lead somewhere, and every
`mirasol-*` command line they show accepted by that command's parser. (The blocks marked `tested` also run:
tests/test_readme.py.)"""
from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from .test_cli import SCRIPTS, parser_of

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^\s*```(.*)$")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# what a parser may say of a path or a value that exists only on the machine the docs describe
ABSENT_HERE = ("does not exist", "not a directory", "No such file")


def blocks(page: Path) -> list[tuple[str, str, int]]:
    """(language, text, first line number) of every fenced block."""
    found, language, lines, start = [], None, [], 0
    for number, line in enumerate(page.read_text().splitlines(), 1):
        fence = FENCE.match(line)
        if fence and language is None:
            language, lines, start = fence.group(1).strip(), [], number
        elif fence:
            found.append((language, "\n".join(lines), start))
            language = None
        elif language is not None:
            lines.append(line)
    assert language is None, f"{page.name}: the block opened at line {start} is never closed"
    return found


def headings(page: Path) -> set[str]:
    """GitHub's anchors of the page's headings (outside code blocks)."""
    anchors, inside = set(), False
    for line in page.read_text().splitlines():
        if FENCE.match(line):
            inside = not inside
        elif not inside and line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_block_opens_with_its_language(page: Path) -> None:
    """A fence that opens a block names its language (```bash, ```python, ```text): a stray fence then shows up as
    a block without one instead of silently turning the rest of the page into code."""
    unnamed = [start for language, _, start in blocks(page) if not language]
    assert not unnamed, f"{page.name}: blocks without a language open at lines {unnamed}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_lead_somewhere(page: Path) -> None:
    text = "\n".join(line for line in page.read_text().splitlines())
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
            continue
        path, _, anchor = target.partition("#")
        destination = (page.parent / path).resolve() if path else page
        if not destination.exists():
            broken.append(target)
        elif anchor and destination.suffix == ".md" and anchor not in headings(destination):
            broken.append(target)
    assert not broken, f"{page.name}: links to nothing: {broken}"


def test_every_page_is_reachable_from_the_readme() -> None:
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in LINK.findall((ROOT / "README.md").read_text())}
    assert {page for page in PAGES[1:]} <= linked, "docs/ pages README.md does not link"


def command_lines(page: Path) -> list[tuple[int, list[str]]]:
    """Every `mirasol-*` command in the page's shell blocks, as argv (continuations joined, `&&` chains split)."""
    found = []
    for language, text, start in blocks(page):
        if language not in ("bash", "sh", "shell", "console"):
            continue
        for line in text.replace("\\\n", " ").splitlines():
            line = line.strip().removeprefix("$ ")
            for part in re.split(r"&&|\|\||;|\|", line):
                try:
                    words = shlex.split(part, comments=True)
                except ValueError:
                    continue
                if words and words[0] in SCRIPTS:
                    found.append((start, words))
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_command_line_parses(page: Path) -> None:
    """Each command's own parser accepts what the docs show: no stale option, choice or missing argument."""
    wrong = []
    for start, (script, *args) in command_lines(page):
        parser = parser_of(script)
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                parser.parse_args(args)
        except SystemExit as stop:
            said = err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else ""
            if stop.code not in (0, None) and not any(words in said for words in ABSENT_HERE):
                wrong.append(f"line {start}: {script} {' '.join(args)}\n    {said}")
        except argparse.ArgumentError as error:
            wrong.append(f"line {start}: {script} {' '.join(args)}\n    {error}")
    assert not wrong, f"{page.name}:\n" + "\n".join(wrong)


def test_the_commands_are_found() -> None:
    """The scan sees the commands README shows (it would pass vacuously otherwise)."""
    seen = {words[0] for _, words in command_lines(ROOT / "README.md")}
    assert {"mirasol-export", "mirasol-run", "mirasol-demo"} <= seen


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_python_blocks_compile(page: Path) -> None:
    for language, text, start in blocks(page):
        if language == "python":
            compile(text, f"{page.name}:{start}", "exec")


def test_the_info_sample_is_what_the_command_prints(demo_fp32_bundle: Path) -> None:
    """docs/bundle.md's `--info` sample is the output for the quick start's bundle (versions aside)."""
    from mirasol.runtime.bundle.reader import Bundle
    from mirasol.runtime.cli.bundle_info import describe_bundle

    marked = re.search(r"<!-- output: mirasol-run bundles/demo --info [^>]*-->\n```text\n(.*?)```",
                       (ROOT / "docs" / "bundle.md").read_text(), re.S)
    assert marked, "docs/bundle.md lost its marked --info sample"
    shown = marked.group(1).rstrip().splitlines()
    printed = describe_bundle(Bundle.load(demo_fp32_bundle), "bundles/demo").splitlines()[:len(shown)]

    def versions_aside(lines: list[str]) -> list[str]:
        return [line for line in lines if not line.startswith("written by")]

    size = re.compile(r"(\d+(?:\.\d+)?) (KB|MB|GB)")

    def sized(line: str) -> tuple[str, list[tuple[float, float]]]:
        """The line with its sizes taken out, and each size in KB with the half-step its printing rounds to.

        A graph's size differs by a few KB between exporter versions, which can carry a rounded total across a
        step (2.4 MB printed as 2.5 MB): sizes compare to within 2% plus that rounding."""
        sizes = []
        for number, unit in size.findall(line):
            scale = {"KB": 1, "MB": 1024, "GB": 1024 ** 2}[unit]
            decimals = len(number.partition(".")[2])
            sizes.append((float(number) * scale, 0.5 * 10 ** -decimals * scale))
        return size.sub("<size>", line), sizes

    for got, want in zip(versions_aside(printed), versions_aside(shown), strict=True):
        (got_text, got_sizes), (want_text, want_sizes) = sized(got), sized(want)
        assert got_text == want_text, f"printed {got!r}, docs/bundle.md shows {want!r}"
        assert len(got_sizes) == len(want_sizes) and all(
            abs(g - w) <= 0.02 * w + gr + wr for (g, gr), (w, wr) in zip(got_sizes, want_sizes)), \
            f"printed {got!r}, docs show {want!r}"
