"""Sampled calls of each graph (feeds and outputs) kept on disk, read back one at a time.

The sensitivity sweep and the accuracy report run a graph on calls the fp32 bundle really made, and compare
with what fp32 answered. At mirasol3b one AV call's feeds are a full KV window (0.7 GB) and its outputs as much
again, so the calls are not held in memory: `SampleStore` is an observer (`record.RecordingBackend`) keeping a
uniform random sample of at most `count` calls per graph (reservoir sampling, seeded), each written to its own
.npz in a scratch directory when it is chosen, and at most `budget_bytes` per graph on disk. `calls(graph)` reads
them back one at a time.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .record import Call, reservoir_slot

SAMPLE_BUDGET_BYTES = 6 << 30  # disk per graph: 4 samples of a mirasol3b AV call (feeds + outputs)


@dataclass
class GraphSamples:
    slots: int  # how many calls this graph keeps (count, or fewer when its calls are large)
    kept: int = 0
    seen: int = 0


class SampleStore:
    def __init__(self, directory: str | Path, count: int, seed: int = 0, budget_bytes: int = SAMPLE_BUDGET_BYTES,
                 keep_outputs: bool = True) -> None:
        self.directory = Path(directory)
        self.count = count
        self.budget_bytes = budget_bytes
        self.keep_outputs = keep_outputs
        self.graphs: dict[str, GraphSamples] = {}
        self._rng = np.random.default_rng(seed)

    def add(self, graph: str, feeds: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> None:
        size = sum(v.nbytes for v in feeds.values()) + (sum(v.nbytes for v in outputs.values())
                                                          if self.keep_outputs else 0)
        state = self.graphs.get(graph)
        if state is None:
            state = self.graphs[graph] = GraphSamples(self.count)
        # calls grow (a KV cache fills): the budget bounds the largest seen; slots past it are dropped
        fits = max(1, self.budget_bytes // max(size, 1))
        if fits < state.slots:
            for slot in range(fits, state.kept):
                self._file(graph, slot).unlink(missing_ok=True)
            state.slots, state.kept = fits, min(state.kept, fits)
        slot = reservoir_slot(self._rng, state.seen, state.slots)
        state.seen += 1
        if slot is None:
            return
        arrays = {f"in:{k}": np.asarray(v) for k, v in feeds.items()}
        if self.keep_outputs:
            arrays.update({f"out:{k}": np.asarray(v) for k, v in outputs.items()})
        with open(self._file(graph, slot), "wb") as f:
            np.savez(f, **arrays)
        state.kept = max(state.kept, slot + 1)

    def calls(self, graph: str) -> Iterator[Call]:
        """The kept calls of `graph`, read from disk one at a time."""
        state = self.graphs.get(graph)
        for slot in range(state.kept if state else 0):
            with np.load(self._file(graph, slot), allow_pickle=False) as data:
                feeds = {k[3:]: data[k] for k in data.files if k.startswith("in:")}
                outputs = {k[4:]: data[k] for k in data.files if k.startswith("out:")} if self.keep_outputs else None
            yield Call(feeds, outputs)

    def kept(self, graph: str) -> int:
        state = self.graphs.get(graph)
        return state.kept if state else 0

    def seen(self, graph: str) -> int:
        state = self.graphs.get(graph)
        return state.seen if state else 0

    def _file(self, graph: str, slot: int) -> Path:
        return self.directory / f"{graph}.{slot}.npz"
