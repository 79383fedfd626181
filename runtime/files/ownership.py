"""Where the toolkit writes: an existing path is replaced, or written into, only if it is ours.

The rule (DESIGN.md, property 5), checked before any work starts:
- a path that does not exist is created; an existing empty directory is filled;
- an existing directory is replaced (or written into) only when it is ours, of the kind being written: a
  bundle is recognised by its manifest (format "mirasol-bundle") and holds nothing but the files a bundle
  holds; every other kind (a checkpoint, the benchmark's exports, a calibration cache) by the marker file
  `.mirasol-output` that `prepare_output_dir` writes into it;
- an existing file is replaced only when the writer recognises it as its own (a stream state file, a demo
  clip), or when it has a name the writer owns inside a directory that is ours (a bundle's manifest, engines
  `<graph>.<precision>.engine` and timing cache; a checkpoint's config and weights);
- `.`, `..`, `~`, `/`, the home directory, the working directory and its parents, and mount points are never
  outputs, empty or not;
- anything else raises OutputError naming the path, and nothing is written.

Files are written through `atomic_file`: a unique temporary name beside the target (created with O_EXCL),
fsync, rename; the last complete write wins and the target never holds half a file.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import stat
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from ..bundle.json_reader import parse_json
from ..bundle.manifest import FORMAT_NAME, MANIFEST_FILE
from ..bundle.precisions import NAMES as PRECISIONS
from ..errors import MirasolError, OutputError

MARKER_FILE = ".mirasol-output"
MARKER_FORMAT = "mirasol-output"
MAX_MARKER_BYTES = 1 << 16
# Files a bundle holds beside those its manifest names: the manifest itself, TensorRT's timing cache, and the
# folder of ONNX Runtime's TensorRT provider caches (backends/onnxruntime_device.py; marked by prepare_output_dir).
BUNDLE_FILES = (MANIFEST_FILE, "timing.cache", "onnxruntime-tensorrt")
_TEMPORARY = re.compile(r"\..+\.tmp(\.[^.]+)?")  # what atomic_file leaves if its process is killed
_UMASK = os.umask(0)
os.umask(_UMASK)


def check_output_dir(path: str | os.PathLike[str], kind: str, legacy: re.Pattern[str] | None = None) -> Path:
    """Refuse `path` as an output directory of `kind` ("bundle", "checkpoint", ...) unless the rule above allows
    it; returns its absolute path. `legacy`: entry names that make a directory without the marker ours too
    (directories written before markers existed). Writes nothing."""
    given = _as_path(path)
    _refuse_special(given)
    absolute = given.absolute()
    if absolute.is_symlink():
        raise OutputError(f"{given} is a symlink; give the directory it points to, or another path")
    if not os.path.lexists(absolute):
        ancestor = next(p for p in absolute.parents if os.path.lexists(p))
        if not ancestor.is_dir():
            raise OutputError(f"cannot create the parent directory of {given}: {ancestor} is not a directory")
        return absolute
    if not absolute.is_dir():
        raise OutputError(f"{given} exists and is not a directory; choose another output path")
    try:
        entries = sorted(os.listdir(absolute))
    except OSError as bad:
        raise OutputError(f"{given} cannot be listed: {bad.strerror or bad}") from None
    why = _why_not_ours(absolute, kind, entries, legacy) if entries else None
    if why:
        raise OutputError(f"{given} exists and {why}; nothing was written (choose another output path, or move "
                          f"its contents away yourself)")
    return absolute


def prepare_output_dir(path: str | os.PathLike[str], kind: str, legacy: re.Pattern[str] | None = None) -> Path:
    """`check_output_dir`, then create the directory and mark it ours, for writers that fill a directory in
    place (a checkpoint, the benchmark's exports, a cache); returns its absolute path."""
    directory = check_output_dir(path, kind, legacy)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if _marker(directory) != kind:
            write_marker(directory, kind)
    except OSError as bad:
        raise OutputError(f"cannot create the output directory {path}: {bad.strerror or bad}") from None
    return directory


def write_marker(directory: Path, kind: str, **about: Any) -> None:
    """Mark `directory` as ours, of `kind` (with `about`: what wrote it, from what, how; for people to read)."""
    with atomic_file(directory / MARKER_FILE) as tmp:
        tmp.write_text(json.dumps({"format": MARKER_FORMAT, "kind": kind, **about}, indent=2) + "\n")


def check_output_file(path: str | os.PathLike[str], is_ours: Callable[[Path], bool], what: str) -> Path:
    """Refuse `path` as an output file unless it is new or `is_ours(path)` says the existing file is ours;
    its directory must exist. Returns its absolute path; writes nothing."""
    given = _as_path(path)
    absolute = given.absolute()
    if given.name in ("", ".", "..", "~"):
        raise OutputError(f"{given} is not a file name; give the path of the {what} to write")
    if not absolute.parent.is_dir():
        raise OutputError(f"cannot write the {what} {given}: its directory {given.parent} does not exist")
    try:
        mode = os.lstat(absolute).st_mode
    except FileNotFoundError:
        return absolute
    except OSError as bad:
        raise OutputError(f"cannot write the {what} {given}: {bad.strerror or bad}") from None
    if stat.S_ISDIR(mode):
        raise OutputError(f"cannot write the {what} {given}: it is a directory")
    if not stat.S_ISREG(mode):
        raise OutputError(f"cannot write the {what} {given}: it exists and is not a regular file")
    if not is_ours(absolute):
        raise OutputError(f"{given} exists and is not a {what} written by mirasol; nothing was written (choose "
                          f"another path, or remove it yourself)")
    return absolute


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a new temporary path beside `path` (same suffix, unique, created with O_EXCL); when the block
    succeeds it is synced to disk and renamed over `path`, when it fails it is removed. An OSError of the
    block or of the rename raises OutputError naming `path`."""
    target = Path(path).absolute()
    try:
        fd, name = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=f".tmp{target.suffix}", dir=target.parent)
    except OSError as bad:
        raise OutputError(f"cannot write {target}: {bad.strerror or bad}") from None
    os.close(fd)
    tmp = Path(name)
    try:
        try:
            yield tmp
            os.chmod(tmp, _file_mode(target))
            fsync(tmp)
            os.replace(tmp, target)
            fsync(target.parent)
        except OSError as bad:
            raise OutputError(f"cannot write {target}: {bad.strerror or bad}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def fsync(path: Path) -> None:
    """Flush a file or directory to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def directory_mode(target: Path) -> int:
    """Permissions for a directory replacing `target`: the target's own, else what the umask gives."""
    return target.stat().st_mode & 0o7777 if target.is_dir() else 0o777 & ~_UMASK


def _file_mode(target: Path) -> int:
    return target.stat().st_mode & 0o7777 if target.is_file() else 0o666 & ~_UMASK


def _as_path(path: Any) -> Path:
    if not isinstance(path, (str, os.PathLike)) or not isinstance(os.fspath(path), str):
        raise OutputError(f"an output path must be a str or an os.PathLike, got {type(path).__name__}")
    return Path(path)


def _refuse_special(path: Path) -> None:
    """`.`, `..`, `~`, `/`, home, the working directory and its parents, mount points: never an output."""
    if path.name in ("", ".", "..", "~"):
        raise OutputError(f"{str(path)!r} is not an output directory mirasol writes; give a new or empty "
                          f"directory (e.g. {Path('bundles') / 'NAME'})")
    try:
        resolved = path.resolve()
        home = Path.home().resolve()
        cwd = Path.cwd().resolve()
    except (OSError, RuntimeError, KeyError) as bad:  # a symlink loop, a vanished working directory, no home
        raise OutputError(f"{path} cannot be resolved: {bad}") from None
    if resolved == home or resolved == cwd or resolved in cwd.parents:
        what = "the home directory" if resolved == home else "the working directory or one of its parents"
        raise OutputError(f"{path} is {what}; mirasol writes outputs only into a new or empty directory of "
                          f"their own")
    if os.path.ismount(resolved):
        raise OutputError(f"{path} is a mount point; give a new or empty directory inside it")


def _why_not_ours(directory: Path, kind: str, entries: list[str], legacy: re.Pattern[str] | None) -> str | None:
    """None when the non-empty `directory` is ours of `kind`; else why not, in words."""
    if kind == "bundle":
        return _why_not_a_bundle(directory, entries)
    marker = _marker(directory)
    if marker == kind or (marker is None and legacy is not None and all(legacy.fullmatch(e) for e in entries)):
        return None
    if marker is not None:
        return f"is a mirasol {marker}, not a {kind}"
    return f"is not a {kind} written by mirasol (it holds {_some(entries)})"


def _why_not_a_bundle(directory: Path, entries: list[str]) -> str | None:
    try:
        with open(directory / MANIFEST_FILE, "rb") as f:
            data = parse_json(f.read(16 << 20), str(directory / MANIFEST_FILE))
    except (OSError, MirasolError):
        data = None
    if not isinstance(data, Mapping) or data.get("format") != FORMAT_NAME:
        return f"is not a mirasol bundle (no mirasol manifest.json; it holds {_some(entries)})"
    foreign = [e for e in entries if e not in _bundle_names(data) and not _TEMPORARY.fullmatch(e)]
    if foreign:
        return f"is a mirasol bundle that also holds {_some(foreign)}, which mirasol did not write"
    return None


def _bundle_names(manifest: Mapping[str, Any]) -> set[str]:
    """The file names a bundle manifest accounts for (read leniently: any format version)."""
    names = set(BUNDLE_FILES)
    graphs = manifest.get("graphs")
    for name, graph in graphs.items() if isinstance(graphs, Mapping) else ():
        if not isinstance(graph, Mapping):
            continue
        names.update(f"{name}.{precision}.engine" for precision in PRECISIONS)  # engines built earlier, recorded or not
        names.add(str(graph.get("file")))
        extras = graph.get("external_data")
        if isinstance(extras, list):
            names.update(e for e in extras if isinstance(e, str))
        engine = graph.get("engine")
        if isinstance(engine, Mapping):
            names.add(str(engine.get("file")))
    return names


def _marker(directory: Path) -> str | None:
    """The kind our marker file in `directory` names, or None."""
    try:
        with open(directory / MARKER_FILE, "rb") as f:
            data = parse_json(f.read(MAX_MARKER_BYTES), str(directory / MARKER_FILE))
    except (OSError, MirasolError):
        return None
    if isinstance(data, Mapping) and data.get("format") == MARKER_FORMAT and isinstance(data.get("kind"), str):
        return data["kind"]
    return None


def _some(entries: list[str], limit: int = 3) -> str:
    shown = ", ".join(repr(e) for e in entries[:limit])
    return shown + (f" and {len(entries) - limit} more" if len(entries) > limit else "")


__all__ = ["MARKER_FILE", "atomic_file", "check_output_dir", "check_output_file", "directory_mode", "fsync",
           "prepare_output_dir"]
