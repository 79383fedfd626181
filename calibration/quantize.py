"""`export_int8_bundle`: model -> fp32 bundle -> calibration on real activations -> int8 bundle + accuracy report.

1. The fp32 bundle is exported (and validated against PyTorch) to a temporary directory, or an existing fp32
   bundle of the same model is given as `reference` (checked against the model, not trusted).
2. It is loaded with the runtime's `Pipeline` through a recording backend, and the calibration clips are
   streamed through it, with questions asked mid-clip and at the end: every graph's feeds are what the
   runtime really gives it (real TTM memory, KV caches at every fill, av_memory of every length, prompts
   and per-token steps), sampled uniformly up to `max_samples` calls per graph.
3. Per graph, activation ranges are calibrated on those feeds (minmax / entropy / percentile), then a
   sensitivity sweep quantizes it with each candidate group kept fp32 in turn (`groups.py`) and measures the
   error against fp32 on the same feeds; groups whose fp32 cuts the error by KEEP_FACTOR, and which hold at
   most MAX_KEEP_WEIGHT_SHARE of the graph's weights, stay fp32.
4. The int8 graphs (flavour `cpu`, `cpu-dynamic` or `tensorrt`, `flavours.py`) are written atomically with
   the fp32 bundle's wiring, and compared with the fp32 bundle on held-out clips (`report.py`); the report goes into the
   manifest's `quantization` field and is printed.

Ranges and sweep decisions are cached per graph, keyed by the fp32 graph's sha256, the calibration data's
digest and every setting that changes them: a re-run with the same data skips steps 2 and 3.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod
from onnxruntime.quantization.calibrate import TensorsData, create_calibrator, load_tensors_data, save_tensors_data
from onnxruntime.quantization.quant_utils import load_model_with_shape_infer

from mirasol.runtime.atomic import atomic_directory
from mirasol.export.bundle import TOKENIZER_FILE, export_bundle, graph_entry, onnx_check, producer_versions
from mirasol.export.onnx_export import DEFAULT_OPSET, EXTERNAL_DATA_BYTES
from mirasol.export.specs import derived_axes, graph_specs, wiring
from mirasol.export.validate import validate_graph
from mirasol.model import Mirasol
from mirasol.runtime.backends.onnxruntime import OnnxRuntimeBackend
from mirasol.runtime.errors import ExportError
from mirasol.runtime.manifest import Manifest
from mirasol.runtime.pipeline import Pipeline
from mirasol.runtime.tokenizer import ByteTokenizer

from .data import ClipSet, iter_loaded, load_clips
from .flavours import Flavour, get_flavour
from .groups import sweep_groups
from .record import FeedRecorder, RecordingBackend
from .report import evaluate, format_report

Progress = Callable[[str], None]
METHODS = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
           "percentile": CalibrationMethod.Percentile}
CACHE_VERSION = 2
KEEP_FACTOR = 1.5  # a group stays fp32 when keeping it fp32 divides the graph's error by at least this
MAX_KEEP_WEIGHT_SHARE = 0.25  # ... and it holds at most this share of the graph's quantizable weights
SWEEP_SAMPLES = 16  # recorded calls per graph the sweep measures on
QUESTION_TOKENS = 12  # greedy tokens per calibration question
CALIBRATION_BATCH = 16  # recorded calls run through the calibrator per collect_data


def default_cache_dir() -> Path:
    root = os.environ.get("MIRASOL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mirasol")
    return Path(root) / "calibration"


class _Reader(CalibrationDataReader):
    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._feeds = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


# ---------------------------------------------------------------- recording
def record_feeds(bundle: Path, clip_set: ClipSet, max_samples: int, seed: int = 0, bar: bool | None = None
                 ) -> FeedRecorder:
    """Stream the calibration clips through the bundle, asking questions mid-clip and at the end."""
    recorder = FeedRecorder(max_per_graph=max_samples, seed=seed)
    pipe = Pipeline.load(bundle, backend=RecordingBackend(OnnxRuntimeBackend(), recorder), verify=False)
    for clip, video, audio in iter_loaded(clip_set.calibration, "calibration clips", bar):
        chunks = pipe.split_clip(video, audio)
        questions = list(clip.questions)
        stream = pipe.stream()
        for i, (chunk_video, chunk_audio) in enumerate(chunks):
            stream.push(chunk_video, chunk_audio)
            if len(chunks) > 1 and i == len(chunks) // 2 - 1 and len(questions) > 1:
                _ask(pipe, stream, questions.pop(0))
        for question in questions:
            _ask(pipe, stream, question)
    return recorder


def _ask(pipe: Pipeline, stream: Any, question: str) -> None:
    room = pipe.max_text_len - len(pipe.tokenizer.prompt(question))
    if room >= 1:
        stream.token_ids(question, min(QUESTION_TOKENS, room))


# ---------------------------------------------------------------- calibration and the sweep
def calibrate_ranges(graph: Path, feeds: list[dict[str, np.ndarray]], method: str, op_types: tuple[str, ...],
                     work: Path) -> TensorsData:
    """Activation ranges of the inputs/outputs of the graph's `op_types` nodes over `feeds`."""
    calibrator = create_calibrator(graph, list(op_types), augmented_model_path=str(work / f"{graph.stem}.aug.onnx"),
                                   calibrate_method=METHODS[method])
    # in batches: each collect_data call reduces what it collected into the running ranges / histograms, so the
    # intermediate tensors of only one batch are held at a time. A batch holds feeds of one shape (the histogram
    # collectors stack a batch's values of each tensor into one array).
    by_shape: dict[tuple, list[dict[str, np.ndarray]]] = {}
    for feed in feeds:
        by_shape.setdefault(tuple((k, v.shape) for k, v in feed.items()), []).append(feed)
    with contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrators print their progress
        for group in by_shape.values():
            for start in range(0, len(group), CALIBRATION_BATCH):
                calibrator.collect_data(_Reader(group[start:start + CALIBRATION_BATCH]))
        ranges = calibrator.compute_data()
    del calibrator
    return ranges


