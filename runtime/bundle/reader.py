"""A bundle on disk: its manifest, checked files and tokenizer.

Loading a bundle never executes anything from it: the manifest is strict JSON, graphs are ONNX files handed
to the backend, state files are read with `allow_pickle=False` after their sizes are checked. Every file name
the manifest gives must stay inside the bundle directory (no separators, no '..', not absolute, and no symlink
pointing out), every external-data location inside a graph file must be one of the files the manifest lists
for that graph (so a graph cannot make the backend read anything else), and every graph file must match its
sha256.
"""
from __future__ import annotations

import hashlib
import math
import os
import stat
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BundleError
from .graph_files import GraphFileError, external_data_locations
from .json_reader import parse_json
from .manifest import CONFIG_LIMITS, GraphEntry, Manifest, check_file_name
from .tokenizer import ByteTokenizer

MAX_STATE_FILE_BYTES = 1 << 31  # 2 GiB: a stream state file, on disk and decompressed
MAX_STATE_HEADER_BYTES = 1 << 16


def sha256_file(path: Path, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


class Bundle:
    """A bundle directory, loaded and checked: names stay inside it, files exist and match their checksums."""

    def __init__(self, path: Path, manifest: Manifest) -> None:
        self.path = path
        self.manifest = manifest
        where = str(path / "manifest.json")
        try:
            self.tokenizer = ByteTokenizer.from_dict(manifest.tokenizer)
        except (ValueError, TypeError) as bad:
            raise BundleError(f"{where}: tokenizer: {bad}") from None
        _check_runtime_contract(manifest, where)

    @classmethod
    def load(cls, path: str | Path, verify: bool = True) -> "Bundle":
        """Read `path`/manifest.json; with `verify`, check every graph file's sha256 (off: faster start)."""
        directory = Path(path)
        manifest = Manifest.read(directory)
        bundle = cls(_resolve(directory), manifest)
        try:
            str(bundle.path).encode("utf-8")
        except UnicodeEncodeError as bad:
            raise BundleError(f"bundle directory {bundle.path}: its path is not UTF-8 text (byte "
                              f"{os.fsencode(bundle.path)[bad.start:bad.start + 1]!r}), and onnxruntime and TensorRT "
                              f"open graph files by UTF-8 paths only; rename or move the bundle") from None
        bundle._refuse_escaping_links()
        for graph in manifest.graphs.values():
            graph_path = bundle.file(graph.file)
            extras = [bundle.file(extra) for extra in graph.external_data]
            if verify:
                _verify(graph_path, graph.sha256, f"graph {graph.name!r}")
                for extra, extra_path in zip(graph.external_data, extras):
                    if extra in graph.external_sha256:
                        _verify(extra_path, graph.external_sha256[extra], f"external data of graph {graph.name!r}")
            _check_external_locations(graph, graph_path)
        return bundle

    def file(self, name: str) -> Path:
        """The path of a file the manifest names; refused if it is missing or resolves outside the bundle."""
        check_file_name(name, str(self.path))
        path = _resolve(self.path / name)
        if path.parent != self.path:
            raise BundleError(f"{self.path}: {name!r} resolves to {path}, outside the bundle directory")
        if not path.is_file():
            what = "is not a regular file" if path.exists() else "is missing"
            raise BundleError(f"{self.path}: file {name!r} named in the manifest {what}")
        return path

    def _refuse_escaping_links(self) -> None:
        """No entry of the bundle may be a symlink leading out of it (a graph's external data is looked up by
        the backend itself, by names inside the graph file, so every link is checked, not only named ones)."""
        try:
            entries = list(os.scandir(self.path))
        except OSError as bad:
            raise BundleError(f"bundle directory {self.path} cannot be listed: {bad}") from None
        for entry in entries:
            if entry.is_symlink():
                target = _resolve(Path(entry.path))
                if target.parent != self.path:
                    raise BundleError(f"{self.path}: {entry.name!r} is a symlink to {target}, outside the bundle "
                                      f"directory")

    @property
    def graphs(self) -> dict[str, GraphEntry]:
        return self.manifest.graphs

    @property
    def config(self) -> dict:
        return self.manifest.config

    @property
    def fingerprint(self) -> str:
        """Identifies the bundle's graphs (for state files): a hash of their checksums."""
        text = ",".join(f"{name}:{g.sha256}" for name, g in sorted(self.graphs.items()))
        return hashlib.sha256(text.encode()).hexdigest()

    # ---- stream state files ----
    def state_limits(self, batch: int) -> dict[str, tuple[np.dtype, tuple[tuple[int, int], ...]]]:
        """Per array a state file may hold ("state/<name>", "counter/<name>"): its dtype and, per axis, the
        smallest and largest size allowed (a stream-scope state tensor is bounded by its window or its axis's
        max in the manifest)."""
        limits: dict[str, tuple[np.dtype, tuple[tuple[int, int], ...]]] = {}
        for spec in self.manifest.state:
            if spec.scope != "stream":
                continue
            graph = self.graphs[spec.graph]
            info = graph.input(spec.input)
            dims = []
            for axis, d in enumerate(info.shape):
                if d == "batch":
                    dims.append((batch, batch))
                elif isinstance(d, int):
                    dims.append((d, d))
                else:
                    high = graph.axes[d].max if d in graph.axes else None
                    if axis == spec.axis and spec.window is not None:
                        high = spec.window if high is None else min(high, spec.window)
                    if high is None:
                        raise BundleError(f"state {spec.name}: axis {d!r} of {spec.graph}.{spec.input} has no bound "
                                          f"in the manifest")
                    dims.append((0, high))
            limits[f"state/{spec.name}"] = (np.dtype(info.dtype), tuple(dims))
        for counter in self.manifest.counters:
            if counter.scope == "stream":
                limits[f"counter/{counter.name}"] = (np.dtype(np.int64), ((batch, batch),))
        return limits

    def read_state(self, path: str | Path, format_name: str, version: int
                   ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Read a stream state file (.npz: a JSON header as uint8 + arrays) written with this bundle.

        Returns (header, arrays). Sizes are bounded before anything is allocated: the file, every member's
        declared size, every array's shape and dtype (checked against `state_limits` from the npy header
        before its data is read). No pickle. Anything else raises BundleError naming the file.
        """
        where = f"state file {path}"
        with BoundedNpz(path, where) as npz:
            if "header" not in npz.names:
                raise BundleError(f"{where}: no header; not a mirasol stream state")
            raw = npz.read("header", np.uint8, ((0, MAX_STATE_HEADER_BYTES),))
            header = _state_header(parse_json(raw.tobytes(), f"{where} (header)"), where, format_name, version, self)
            limits = self.state_limits(header["batch"]) if header["batch"] is not None else {}
            unexpected = sorted(npz.names - set(limits) - {"header"})
            if unexpected:
                raise BundleError(f"{where}: unexpected entries {[n + '.npy' for n in unexpected[:5]]}")
            arrays = {}
            for name, (dtype, dims) in limits.items():
                if name not in npz.names:
                    raise BundleError(f"{where}: {name} is missing")
                arrays[name] = npz.read(name, dtype, dims)
        for name, value in arrays.items():
            if name.startswith("counter/") and (value < 0).any():
                raise BundleError(f"{where}: {name} holds negative values")
            if value.dtype.kind == "f" and not np.isfinite(value).all():
                raise BundleError(f"{where}: {name} holds NaN or inf")
        return header, arrays


class BoundedNpz:
    """An .npz read without pickle and with every size bounded before it is allocated.

        with BoundedNpz(path, "chunks file clip.npz", max_bytes=1 << 30, error=InputError) as npz:
            video = npz.read("video", np.float32, ((1, 1 << 16), (3, 3), (1, 4096), (1, 4096)))

    The file and the sum of its members' declared sizes must be within `max_bytes`; `read` checks an array's
    dtype and, per axis, its size range from the npy header, and that the entry really holds that many bytes,
    before reading it. Every failure raises `error` (BundleError by default) starting with `where`.
    """

    def __init__(self, path: str | Path, where: str, max_bytes: int = MAX_STATE_FILE_BYTES,
                 error: type[Exception] = BundleError) -> None:
        self.path = Path(path)
        self.where = where
        self.max_bytes = max_bytes
        self.error = error
        self._archive: zipfile.ZipFile | None = None
        self._members: dict[str, zipfile.ZipInfo] = {}

    @property
    def names(self) -> set[str]:
        """The arrays the file holds (entry names without '.npy'; other entries as they are)."""
        return {name.removesuffix(".npy") for name in self._members}

    def __enter__(self) -> "BoundedNpz":
        try:
            info = os.stat(self.path)
        except FileNotFoundError:
            raise self.error(f"{self.where} does not exist") from None
        except (OSError, ValueError) as bad:
            raise self.error(f"{self.where} cannot be read: {getattr(bad, 'strerror', None) or bad}") from None
        if stat.S_ISDIR(info.st_mode):
            raise self.error(f"{self.where} is a directory, not a file")
        if not stat.S_ISREG(info.st_mode):
            raise self.error(f"{self.where} is not a regular file (a FIFO, socket or device)")
        size = info.st_size
        if size > self.max_bytes:
            raise self.error(f"{self.where} is {size} bytes, over the {self.max_bytes}-byte limit")
        try:
            self._archive = zipfile.ZipFile(self.path)
            infos = self._archive.infolist()
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as bad:
            self.__exit__()
            raise self.error(f"{self.where} is not a readable .npz: {bad}") from None
        declared = sum(info.file_size for info in infos)
        refused = _refused_entry(infos) or (f"its entries declare {declared} bytes, over the {self.max_bytes}-byte "
                                            f"limit" if declared > self.max_bytes else None)
        if refused:
            self.__exit__()
            raise self.error(f"{self.where}: {refused}")
        self._members = {info.filename: info for info in infos}
        return self

    def __exit__(self, *_: Any) -> None:
        if self._archive is not None:
            self._archive.close()
            self._archive = None

    def read(self, name: str, dtype: Any, dims: tuple[tuple[int, int], ...]) -> np.ndarray:
        """Array `name`, refused unless it is `dtype` with dims[i][0] <= shape[i] <= dims[i][1] on every axis."""
        member = self._members.get(f"{name}.npy")
        where = f"{self.where}: {name}"
        if member is None or self._archive is None:
            raise self.error(f"{where} is missing")
        try:
            return _read_member(self._archive, member, np.dtype(dtype), dims, where, self.error)
        except self.error:
            raise
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, zlib.error) as bad:  # truncated, CRC, deflate
            raise self.error(f"{where} is not readable: {bad}") from None


def _refused_entry(infos: list[zipfile.ZipInfo]) -> str | None:
    """Why an .npz entry cannot be read safely (encrypted, or compressed other than the way numpy writes)."""
    for info in infos:
        if info.flag_bits & 0x1:
            return f"entry {info.filename!r} is encrypted"
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            return (f"entry {info.filename!r} uses zip compression method {info.compress_type}; only stored and "
                    f"deflated entries (what numpy writes) are read")
    return None


def state_file_format(path: str | Path) -> str | None:
    """The format a stream state file's header names, or None if `path` is not such a file (never raises)."""
    try:
        with BoundedNpz(path, f"state file {path}") as npz:
            raw = npz.read("header", np.uint8, ((0, MAX_STATE_HEADER_BYTES),))
        header = parse_json(raw.tobytes(), f"state file {path} (header)")
    except BundleError:
        return None
    return header.get("format") if isinstance(header, Mapping) else None


def _resolve(path: Path) -> Path:
    """`path` with every symlink followed; a link loop is a BundleError."""
    try:
        return path.resolve()
    except (OSError, RuntimeError) as bad:
        raise BundleError(f"{path} cannot be resolved (a symlink loop?): {bad}") from None


def _check_external_locations(graph: GraphEntry, path: Path) -> None:
    """Every external-data location inside the graph file is a file the manifest lists for this graph."""
    try:
        locations = external_data_locations(path)
    except GraphFileError as bad:
        raise BundleError(f"{path}: graph {graph.name!r} is not a readable ONNX file: {bad}") from None
    except OSError as bad:
        raise BundleError(f"{path}: graph {graph.name!r} cannot be read: {bad.strerror or bad}") from None
    unlisted = sorted(locations - set(graph.external_data))
    if unlisted:
        raise BundleError(f"{path}: graph {graph.name!r} reads external data from {unlisted[0]!r}, which is not one "
                          f"of the files its manifest entry lists {list(graph.external_data)}; refusing the bundle")


def _verify(path: Path, expected: str, what: str) -> None:
    try:
        actual = sha256_file(path)
    except OSError as bad:
        raise BundleError(f"{path}: {what} cannot be read: {bad.strerror or bad}") from None
    if actual != expected:
        raise BundleError(f"{path}: checksum of {what} is {actual[:12]}…, the manifest says {expected[:12]}… "
                          f"(file altered or truncated); re-export the bundle")


def _check_runtime_contract(manifest: Manifest, where: str) -> None:
    """What the Pipeline relies on beyond the manifest format: config values, step IO and returns."""
    missing = [key for key in CONFIG_LIMITS if key not in manifest.config]  # the manifest checked their ranges
    if missing:
        raise BundleError(f"{where}: config.{missing[0]} is missing (the runtime reads "
                          f"{', '.join(CONFIG_LIMITS)}); re-export the bundle")
    contract = {"push": ({"video", "audio"}, True), "ask": (set(), False), "generate": ({"input_ids"}, True)}
    for step_name, (inputs, returns) in contract.items():
        step = manifest.steps[step_name]
        if set(step.inputs) != inputs:
            raise BundleError(f"{where}: step {step_name!r} takes inputs {sorted(step.inputs)}, this runtime "
                              f"gives {sorted(inputs)}")
        if returns and step.returns is None:
            raise BundleError(f"{where}: step {step_name!r} returns nothing; this runtime needs its output")
    _check_chunk_shape(manifest, where)


def _check_chunk_shape(manifest: Manifest, where: str) -> None:
    """A chunk has one fixed shape, the config's (the media decoders, the clip splitter, live sources and Triton's
    model config are made from it): video [batch, frames_per_chunk, 3, image_size, image_size], audio [batch,
    n_mels, mel frames]."""
    config = manifest.config
    size = config["image_size"]
    for name, wanted in (("video", (config["frames_per_chunk"], 3, size, size)), ("audio", (config["n_mels"], None))):
        shape = manifest.step_tensor("push", name)[1].shape
        fixed = shape[1:]
        if (len(fixed) != len(wanted) or not all(isinstance(d, int) and d >= 1 for d in fixed)
                or any(w is not None and d != w for d, w in zip(fixed, wanted))):
            parts = ", ".join("N" if w is None else str(w) for w in wanted)
            raise BundleError(f"{where}: the push step's input {name!r} has shape {list(shape)}; a chunk has the fixed "
                              f"shape [batch, {parts}] its config gives (N: a fixed number of mel frames)")


def _read_member(archive: zipfile.ZipFile, member: zipfile.ZipInfo, dtype: np.dtype,
                 dims: tuple[tuple[int, int], ...], where: str, error: type[Exception] = BundleError) -> np.ndarray:
    """One .npy member: header checked (dtype, rank, sizes, bytes present) before its data is allocated."""
    with archive.open(member) as f:
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0), (3, 0)):
            raise error(f"{where}: unsupported .npy version {version}")
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        try:
            shape, fortran, stored = read_header(f)
        except Exception as bad:  # noqa: BLE001 - numpy parses this untrusted text (a Python literal: ast, tokenize)
            raise error(f"{where}: its .npy header is not readable: {type(bad).__name__}: {bad}") from None
        if stored != dtype or stored.hasobject:
            raise error(f"{where}: expected dtype {dtype}, got {stored}")
        if len(shape) != len(dims) or not all(lo <= n <= hi for n, (lo, hi) in zip(shape, dims)):
            raise error(f"{where}: expected shape within {[lo if lo == hi else f'{lo}..{hi}' for lo, hi in dims]}"
                        f", got {list(shape)}")
        nbytes = math.prod(shape) * stored.itemsize
        if nbytes > member.file_size:
            raise error(f"{where}: its header promises {nbytes} bytes, the entry holds {member.file_size}")
        data = f.read(nbytes + 1)
        if len(data) != nbytes:
            raise error(f"{where}: expected {nbytes} bytes of data, got {len(data)}")
    array = np.frombuffer(data, dtype=stored).reshape(shape, order="F" if fortran else "C")
    return np.ascontiguousarray(array).copy() if fortran else array.copy()


