"""int8 calibration primitives: stream the calibration clips, accumulate ranges, sweep sensitivity, cache.

1. `calibrate`: the fp32 bundle is loaded with the runtime's `Pipeline` through a backend that runs each graph with
   extra outputs (`ranges.RangeBackend`), and the calibration clips are streamed through it, with questions asked
   mid-clip and at the end: every graph sees what the runtime really gives it (real TTM memory, KV caches at every
   fill, av_memory of every length, prompts and per-token steps), and every call's activations are folded into
   per-tensor ranges as it runs (minmax / entropy / percentile), then dropped. Observers see the same calls: a
   `samples.SampleStore` keeps a few of them on disk for the sweep.
2. `sensitivity_sweep`: the graph quantized with each candidate group kept fp32 in turn (`groups.py`), the error
   measured against fp32 on the sampled calls; groups whose fp32 cuts the error by KEEP_FACTOR, and which hold at
   most MAX_KEEP_WEIGHT_SHARE of the graph's weights, stay fp32. One candidate exists at a time, written to disk
   and run from there, its weights read from the fp32 bundle's files a tensor at a time.
3. `CalibrationCache`: ranges and sweep decisions per graph, keyed by the fp32 graph's sha256, the calibration
   data's digest and every setting that changes them, so a re-run with the same data skips steps 1 and 2.

The int8 bundle itself is written by the exporter (`mirasol.export.int8`), which drives these.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization.calibrate import TensorsData, load_tensors_data, save_tensors_data

from mirasol.runtime.files.atomic import atomic_file, prepare_output_dir, write_file
from mirasol.runtime.pipeline import Pipeline

from .data import Clip, ClipSet, iter_loaded
from .external_data import write_graph
from .groups import sweep_groups
from .int8_targets import Int8Recipe
from .ranges import METHODS, RangeBackend, RangeCollector
from .record import Call, Observer, RecordingBackend

Progress = Callable[[str], None]
CACHE_VERSION = 3
KEEP_FACTOR = 1.5  # a group stays fp32 when keeping it fp32 divides the graph's error by at least this
MAX_KEEP_WEIGHT_SHARE = 0.25  # ... and it holds at most this share of the graph's quantizable weights
SWEEP_SAMPLES = 16  # sampled calls per graph the sweep measures on (fewer where they pass the disk budget)
QUESTION_TOKENS = 12  # greedy tokens per calibration question
CACHE_FILES = re.compile(r"[0-9a-f]{24}\.(ranges|sweep)\.json(\.tmp-\d+)?")  # a cache written before its marker

__all__ = ["METHODS", "CalibrationOptions", "calibrate", "stream_clips", "sensitivity_sweep", "graph_error"]


@dataclass(frozen=True)
class CalibrationOptions:
    """How an int8 bundle is calibrated (and how the int8 KV cache's scales are).

    data: 'synthetic' or a directory of .npz / media clips; clips / held_out: calibration and held-out clips (the
    held-out ones feed the accuracy report); target: "cpu", "cpu-dynamic" or "tensorrt", where the int8 graphs run
    (or an Int8Recipe: `int8_targets.py`); method: "minmax", "entropy" or "percentile"; max_chunks: chunks per clip
    (default the config's clip length); cache_dir / use_cache: the calibration cache; threads: ONNX Runtime's
    intra-op threads while calibrating (default: its choice).
    """

    data: str
    clips: int = 16
    held_out: int = 4
    target: str | Int8Recipe = "cpu"
    method: str = "minmax"
    max_chunks: int | None = None
    cache_dir: str | Path | None = None
    use_cache: bool = True
    seed: int = 0
    bar: bool | None = None
    threads: int | None = None


def default_cache_dir() -> Path:
    root = os.environ.get("MIRASOL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mirasol")
    return Path(root) / "calibration"


# ---------------------------------------------------------------- streaming the clips
def stream_clips(pipe: Pipeline, clips: Sequence[Clip], bar: bool | None = None, desc: str = "calibration clips"
                 ) -> int:
    """Stream `clips` through `pipe`, asking each clip's questions mid-clip and at the end; the chunks pushed."""
    chunks_pushed = 0
    for clip, video, audio in iter_loaded(list(clips), desc, bar):
        chunks = pipe.split_clip(video, audio)
        questions = list(clip.questions)
        stream = pipe.stream()
        for i, (chunk_video, chunk_audio) in enumerate(chunks):
            stream.push(chunk_video, chunk_audio)
            chunks_pushed += 1
            if len(chunks) > 1 and i == len(chunks) // 2 - 1 and len(questions) > 1:
                _ask(pipe, stream, questions.pop(0))
        for question in questions:
            _ask(pipe, stream, question)
    return chunks_pushed


def _ask(pipe: Pipeline, stream: Any, question: str) -> None:
    room = pipe.max_text_len - len(pipe.tokenizer.prompt(question))
    if room >= 1:
        stream.token_ids(question, min(QUESTION_TOKENS, room))


def calibrate(bundle: Path, clip_set: ClipSet, collectors: dict[str, RangeCollector], work: Path,
              observers: Sequence[Observer] = (), bar: bool | None = None, threads: int | None = None) -> int:
    """Stream the calibration clips through the fp32 bundle: `collectors` fold ranges per graph, `observers` see
    every call (`work`: scratch space for graphs written out); the chunks pushed."""
    backend = RecordingBackend(RangeBackend(collectors, work, threads), list(observers))
    pipe = Pipeline.load(bundle, backend=backend, verify=False)
    try:
        return stream_clips(pipe, clip_set.calibration, bar)
    finally:
        pipe.close()


# ---------------------------------------------------------------- the sweep
def graph_error(session: ort.InferenceSession, calls: Iterable[Call]) -> tuple[float, dict[str, float]]:
    """Relative RMS error per output over `calls` (sqrt(sum err^2 / sum ref^2), against each call's recorded
    outputs), and the worst of them."""
    names = [o.name for o in session.get_outputs()]
    err = dict.fromkeys(names, 0.0)
    ref = dict.fromkeys(names, 0.0)
    for call in calls:
        assert call.outputs is not None, "the calls were recorded without their outputs"
        for name, got in zip(names, session.run(names, call.feeds)):
            want = call.outputs[name].astype(np.float64)
            diff = got.astype(np.float64) - want
            err[name] += float((diff * diff).sum()) if np.isfinite(got).all() else float("inf")
            ref[name] += float((want * want).sum())
    per_output = {n: float(np.sqrt(err[n] / ref[n])) for n in names if ref[n] > 0}
    return max(per_output.values(), default=0.0), per_output


def candidate_error(model: onnx.ModelProto, weights_dir: Path, recipe: Int8Recipe, ranges: TensorsData | None,
                    exclude: set[str] | frozenset[str], calls: Callable[[], Iterator[Call]], work: Path) -> float:
    """The error of `model` quantized by `recipe` with `exclude` kept fp32, on the sampled calls: the candidate is
    written to `work` (weights a tensor at a time) and run from there, then deleted."""
    path = work / "candidate.onnx"
    write_graph(recipe.quantize(model, ranges, exclude, weights_dir), path, weights_dir)
    try:
        session = ort.InferenceSession(str(path), sess_options=recipe.session_options(),
                                       providers=["CPUExecutionProvider"])
        return graph_error(session, calls())[0]
    finally:
        path.unlink(missing_ok=True)
        Path(f"{path}.data").unlink(missing_ok=True)


def sensitivity_sweep(name: str, model: onnx.ModelProto, weights_dir: Path, ranges: TensorsData | None,
                      recipe: Int8Recipe, calls: Callable[[], Iterator[Call]], samples: int, work: Path,
                      log: Progress = lambda _: None) -> tuple[set[str], dict[str, Any]]:
    """Which candidate groups stay fp32, by the error of quantizing with each one kept fp32 in turn (`model`:
    the shape-inferred, weightless fp32 graph whose weights are in `weights_dir`; `calls`: the sampled calls)."""
    def error(exclude: set[str] | frozenset[str]) -> float:
        return candidate_error(model, weights_dir, recipe, ranges, exclude, calls, work)

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
    return keep, {"baseline_error": baseline, "final_error": final, "samples": samples, "groups": decisions,
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
