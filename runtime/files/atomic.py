"""Write a directory atomically: build it beside the target, then swap it into place.

Used for bundles (`mirasol-export`) and Triton model repositories (`mirasol-triton`). The target must be ours to
replace (`output.check_output_dir`: new, empty, or a directory of that kind we wrote), checked before anything is
written and again just before the swap. A failed or killed write leaves the target exactly as it was (or, once
the swap has happened, holds the complete new directory); at worst a hidden temporary directory remains beside it,
which the next write to the same target removes.

The swap is one renameat2(RENAME_EXCHANGE) on Linux. Where that is unavailable, the old target is first
renamed to a `-previous` backup and the new directory renamed into place; a process killed between the two
renames leaves the target missing and its backup beside it, and the next export to the target (or
`recover(target)`) puts the backup back before anything else.

Temporary directories are `.<target>.tmp-<random>`. The writer holds an flock on each directory of its own
(its work directory from the moment it has that name, and the old target while it swaps it out) until it is
done, so `recover` touches only leftovers whose writer is gone, whatever its PID and wherever it runs (two
containers sharing a folder both run as PID 1). A writer killed in the moment between creating its work
directory and naming it leaves an empty `.<target>.new-<random>` directory, which nothing removes.
"""
from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from ..errors import ExportError
from .ownership import check_output_dir, directory_mode, fsync

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_BACKUP_SUFFIX = "-previous"


def pause_point(stage: str) -> None:
    """A named stage of writing a bundle. Where the environment names it in MIRASOL_PAUSE_AT (the tests that kill
    an export at a chosen stage), the process says so on stderr and waits there to be killed."""
    if os.environ.get("MIRASOL_PAUSE_AT") == stage:
        print(f"paused at {stage}", file=sys.stderr, flush=True)
        while True:
            time.sleep(60)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2); False where the platform cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def _fsync_tree(directory: Path) -> None:
    """Every file and directory under `directory` (the directory last) reaches the disk."""
    for root, dirs, files in os.walk(directory, topdown=False):
        for name in (*files, *dirs):
            fsync(Path(root) / name)
    fsync(directory)


def _lock(directory: Path, wait: bool = False) -> int | None:
    """An fd holding an exclusive flock on `directory`; None if another writer holds it (or it is gone)."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except OSError:
        os.close(fd)
        return None
    return fd


def recover(target: str | Path) -> None:
    """Undo what killed exports to `target` left: restore a target lost between the fallback's two renames,
    then remove the temporary directories no live writer holds."""
    target = Path(target).absolute()
    for path in sorted(target.parent.glob(f".{target.name}.tmp-*")):
        fd = _lock(path)
        if fd is None:
            continue  # a live writer's, or already gone
        try:
            if path.name.endswith(_BACKUP_SUFFIX) and not os.path.lexists(target):
                path.rename(target)  # the previous target, taken out by a killed fallback swap
            else:
                shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(fd)


def _new_work_directory(target: Path) -> tuple[Path, int]:
    """A fresh, locked `.<target>.tmp-<random>` beside the target (locked before it gets that name)."""
    fresh = Path(tempfile.mkdtemp(prefix=f".{target.name}.new-", dir=target.parent))
    fd = _lock(fresh)
    if fd is None:
        raise OSError(f"cannot lock {fresh}")
    work = fresh.with_name(fresh.name.replace(".new-", ".tmp-", 1))
    os.rename(fresh, work)
    return work, fd


def _swap_in(work: Path, target: Path) -> None:
    """Put `work` in place of `target`, which stays whole (or is put back) if anything fails."""
    if not target.exists():
        work.rename(target)
        return
    held = _lock(target, wait=True)  # the old target, locked while it sits under a temporary name
    try:
        if _exchange(work, target):
            shutil.rmtree(work, ignore_errors=True)  # now holds the previous bundle
            return
        backup = work.with_name(work.name + _BACKUP_SUFFIX)
        target.rename(backup)
        try:
            work.rename(target)
        except BaseException:
            backup.rename(target)
            raise
        shutil.rmtree(backup, ignore_errors=True)
    finally:
        if held is not None:
            os.close(held)


def _reason(error: OSError) -> str:
    return f"{error.strerror or error}" + (f" ({error.filename})" if error.filename else "")


@contextlib.contextmanager
def atomic_directory(target: str | Path, kind: str = "bundle") -> Iterator[Path]:
    """Yield an empty directory; on success it replaces `target` in one step, on failure it is removed.

    `target` must be ours to replace (a `kind` directory, empty, or new); otherwise OutputError before anything
    is written. An OSError while writing (a full disk, a read-only folder) raises ExportError naming the target.
    """
    given = target
    target = check_output_dir(target, kind)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        recover(target)
        work, fd = _new_work_directory(target)
    except OSError as bad:
        raise ExportError(f"cannot write beside {target}: {bad.strerror or bad}") from None
    try:
        try:
            pause_point("temporary directory made")
            yield work
            pause_point("written, before the swap")
            check_output_dir(given, kind)  # still ours: nothing of the user's moved in while we worked
            os.chmod(work, directory_mode(target))
            _fsync_tree(work)
            _swap_in(work, target)
        except OSError as bad:
            raise ExportError(f"writing {target} failed: {_reason(bad)}; {target} was left as it was") from None
        try:
            fsync(target.parent)
        except OSError as bad:
            raise ExportError(f"{target} was written, but its folder could not be synced to disk: {_reason(bad)}"
                              ) from None
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        os.close(fd)


__all__ = ["atomic_directory", "recover"]
