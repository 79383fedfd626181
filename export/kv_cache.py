"""`mirasol-export --kv-cache int8`: the AV KV cache carried in int8 (`mirasol.calibration.kv_cache`), for a bundle
of any precision.

Once the bundle's graphs are written and validated, and its manifest checked: the scales are calibrated on the fp32
graphs (the reference fp32 bundle, or the bundle itself at fp32) while the calibration clips stream through them;
the graph that carries the cache is rewritten (its weights are not touched: only the proto changes, beside the same
files); and the rewrite is checked against the float graph it came from, case by case (the spec's validation sizes:
an empty, a typical and a full window) with the same quantized cache fed to both: the context within the bundle's
own tolerance, each written value within half a quantization step of the float graph's. The manifest then declares
the state int8, and its `quantization.kv_cache` says how.
"""
from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from mirasol.calibration.data import load_clips
from mirasol.calibration.external_data import load_weightless
from mirasol.calibration.kv_cache import HEADROOM, KvAbsmax, KvCodec, kv_states, quantize_graph, scales_from_absmax
from mirasol.calibration.quantize import CalibrationOptions, stream_clips
from mirasol.calibration.record import RecordingBackend
from mirasol.runtime.backends.onnxruntime import OnnxRuntimeBackend
from mirasol.runtime.bundle.manifest import Manifest
from mirasol.runtime.bundle.precisions import PRECISIONS, Tolerance
from mirasol.runtime.errors import ExportError
from mirasol.runtime.pipeline import Pipeline

from .graph_sources import graph_entry
from .specs import GraphSpec
from .validate import validation_cases

FLOAT_TOLERANCE = PRECISIONS["fp32"].tolerance  # a graph with no tolerance of its own (int8, int4) is deterministic


def calibrate_scales(bundle: Path, calibration: CalibrationOptions, config: Any,
                     progress=lambda _: None) -> dict[str, np.ndarray]:
    """Per KV state of the fp32 `bundle`: scales [H, hd] from the largest |value| its graph writes while the
    calibration clips stream."""
    clip_set = load_clips(calibration.data, config, clips=calibration.clips, held_out=calibration.held_out,
                          max_chunks=calibration.max_chunks, seed=calibration.seed, log=progress)
    absmax = KvAbsmax(kv_states(Manifest.read(bundle)))
    backend = RecordingBackend(OnnxRuntimeBackend(threads=calibration.threads), absmax)
    with Pipeline.load(bundle, backend=backend, verify=False) as pipe:
        chunks = stream_clips(pipe, clip_set.calibration, calibration.bar, "KV cache calibration clips")
    missing = [s.name for s in kv_states(Manifest.read(bundle)) if s.name not in absmax.absmax]
    if missing:
        raise ExportError(f"KV cache calibration saw no values of {missing} ({chunks} chunks streamed)")
    progress(f"KV cache scales calibrated on {chunks} chunks of {len(clip_set.calibration)} clips "
             f"({clip_set.kind} data)")
    return {name: scales_from_absmax(peak) for name, peak in absmax.absmax.items()}


def apply(directory: Path, manifest: Manifest, specs: dict[str, GraphSpec], fp32_bundle: Path,
          calibration: CalibrationOptions, config: Any, progress=lambda _: None) -> dict[str, Any]:
    """Carry the KV cache of the bundle being written in `directory` in int8; updates `manifest` (not written)
    and returns what `quantization.kv_cache` reports."""
    start = time.perf_counter()
    states = kv_states(manifest)
    scales = calibrate_scales(fp32_bundle, calibration, config, progress)
    checks: dict[str, Any] = {}
    for graph in sorted({s.graph for s in states}):
        entry, own = manifest.graphs[graph], [s for s in states if s.graph == graph]
        path = directory / entry.file
        float_copy = directory / f".{entry.file}.float-kv.onnx"  # beside it: its external data resolves the same
        path.replace(float_copy)
        try:
            onnx.save(quantize_graph(load_weightless(float_copy), own, scales), str(path))
            onnx.checker.check_model(str(path), full_check=True)
            checks[graph] = check_graph(specs[graph], float_copy, path, KvCodec.from_graph(path, own),
                                        PRECISIONS[manifest.precision].tolerance)
        finally:
            float_copy.unlink(missing_ok=True)
        manifest.graphs[graph] = dataclasses.replace(graph_entry(specs[graph], directory), engine=entry.engine)
    manifest.check()
    window = {s.name: _window_elements(manifest, s) for s in states}
    elements = sum(window.values())
    report = {"dtype": "int8", "states": [s.name for s in states], "scales": "fixed per (head, channel)",
              "headroom": HEADROOM, "calibration": {"data": calibration.data, "clips": calibration.clips,
                                                     "graphs": "fp32"},
              "window_bytes_per_stream": {"int8": elements, "float16": 2 * elements, "float32": 4 * elements},
              "check": checks}
    progress(f"KV cache in int8: {len(states)} states, {elements / 2 ** 20:.1f} MiB per stream at a full window "
             f"(float16 {2 * elements / 2 ** 20:.1f} MiB), checked against the float graph in "
             f"{time.perf_counter() - start:.1f}s")
    return report


