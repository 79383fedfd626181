"""Write a directory atomically: build it beside the target, then swap it into place.

Used for bundles (`mirasol-export`) and Triton model repositories (`mirasol-triton`). A failed or killed write
leaves the target exactly as it was (or, once the swap has happened, holds the complete new directory); at worst
a hidden temporary directory remains beside it, which the next write to the same target removes.

The swap is one renameat2(RENAME_EXCHANGE) on Linux. Where that is unavailable, the old target is first
renamed to a `-previous` backup and the new directory renamed into place; a process killed between the two
renames leaves the target missing and its backup beside it, and the next export to the target (or
`recover(target)`) puts the backup back before anything else.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import ExportError

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_BACKUP_SUFFIX = "-previous"
_OURS: set[str] = set()  # temporary directories this process is writing now


def pause_point(stage: str) -> None:
    """A named stage of writing a directory. Where the environment names it in MIRASOL_PAUSE_AT (the tests that
    kill an export at a chosen stage), the process says so on stderr and waits there to be killed."""
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


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(directory: Path) -> None:
    """Every file and directory under `directory` (the directory last) reaches the disk."""
    for root, dirs, files in os.walk(directory, topdown=False):
        for name in files:
            _fsync_path(Path(root) / name)
        for name in dirs:
            _fsync_path(Path(root) / name)
    _fsync_path(directory)


def _pid_of(path: Path) -> int | None:
    try:
        return int(path.name.rsplit(".tmp-", 1)[1].split("-", 1)[0])
    except (ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover(target: str | Path) -> None:
    """Undo what a killed export to `target` left: restore a target lost between the fallback's two renames,
    then remove the temporary directories of exports whose process is gone."""
    target = Path(target).absolute()
    leftovers = sorted(target.parent.glob(f".{target.name}.tmp-*"))
    for path in leftovers:
        if path.name.endswith(_BACKUP_SUFFIX) and not target.exists() and not os.path.lexists(target):
            pid = _pid_of(path)
            if pid is not None and (pid == os.getpid() or not _alive(pid)) and str(path) not in _OURS:
                path.rename(target)  # the previous target, taken out by a killed fallback swap
    for path in leftovers:
        if not path.exists() or str(path) in _OURS or str(path).removesuffix(_BACKUP_SUFFIX) in _OURS:
            continue
        pid = _pid_of(path)
        if pid is None:
            continue
        # A pid can come back (containers start every run at the same low pid): our own pid is stale here,
        # since this process's live directories are in _OURS.
        if pid == os.getpid() or not _alive(pid):
            shutil.rmtree(path, ignore_errors=True)


def _mode_for(target: Path) -> int:
    """Keep the target's permissions; a new target gets what the umask gives a new directory."""
    if target.is_dir():
        return target.stat().st_mode & 0o7777
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


@contextlib.contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield an empty directory; on success it replaces `target` in one step, on failure it is removed."""
    target = Path(target).absolute()
    if os.path.lexists(target) and (target.is_symlink() or not target.is_dir()):
        raise ExportError(f"{target} exists and is not a directory; choose another --out or remove it")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as bad:
        raise ExportError(f"cannot create the parent directory of {target}: {bad}") from None
    recover(target)
    try:
        work = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    except OSError as bad:
        raise ExportError(f"cannot write beside {target}: {bad}") from None
    _OURS.add(str(work))
    try:
        pause_point("temporary directory made")
        yield work
        pause_point("written, before the swap")
        os.chmod(work, _mode_for(target))
        _fsync_tree(work)
        if not target.exists():
            work.rename(target)
        elif _exchange(work, target):
            shutil.rmtree(work)  # now holds the previous bundle
        else:
            backup = work.with_name(work.name + _BACKUP_SUFFIX)
            target.rename(backup)
            try:
                work.rename(target)
            except BaseException:
                backup.rename(target)
                raise
            shutil.rmtree(backup)
        _fsync_path(target.parent)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        _OURS.discard(str(work))
