"""`export_bundle`: model -> the four graphs, validated, in a bundle directory with its manifest."""
from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch

from mirasol.model import Mirasol
from mirasol.runtime.atomic import atomic_directory
from mirasol.runtime.backends.base import TensorInfo
from mirasol.runtime.bundle import sha256_file
from mirasol.runtime.errors import ExportError
from mirasol.runtime.manifest import GraphEntry, Manifest
from mirasol.runtime.tokenizer import ByteTokenizer

from .fp16 import to_fp16
from .onnx_export import DEFAULT_OPSET, EXTERNAL_DATA_BYTES, export_graph, graph_metadata
from .specs import GraphSpec, derived_axes, graph_specs, wiring
from .validate import validate_graph

PRECISIONS = ("fp32", "fp16")
TOKENIZER_FILE = "tokenizer.json"
Progress = Callable[[str], None]


def producer_versions(opset: int) -> dict[str, str]:
    def version(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "unknown"
    return {"mirasol-edge": version("mirasol-edge"), "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "opset": str(opset), "python": platform.python_version()}


def graph_entry(spec: GraphSpec, directory: Path, onnx_model: onnx.ModelProto | None = None) -> GraphEntry:
    """The manifest entry of a graph file in `directory`, its IO read from the file itself."""
    path = directory / spec.file
    model = onnx_model or onnx.load(str(path), load_external_data=False)
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


def export_bundle(model: Mirasol, out: str | Path, precision: str = "fp32", opset: int = DEFAULT_OPSET,
                  validate: bool = True, max_batch: int = 4, fp16_io: bool = False,
                  progress: Progress = lambda _: None) -> Manifest:
    """Export `model` to a bundle at `out`, written atomically; returns its manifest."""
    if precision not in PRECISIONS:
        raise ExportError(f"precision {precision!r} is not one of {PRECISIONS} (int8: mirasol-export "
                          f"--precision int8 --calibration-data PATH)")
    model = model.eval()
    specs = graph_specs(model.config, max_batch=max_batch)
    producer = producer_versions(opset)
    metadata_props = graph_metadata(model, producer, precision)
    validation: dict[str, object] = {}
    precision_report: dict[str, object] = {}
    with atomic_directory(out) as work:
        for spec in specs.values():
            start = time.perf_counter()
            path = export_graph(spec, model, work / spec.file, metadata_props, opset)
            progress(f"exported {spec.file} in {time.perf_counter() - start:.1f}s")
            if precision == "fp16":
                rng = np.random.default_rng(1)
                feeds = [spec.example(sizes, rng) for sizes in spec.validation_sizes()]
                fp16_model, precision_report[spec.name] = to_fp16(onnx.load(str(path)), feeds, fp16_io, progress)
                large = sum(t.ByteSize() for t in fp16_model.graph.initializer) >= EXTERNAL_DATA_BYTES
                onnx.save(fp16_model, str(path), save_as_external_data=large, location=f"{spec.file}.data")
            if validate:
                start = time.perf_counter()
                validation[spec.name] = validate_graph(spec, model, path, precision)
                progress(f"validated {spec.name} against PyTorch ({validation[spec.name]['cases']} cases) "
                         f"in {time.perf_counter() - start:.1f}s")
        (work / TOKENIZER_FILE).write_text(json.dumps(ByteTokenizer().to_dict()))
        steps, state, counters = wiring(model.config)
        manifest = Manifest(
            config=model.config.to_dict(), precision=precision,
            graphs={name: graph_entry(spec, work) for name, spec in specs.items()},
            steps=steps, state=state, counters=counters, tokenizer=ByteTokenizer().to_dict(),
            producer=producer, validation=validation,
            quantization={"fp16": precision_report} if precision_report else {})
        manifest.check()
        manifest.write(work)
        onnx_check(work, manifest)
    return manifest


def onnx_check(directory: Path, manifest: Manifest) -> None:
    """onnx.checker with full_check on every graph of the bundle."""
    for graph in manifest.graphs.values():
        try:
            onnx.checker.check_model(str(directory / graph.file), full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as bad:
            raise ExportError(f"{graph.file} fails onnx.checker: {bad}") from None