def _session(model: onnx.ModelProto, options: ort.SessionOptions | None = None) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"])


def graph_error(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], references: list[list[np.ndarray]],
                options: ort.SessionOptions | None = None) -> tuple[float, dict[str, float]]:
    """Relative RMS error per output over all feeds (sqrt(sum err^2 / sum ref^2)), and the worst of them."""
    session = _session(model, options)
    names = [o.name for o in session.get_outputs()]
    err = dict.fromkeys(names, 0.0)
    ref = dict.fromkeys(names, 0.0)
    for feed, reference in zip(feeds, references):
        for name, got, want in zip(names, session.run(None, feed), reference):
            diff = got.astype(np.float64) - want
            err[name] += float((diff * diff).sum()) if np.isfinite(got).all() else float("inf")
            ref[name] += float((want.astype(np.float64) ** 2).sum())
    per_output = {n: float(np.sqrt(err[n] / ref[n])) for n in names if ref[n] > 0}
    return max(per_output.values(), default=0.0), per_output


def sensitivity_sweep(name: str, model: onnx.ModelProto, ranges: TensorsData | None, flavour: Flavour,
                      feeds: list[dict[str, np.ndarray]], log: Progress = lambda _: None
                      ) -> tuple[set[str], dict[str, Any]]:
    """Which candidate groups stay fp32, by the error of quantizing with each one kept fp32 in turn."""
    reference_session = _session(model)
    references = [reference_session.run(None, feed) for feed in feeds]

    def error(exclude: set[str] | frozenset[str]) -> float:
        return graph_error(flavour.quantize(model, ranges, exclude), feeds, references, flavour.session_options())[0]

    groups = sweep_groups(model, flavour.quantizable(model))
    baseline = error(set())
    keep: set[str] = set()
    decisions: dict[str, dict[str, Any]] = {}
    for group in groups.values():
        entry: dict[str, Any] = group.to_dict()
        if not group.quantized:
            entry.update(error_kept_fp32=baseline, kept_fp32=True, reason="reaches no quantized node: already fp32")
        else:
            err = error(group.excluded)
            gain = baseline / max(err, 1e-12)
            hurts = gain >= KEEP_FACTOR
            kept = hurts and group.weight_share <= MAX_KEEP_WEIGHT_SHARE
            reason = ("hurts accuracy in int8" if kept else
                      f"hurts accuracy, but holds {group.weight_share:.0%} of the weights: stays int8" if hurts else
                      "harmless in int8")
            entry.update(error_kept_fp32=err, gain=gain, kept_fp32=kept, reason=reason)
            if kept:
                keep |= group.excluded
            log(f"  {name}: {group.name} ({len(group.quantized)} quantized nodes, {group.weight_share:.0%} of weights)"
                f" kept fp32 -> error {err:.3g} (all int8 {baseline:.3g}): {reason}")
        decisions[group.name] = entry
    final = error(keep) if keep else baseline
    log(f"  {name}: error vs fp32 {baseline:.3g} all int8 -> {final:.3g} with the chosen groups fp32")
    return keep, {"baseline_error": baseline, "final_error": final, "samples": len(feeds), "groups": decisions,
                  "keep_factor": KEEP_FACTOR, "max_keep_weight_share": MAX_KEEP_WEIGHT_SHARE,
                  "excluded_nodes": len(keep)}


# ---------------------------------------------------------------- cache
def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


