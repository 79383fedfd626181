"""The accuracy report of an int8 bundle: how far it is from the fp32 bundle on held-out clips.

Measured on clips that were not calibrated on, two ways:
- per graph: every int8 graph run on the very inputs its fp32 twin saw while the fp32 bundle streamed the
  held-out clips and answered their questions (so each graph's own error, not its upstream's), per output:
  cosine similarity (over all recorded calls, and the worst single call), max abs error, and max abs error
  relative to the output's largest magnitude;
- end to end, through two runtime Pipelines side by side: each chunk's `av_context` (cosine, max error), and
  the greedy answers (identical answers, and the share of the fp32 answer's tokens reproduced before the first
  difference).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mirasol.runtime.backends.onnxruntime import OnnxRuntimeBackend
from mirasol.runtime.pipeline import Pipeline

from .data import Clip, iter_loaded
from .record import FeedRecorder, RecordingBackend

EVAL_SAMPLES = 48  # recorded calls per graph for the per-graph comparison


class _Stats:
    """Running cosine / error of one output over many calls."""

    def __init__(self) -> None:
        self.dot = self.ref_sq = self.got_sq = 0.0
        self.min_cosine = 1.0
        self.max_abs = 0.0
        self.scale = 0.0
        self.calls = 0

    def add(self, reference: np.ndarray, got: np.ndarray) -> None:
        r = reference.astype(np.float64).ravel()
        g = got.astype(np.float64).ravel()
        if r.size == 0:
            return
        self.calls += 1
        self.dot += float(r @ g)
        self.ref_sq += float(r @ r)
        self.got_sq += float(g @ g)
        self.min_cosine = min(self.min_cosine, cosine(r, g))
        self.max_abs = max(self.max_abs, float(np.abs(r - g).max()) if np.isfinite(g).all() else float("inf"))
        self.scale = max(self.scale, float(np.abs(r).max()))

    def to_dict(self) -> dict[str, float]:
        total = self.dot / np.sqrt(self.ref_sq * self.got_sq) if self.ref_sq > 0 and self.got_sq > 0 else \
            float(self.ref_sq == self.got_sq)
        return {"cosine": float(total), "min_cosine": float(self.min_cosine), "max_abs_error": self.max_abs,
                "max_rel_error": self.max_abs / max(self.scale, 1e-12), "calls": self.calls}


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two arrays (1.0 for two zero arrays, 0.0 for one)."""
    a = a.astype(np.float64).ravel()
    b = b.astype(np.float64).ravel()
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0 or nb == 0:
        return float(na == nb)
    return float(a @ b / (na * nb))


def prefix_agreement(reference: list[int], got: list[int]) -> float:
    """Share of the reference answer's tokens reproduced before the first difference (1.0 if both empty)."""
    length = max(len(reference), len(got))
    if length == 0:
        return 1.0
    same = 0
    for a, b in zip(reference, got):
        if a != b:
            break
        same += 1
    return same / length


def evaluate(reference: str | Path, quantized: str | Path, clips: list[Clip], max_new_tokens: int = 16,
             bar: bool | None = None, int8_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Compare the int8 bundle at `quantized` with the fp32 bundle at `reference` on held-out `clips`
    (`int8_options`: options of the onnxruntime backend running the int8 bundle)."""
    recorder = FeedRecorder(max_per_graph=EVAL_SAMPLES, seed=1, keep_outputs=True)
    fp32 = Pipeline.load(reference, backend=RecordingBackend(OnnxRuntimeBackend(), recorder), verify=False)
    int8 = Pipeline.load(quantized, **(int8_options or {}))
    context = _Stats()
    chunk_cosines: list[float] = []
    answers: list[dict[str, Any]] = []
    for clip, video, audio in iter_loaded(clips, "held-out clips", bar):
        s32, s8 = fp32.stream(), int8.stream()
        for chunk_video, chunk_audio in fp32.split_clip(video, audio):
            r, g = s32.push(chunk_video, chunk_audio), s8.push(chunk_video, chunk_audio)
            context.add(r, g)
            chunk_cosines.append(cosine(r, g))
        for question in clip.questions:
            room = fp32.max_text_len - len(fp32.tokenizer.prompt(question))
            tokens = min(max_new_tokens, room)
            a32 = s32.token_ids(question, tokens)[0]
            a8 = s8.token_ids(question, tokens)[0]
            answers.append({"clip": clip.name, "question": question, "fp32": fp32.tokenizer.decode(a32),
                            "int8": int8.tokenizer.decode(a8), "identical": a32 == a8,
                            "prefix_agreement": prefix_agreement(a32, a8)})
    per_graph: dict[str, dict[str, dict[str, float]]] = {}
    for graph, calls in recorder.calls.items():
        session = int8.sessions[graph]
        stats: dict[str, _Stats] = {}
        for call in calls:
            got = session.run(call.feeds)
            for name, ref in (call.outputs or {}).items():
                stats.setdefault(name, _Stats()).add(ref, got[name])
        per_graph[graph] = {name: s.to_dict() for name, s in stats.items()}
    identical = sum(a["identical"] for a in answers)
    # a random-init decoder often answers every question with one repeated token: agreement then says little
    fp32_answers = {a["fp32"] for a in answers}
    degenerate = bool(answers) and len(fp32_answers) == 1 and len(set(next(iter(fp32_answers)))) <= 1
    return {
        "held_out_clips": len(clips), "chunks": len(chunk_cosines),
        "per_graph": per_graph,
        "av_context": {**context.to_dict(), "mean_chunk_cosine": float(np.mean(chunk_cosines)) if chunk_cosines
                       else None, "min_chunk_cosine": float(min(chunk_cosines)) if chunk_cosines else None},
        "answers": {"questions": len(answers), "identical": identical,
                    "identical_rate": identical / len(answers) if answers else None,
                    "token_agreement": float(np.mean([a["prefix_agreement"] for a in answers])) if answers else None,
                    "distinct_fp32_answers": len(fp32_answers), "degenerate": degenerate,
                    "max_new_tokens": max_new_tokens, "examples": answers[:6]},
    }
