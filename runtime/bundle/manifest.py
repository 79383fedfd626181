"""The bundle manifest: the contract between the exporter and the runtime.

A bundle is a directory holding the graphs and `manifest.json`. The manifest says, as data:
- per graph: its file, checksum, inputs/outputs (name, dtype, symbolic shape) and the range of every
  symbolic axis (min/opt/max: the TensorRT optimization profile and the runtime's input bounds);
- the steps: which graphs run, in order, for `push` (one chunk), `ask` (once per question) and
  `generate` (once per text step), which inputs the caller gives, which output the step returns;
- the state wiring: each carried tensor, which graph output feeds which graph input at the next step,
  how it starts (zeros, or empty along an axis), how it is updated (replaced or appended) and bounded
  (a window along that axis), and whether it lives for the whole stream or one question;
- counters: integer inputs that count steps (the text decoder's position).
Inside one step, a graph input that is none of these is fed by the earlier graph's output of the same name.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BundleError
from .json_reader import JsonReader, parse_json, short
from .tensors import TensorInfo
from .wiring import (MAX_RANK, CounterSpec, StateSpec, StepSpec, binding, check_wiring, counter_from_dict,
                     state_from_dict, step_from_dict)

FORMAT_NAME = "mirasol-bundle"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
# Tensor dtypes a manifest may declare: those numpy holds (the runtime's arrays), by numpy's names.
DTYPES = ("float32", "float16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")
STEPS = ("push", "ask", "generate")
# Model config values the runtime reads (media decoding, chunking, text): (type, smallest, largest) where given.
CONFIG_LIMITS: dict[str, tuple[type, float, float]] = {
    "fps": (float, 1e-3, 1e3), "frames_per_chunk": (int, 1, 4096), "image_size": (int, 1, 8192),
    "sample_rate": (int, 1, 384_000), "n_fft": (int, 1, 1 << 16), "hop_length": (int, 1, 1 << 16),
    "n_mels": (int, 1, 4096), "max_text_len": (int, 1, 1 << 20)}
# What a question gets when the caller does not say (`Stream.ask(max_new_tokens=None)`, the command lines, Triton):
# the bundle's `generation` section, written at export from these values.
GENERATION_DEFAULTS: dict[str, int] = {"max_new_tokens": 32}
MAX_CHUNK_SAMPLES = 1 << 26  # audio samples in one chunk (sample_rate * frames_per_chunk / fps)


@dataclass(frozen=True)
class AxisRange:
    """Sizes a symbolic axis takes: the smallest, the typical and the largest."""

    min: int
    opt: int
    max: int

    def to_dict(self) -> dict[str, int]:
        return {"min": self.min, "opt": self.opt, "max": self.max}


@dataclass(frozen=True)
class GraphEntry:
    name: str
    file: str
    sha256: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    axes: dict[str, AxisRange]
    external_data: tuple[str, ...] = ()
    engine: dict[str, Any] | None = None  # TensorRT engine record, added on the device
    external_sha256: dict[str, str] = field(default_factory=dict)  # sha256 per external-data file

    def input(self, name: str) -> TensorInfo:
        return _by_name(self.inputs, name, f"graph {self.name!r} has no input")

    def output(self, name: str) -> TensorInfo:
        return _by_name(self.outputs, name, f"graph {self.name!r} has no output")

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "file": self.file, "sha256": self.sha256,
            "inputs": [t.to_dict() for t in self.inputs], "outputs": [t.to_dict() for t in self.outputs],
            "axes": {name: r.to_dict() for name, r in self.axes.items()},
            "external_data": list(self.external_data)}
        if self.engine is not None:
            data["engine"] = self.engine
        if self.external_sha256:
            data["external_sha256"] = dict(self.external_sha256)
        return data


@dataclass
class Manifest:
    config: dict[str, Any]
    precision: str
    graphs: dict[str, GraphEntry]
    steps: dict[str, StepSpec]
    state: tuple[StateSpec, ...]
    counters: tuple[CounterSpec, ...]
    tokenizer: dict[str, Any]
    producer: dict[str, str] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)
    quantization: dict[str, Any] = field(default_factory=dict)
    generation: dict[str, int] = field(default_factory=lambda: dict(GENERATION_DEFAULTS))
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format, "format_version": self.format_version,
            "producer": self.producer, "precision": self.precision, "config": self.config,
            "tokenizer": self.tokenizer,
            "graphs": {name: g.to_dict() for name, g in self.graphs.items()},
            "steps": {name: s.to_dict() for name, s in self.steps.items()},
            "state": [s.to_dict() for s in self.state],
            "counters": [c.to_dict() for c in self.counters],
            "validation": self.validation, "quantization": self.quantization, "generation": self.generation}

    def write(self, directory: str | Path) -> Path:
        path = Path(directory) / MANIFEST_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    @classmethod
    def from_dict(cls, data: Any, where: str = MANIFEST_FILE) -> "Manifest":
        """Build and check a manifest from parsed JSON; anything malformed raises BundleError naming the key."""
        r = JsonReader(where)
        r.mapping(data, "the manifest")
        if data.get("format") != FORMAT_NAME:
            raise BundleError(f"{where}: not a mirasol bundle manifest (format {short(data.get('format'))}, "
                              f"expected {FORMAT_NAME!r})")
        version = data.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise BundleError(f"{where}: format_version: expected an integer, got {short(version)}")
        if version > FORMAT_VERSION:
            raise BundleError(
                f"{where}: bundle format version {version} is newer than this runtime reads "
                f"(up to {FORMAT_VERSION}); upgrade mirasol-edge or re-export the bundle with this version")
        if version < 1:
            raise BundleError(f"{where}: bundle format version {version} is not supported; re-export it")
        graphs = r.mapping(r.key(data, "graphs", ""), "graphs")
        steps = r.mapping(r.key(data, "steps", ""), "steps")
        manifest = cls(
            config=dict(r.mapping(r.key(data, "config", ""), "config")),
            precision=r.string(r.key(data, "precision", ""), "precision"),
            graphs={r.string(name, "graphs (a graph name)"): _graph_from_dict(r, name, g)
                    for name, g in graphs.items()},
            steps={r.string(name, "steps (a step name)"): step_from_dict(r, name, s) for name, s in steps.items()},
            state=tuple(state_from_dict(r, i, s)
                        for i, s in enumerate(r.array(r.key(data, "state", ""), "state"))),
            counters=tuple(counter_from_dict(r, i, c)
                           for i, c in enumerate(r.array(r.key(data, "counters", ""), "counters"))),
            tokenizer=dict(r.mapping(r.key(data, "tokenizer", ""), "tokenizer")),
            producer=dict(r.mapping(data.get("producer", {}), "producer")),
            validation=dict(r.mapping(data.get("validation", {}), "validation")),
            quantization=dict(r.mapping(data.get("quantization", {}), "quantization")),
            generation={**GENERATION_DEFAULTS, **r.mapping(data.get("generation", {}), "generation")},
            format_version=version)
        manifest.check(where)
        return manifest

    @classmethod
    def read(cls, directory: str | Path) -> "Manifest":
        """Read `directory`/manifest.json: JSON only (never code), size-bounded, strictly checked."""
        directory = Path(directory)
        path = directory / MANIFEST_FILE
        if not directory.is_dir():
            raise BundleError(f"bundle directory {directory} does not exist" if not directory.exists()
                              else f"bundle path {directory} is not a directory")
        if not path.is_file():
            raise BundleError(f"{path} is missing: {directory} is not a mirasol bundle")
        if path.resolve().parent != directory.resolve():
            raise BundleError(f"{path} resolves to {path.resolve()}, outside the bundle directory")
        try:
            with open(path, "rb") as f:
                raw = f.read(MAX_MANIFEST_BYTES + 1)  # bounded before anything is allocated from it
        except OSError as bad:
            raise BundleError(f"{path} cannot be read: {bad}") from None
        if len(raw) > MAX_MANIFEST_BYTES:
            raise BundleError(f"{path} is over the {MAX_MANIFEST_BYTES}-byte manifest limit")
        return cls.from_dict(parse_json(raw, str(path)), str(path))

    def check(self, where: str = MANIFEST_FILE) -> None:
        """Config values the runtime reads are in range, every name the wiring uses exists, and every graph input
        of a step is bound exactly once."""
        _check_config(self.config, where)
        longest = self.config.get("max_text_len", 1 << 20)
        for key, value in self.generation.items():
            if key not in GENERATION_DEFAULTS:
                raise BundleError(f"{where}: generation: unknown setting {short(key)} "
                                  f"(known: {list(GENERATION_DEFAULTS)})")
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= longest:
                raise BundleError(f"{where}: generation.{key}: expected an integer in [1, {longest}], "
                                  f"got {short(value)}")
        for name in STEPS:
            if name not in self.steps:
                raise BundleError(f"{where}: step {name!r} is missing")
        for name, graph in self.graphs.items():
            check_file_name(graph.file, where)
            for extra in graph.external_data:
                check_file_name(extra, where)
            for extra in graph.external_sha256:
                if extra not in graph.external_data:
                    raise BundleError(f"{where}: graph {name!r} has a checksum for {extra!r}, which is not one of "
                                      f"its external_data files {list(graph.external_data)}")
            if isinstance(graph.engine, Mapping) and graph.engine.get("file") is not None:
                check_file_name(graph.engine["file"], where)
            for kind, tensors in (("input", graph.inputs), ("output", graph.outputs)):
                names_seen = [t.name for t in tensors]
                twice = sorted({n for n in names_seen if names_seen.count(n) > 1})
                if twice:
                    raise BundleError(f"{where}: graph {name!r} names {kind} {twice[0]!r} twice")
        check_wiring(self.graphs, self.state, self.counters, self.steps, where)

    @property
    def max_batch(self) -> int:
        """The largest batch every graph takes (the smallest maximum of their batch axes)."""
        return min((g.axes["batch"].max for g in self.graphs.values() if "batch" in g.axes), default=1 << 16)

    def step_tensor(self, step_name: str, name: str, output: bool = False) -> tuple[str, TensorInfo]:
        """The first graph of a step with input (or output) `name`, and that tensor's description."""
        step = self.steps[step_name]
        for graph in step.graphs:
            for tensor in (self.graphs[graph].outputs if output else self.graphs[graph].inputs):
                if tensor.name == name:
                    return graph, tensor
        raise BundleError(f"no graph of step {step_name!r} {list(step.graphs)} has {'output' if output else 'input'} "
                          f"{name!r}")

    def binding(self, graph: str, input_name: str) -> StateSpec | CounterSpec | None:
        """The state or counter that feeds `graph`'s input `input_name`, if one does."""
        return binding(self.state, self.counters, graph, input_name)


