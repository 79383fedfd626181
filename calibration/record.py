"""Record what each graph really sees: a Backend wrapper the Pipeline runs through without knowing it.

`RecordingBackend(inner, recorder)` loads every graph with `inner` and hands the Pipeline sessions whose
`run` first gives a copy of the feeds (and, when asked, the outputs) to a `FeedRecorder`. The recorder keeps
a uniform random sample of at most `max_per_graph` calls per graph (reservoir sampling, seeded), so memory
stays bounded however long the calibration streams are.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from mirasol.runtime.backends.base import Backend, GraphSession
from mirasol.runtime.bundle.reader import Bundle
from mirasol.runtime.bundle.manifest import GraphEntry


@dataclass
class Call:
    feeds: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray] | None = None


@dataclass
class FeedRecorder:
    max_per_graph: int = 64
    seed: int = 0
    keep_outputs: bool = False
    calls: dict[str, list[Call]] = field(default_factory=dict)
    seen: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._rng = np.random.default_rng(self.seed)

    def add(self, graph: str, feeds: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray] | None) -> None:
        seen = self.seen.get(graph, 0)
        self.seen[graph] = seen + 1
        kept = self.calls.setdefault(graph, [])
        if len(kept) < self.max_per_graph:
            slot = len(kept)
        else:
            slot = int(self._rng.integers(0, seen + 1))
            if slot >= self.max_per_graph:
                return
        call = Call({k: np.array(v, copy=True) for k, v in feeds.items()},
                    {k: np.array(v, copy=True) for k, v in outputs.items()} if outputs is not None else None)
        if slot == len(kept):
            kept.append(call)
        else:
            kept[slot] = call

    def feeds(self, graph: str) -> list[dict[str, np.ndarray]]:
        return [call.feeds for call in self.calls.get(graph, [])]


class RecordingSession(GraphSession):
    def __init__(self, inner: GraphSession, recorder: FeedRecorder) -> None:
        self.inner = inner
        self.recorder = recorder
        self.name = inner.name
        self.inputs = inner.inputs
        self.outputs = inner.outputs

    def run(self, feeds: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None
            ) -> dict[str, np.ndarray]:
        outputs = self.inner.run(feeds, output_names)
        self.recorder.add(self.name, feeds, outputs if self.recorder.keep_outputs else None)
        return outputs

    def close(self) -> None:
        self.inner.close()


class RecordingBackend(Backend):
    def __init__(self, inner: Backend, recorder: FeedRecorder) -> None:
        self.inner = inner
        self.recorder = recorder
        self.name = inner.name

    def load(self, entry: GraphEntry, bundle: Bundle) -> GraphSession:
        return RecordingSession(self.inner.load(entry, bundle), self.recorder)
