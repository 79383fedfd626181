"""int8 calibration primitives: record what each graph sees, calibrate activation ranges, sweep sensitivity.

1. `record_feeds`: the fp32 bundle is loaded with the runtime's `Pipeline` through a recording backend, and the
   calibration clips are streamed through it, with questions asked mid-clip and at the end: every graph's feeds
   are what the runtime really gives it (real TTM memory, KV caches at every fill, av_memory of every length,
   prompts and per-token steps), sampled uniformly up to `max_samples` calls per graph.
2. `calibrate_ranges`: per graph, activation ranges on those feeds (minmax / entropy / percentile).
3. `sensitivity_sweep`: the graph quantized with each candidate group kept fp32 in turn (`groups.py`), the error
   measured against fp32 on the same feeds; groups whose fp32 cuts the error by KEEP_FACTOR, and which hold at
   most MAX_KEEP_WEIGHT_SHARE of the graph's weights, stay fp32.
4. `CalibrationCache`: ranges and sweep decisions per graph, keyed by the fp32 graph's sha256, the calibration
   data's digest and every setting that changes them, so a re-run with the same data skips steps 1 to 3.

The int8 bundle itself is written by the exporter (`mirasol.export.int8`), which drives these.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod
from onnxruntime.quantization.calibrate import TensorsData, create_calibrator, load_tensors_data, save_tensors_data

from mirasol.runtime.backends.onnxruntime import OnnxRuntimeBackend
from mirasol.runtime.files.atomic import atomic_file, prepare_output_dir, write_file
from mirasol.runtime.pipeline import Pipeline

from .data import ClipSet, iter_loaded
from .int8_targets import Int8Recipe
from .groups import sweep_groups
from .record import FeedRecorder, RecordingBackend

Progress = Callable[[str], None]
METHODS = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
           "percentile": CalibrationMethod.Percentile}
CACHE_VERSION = 2
KEEP_FACTOR = 1.5  # a group stays fp32 when keeping it fp32 divides the graph's error by at least this
MAX_KEEP_WEIGHT_SHARE = 0.25  # ... and it holds at most this share of the graph's quantizable weights
SWEEP_SAMPLES = 16  # recorded calls per graph the sweep measures on
QUESTION_TOKENS = 12  # greedy tokens per calibration question
CALIBRATION_BATCH = 16  # recorded calls run through the calibrator per collect_data
CACHE_FILES = re.compile(r"[0-9a-f]{24}\.(ranges|sweep)\.json(\.tmp-\d+)?")  # a cache written before its marker


@dataclass(frozen=True)
class CalibrationOptions:
    """How an int8 bundle is calibrated.

    data: 'synthetic' or a directory of .npz / media clips; clips / held_out: calibration and held-out clips (the
    held-out ones feed the accuracy report); target: "cpu", "cpu-dynamic" or "tensorrt", where the int8 graphs run
    (or an Int8Recipe: `int8_targets.py`); method:
    "minmax", "entropy" or "percentile"; max_chunks: chunks per clip (default the config's clip length);
    max_samples: recorded calls per graph to calibrate on; cache_dir / use_cache: the calibration cache.
    """

    data: str
    clips: int = 16
    held_out: int = 4
    target: str | Int8Recipe = "cpu"
    method: str = "minmax"
    max_chunks: int | None = None
    max_samples: int = 64
    cache_dir: str | Path | None = None
    use_cache: bool = True
    seed: int = 0
    bar: bool | None = None


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


def sensitivity_sweep(name: str, model: onnx.ModelProto, ranges: TensorsData | None, recipe: Int8Recipe,
                      feeds: list[dict[str, np.ndarray]], log: Progress = lambda _: None
                      ) -> tuple[set[str], dict[str, Any]]:
    """Which candidate groups stay fp32, by the error of quantizing with each one kept fp32 in turn."""
    reference_session = _session(model)
    references = [reference_session.run(None, feed) for feed in feeds]

    def error(exclude: set[str] | frozenset[str]) -> float:
        return graph_error(recipe.quantize(model, ranges, exclude), feeds, references, recipe.session_options())[0]

    groups = sweep_groups(model, recipe.quantizable(model))
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
def cache_key(*parts: Any) -> str:
    """A short digest of everything that decides a cached value."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


class CalibrationCache:
    """Calibrated ranges and sweep decisions on disk (`directory` None: no cache)."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = None if directory is None else prepare_output_dir(directory, "calibration cache", CACHE_FILES)

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
            with atomic_file(path) as tmp:  # onnxruntime's writer opens its path as it is: a temporary of ours
                save_tensors_data(ranges, str(tmp))

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
            write_file(path, json.dumps(value, default=float))

    def _path(self, key: str, kind: str) -> Path | None:
        return None if self.directory is None else self.directory / f"{key}.{kind}.json"