def _check_config(config: Mapping[str, Any], where: str) -> None:
    """The config values in CONFIG_LIMITS, where present, are numbers of the right kind within their range."""
    for key, (kind, low, high) in CONFIG_LIMITS.items():
        if key not in config:
            continue
        value = config[key]
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or (kind is int and not isinstance(value, int)) or not low <= value <= high:
            raise BundleError(f"{where}: config.{key}: expected {'an integer' if kind is int else 'a number'} in "
                              f"[{low:g}, {high:g}], got {short(value)}")
    if all(k in config for k in ("sample_rate", "frames_per_chunk", "fps", "hop_length")):
        samples = config["sample_rate"] * config["frames_per_chunk"] / config["fps"]
        if not config["hop_length"] <= samples <= MAX_CHUNK_SAMPLES:
            raise BundleError(f"{where}: config: a chunk of sample_rate * frames_per_chunk / fps = {samples:g} audio "
                              f"samples must hold at least hop_length ({config['hop_length']}) and at most "
                              f"{MAX_CHUNK_SAMPLES}")


def _by_name(tensors: tuple[TensorInfo, ...], name: str, message: str) -> TensorInfo:
    for tensor in tensors:
        if tensor.name == name:
            return tensor
    raise BundleError(f"{message} {name!r}")