class _Cache:
    def __init__(self, directory: Path | None) -> None:
        self.directory = directory

    def ranges(self, key: str) -> TensorsData | None:
        path = self._path(key, "ranges")
        if path is None or not path.is_file():
            return None
        try:
            return load_tensors_data(path)
        except (ValueError, KeyError, TypeError, json.JSONDecodeError):
            return None

    def save_ranges(self, key: str, ranges: TensorsData) -> None:
        path = self._path(key, "ranges")
        if path is not None:
            save_tensors_data(ranges, path)

    def sweep(self, key: str) -> dict[str, Any] | None:
        path = self._path(key, "sweep")
        if path is None or not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (ValueError, OSError):
            return None

    def save_sweep(self, key: str, value: dict[str, Any]) -> None:
        path = self._path(key, "sweep")
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
            tmp.write_text(json.dumps(value, default=float))
            tmp.replace(path)

    def _path(self, key: str, kind: str) -> Path | None:
        return None if self.directory is None else self.directory / f"{key}.{kind}.json"


# ---------------------------------------------------------------- the reference fp32 bundle
def check_reference(model: Mirasol, directory: Path, max_batch: int) -> Manifest:
    """An existing fp32 bundle used as the reference: it must be this model's, checked against PyTorch."""
    manifest = Manifest.read(directory)
    if manifest.precision != "fp32":
        raise ExportError(f"reference bundle {directory} is {manifest.precision}; int8 calibrates an fp32 bundle")
    if manifest.config != model.config.to_dict():
        raise ExportError(f"reference bundle {directory} was exported from another model config")
    for name, spec in graph_specs(model.config, max_batch=max_batch).items():
        entry = manifest.graphs.get(name)
        if entry is None or entry.axes != derived_axes(spec):
            raise ExportError(f"reference bundle {directory}: graph {name!r} is missing or has other axis ranges "
                              f"(another --max-batch?)")
        validate_graph(spec, model, directory / entry.file, "fp32")  # raises if the weights differ
    return manifest


