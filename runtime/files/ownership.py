"""The ownership rule: may the toolkit write, or replace, this path? Policy only, nothing here writes: how a write
is made (atomically, re-checked at the moment it is put in place) is `atomic.py`, which asks this module.

The rule (DESIGN.md, property 5), checked before any work starts and again when the work is put in place:
- a path that does not exist is created; an existing empty directory is filled;
- an existing directory is replaced (or written into) only when it is ours, of the kind being written:
  - a bundle is recognised by its manifest (format "mirasol-bundle") and holds nothing but the files that manifest
    accounts for (graphs, external data, engines, the manifest, TensorRT's timing cache) and our temporaries;
  - a directory written whole (a Triton model folder) by our marker file `.mirasol-output`, which names its kind
    and lists every file written into it: it holds nothing else;
  - a directory written into in place (a checkpoint, the benchmark's exports, a cache) by the marker naming its
    kind (or, written before markers existed, `legacy`: only names that writer gives its files);
- an existing file is replaced only when it is a regular file the writer recognises as its own (a stream state file,
  a demo clip, a benchmark report), or one with a name the writer owns inside a directory that is ours (a bundle's
  manifest and engines, a checkpoint's weights: `owned_name`); never through a symlink;
- `.`, `..`, `~`, `/`, the home directory, the working directory and its parents, and mount points are never
  outputs, empty or not;
- our temporaries are `.<name>.mirasol-tmp-<32 hex digits>[suffix]` (`temporary_name`): our exact prefix and 128
  random bits. Nothing else is taken for a leftover of ours, so `.notes.tmp.txt` stays the user's;
- anything else raises OutputError naming the path, and nothing is written. So does any OSError met while
  checking or writing (`output_errors`: the one place an OSError becomes an OutputError).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import stat
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..bundle.json_reader import parse_json
from ..bundle.manifest import FORMAT_NAME, MANIFEST_FILE
from ..bundle.precisions import NAMES as PRECISIONS
from ..errors import MirasolError, OutputError

MARKER_FILE = ".mirasol-output"
MARKER_FORMAT = "mirasol-output"
MAX_MARKER_BYTES = 1 << 20
# Files a bundle holds beside those its manifest names: the manifest itself and TensorRT's timing cache.
BUNDLE_FILES = (MANIFEST_FILE, "timing.cache")
# Folders a bundle may hold: name -> the kind prepare_output_dir marked it with; ours whole when so marked (ONNX
# Runtime's TensorRT provider writes its engine and timing caches there: backends/onnxruntime_device.py).
BUNDLE_FOLDERS = {"onnxruntime-tensorrt": "onnxruntime-tensorrt cache"}
TEMPORARY_TAG = ".mirasol-tmp-"
BACKUP_TAIL = "-previous"  # a target moved aside while a directory is swapped without renameat2
_TEMPORARY = re.compile(r"\..{1,40}\.mirasol-(tmp|new)-[0-9a-f]{32}(-previous|\.[A-Za-z0-9_]{1,16})?", re.S)
_MAX_SHOWN = 160  # characters of a path shown in a message


def temporary_stem(name: str) -> str:
    """`.<name>.mirasol-tmp-`: what every temporary of ours beside (or for) `name` starts with (a long name is
    shortened, with a digest of the whole name, so the temporary's name stays within NAME_MAX)."""
    if len(name) > 40:
        name = name[:31] + "~" + hashlib.sha256(os.fsencode(name)).hexdigest()[:8]
    return f".{name}{TEMPORARY_TAG}"


def temporary_name(name: str, suffix: str = "", tag: str = TEMPORARY_TAG) -> str:
    """A fresh temporary name for a file or directory `name`: its stem, 128 random bits, and `suffix` (a file
    keeps its target's suffix, which numpy and FFmpeg go by; a suffix that is not a short plain one is dropped)."""
    suffix = suffix if re.fullmatch(r"\.[A-Za-z0-9_]{1,16}", suffix) else ""
    return temporary_stem(name)[:-len(TEMPORARY_TAG)] + tag + secrets.token_hex(16) + suffix


def is_temporary(name: str) -> bool:
    """Whether `name` is one of our temporaries (exactly: our tag and 32 random hex digits), never a user's file."""
    return _TEMPORARY.fullmatch(name) is not None


def shown(path: Any) -> str:
    """A path as messages show it: whole, or its start and end when it is very long."""
    text = os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else repr(path)
    return text if len(text) <= _MAX_SHOWN else f"{text[:100]}…{text[-40:]} ({len(text)} characters)"


@contextlib.contextmanager
def output_errors(path: Any, message: str = "cannot write {path}: {reason}") -> Iterator[None]:
    """Any OSError inside the block becomes one OutputError, `message` with the path (`shown`) and the reason."""
    try:
        yield
    except OSError as bad:
        reason = bad.strerror or str(bad) or type(bad).__name__
        raise OutputError(message.format(path=shown(path), reason=reason)) from None


# ---- directories ----------------------------------------------------------------------------------------------

def check_output_dir(path: str | os.PathLike[str], kind: str, legacy: re.Pattern[str] | None = None) -> Path:
    """Refuse `path` as an output directory of `kind` ("bundle", "checkpoint", ...) unless the rule above allows
    it; returns its absolute path. Writes nothing."""
    given = _as_path(path)
    with output_errors(given, "cannot use {path} as an output: {reason}"):
        _refuse_special(given)
        absolute = given.absolute()
        if not os.path.lexists(absolute):
            ancestor = next(p for p in absolute.parents if os.path.lexists(p))
            if not ancestor.is_dir():
                raise OutputError(f"cannot create the parent directory of {shown(given)}: {shown(ancestor)} is not a "
                                  f"directory")
            return absolute
        if absolute.is_symlink():
            raise OutputError(f"{shown(given)} is a symlink; give the directory it points to, or another path")
        if not absolute.is_dir():
            raise OutputError(f"{shown(given)} exists and is not a directory; choose another output path")
        why = why_not_ours(absolute, kind, legacy)
    if why:
        raise OutputError(f"{shown(given)} exists and {why}; nothing was written (choose another output path, or "
                          f"move its contents away yourself)")
    return absolute


def why_not_ours(directory: Path, kind: str, legacy: re.Pattern[str] | None = None) -> str | None:
    """None when the existing `directory` (not followed if a link) is empty or ours of `kind`; else why not, in
    words that follow "it" ("is a symlink", "is a mirasol bundle that also holds 'notes.txt', ...")."""
    mode = os.lstat(directory).st_mode
    if stat.S_ISLNK(mode):
        return "is a symlink"
    if not stat.S_ISDIR(mode):
        return "is not a directory"
    entries = sorted(os.listdir(directory))
    if not entries:
        return None
    if kind == "bundle":
        return _why_not_a_bundle(directory, entries)
    about = read_marker(directory)
    marker = about.get("kind") if about else None
    if marker == kind and isinstance(about, Mapping) and "files" in about:
        foreign = sorted(set(_entries(directory)) - owned_files(directory, kind))
        return f"is a mirasol {kind} that also holds {_some(foreign)}, which mirasol did not write" if foreign else None
    if marker == kind or (marker is None and legacy is not None and all(legacy.fullmatch(e) for e in entries)):
        return None
    if marker is not None:
        return f"is a mirasol {marker}, not a {kind}"
    return f"is not a {kind} written by mirasol (it holds {_some(entries)})"


def owned_files(directory: Path, kind: str) -> set[str]:
    """The entries (relative, '/'-separated) under a directory written whole that are ours to delete when it is
    replaced: the regular files its manifest or marker accounts for, our temporary files, and the folders that lead
    to them. Everything else (a user's file, any symlink) is not, wherever it sits."""
    entries = _entries(directory)
    if kind == "bundle":
        manifest = _bundle_manifest(directory)
        known = _bundle_names(manifest) if manifest is not None else set()
        folders = {name for name in BUNDLE_FOLDERS if name in entries and _our_folder(directory, name)}
        return {n for n, what in entries.items() if (what == "file" and (n in known or is_temporary(n)))
                or n in folders or n.split("/", 1)[0] in folders}
    about = read_marker(directory)
    listed = about.get("files") if isinstance(about, Mapping) and about.get("kind") == kind else None
    if not isinstance(listed, list):
        return set()
    ours = {MARKER_FILE, *(f for f in listed if isinstance(f, str))}
    files = {n for n, what in entries.items() if what == "file" and (n in ours or is_temporary(n.rpartition("/")[2]))}
    folders = {str(parent.as_posix()) for n in files for parent in Path(n).parents if str(parent) != "."}
    return files | {f for f in folders if entries.get(f) == "dir"}


def _entries(directory: Path) -> dict[str, str]:
    """Every entry under `directory`, links not followed: relative path -> "dir", "file" (regular) or "other"."""
    found: dict[str, str] = {}
    for root, dirs, files in os.walk(directory):
        base = Path(root).relative_to(directory)
        for name in (*dirs, *files):
            mode = os.lstat(Path(root) / name).st_mode
            found[(base / name).as_posix()] = ("dir" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode)
                                               else "other")
    return found


