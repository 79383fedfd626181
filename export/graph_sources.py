"""Graph sources: each writes the graphs of one precision, one at a time, into the bundle being written.

A source is made before any work starts (so bad options fail early); `write(context, spec, path)` writes graph
`spec` to `path` and returns what the manifest should report of it (or None); `report(context, bundle,
graph_reports)` returns the precision's report on the whole bundle once it is written (the manifest's
`quantization` field). fp32 graphs are traced from the model; the others are transforms of a validated fp32
bundle of the same model (`ExportContext.fp32_bundle`, set once that bundle exists); `needs_model` says which,
so that a model handed over (`release_model`) is freed before the transforms run. `precision_transforms.py` maps every
precision of the registry (`mirasol.runtime.bundle.precisions`) to its source.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnx
from mirasol.calibration.external_data import write_graph
from mirasol.calibration.fp16 import to_fp16
from mirasol.calibration.quantize import CalibrationOptions
from mirasol.model import Mirasol
from mirasol.runtime.bundle.manifest import GraphEntry
from mirasol.runtime.bundle.reader import sha256_file
from mirasol.runtime.bundle.tensors import TensorInfo
from mirasol.runtime.errors import ExportError

from .onnx_export import export_graph, graph_metadata
from .specs import GraphSpec, derived_axes

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ExportContext:
    model: Mirasol
    specs: dict[str, GraphSpec]
    opset: int
    producer: dict[str, str]
    progress: Progress
    fp32_bundle: Path | None = None  # a validated fp32 bundle of `model`, which the transforms start from
    release_model: bool = False  # the caller hands `model` over: its weights may go once the graphs are written

    def fp32_source(self) -> Path:
        if self.fp32_bundle is None:
            raise ExportError("this precision transforms an fp32 bundle, and none was made or given")
        return self.fp32_bundle


@dataclass(frozen=True)
class PrecisionOptions:
    """Options of the precisions that take any."""

    fp16_io: bool = False  # fp16: graph inputs/outputs in fp16 too
    calibration: CalibrationOptions | None = None  # int8


class GraphSource(Protocol):
    precision: str
    needs_model: bool  # write() reads the model's weights (tracing); the transforms read only the fp32 bundle

    def write(self, context: ExportContext, spec: GraphSpec, path: Path) -> dict[str, Any] | None: ...

    def report(self, context: ExportContext, bundle: Path, graph_reports: dict[str, Any]) -> dict[str, Any]: ...


def save_graph(model: onnx.ModelProto, path: Path, precision: str, weights_dir: Path | None = None) -> None:
    """Write a transformed graph, its precision in metadata_props; weights over 2 GB go beside it (`.data`).
    `weights_dir`: where the tensors it still reads from another graph's files are (a weightless transform of an
    fp32 graph: `mirasol.calibration.external_data`). The model is consumed."""
    props = {p.key: p.value for p in model.metadata_props}
    props["mirasol.precision"] = precision
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, props)
    write_graph(model, path, weights_dir)


class TracedGraphs:
    """fp32: each graph traced from the model with torch.export."""

    precision = "fp32"
    needs_model = True

    def __init__(self, context: ExportContext, options: PrecisionOptions) -> None:
        self.metadata = graph_metadata(context.model, context.producer, self.precision)

    def write(self, context: ExportContext, spec: GraphSpec, path: Path) -> None:
        export_graph(spec, context.model, path, self.metadata, context.opset)

    def report(self, context: ExportContext, bundle: Path, graph_reports: dict[str, Any]) -> dict[str, Any]:
        return {}


class Fp16Graphs:
    """fp16: each fp32 graph converted, groups kept fp32 where measurement on the validation inputs says so."""

    precision = "fp16"
    needs_model = False

    def __init__(self, context: ExportContext, options: PrecisionOptions) -> None:
        self.fp16_io = options.fp16_io

    def write(self, context: ExportContext, spec: GraphSpec, path: Path) -> dict[str, Any]:
        rng = np.random.default_rng(1)
        feeds = [spec.example(sizes, rng) for sizes in spec.validation_sizes()]
        fp32 = onnx.load(str(context.fp32_source() / spec.file))
        model, report = to_fp16(fp32, feeds, self.fp16_io, context.progress)
        save_graph(model, path, self.precision)
        return report

    def report(self, context: ExportContext, bundle: Path, graph_reports: dict[str, Any]) -> dict[str, Any]:
        return {"fp16": graph_reports}


def graph_entry(spec: GraphSpec, directory: Path) -> GraphEntry:
    """The manifest entry of a graph file in `directory`, its IO dtypes read from the file itself."""
    path = directory / spec.file
    model = onnx.load(str(path), load_external_data=False)
    dtypes = {i.name: onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type).name
              for i in (*model.graph.input, *model.graph.output)}
    external = tuple(sorted({e.value for init in model.graph.initializer for e in init.external_data
                             if e.key == "location"}))
    return GraphEntry(
        name=spec.name, file=spec.file, sha256=sha256_file(path),
        inputs=tuple(TensorInfo(t.name, dtypes[t.name], t.shape) for t in spec.inputs),
        outputs=tuple(TensorInfo(t.name, dtypes[t.name], t.shape) for t in spec.outputs),
        axes=derived_axes(spec), external_data=external,
        external_sha256={name: sha256_file(directory / name) for name in external})
