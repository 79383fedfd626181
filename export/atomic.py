"""Write a directory atomically: build it beside the target, then swap it into place.

A failed or killed export leaves the target exactly as it was; at worst a hidden temporary directory
remains beside it, which the next export to the same target removes.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2); False where the platform cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def _fsync_tree(directory: Path) -> None:
    for path in [*directory.iterdir(), directory]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove_stale(target: Path) -> None:
    """Temporary directories of earlier exports to `target` whose process is gone."""
    for path in target.parent.glob(f".{target.name}.tmp-*"):
        try:
            pid = int(path.name.rsplit(".tmp-", 1)[1].split("-", 1)[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            continue


@contextlib.contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield an empty directory; on success it replaces `target` in one step, on failure it is removed."""
    target = Path(target).absolute()
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(target)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    try:
        yield work
        _fsync_tree(work)
        if not target.exists():
            work.rename(target)
        elif _exchange(work, target):
            shutil.rmtree(work)  # now holds the previous bundle
        else:
            backup = work.with_name(work.name + "-previous")
            target.rename(backup)
            work.rename(target)
            shutil.rmtree(backup)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