def _why_not_a_bundle(directory: Path, entries: list[str]) -> str | None:
    manifest = _bundle_manifest(directory)
    if manifest is None:
        return f"is not a mirasol bundle (no mirasol manifest.json; it holds {_some(entries)})"
    names = _bundle_names(manifest)
    foreign = [e for e in entries if not _our_folder(directory, e)
               and (not (e in names or is_temporary(e)) or not _is_file(directory / e))]
    if foreign:
        return f"is a mirasol bundle that also holds {_some(foreign)}, which mirasol did not write"
    return None


def _our_folder(directory: Path, name: str) -> bool:
    """Whether the entry `name` of a bundle is one of its folders (BUNDLE_FOLDERS), marked ours of that kind."""
    kind = BUNDLE_FOLDERS.get(name)
    path = directory / name
    return kind is not None and stat.S_ISDIR(os.lstat(path).st_mode) and why_not_ours(path, kind) is None


def _is_file(path: Path) -> bool:
    return stat.S_ISREG(os.lstat(path).st_mode)


def _bundle_manifest(directory: Path) -> Mapping[str, Any] | None:
    try:
        fd = os.open(directory / MANIFEST_FILE, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as f:
            data = parse_json(f.read(16 << 20), str(directory / MANIFEST_FILE))
    except (OSError, MirasolError):
        return None
    return data if isinstance(data, Mapping) and data.get("format") == FORMAT_NAME else None


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


def read_marker(directory: Path) -> Mapping[str, Any] | None:
    """Our marker file in `directory` (a JSON object naming our format and a kind), or None."""
    try:
        fd = os.open(directory / MARKER_FILE, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as f:
            data = parse_json(f.read(MAX_MARKER_BYTES), str(directory / MARKER_FILE))
    except (OSError, MirasolError):
        return None
    if isinstance(data, Mapping) and data.get("format") == MARKER_FORMAT and isinstance(data.get("kind"), str):
        return data
    return None


def marker_kind(directory: Path) -> str | None:
    about = read_marker(directory)
    return about["kind"] if about else None


# ---- files ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OutputFile:
    """A file the rule allows writing: where, what it is, how the writer recognises its own, and whether such a
    file of ours was there when checked (if not, the write may not replace anything: atomic.py renames without
    replacing)."""

    path: Path
    what: str
    is_ours: Callable[[Path], bool]
    replaces: bool


def owned_name(path: Path) -> bool:
    """For a file with a name the writer owns, inside a directory that is ours: any regular file there is ours."""
    return True


def check_output_file(path: str | os.PathLike[str], is_ours: Callable[[Path], bool], what: str) -> OutputFile:
    """Refuse `path` as an output file unless it is new or `is_ours(path)` says the existing regular file is ours;
    its directory must exist. Writes nothing."""
    given = _as_path(path)
    absolute = given.absolute()
    if given.name in ("", ".", "..", "~"):
        raise OutputError(f"{shown(given)} is not a file name; give the path of the {what} to write")
    with output_errors(given, f"cannot write the {what} {{path}}: {{reason}}"):
        if not absolute.parent.is_dir():
            raise OutputError(f"cannot write the {what} {shown(given)}: its directory {shown(given.parent)} does not "
                              f"exist")
        try:
            mode = os.lstat(absolute).st_mode
        except FileNotFoundError:
            return OutputFile(absolute, what, is_ours, replaces=False)
        if stat.S_ISDIR(mode):
            raise OutputError(f"cannot write the {what} {shown(given)}: it is a directory")
        if stat.S_ISLNK(mode):
            raise OutputError(f"cannot write the {what} {shown(given)}: it is a symlink (mirasol never writes through "
                              f"one; give the path it points to, or another)")
        if not stat.S_ISREG(mode):
            raise OutputError(f"cannot write the {what} {shown(given)}: it exists and is not a regular file")
        if not is_ours(absolute):
            raise OutputError(f"{shown(given)} exists and is not a {what} written by mirasol; nothing was written "
                              f"(choose another path, or remove it yourself)")
    return OutputFile(absolute, what, is_ours, replaces=True)


def has_json_format(path: Path, name: str, max_bytes: int = 64 << 20) -> bool:
    """Whether `path` holds a JSON object whose "format" is `name`: how a JSON report of ours is known (a benchmark's,
    a load figure's). Reads at most `max_bytes`, follows no link, never raises."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            data = parse_json(f.read(max_bytes), str(path))
    except (OSError, MirasolError):
        return False
    return isinstance(data, Mapping) and data.get("format") == name


def is_ours_now(path: Path, output: OutputFile) -> bool:
    """Whether what is at `path` (not followed) is a regular file `output`'s writer recognises as its own."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode) and output.is_ours(path)
    except OSError:
        return False


# ---- helpers --------------------------------------------------------------------------------------------------

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
        raise OutputError(f"{shown(path)} cannot be resolved: {bad}") from None
    if resolved == home or resolved == cwd or resolved in cwd.parents:
        what = "the home directory" if resolved == home else "the working directory or one of its parents"
        raise OutputError(f"{shown(path)} is {what}; mirasol writes outputs only into a new or empty directory of "
                          f"their own")
    if os.path.ismount(resolved):
        raise OutputError(f"{shown(path)} is a mount point; give a new or empty directory inside it")


def _some(entries: list[str], limit: int = 3) -> str:
    listed = ", ".join(repr(e) for e in entries[:limit])
    return listed + (f" and {len(entries) - limit} more" if len(entries) > limit else "")


__all__ = ["BUNDLE_FILES", "BUNDLE_FOLDERS", "MARKER_FILE", "OutputFile", "check_output_dir", "check_output_file",
           "has_json_format",
           "is_temporary", "output_errors", "owned_files", "owned_name", "read_marker", "shown", "temporary_name",
           "why_not_ours"]
