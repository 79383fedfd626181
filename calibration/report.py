"""The accuracy report of a quantized bundle (int8, int4, an int8 KV cache): how far it is from the fp32 bundle on
held-out clips.

Measured on clips that were not calibrated on, two ways:
- per graph: every quantized graph run on the very inputs its fp32 twin saw while the fp32 bundle streamed the
  held-out clips and answered their questions (so each graph's own error, not its upstream's), per output:
  cosine similarity (over the sampled calls, and the worst single call), max abs error, and max abs error
  relative to the output's largest magnitude;
- end to end, through the runtime Pipeline: each chunk's `av_context` (cosine, max error), and the greedy answers
  (identical answers, and the share of the fp32 answer's tokens reproduced before the first difference).

The two bundles run one after the other, never side by side (at mirasol3b the fp32 bundle alone takes 13 GB): the
fp32 pass keeps each chunk's av_context and each answer in memory and a sample of every graph's calls on disk
(`samples.SampleStore`), the quantized pass compares against them.
"""
from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mirasol.runtime.backends.onnxruntime import OnnxRuntimeBackend
from mirasol.runtime.pipeline import Pipeline

from .data import Clip, iter_loaded
from .record import RecordingBackend
from .samples import SampleStore

EVAL_SAMPLES = 48  # sampled calls per graph for the per-graph comparison (fewer where they pass the disk budget)
# converts a recorded fp32 call to what a quantized graph takes and back (the int8 KV cache: `kv_cache.KvCodec`)
Codec = Any


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


def _questions(pipe: Pipeline, clip: Clip, max_new_tokens: int) -> list[tuple[str, int]]:
    return [(q, min(max_new_tokens, pipe.max_text_len - len(pipe.tokenizer.prompt(q)))) for q in clip.questions]


def evaluate(reference: str | Path, quantized: str | Path, clips: list[Clip], max_new_tokens: int = 16,
             bar: bool | None = None, options: Mapping[str, Any] | None = None,
             codecs: Mapping[str, Codec] | None = None, label: str = "quantized",
             progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Compare the bundle at `quantized` with the fp32 bundle at `reference` on held-out `clips`.

    options: of the onnxruntime backend running the quantized bundle; codecs: per graph, how the fp32 calls'
    tensors become the quantized graph's (an int8 KV cache) and its outputs become comparable again.
    """
    codecs = dict(codecs or {})
    with tempfile.TemporaryDirectory(prefix="mirasol-report-") as scratch:
        store = SampleStore(scratch, EVAL_SAMPLES, seed=1)
        contexts: list[list[np.ndarray]] = []
        answers32: list[list[int]] = []
        with Pipeline.load(reference, backend=RecordingBackend(OnnxRuntimeBackend(), store), verify=False) as fp32:
            for clip, video, audio in iter_loaded(clips, "held-out clips (fp32)", bar):
                stream = fp32.stream()
                contexts.append([stream.push(v, a) for v, a in fp32.split_clip(video, audio)])
                answers32 += [stream.token_ids(q, n)[0] for q, n in _questions(fp32, clip, max_new_tokens)]
            tokenizer = fp32.tokenizer
        progress(f"report: fp32 pass done ({sum(map(len, contexts))} chunks, {len(answers32)} answers)")
        context = _Stats()
        chunk_cosines: list[float] = []
        answers: list[dict[str, Any]] = []
        per_graph: dict[str, dict[str, dict[str, float]]] = {}
        with Pipeline.load(quantized, **dict(options or {})) as pipe:
            index = 0
            for (clip, video, audio), wanted in zip(iter_loaded(clips, f"held-out clips ({label})", bar), contexts):
                stream = pipe.stream()
                for (v, a), want in zip(pipe.split_clip(video, audio), wanted):
                    got = stream.push(v, a)
                    context.add(want, got)
                    chunk_cosines.append(cosine(want, got))
                for question, tokens in _questions(pipe, clip, max_new_tokens):
                    a32, aq = answers32[index], stream.token_ids(question, tokens)[0]
                    index += 1
                    answers.append({"clip": clip.name, "question": question, "fp32": tokenizer.decode(a32),
                                    label: tokenizer.decode(aq), "identical": a32 == aq,
                                    "prefix_agreement": prefix_agreement(a32, aq)})
            for graph, session in pipe.sessions.items():
                codec = codecs.get(graph)
                stats: dict[str, _Stats] = {}
                for call in store.calls(graph):
                    feeds = codec.encode(call.feeds) if codec is not None else call.feeds
                    got = session.run(feeds)
                    if codec is not None:
                        got = codec.decode(got)
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
