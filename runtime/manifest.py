"""The bundle manifest: the contract between the exporter and the runtime.

A bundle is a directory holding the graphs and `manifest.json`. The manifest says, as data:
- per graph: its file, checksum, inputs/outputs (name, dtype, symbolic shape) and the range of every
  symbolic axis (min/opt/max: the TensorRT optimization profile and the runtime's input bounds);
- the steps: which graphs run, in order, for `push` (one chunk), `ask` (once per question) and
  `generate` (once per text step), which inputs the caller gives, which output the step returns;
- the state wiring: each carried tensor, which graph output feeds which graph input at the next step,
  how it starts (zeros, or empty along an axis), how it is updated (replaced or appended) and bounded
  (a window along that axis), and whether it lives for the whole stream or one question;
- counters: integer inputs (chunk_index, position) that count steps.
Inside one step, a graph input that is none of these is fed by the earlier graph's output of the same name.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .backends.base import TensorInfo
from .errors import BundleError

FORMAT_NAME = "mirasol-bundle"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
SCOPES = ("stream", "question")
STEPS = ("push", "ask", "generate")


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
        return data


@dataclass(frozen=True)
class StateSpec:
    """A carried tensor: `source_graph.output` at one step becomes `graph.input` at the next."""

    name: str
    graph: str
    input: str
    source_graph: str
    output: str
    init: str  # "zeros": zeros of the input's shape; "empty": size 0 along `axis`
    update: str = "replace"  # "replace" by the output, or "append" it along `axis`
    axis: int | None = None
    window: int | None = None  # keep at most the last `window` entries along `axis`
    scope: str = "stream"  # "stream": lives until the stream ends; "question": reset by each ask

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class CounterSpec:
    """An int64 [batch] input counting what came before: +`step` per run, or + the length of an input."""

    name: str
    graph: str
    input: str
    step: int | None = None
    length_of: tuple[str, int] | None = None  # (input name, axis)
    scope: str = "stream"

    def to_dict(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data["length_of"] = list(self.length_of) if self.length_of else None
        return data


@dataclass(frozen=True)
class StepSpec:
    graphs: tuple[str, ...]
    inputs: tuple[str, ...] = ()
    returns: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"graphs": list(self.graphs), "inputs": list(self.inputs), "returns": self.returns}


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
            "validation": self.validation, "quantization": self.quantization}

    def write(self, directory: str | Path) -> Path:
        path = Path(directory) / MANIFEST_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = MANIFEST_FILE) -> "Manifest":
        if not isinstance(data, Mapping):
            raise BundleError(f"{where}: expected a JSON object, got {type(data).__name__}")
        if data.get("format") != FORMAT_NAME:
            raise BundleError(f"{where}: not a mirasol bundle manifest (format {data.get('format')!r}, "
                              f"expected {FORMAT_NAME!r})")
        version = data.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise BundleError(
                f"{where}: bundle format version {version!r} is newer than this runtime reads "
                f"(up to {FORMAT_VERSION}); upgrade mirasol-edge or re-export the bundle with this version")
        if version < 1:
            raise BundleError(f"{where}: bundle format version {version} is not supported; re-export it")
        try:
            manifest = cls(
                config=dict(data["config"]), precision=str(data["precision"]),
                graphs={name: _graph_from_dict(name, g) for name, g in data["graphs"].items()},
                steps={name: StepSpec(tuple(s["graphs"]), tuple(s.get("inputs", ())), s.get("returns"))
                       for name, s in data["steps"].items()},
                state=tuple(StateSpec(**s) for s in data["state"]),
                counters=tuple(CounterSpec(**{**c, "length_of": tuple(c["length_of"]) if c.get("length_of")
                                              else None}) for c in data["counters"]),
                tokenizer=dict(data["tokenizer"]), producer=dict(data.get("producer", {})),
                validation=dict(data.get("validation", {})), quantization=dict(data.get("quantization", {})),
                format_version=version)
        except KeyError as missing:
            raise BundleError(f"{where}: missing key {missing}") from None
        except (TypeError, ValueError, AttributeError) as bad:
            raise BundleError(f"{where}: malformed entry ({bad})") from None
        manifest.check(where)
        return manifest

    @classmethod
    def read(cls, directory: str | Path) -> "Manifest":
        path = Path(directory) / MANIFEST_FILE
        if not Path(directory).is_dir():
            raise BundleError(f"bundle directory {directory} does not exist")
        if not path.is_file():
            raise BundleError(f"{path} is missing: {directory} is not a mirasol bundle")
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise BundleError(f"{path} is {path.stat().st_size} bytes, over the {MAX_MANIFEST_BYTES} limit")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as bad:
            raise BundleError(f"{path} is not valid JSON: {bad}") from None
        return cls.from_dict(data, str(path))

    def check(self, where: str = MANIFEST_FILE) -> None:
        """Every name the wiring uses exists, and every graph input of a step is bound exactly once."""
        for name in STEPS:
            if name not in self.steps:
                raise BundleError(f"{where}: step {name!r} is missing")
        for name, graph in self.graphs.items():
            _check_file_name(graph.file, where)
            for extra in graph.external_data:
                _check_file_name(extra, where)
        for spec in (*self.state, *self.counters):
            if spec.scope not in SCOPES:
                raise BundleError(f"{where}: {spec.name}: scope {spec.scope!r} is not one of {SCOPES}")
            self._graph(spec.graph, where).input(spec.input)
        for spec in self.state:
            if spec.init not in ("zeros", "empty") or spec.update not in ("replace", "append"):
                raise BundleError(f"{where}: state {spec.name}: unknown init {spec.init!r} or update {spec.update!r}")
            self._graph(spec.source_graph, where).output(spec.output)
        for step_name, step in self.steps.items():
            produced: set[str] = set()
            for graph_name in step.graphs:
                graph = self._graph(graph_name, where)
                for tensor in graph.inputs:
                    if not (tensor.name in step.inputs or tensor.name in produced
                            or self.binding(graph_name, tensor.name) is not None):
                        raise BundleError(f"{where}: step {step_name!r}: input {tensor.name!r} of graph "
                                          f"{graph_name!r} is fed by nothing")
                produced.update(t.name for t in graph.outputs)
            if step.returns is not None and step.returns not in produced:
                raise BundleError(f"{where}: step {step_name!r} returns {step.returns!r}, which no graph produces")

    def binding(self, graph: str, input_name: str) -> StateSpec | CounterSpec | None:
        for spec in (*self.state, *self.counters):
            if spec.graph == graph and spec.input == input_name:
                return spec
        return None

    def _graph(self, name: str, where: str) -> GraphEntry:
        try:
            return self.graphs[name]
        except KeyError:
            raise BundleError(f"{where}: names graph {name!r}, which the bundle does not have") from None


def _by_name(tensors: tuple[TensorInfo, ...], name: str, message: str) -> TensorInfo:
    for tensor in tensors:
        if tensor.name == name:
            return tensor
    raise BundleError(f"{message} {name!r}")


def _check_file_name(name: str, where: str) -> None:
    """Manifest file names are plain names inside the bundle: no separators, no '..', not absolute."""
    if (not isinstance(name, str) or not name or name in (".", "..") or os.sep in name or "/" in name
            or (os.altsep and os.altsep in name) or "\x00" in name):
        raise BundleError(f"{where}: file name {name!r} is not a plain file name inside the bundle")


def _graph_from_dict(name: str, data: Mapping[str, Any]) -> GraphEntry:
    return GraphEntry(
        name=name, file=data["file"], sha256=data["sha256"],
        inputs=tuple(TensorInfo.from_dict(t) for t in data["inputs"]),
        outputs=tuple(TensorInfo.from_dict(t) for t in data["outputs"]),
        axes={axis: AxisRange(**r) for axis, r in data["axes"].items()},
        external_data=tuple(data.get("external_data", ())), engine=data.get("engine"))
