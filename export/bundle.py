"""Write bundles: one writer for every precision (`write_bundle`), and `export_bundle`, which feeds it.

`write_bundle` takes a graph source (`graph_sources.py`: the graphs of one precision, written one at a time) and
writes, atomically (`mirasol.runtime.files.atomic`): the graphs, each checked against its PyTorch module where the
precision has a tolerance (`mirasol.runtime.bundle.precisions`), then the manifest (config, IO, axes, wiring,
producer versions, validation, the precision's report), checked by `Manifest.check` and onnx.checker. A format
change is made here once. fp32 graphs are traced from the model; every other precision transforms a validated fp32
bundle of the same model: exported first into a temporary directory, or an existing one given as `reference`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import platform
import tempfile
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import onnx
import onnxruntime
import torch

from mirasol.model import Mirasol, release_weights
from mirasol.calibration.kv_cache import KV_CACHES
from mirasol.calibration.quantize import CalibrationOptions
from mirasol.runtime.files.atomic import atomic_directory, pause_point
from mirasol.runtime.errors import ExportError, MirasolError
from mirasol.runtime.bundle.manifest import Manifest
from mirasol.runtime.files.ownership import check_output_dir
from mirasol.runtime.bundle.precisions import get_precision
from mirasol.runtime.bundle.tokenizer import ByteTokenizer

from . import DEFAULT_OPSET, kv_cache
from .precision_transforms import TRANSFORMS
from .graph_sources import ExportContext, GraphSource, PrecisionOptions, graph_entry
from .specs import GraphSpec, derived_axes, graph_specs, wiring
from .validate import compare_graph, record_references

Progress = Callable[[str], None]


def producer_versions(opset: int) -> dict[str, str]:
    def version(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "unknown"
    return {"mirasol-edge": version("mirasol-edge"), "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "opset": str(opset), "python": platform.python_version()}


def onnx_check(directory: Path, manifest: Manifest) -> None:
    """onnx.checker with full_check on every graph of the bundle."""
    for graph in manifest.graphs.values():
        try:
            onnx.checker.check_model(str(directory / graph.file), full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as bad:
            raise ExportError(f"{graph.file} fails onnx.checker: {bad}") from None


def write_bundle(out: str | Path, context: ExportContext, source: GraphSource, validate: bool = True,
                 kv_calibration: CalibrationOptions | None = None) -> Manifest:
    """Write the graphs `source` makes, validated, and the manifest, as a bundle at `out` (atomically);
    kv_calibration: carry the AV KV cache in int8, its scales calibrated on these clips (`kv_cache.py`)."""
    precision = get_precision(source.precision)
    model, progress = context.model, context.progress
    check = validate and precision.tolerance is not None
    validation: dict[str, object] = {}
    graph_reports: dict[str, object] = {}
    with atomic_directory(out) as work, tempfile.TemporaryDirectory(prefix="mirasol-references-") as references:
        def write(spec: GraphSpec) -> None:
            start = time.perf_counter()
            graph_reports[spec.name] = source.write(context, spec, work / spec.file)
            progress(f"wrote {spec.file} ({precision.name}) in {time.perf_counter() - start:.1f}s")
            pause_point(f"{spec.name} written", Path(out))

        for spec in context.specs.values():  # first what needs the model: tracing, and PyTorch's side of validation
            if source.needs_model:
                write(spec)
            if check:
                start = time.perf_counter()
                record_references(spec, model, Path(references))
                progress(f"ran {spec.name} in PyTorch for validation in {time.perf_counter() - start:.1f}s")
        if context.release_model:  # the caller handed the model over: ONNX Runtime gets its memory
            release_weights(model)
        for spec in context.specs.values():
            if not source.needs_model:
                write(spec)
            if check:
                start = time.perf_counter()
                validation[spec.name] = compare_graph(spec, Path(references), work / spec.file, precision.name)
                progress(f"validated {spec.name} against PyTorch ({validation[spec.name]['cases']} cases) "
                         f"in {time.perf_counter() - start:.1f}s")
        steps, state, counters = wiring(model.config)
        manifest = Manifest(
            config=model.config.to_dict(), precision=precision.name,
            graphs={name: graph_entry(spec, work) for name, spec in context.specs.items()},
            steps=steps, state=state, counters=counters, tokenizer=ByteTokenizer().to_dict(),
            producer=context.producer, validation=validation)
        manifest.check()
        manifest.write(work)
        onnx_check(work, manifest)
        kv_report = None
        if kv_calibration is not None:  # calibrated on fp32 graphs: the reference, or these when they are fp32
            kv_report = kv_cache.apply(work, manifest, context.specs, context.fp32_bundle or work, kv_calibration,
                                       model.config, progress)
            manifest.write(work)
        manifest.quantization = source.report(context, work, graph_reports)
        if kv_report is not None:
            manifest.quantization["kv_cache"] = kv_report
        if manifest.quantization:
            manifest.write(work)
    return manifest


def check_reference(model: Mirasol, directory: Path, specs: dict[str, GraphSpec], validate: bool,
                    release_model: bool = False) -> Manifest:
    """An existing fp32 bundle to transform: it must be this model's (config, axes and, with `validate`, every
    graph checked against PyTorch), not trusted. release_model: free the model's weights once PyTorch's side of
    the check is done (the caller needs them no more)."""
    manifest = Manifest.read(directory)
    if manifest.precision != "fp32":
        raise ExportError(f"reference bundle {directory} is {manifest.precision}; the transforms start from fp32")
    if manifest.config != model.config.to_dict():
        raise ExportError(f"reference bundle {directory} was exported from another model config")
    for name, spec in specs.items():
        entry = manifest.graphs.get(name)
        if entry is None or entry.axes != derived_axes(spec):
            raise ExportError(f"reference bundle {directory}: graph {name!r} is missing or has other axis ranges "
                              f"(another --max-batch?)")
    with tempfile.TemporaryDirectory(prefix="mirasol-references-") as references:
        for spec in specs.values() if validate else ():
            record_references(spec, model, Path(references))
        if release_model:
            release_weights(model)
        for name, spec in specs.items() if validate else ():  # raises if the weights differ
            compare_graph(spec, Path(references), directory / manifest.graphs[name].file, "fp32")
    return manifest


def export_bundle(model: Mirasol, out: str | Path, precision: str = "fp32", *, opset: int = DEFAULT_OPSET,
                  validate: bool = True, max_batch: int = 4, reference: str | Path | None = None,
                  fp16_io: bool = False, calibration: CalibrationOptions | None = None, kv: str = "float",
                  release_model: bool = False, progress: Progress = lambda _: None) -> Manifest:
    """Export `model` as a bundle of `precision` at `out` (written atomically); returns its manifest.

    reference: an fp32 bundle of this model that fp16/int8 start from (checked against the model), instead of
    exporting one; fp16_io: fp16 graph inputs/outputs; calibration: how int8 is calibrated (required for int8), and
    the clips the int8 KV cache's scales are calibrated on; kv: how the AV KV cache is carried, "float" (as the graph
    computes) or "int8" (`kv_cache.py`, needs `calibration`);
    release_model: the caller hands `model` over: once its graphs are written and run in PyTorch for validation,
    its weights are freed (`release_weights`), so ONNX Runtime checks the graphs without the model beside them
    (how mirasol3b validates in 24 GB); the model is unusable afterwards.
    """
    try:
        entry = get_precision(precision)
    except MirasolError as unknown:
        raise ExportError(str(unknown)) from None
    if entry.needs_calibration and calibration is None:
        raise ExportError(f"{precision} needs calibration data (mirasol-export --precision {precision} "
                          f"--calibration-data DIR|synthetic)")
    if kv not in KV_CACHES:
        raise ExportError(f"kv cache {kv!r} is not one of {KV_CACHES}")
    if kv == "int8" and calibration is None:
        raise ExportError("an int8 KV cache needs calibration data for its scales (mirasol-export --kv-cache int8 "
                          "--calibration-data DIR|synthetic)")
    if precision == "fp32" and reference is not None:
        raise ExportError("a reference bundle is what fp16 and int8 start from; fp32 is traced from the model")
    check_output_dir(out, "bundle")  # before any work: a target holding anything not ours is refused
    model = model.eval()
    context = ExportContext(model, graph_specs(model.config, max_batch=max_batch), opset, producer_versions(opset),
                            progress, release_model=release_model)
    source = TRANSFORMS[precision](context, PrecisionOptions(fp16_io=fp16_io, calibration=calibration))
    # a precision without a PyTorch check of its own (int8) needs the weights no more once its fp32 bundle exists
    free_early = release_model and entry.tolerance is None
    with contextlib.ExitStack() as stack:
        if precision != "fp32":
            if reference is not None:
                check_reference(model, Path(reference), context.specs, validate, release_model=free_early)
                progress(f"reference fp32 bundle {reference} matches the model")
            else:
                reference = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mirasol-fp32-"))) / "fp32"
                export_bundle(model, reference, "fp32", opset=opset, validate=validate, max_batch=max_batch,
                              release_model=free_early, progress=progress)
            context = dataclasses.replace(context, fp32_bundle=Path(reference))
        return write_bundle(out, context, source, validate, calibration if kv == "int8" else None)