def _state_header(header: Any, where: str, format_name: str, version: int, bundle: Bundle) -> dict[str, Any]:
    if not isinstance(header, Mapping):
        raise BundleError(f"{where}: the header is not a JSON object")
    if header.get("format") != format_name or header.get("version") != version:
        raise BundleError(f"{where}: unknown format {header.get('format')!r} v{header.get('version')!r} "
                          f"(expected {format_name!r} v{version})")
    if header.get("bundle") != bundle.fingerprint:
        raise BundleError(f"{where} was saved with another bundle; restore it with the bundle it came from")
    batch, chunks = header.get("batch"), header.get("chunks")
    max_batch = bundle.manifest.max_batch
    if batch is not None and (not isinstance(batch, int) or isinstance(batch, bool) or not 1 <= batch <= max_batch):
        raise BundleError(f"{where}: batch must be an integer in [1, {max_batch}] or null, got {batch!r}")
    if not isinstance(chunks, int) or isinstance(chunks, bool) or chunks < 0 or (batch is None and chunks):
        raise BundleError(f"{where}: chunks must be a non-negative integer (0 for an unused stream), got {chunks!r}")
    return dict(header)


__all__ = ["BoundedNpz", "Bundle", "MAX_STATE_FILE_BYTES", "sha256_file", "state_file_format"]
