"""How the toolkit writes: every file and folder goes through here, which asks the ownership rule (`ownership.py`)
before any work and again at the moment the work is put in place. Nothing is ever half-written.

- `atomic_file(path, is_ours, what)`: a temporary beside the target (our exact prefix and 128 random bits, created
  with O_EXCL), synced, then put in place. Where the path held nothing of ours when checked, the rename does not
  replace (renameat2 RENAME_NOREPLACE, else link + unlink): a file someone puts there meanwhile is kept and the
  write refused, unless it is one of ours (another writer's save). Where it held our file, the two are exchanged
  (RENAME_EXCHANGE) and what came out is checked: if it is not ours after all, it is put back.
- `atomic_directory(target, kind)`: a directory written whole (a bundle, a Triton model folder), built beside the
  target and swapped in with one renameat2(RENAME_EXCHANGE). The old directory is checked again after the swap: if
  anything not ours reached it in the meantime, the swap is undone and refused. The old copy is then removed file by
  file, only what its manifest or marker accounts for; whatever is not ours (it arrived later still) is moved into
  the new directory, never deleted. Without renameat2 the old target is renamed to a `-previous` backup first; a
  process killed between the two renames leaves it missing and the backup beside it, which the next write to the
  target (or `recover(target)`) puts back.
- `prepare_output_dir` / `write_marker` / `make_directories` / `remove_file`: a directory written into in place, its
  marker, a folder made, and one of our files removed (only if still ours).
- `open_pipe(path)`: an existing named pipe opened for writing (a live source's feed); the open never creates,
  truncates or follows, and what it opened is checked again, so a regular file put there is refused untouched.

The writer holds an flock on each temporary directory of its own (its work directory from the moment it has that
name, and the old target while it swaps it out), so `recover` touches only leftovers whose writer is gone, whatever
its PID and wherever it runs. A writer killed between making its work directory and naming it leaves an empty
`.<target>.mirasol-new-<random>` directory, which nothing removes.

`pause_point(stage)` calls `PAUSE_HOOK` where a test has set it (in its own process; nothing in the environment
reaches it): the tests that kill a writer, or race it, at a named stage.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import stat
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import OutputError
from .ownership import (BACKUP_TAIL, MARKER_FILE, MARKER_FORMAT, TEMPORARY_TAG, OutputFile, check_output_dir,
                        check_output_file, is_ours_now, is_temporary, marker_kind, output_errors, owned_files,
                        owned_name, shown, temporary_name, temporary_stem, why_not_ours)

PAUSE_HOOK: Callable[[str, Path | None], None] | None = None  # set by tests only, in their own process
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_UNSUPPORTED = {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP}
_NEW_TAG = ".mirasol-new-"
_UMASK = os.umask(0)
os.umask(_UMASK)


def pause_point(stage: str, path: Path | None = None) -> None:
    """A named stage of a write to `path` (see the module docstring)."""
    if PAUSE_HOOK is not None:
        PAUSE_HOOK(stage, path)


# ---- renames --------------------------------------------------------------------------------------------------

def _renameat2(source: Path, target: Path, flags: int) -> bool:
    """renameat2(source, target, flags); False where the platform or filesystem has no such rename."""
    try:
        call = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    if call(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in _UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), str(target))


def rename_no_replace(source: Path, target: Path) -> None:
    """Rename `source` to `target` unless `target` exists (FileExistsError then; nothing replaced)."""
    if _renameat2(source, target, _RENAME_NOREPLACE):
        return
    if not source.is_dir():
        try:
            os.link(source, target, follow_symlinks=False)  # fails if target exists
        except FileExistsError:
            raise
        except OSError:  # a filesystem without hard links: the narrowest check left
            pass
        else:
            os.unlink(source)
            return
    if os.path.lexists(target):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target))
    os.rename(source, target)


def fsync(path: Path) -> None:
    """Flush a file or directory to the disk."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- files ----------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], is_ours: Callable[[Path], bool] = owned_name,
                what: str = "file") -> Iterator[Path]:
    """Yield a new temporary path beside `path`; when the block succeeds it is synced and put in place (see the
    module docstring), when it fails it is removed. `path` must be new or hold a regular file `is_ours` recognises
    (default `owned_name`: a name the writer owns in a directory that is ours). Any OSError raises OutputError
    naming `path`."""
    output = check_output_file(path, is_ours, what)
    target = output.path
    with output_errors(target):
        tmp = target.with_name(temporary_name(target.name, target.suffix))
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW, 0o600))
    try:
        with output_errors(target):
            yield tmp
            os.chmod(tmp, _replacing_mode(target, directory=False))
            fsync(tmp)
            pause_point("file written, before it is put in place", target)
            _put_file(tmp, output)
            fsync(target.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_file(path: str | os.PathLike[str], data: bytes | str, is_ours: Callable[[Path], bool] = owned_name,
               what: str = "file") -> Path:
    """`data` written to `path` through `atomic_file`; returns the absolute path."""
    with atomic_file(path, is_ours, what) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
    return Path(path).absolute()


def _put_file(tmp: Path, output: OutputFile) -> None:
    target = output.path
    if not output.replaces:
        try:
            rename_no_replace(tmp, target)
            return
        except FileExistsError:  # something appeared there since the check: replaced below only if it is ours too,
            if output.is_ours is owned_name:  # which only a writer that knows its files by their content can tell
                raise OutputError(_appeared(target, output.what)) from None
    try:
        exchanged = _renameat2(tmp, target, _RENAME_EXCHANGE)
    except FileNotFoundError:  # our old file went away meanwhile
        rename_no_replace(tmp, target)
        return
    if exchanged:  # the previous file is at `tmp` now
        if not is_ours_now(tmp, output):
            _renameat2(tmp, target, _RENAME_EXCHANGE)
            raise OutputError(_appeared(target, output.what))
        os.unlink(tmp)
        return
    if not is_ours_now(target, output):
        raise OutputError(_appeared(target, output.what))
    os.replace(tmp, target)


def _appeared(target: Path, what: str) -> str:
    return (f"{shown(target)} was taken by a file that is not a {what} written by mirasol while the {what} was "
            f"written; that file was kept and nothing was written (choose another path, or remove it yourself)")


def remove_file(path: Path, is_ours: Callable[[Path], bool], what: str) -> bool:
    """Remove `path` if it is a regular file `is_ours` recognises (checked after moving it aside, so a file put
    there meanwhile is put back, not deleted); False if it was not there or not ours."""
    aside = path.with_name(temporary_name(path.name, path.suffix))
    pause_point("file to remove", path)
    with output_errors(path, "cannot remove {path}: {reason}"):
        try:
            rename_no_replace(path, aside)
        except FileNotFoundError:
            return False
        if is_ours_now(aside, OutputFile(path, what, is_ours, True)):
            os.unlink(aside)
            return True
        rename_no_replace(aside, path)
    return False


def _replacing_mode(target: Path, directory: bool) -> int:
    """Permissions for a file (or directory) replacing `target`: the target's own where it is one (never a link's
    target's), else what the umask gives."""
    fresh = (0o777 if directory else 0o666) & ~_UMASK
    try:
        mode = os.lstat(target).st_mode
    except OSError:
        return fresh
    return mode & 0o7777 if (stat.S_ISDIR(mode) if directory else stat.S_ISREG(mode)) else fresh


# ---- named pipes ----------------------------------------------------------------------------------------------

def open_pipe(path: str | os.PathLike[str], what: str = "named pipe") -> BinaryIO | None:
    """The existing named pipe (FIFO) `path`, opened for writing; None while no process has it open for reading
    (call again to wait). Anything else at `path` (nothing, a regular file, a symlink, a device) raises OutputError:
    a pipe's writer would otherwise create or truncate a regular file there. The open never creates, truncates or
    follows a link, and what it opened is checked again, so a file put there meanwhile is refused as it is."""
    given = Path(path)
    with output_errors(given, f"cannot write to the {what} {{path}}: {{reason}}"):
        _require_pipe(os.lstat(given).st_mode, given, what)
        pause_point("pipe checked, before it is opened", given.absolute())
        try:
            fd = os.open(given, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as bad:
            if bad.errno == errno.ENXIO:  # a pipe no one reads yet
                return None
            raise
        try:
            _require_pipe(os.fstat(fd).st_mode, given, what)
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
    return os.fdopen(fd, "wb", buffering=0)


def _require_pipe(mode: int, path: Path, what: str) -> None:
    if stat.S_ISLNK(mode):
        raise OutputError(f"cannot write to the {what} {shown(path)}: it is a symlink (mirasol never writes through "
                          f"one; give the path of the pipe itself)")
    if not stat.S_ISFIFO(mode):
        raise OutputError(f"cannot write to the {what} {shown(path)}: it is not a named pipe (only an existing pipe "
                          f"is written into, never a file; create one with mkfifo)")


# ---- directories written into in place ------------------------------------------------------------------------

def make_directories(path: str | os.PathLike[str], what: str = "directory") -> Path:
    """`path` and its missing parents created (an existing directory is kept as it is); returns it absolute."""
    path = Path(path).absolute()
    with output_errors(path, f"cannot create the {what} {{path}}: {{reason}}"):
        path.mkdir(parents=True, exist_ok=True)
    return path


def prepare_output_dir(path: str | os.PathLike[str], kind: str, legacy: re.Pattern[str] | None = None) -> Path:
    """`check_output_dir`, then create the directory and mark it ours, for writers that fill a directory in
    place (a checkpoint, the benchmark's exports, a cache); returns its absolute path."""
    directory = check_output_dir(path, kind, legacy)
    make_directories(directory, "output directory")
    if marker_kind(directory) != kind:
        write_marker(directory, kind)
    return directory


def write_marker(directory: Path, kind: str, **about: Any) -> None:
    """Mark `directory` as ours, of `kind` (with `about`: what wrote it, from what, how, and for a directory written
    whole the list of its `files`)."""
    write_file(directory / MARKER_FILE, json.dumps({"format": MARKER_FORMAT, "kind": kind, **about}, indent=2) + "\n")


# ---- directories written whole --------------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike[str], kind: str = "bundle") -> Iterator[Path]:
    """Yield an empty directory; on success it replaces `target` in one step, on failure it is removed.

    `target` must be ours to replace (a `kind` directory written whole, empty, or new); otherwise OutputError before
    anything is written. What the block writes must account for itself (a bundle's manifest; for other kinds the
    marker's list of files), so that the next write knows what is ours. An OSError raises OutputError naming it.
    """
    given = target
    target = check_output_dir(target, kind)
    with output_errors(target, "cannot write beside {path}: {reason}"):
        target.parent.mkdir(parents=True, exist_ok=True)
        recover(target)
        work, fd = _new_work_directory(target)
    try:
        with output_errors(target, "writing {path} failed: {reason}; {path} was left as it was"):
            pause_point("temporary directory made", target)
            yield work
            pause_point("written, before the swap", target)
            check_output_dir(given, kind)  # still ours: nothing of the user's moved in while we worked
            os.chmod(work, _replacing_mode(target, directory=True))
            _fsync_tree(work)
            pause_point("checked, before the swap", target)
            _swap_in(work, target, kind)
        with output_errors(target, "{path} was written, but its folder could not be synced to disk: {reason}"):
            fsync(target.parent)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)  # our own work directory (or, after a refused swap, our new copy)
        raise
    finally:
        os.close(fd)


def _swap_in(work: Path, target: Path, kind: str) -> None:
    """Put `work` in place of `target`; refused (target as it was) if the old target is no longer ours."""
    if not os.path.lexists(target):
        try:
            rename_no_replace(work, target)
            return
        except FileExistsError:
            pass  # something appeared there since the check: swapped below only if it is ours
    held = _lock(target, wait=True)  # the old target, locked while it sits under a temporary name
    try:
        if _renameat2(work, target, _RENAME_EXCHANGE):
            old, undo = work, lambda: _renameat2(work, target, _RENAME_EXCHANGE)
        else:
            old = work.with_name(work.name + BACKUP_TAIL)
            os.rename(target, old)
            pause_point("old moved aside", target)
            try:
                rename_no_replace(work, target)
            except BaseException:
                os.rename(old, target)
                raise
            undo = lambda: (os.rename(target, work), os.rename(old, target))  # noqa: E731
        why = why_not_ours(old, kind)
        if why:
            undo()
            _remove_owned(work, kind, target)
            raise OutputError(f"{shown(target)} changed while it was written: it {why}; it was left as it is now, and "
                              f"nothing was replaced")
        pause_point("swapped, old copy not yet removed", target)
        _remove_owned(old, kind, target)
    finally:
        if held is not None:
            os.close(held)


def _remove_owned(old: Path, kind: str, target: Path) -> None:
    """Delete what is ours in `old` (the copy swapped out, or our refused new one), file by file; move whatever
    else is there into `target`; anything that cannot go there keeps `old` under a name the user sees."""
    if not os.path.isdir(old) or os.path.islink(old):
        return
    for rel in sorted(owned_files(old, kind), key=lambda r: r.count("/"), reverse=True):
        with contextlib.suppress(OSError):
            (os.rmdir if os.path.isdir(old / rel) else os.unlink)(old / rel)
    with contextlib.suppress(OSError):
        os.rmdir(old)
        return
    kept = _put_back(old, target)
    if not kept:
        os.rmdir(old)
    else:
        home = target.with_name(f"{target.name}.kept-{secrets.token_hex(4)}")
        os.rename(old, home)
        warnings.warn(f"{len(kept)} entries that appeared in {shown(target)} while it was replaced could not be put "
                      f"back beside the new files ({kept[0]!r}...); they are in {shown(home)}", stacklevel=3)


def _put_back(source: Path, target: Path) -> list[str]:
    """Move every entry of `source` into the same place under `target` (merging folders); what cannot move."""
    kept = []
    for name in sorted(os.listdir(source)):
        here, there = source / name, target / name
        if os.path.isdir(here) and not os.path.islink(here) and os.path.isdir(there) and not os.path.islink(there):
            kept += [f"{name}/{k}" for k in _put_back(here, there)]
            with contextlib.suppress(OSError):
                os.rmdir(here)
            continue
        try:
            rename_no_replace(here, there)
        except OSError:
            kept.append(name)
    return kept


def recover(target: str | os.PathLike[str]) -> None:
    """Undo what killed writes to `target` left: restore a target lost between the fallback's two renames, then
    remove the temporary directories (named exactly as ours) that no live writer holds."""
    target = Path(target).absolute()
    stem = temporary_stem(target.name)
    try:
        names = sorted(os.listdir(target.parent))
    except OSError:
        return
    for name in names:
        path = target.parent / name
        if not (name.startswith(stem) and is_temporary(name)) or os.path.islink(path) or not path.is_dir():
            continue
        fd = _lock(path)
        if fd is None:
            continue  # a live writer's, or already gone
        try:
            if name.endswith(BACKUP_TAIL) and not os.path.lexists(target):
                rename_no_replace(path, target)  # the previous target, taken out by a killed fallback swap
            else:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass
        finally:
            os.close(fd)


def _new_work_directory(target: Path) -> tuple[Path, int]:
    """A fresh, locked `.<target>.mirasol-tmp-<random>` beside the target (locked before it gets that name)."""
    fresh = target.parent / temporary_name(target.name, tag=_NEW_TAG)
    os.mkdir(fresh, 0o700)
    fd = _lock(fresh)
    if fd is None:
        raise OSError(errno.EAGAIN, "cannot lock the temporary directory", str(fresh))
    work = fresh.with_name(fresh.name.replace(_NEW_TAG, TEMPORARY_TAG, 1))
    rename_no_replace(fresh, work)
    return work, fd


def _fsync_tree(directory: Path) -> None:
    """Every file and directory under `directory` (the directory last) reaches the disk."""
    for root, dirs, files in os.walk(directory, topdown=False):
        for name in (*files, *dirs):
            if not os.path.islink(Path(root) / name):
                fsync(Path(root) / name)
    fsync(directory)


def _lock(directory: Path, wait: bool = False) -> int | None:
    """An fd holding an exclusive flock on `directory`; None if another writer holds it (or it is gone)."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except OSError:
        os.close(fd)
        return None
    return fd


__all__ = ["PAUSE_HOOK", "atomic_directory", "atomic_file", "fsync", "is_temporary", "make_directories",
           "open_pipe", "pause_point", "prepare_output_dir", "recover", "remove_file", "rename_no_replace",
           "write_file", "write_marker"]
