"""The shared context of a run: what every section reads (model, bundles, pipelines, inputs, settings) and the
report so far. A section is a function `section(run: Run) -> its report entry` (see `run.SECTIONS`)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mirasol.model import Mirasol, MirasolConfig
from mirasol.runtime.pipeline import Pipeline

from .source import Progress, Source

# information rows beside the same-thread comparisons (multi-threaded runs, not --quick): name suffix -> note
EXTRA_NOTES = {"1thread": "1 thread, for information",
               "nospin": "ONNX Runtime spin-waiting off (session.intra_op.allow_spinning=0), for information",
               "spin": "ONNX Runtime spin-waiting on (session.intra_op.allow_spinning=1), for information",
               "arena": "ONNX Runtime's CPU memory arena on (its own default; the backend's is off), for information"}
EXTRA_SUFFIXES = tuple(f"_{k}" for k in EXTRA_NOTES)


def extra_note(engine: str) -> str | None:
    """The note of an information row ("runtime_fp32_1thread" -> "1 thread, ..."), None for a compared engine."""
    return EXTRA_NOTES[engine.rsplit("_", 1)[1]] if engine.endswith(EXTRA_SUFFIXES) else None


def chunk_pool(config: MirasolConfig, count: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """`count` distinct random chunks: video [F, 3, H, W] in [0, 1], audio log-mel [n_mels, A]."""
    rng = np.random.default_rng(seed)
    return [(rng.random((config.frames_per_chunk, 3, config.image_size, config.image_size), dtype=np.float32),
             rng.standard_normal((config.n_mels, config.audio_frames_per_chunk)).astype(np.float32))
            for _ in range(count)]


@dataclass
class Pushes:
    """The primary runtime's timed pushes of the streaming section, and its `Stream.timings` around them."""

    seconds: list[float]
    before: dict[str, dict[str, float]]
    after: dict[str, dict[str, float]]


@dataclass
class Run:
    """One benchmark run, as the sections see it."""

    source: Source
    paths: dict[str, Path]  # bundle per precision
    pipes: dict[str, Pipeline]  # loaded, per precision
    extras: dict[str, Pipeline]  # information rows of the primary: "<precision>_1thread", "<precision>_(no)spin"
    primary: str  # the precision the others are compared with (fp32 where there is one)
    load_times: dict[str, Any]  # warm `Pipeline.load` stats per precision
    pool: list[tuple[np.ndarray, np.ndarray]]  # input chunks, cycled through
    torch_pool: list[tuple[torch.Tensor, torch.Tensor]]  # the same chunks as tensors (shared memory)
    question: str
    prompt: list[int]  # the question's token ids
    new_tokens: int  # requested per answer (within the decoder's room)
    chunks: int  # the clip: chunks pushed before asking; the naive baseline re-runs this many
    rounds: int  # interleaved rounds of the streaming engines
    block: int  # calls per engine per round
    warmup: int  # chunks pushed before timing (past the window: the carried state is at its full size)
    repeats: int  # as asked (the flatness section sizes its streams by it)
    flat_chunks: int  # length of the flatness streams
    threads: int
    quick: bool
    log: Progress
    report: dict[str, Any]  # the sections so far ("export" and "meta" first)
    pushes: Pushes | None = None  # set by the streaming section, read by the overhead section

    @property
    def model(self) -> Mirasol:
        return self.source.model

    @property
    def config(self) -> MirasolConfig:
        return self.source.model.config

    def with_threads(self, count: int) -> Callable[[], None]:
        """A callable that sets PyTorch's intra-op threads (an Engine's before/after)."""
        return lambda: torch.set_num_threads(count)
