"""Copying files we are told about, and nothing else: how `mirasol-triton` copies a bundle into a repository.

Only the names given are copied (a bundle: the files its manifest lists), each one a regular file opened without
following a link and without blocking (a symlink, FIFO, device or directory is refused before anything is read), read
up to the size it had when opened and checked against the size and sha256 expected of it. Nothing else in the source
directory is looked at, so a link to a secret, to `..` or to /dev/zero there reads nothing and fills no disk.
"""
from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import BundleError
from .ownership import output_errors, shown

BLOCK = 1 << 22


@dataclass(frozen=True)
class Expected:
    """What a copied file must be: its sha256 (None: not known) and its size in bytes (None: not known), and at
    most `max_bytes` where neither pins it."""

    sha256: str | None = None
    size: int | None = None
    max_bytes: int | None = None


def copy_listed(source: Path, target: Path, files: Mapping[str, Expected], what: str = "file") -> None:
    """Copy each plain file name of `files` from `source` into the directory `target` (created, new), checked as
    the module docstring says. A source file that is not as expected raises BundleError naming it; an OSError
    while writing raises OutputError naming the target."""
    with output_errors(target, "cannot create {path}: {reason}"):
        target.mkdir(parents=True)
    for name, expected in files.items():
        if not name or "/" in name or name in (".", ".."):
            raise BundleError(f"{shown(source)}: {name!r} is not a plain file name")
        _copy_one(source / name, target / name, expected, what)


def _copy_one(source: Path, target: Path, expected: Expected, what: str) -> None:
    try:
        fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as bad:
        reason = "it is a symlink (only regular files are copied)" if _is_link(source) else bad.strerror or str(bad)
        raise BundleError(f"{shown(source)}: the {what} cannot be copied: {reason}") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise BundleError(f"{shown(source)}: the {what} is not a regular file (a directory, FIFO, socket or "
                              f"device); only regular files are copied")
        size = info.st_size
        limit = expected.size if expected.size is not None else expected.max_bytes
        if (expected.size is not None and size != expected.size) or (limit is not None and size > limit):
            raise BundleError(f"{shown(source)}: the {what} is {size} bytes, "
                              f"{'expected' if expected.size is not None else 'over the limit of'} {limit}")
        digest = hashlib.sha256()
        copied = 0
        with output_errors(target), open(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW, 0o644),
                                          "wb") as out:
            while copied <= size and (block := f.read(min(BLOCK, size + 1 - copied))):
                digest.update(block)
                out.write(block)
                copied += len(block)
    if copied != size:
        raise BundleError(f"{shown(source)}: the {what} changed while it was copied ({copied} bytes, {size} expected)")
    if expected.sha256 is not None and digest.hexdigest() != expected.sha256:
        raise BundleError(f"{shown(source)}: the {what}'s sha256 is {digest.hexdigest()[:12]}…, the manifest says "
                          f"{expected.sha256[:12]}… (altered, or changed while copied); re-export the bundle")


def _is_link(path: Path) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(path).st_mode)
    except OSError:
        return False


__all__ = ["Expected", "copy_listed"]
