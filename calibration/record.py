"""Watch what each graph really sees: a Backend wrapper the Pipeline runs through without knowing it.

`RecordingBackend(inner, observers)` loads every graph with `inner` and hands the Pipeline sessions whose `run`
gives the feeds and outputs of every call to each observer (`observer.add(graph, feeds, outputs)`). Observers:
`FeedRecorder` keeps a uniform random sample of calls in memory (reservoir sampling, seeded: for measurements on
small presets); `samples.SampleStore` keeps one on disk (what the exporter uses, at any model size); `ranges`
and `kv_cache` fold statistics per call and keep nothing.
"""
from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from mirasol.runtime.backends.base import Backend, GraphSession
from mirasol.runtime.bundle.manifest import GraphEntry
from mirasol.runtime.bundle.reader import Bundle


class Observer(Protocol):
    def add(self, graph: str, feeds: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> None: ...


@dataclass
class Call:
    feeds: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray] | None = None


@dataclass
class FeedRecorder:
    """At most `max_per_graph` calls per graph, a uniform sample, copied into memory."""

    max_per_graph: int = 64
    seed: int = 0
    keep_outputs: bool = False
    calls: dict[str, list[Call]] = field(default_factory=dict)
    seen: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._rng = np.random.default_rng(self.seed)

    def add(self, graph: str, feeds: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> None:
        slot = reservoir_slot(self._rng, self.seen.get(graph, 0), self.max_per_graph)
        self.seen[graph] = self.seen.get(graph, 0) + 1
        if slot is None:
            return
        kept = self.calls.setdefault(graph, [])
        call = Call({k: np.array(v, copy=True) for k, v in feeds.items()},
                    {k: np.array(v, copy=True) for k, v in outputs.items()} if self.keep_outputs else None)
        if slot == len(kept):
            kept.append(call)
        else:
            kept[slot] = call

    def feeds(self, graph: str) -> list[dict[str, np.ndarray]]:
        return [call.feeds for call in self.calls.get(graph, [])]


def reservoir_slot(rng: np.random.Generator, seen: int, size: int) -> int | None:
    """Where call number `seen` (0-based) goes in a uniform reservoir sample of `size` calls, or None."""
    if seen < size:
        return seen
    slot = int(rng.integers(0, seen + 1))
    return slot if slot < size else None


class RecordingSession(GraphSession):
    def __init__(self, inner: GraphSession, observers: Sequence[Observer]) -> None:
        self.inner = inner
        self.observers = tuple(observers)
        self.name = inner.name
        self.inputs = inner.inputs
        self.outputs = inner.outputs

    def run(self, feeds: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None,
            keep_on_device: Collection[str] = ()) -> dict[str, np.ndarray]:
        outputs = self.inner.run(feeds, output_names)
        for observer in self.observers:
            observer.add(self.name, feeds, outputs)
        return outputs

    def close(self) -> None:
        self.inner.close()


class RecordingBackend(Backend):
    def __init__(self, inner: Backend, observers: Observer | Sequence[Observer]) -> None:
        self.inner = inner
        self.observers: tuple[Any, ...] = tuple(observers) if isinstance(observers, Sequence) else (observers,)
        self.name = inner.name

    def load(self, entry: GraphEntry, bundle: Bundle) -> GraphSession:
        return RecordingSession(self.inner.load(entry, bundle), self.observers)