# ---------------------------------------------------------------- the bundle
def export_int8_bundle(model: Mirasol, out: str | Path, calibration_data: str, clips: int = 16,
                       opset: int = DEFAULT_OPSET, max_batch: int = 4, progress: Progress = lambda _: None, *,
                       flavour: str | Flavour = "cpu", method: str = "minmax", held_out: int = 4,
                       max_chunks: int | None = None, max_samples: int = 64, reference: str | Path | None = None,
                       validate: bool = True, cache_dir: str | Path | None = None, use_cache: bool = True,
                       seed: int = 0, bar: bool | None = None) -> Manifest:
    """Calibrate `model` on `calibration_data` ('synthetic' or a directory of .npz / media clips) and write an
    int8 bundle to `out` (atomically); returns its manifest, whose `quantization` field holds the report.

    flavour: "cpu" (ONNX Runtime on x86: calibrated QDQ), "cpu-dynamic" (ranges per call) or "tensorrt"
    (explicit Q/DQ for TensorRT), see flavours.py; method: "minmax", "entropy" or "percentile";
    clips / held_out: calibration and held-out clips; max_chunks: chunks per clip
    (default the config's clip length); max_samples: recorded calls per graph to calibrate on; reference: an
    existing fp32 bundle of this model to calibrate (checked against the model) instead of exporting one.
    """
    start = time.perf_counter()
    flavour = get_flavour(flavour)
    if method not in METHODS:
        raise ExportError(f"calibration method {method!r} is not one of {sorted(METHODS)}")
    model = model.eval()
    config = model.config
    clip_set = load_clips(calibration_data, config, clips=clips, held_out=held_out, max_chunks=max_chunks,
                          seed=seed, log=progress)
    progress(f"calibration data: {clip_set.kind} ({clip_set.generator}, {clip_set.source}): "
             f"{len(clip_set.calibration)} calibration clips, {len(clip_set.held_out)} held-out clips")
    specs = graph_specs(config, max_batch=max_batch)
    cache = _Cache(Path(cache_dir) if cache_dir else default_cache_dir()) if use_cache else _Cache(None)
    with tempfile.TemporaryDirectory(prefix="mirasol-int8-") as tmp_name:
        tmp = Path(tmp_name)
        if reference is not None:
            fp32_dir = Path(reference)
            fp32_manifest = check_reference(model, fp32_dir, max_batch)
            progress(f"reference fp32 bundle {fp32_dir} matches the model")
        else:
            fp32_dir = tmp / "fp32"
            fp32_manifest = export_bundle(model, fp32_dir, precision="fp32", opset=opset, validate=validate,
                                          max_batch=max_batch, progress=progress)
        settings = {"method": method, "op_types": list(flavour.op_types), "max_samples": max_samples,
                    "question_tokens": QUESTION_TOKENS, "version": CACHE_VERSION, "seed": seed,
                    "onnxruntime": ort.__version__}
        range_keys = {name: _key("ranges", g.sha256, clip_set.digest, settings)
                      for name, g in fp32_manifest.graphs.items()}
        sweep_keys = {name: _key("sweep", range_keys[name], flavour.settings(), KEEP_FACTOR, MAX_KEEP_WEIGHT_SHARE,
                                 SWEEP_SAMPLES) for name in fp32_manifest.graphs}
        ranges = {name: cache.ranges(key) for name, key in range_keys.items()}
        sweeps = {name: cache.sweep(key) for name, key in sweep_keys.items()}
        cached = [name for name in specs if (ranges[name] is not None or not flavour.uses_ranges)
                  and sweeps[name] is not None]
        recorder = None
        if len(cached) < len(specs):
            t0 = time.perf_counter()
            recorder = record_feeds(fp32_dir, clip_set, max_samples, seed, bar)
            progress(f"recorded graph inputs in {time.perf_counter() - t0:.1f}s: "
                     + ", ".join(f"{g} {len(recorder.calls.get(g, []))}/{recorder.seen.get(g, 0)} calls"
                                 for g in specs))
        else:
            progress(f"calibration cache hit ({cache.directory}): ranges and sweep decisions of every graph reused")
        quantized: dict[str, onnx.ModelProto] = {}
        sweep_report: dict[str, Any] = {}
        for name, spec in specs.items():
            t0 = time.perf_counter()
            path = fp32_dir / fp32_manifest.graphs[name].file
            fp32_model = load_model_with_shape_infer(path)
            feeds = recorder.feeds(name) if recorder is not None else []
            if recorder is not None and not feeds:
                raise ExportError(f"calibration recorded no inputs for graph {name!r}")
            if ranges[name] is None and flavour.uses_ranges:
                ranges[name] = calibrate_ranges(path, feeds, method, flavour.op_types, tmp)
                cache.save_ranges(range_keys[name], ranges[name])
            if sweeps[name] is None:
                sample = [feeds[i] for i in np.linspace(0, len(feeds) - 1, min(SWEEP_SAMPLES, len(feeds))).astype(int)]
                exclude, decision = sensitivity_sweep(name, fp32_model, ranges[name], flavour, sample, progress)
                sweeps[name] = {"exclude": sorted(exclude), "report": decision}
                cache.save_sweep(sweep_keys[name], sweeps[name])
            sweep = sweeps[name]
            quantized[name] = flavour.quantize(fp32_model, ranges[name], set(sweep["exclude"]))
            _set_precision(quantized[name])
            sweep_report[name] = sweep["report"]
            progress(f"quantized {spec.file} ({flavour.name}{', ' + method if flavour.uses_ranges else ''}) in "
                     f"{time.perf_counter() - t0:.1f}s")
        del recorder
        producer = producer_versions(opset)
        with atomic_directory(out) as work:
            for name, spec in specs.items():
                large = sum(t.ByteSize() for t in quantized[name].graph.initializer) >= EXTERNAL_DATA_BYTES
                onnx.save(quantized[name], str(work / spec.file), save_as_external_data=large,
                          location=f"{spec.file}.data")
            (work / TOKENIZER_FILE).write_text(json.dumps(ByteTokenizer().to_dict()))
            steps, state, counters = wiring(config)
            manifest = Manifest(
                config=config.to_dict(), precision="int8",
                graphs={name: graph_entry(spec, work) for name, spec in specs.items()},
                steps=steps, state=state, counters=counters, tokenizer=ByteTokenizer().to_dict(),
                producer=producer, validation={}, quantization={})
            manifest.check()
            manifest.write(work)
            onnx_check(work, manifest)
            t0 = time.perf_counter()
            accuracy = evaluate(fp32_dir, work, clip_set.held_out, bar=bar, int8_options=flavour.backend_options())
            progress(f"compared with fp32 on {len(clip_set.held_out)} held-out clips in "
                     f"{time.perf_counter() - t0:.1f}s")
            manifest.quantization = {
                "format": "int8", "flavour": flavour.settings(),
                "method": method if flavour.uses_ranges else "dynamic (ranges per call)",
                "data": clip_set.describe(), "calibration": {"max_samples_per_graph": max_samples,
                                                              "question_tokens": QUESTION_TOKENS,
                                                              "cached": sorted(cached)},
                "sweep": sweep_report, "accuracy": accuracy,
                "reference": {"precision": "fp32", "graphs": {n: g.sha256 for n, g in fp32_manifest.graphs.items()},
                              "validation": fp32_manifest.validation}}
            manifest.write(work)
    progress(format_report(manifest.quantization))
    progress(f"int8 bundle written in {time.perf_counter() - start:.1f}s")
    return manifest


def _set_precision(model: onnx.ModelProto) -> None:
    props = {p.key: p.value for p in model.metadata_props}
    props["mirasol.precision"] = "int8"
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, props)