def _window_elements(manifest: Manifest, state: Any) -> int:
    """Elements of one stream's state tensor at its full window (batch 1)."""
    shape = manifest.graphs[state.graph].input(state.input).shape
    return int(np.prod([state.window if i == state.axis else d for i, d in enumerate(shape) if d != "batch"]))


def check_graph(spec: GraphSpec, float_graph: Path, int8_graph: Path, codec: KvCodec,
                tolerance: Tolerance | None) -> dict[str, Any]:
    """The int8-KV graph against the float graph it was made from, on the spec's validation cases at batch 1 with
    the same quantized cache: outputs other than the cache within `tolerance` (fp32's where None); cache values
    within half a quantization step where they are not clipped. Raises ExportError on a failure."""
    tolerance = tolerance or FLOAT_TOLERANCE
    cases = [(sizes, feeds) for sizes, feeds in validation_cases(spec) if sizes.get("batch", 1) == 1]
    with tempfile.TemporaryDirectory(prefix="mirasol-kv-check-") as scratch:
        session = ort.InferenceSession(str(float_graph), providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        half_float = any(i.type == "tensor(float16)" for i in session.get_inputs())
        for index, (_, feeds) in enumerate(cases):  # the float graph alone first: never two of them in memory
            float_feeds = _typed(session, codec.decode(codec.encode(feeds)))
            np.savez(Path(scratch) / f"{index}.npz", **dict(zip(names, session.run(names, float_feeds))))
        del session
        session = ort.InferenceSession(str(int8_graph), providers=["CPUExecutionProvider"])
        # half a step, plus the rounding of the graph's own float type at the largest code
        bound_steps = 0.5 + 127 * (2.0 ** -10 if half_float else 2.0 ** -22)
        worst: dict[str, float] = {}
        clipped = total = 0
        failures: list[str] = []
        for index, (sizes, feeds) in enumerate(cases):
            got = codec.decode(dict(zip(names, session.run(names, _typed(session, codec.encode(feeds))))))
            with np.load(Path(scratch) / f"{index}.npz", allow_pickle=False) as reference:
                for name in names:
                    want, value = reference[name].astype(np.float32), got[name].astype(np.float32)
                    if not want.size:
                        continue
                    if name in codec.scales:
                        step = np.broadcast_to(codec.scales[name], want.shape)  # [1, H, 1, hd]
                        inside = np.abs(want) <= 127.5 * step
                        clipped += int((~inside).sum())
                        total += want.size
                        error = float((np.abs(value - want) / step)[inside].max(initial=0.0))
                        bound = bound_steps
                    else:
                        error = float(np.abs(value - want).max())
                        bound = tolerance.bound(float(np.abs(want).max()))
                    worst[name] = max(worst.get(name, 0.0), error)
                    if not error <= bound:
                        failures.append(f"{name} at {sizes}: {error:.3g} > {bound:.3g}")
    if failures:
        raise ExportError(f"{int8_graph.name}: the int8 KV cache changes the graph's results: "
                          + "; ".join(failures[:4]))
    return {"cases": len(cases), "max_error": worst, "cache_error_unit": "quantization steps",
            "clipped_share": clipped / max(total, 1)}


def _typed(session: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Float feeds in the float type the session declares (an fp16-IO graph takes float16)."""
    half = {i.name for i in session.get_inputs() if i.type == "tensor(float16)"}
    return {k: v.astype(np.float16) if k in half else v for k, v in feeds.items()}