def check_file_name(name: Any, where: str) -> None:
    """Manifest file names are plain names inside the bundle: no separators, no '..', not absolute."""
    if (not isinstance(name, str) or not name or name in (".", "..") or os.sep in name or "/" in name
            or "\\" in name or (os.altsep and os.altsep in name) or "\x00" in name or ":" in name):
        raise BundleError(f"{where}: file name {short(name)} is not a plain file name inside the bundle")


def _tensor(r: JsonReader, data: Any, path: str) -> TensorInfo:
    data = r.fields(data, path, ("name", "dtype", "shape"))
    shape = r.array(data["shape"], f"{path}.shape")
    if len(shape) > MAX_RANK:
        raise r.fail(f"{path}.shape", f"at most {MAX_RANK} axes", shape)
    dims: list[int | str] = []
    for i, d in enumerate(shape):
        dims.append(r.name(d, f"{path}.shape[{i}]") if isinstance(d, str)
                    else r.integer(d, f"{path}.shape[{i}]"))
    return TensorInfo(r.name(data["name"], f"{path}.name"),
                      r.choice(data["dtype"], f"{path}.dtype", DTYPES), tuple(dims))




def _graph_from_dict(r: JsonReader, name: Any, data: Any) -> GraphEntry:
    path = f"graphs.{name}"
    r.name(name, "graphs (a graph name)")
    # Unknown keys of a graph entry are ignored (as this format has always done), the known ones checked.
    data = r.fields(data, path, ("file", "sha256", "inputs", "outputs", "axes"), None)
    sha = r.sha256(data["sha256"], f"{path}.sha256")
    external_sha = {r.string(f, f"{path}.external_sha256 (a file name)"): r.sha256(h, f"{path}.external_sha256.{f}")
                    for f, h in r.mapping(data.get("external_sha256", {}), f"{path}.external_sha256").items()}
    axes: dict[str, AxisRange] = {}
    for axis, ranges in r.mapping(data["axes"], f"{path}.axes").items():
        where = f"{path}.axes.{axis}"
        r.name(axis, f"{path}.axes (an axis name)")
        ranges = r.fields(ranges, where, ("min", "opt", "max"))
        low, opt, high = (r.integer(ranges[k], f"{where}.{k}") for k in ("min", "opt", "max"))
        if not low <= opt <= high:
            raise r.fail(where, "min <= opt <= max", dict(ranges))
        axes[axis] = AxisRange(low, opt, high)
    engine = data.get("engine")
    if engine is not None:
        r.mapping(engine, f"{path}.engine")
    return GraphEntry(
        name=name, file=r.string(data["file"], f"{path}.file"), sha256=sha,
        inputs=tuple(_tensor(r, t, f"{path}.inputs[{i}]")
                     for i, t in enumerate(r.array(data["inputs"], f"{path}.inputs"))),
        outputs=tuple(_tensor(r, t, f"{path}.outputs[{i}]")
                      for i, t in enumerate(r.array(data["outputs"], f"{path}.outputs"))),
        axes=axes,
        external_data=tuple(r.string(f, f"{path}.external_data[{i}]")
                            for i, f in enumerate(r.array(data.get("external_data", []), f"{path}.external_data"))),
        engine=dict(engine) if engine is not None else None, external_sha256=external_sha)
