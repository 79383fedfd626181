"""Prometheus metrics of the service (`/metrics`, text format 0.0.4), in a registry of its own.

Per source, from the scheduler's snapshot at scrape time: chunks received (decoded), pushed, dropped (by
reason), queue depth and size, reconnects, whether it is up, its state; per standing question the seconds
its answers took and the chunks it stood over (their ratio is its cost per chunk). Measured as they happen:
chunk latency per source, answer time per kind (question, standing), the duration and size of every push
call, the seconds the inference thread spent in pushes and in answers, questions by result, events lost by
slow subscribers, webhook posts by result.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class _Snapshot:
    """A custom collector: the per-source figures the scheduler reports at scrape time."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.snapshot = snapshot

    def collect(self):  # noqa: ANN201 - prometheus_client's collector protocol
        data = self.snapshot()

        def family(kind: str, name: str, doc: str, labels: list[str]) -> Any:
            return (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(name, doc, labels=labels)

        received = family("counter", "mirasol_source_chunks_received", "chunks decoded from the source", ["source"])
        pushed = family("counter", "mirasol_source_chunks_pushed", "chunks pushed into the stream", ["source"])
        dropped = family("counter", "mirasol_source_chunks_dropped", "chunks dropped by the drop policy",
                         ["source", "reason"])
        depth = family("gauge", "mirasol_source_queue_depth", "chunks waiting in the source's queue", ["source"])
        size = family("gauge", "mirasol_source_queue_size", "the source's queue size", ["source"])
        reconnects = family("counter", "mirasol_source_reconnects", "reconnect attempts", ["source"])
        up = family("gauge", "mirasol_source_up", "1 while the source delivers chunks", ["source"])
        state = family("gauge", "mirasol_source_state", "the source's state (1 for the current one)",
                       ["source", "state"])
        standing_s = family("counter", "mirasol_standing_answer_seconds", "seconds a standing question's answers "
                            "took", ["source", "standing"])
        standing_chunks = family("counter", "mirasol_standing_chunks", "chunks pushed while the standing question "
                                 "stood", ["source", "standing"])
        for source in data["sources"]:
            sid = source["id"]
            received.add_metric([sid], source["received"])
            pushed.add_metric([sid], source["pushed"])
            dropped.add_metric([sid, "queue_full"], source["dropped_queue_full"])
            dropped.add_metric([sid, "late"], source["dropped_late"])
            depth.add_metric([sid], source["queue"][0])
            size.add_metric([sid], source["queue"][1])
            reconnects.add_metric([sid], source["reconnects"])
            up.add_metric([sid], 1.0 if source["state"] == "live" else 0.0)
            state.add_metric([sid, source["state"]], 1.0)
            for standing in source["standing"]:
                standing_s.add_metric([sid, standing["id"]], standing["answer_ms_total"] / 1000)
                standing_chunks.add_metric([sid, standing["id"]], standing["chunks"])
        lost = family("counter", "mirasol_events_lost", "events a slow subscriber lost", [])
        lost.add_metric([], data["events_lost"])
        subscribers = family("gauge", "mirasol_subscribers", "SSE and WebSocket subscribers", [])
        subscribers.add_metric([], data["subscribers"])
        active = family("gauge", "mirasol_questions_active", "questions being answered or waiting", [])
        active.add_metric([], data["questions_active"])
        webhook = family("counter", "mirasol_webhook_posts", "webhook posts by result", ["result"])
        for result, count in data["webhook"].items():
            webhook.add_metric([result], count)
        yield from (received, pushed, dropped, depth, size, reconnects, up, state, standing_s, standing_chunks,
                    lost, subscribers, active, webhook)


class Metrics:
    """The service's registry; `render()` is the /metrics body."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.latency = Histogram("mirasol_chunk_latency_seconds", "capture to av_context, per pushed chunk",
                                 ["source"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.answer = Histogram("mirasol_answer_seconds", "time to a whole answer, from its turn to its last token",
                                ["kind"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.push = Histogram("mirasol_push_seconds", "one push call (push_streams or push)", buckets=LATENCY_BUCKETS,
                              registry=self.registry)
        self.batch = Histogram("mirasol_push_batch_size", "chunks in one push call", buckets=BATCH_BUCKETS,
                               registry=self.registry)
        self.backend = Counter("mirasol_backend_seconds", "seconds the inference thread spent in the model",
                               ["step"], registry=self.registry)
        self.questions = Counter("mirasol_questions", "questions by kind and result", ["kind", "result"],
                                 registry=self.registry)
        self.registry.register(_Snapshot(snapshot))

    def forget(self, source: str) -> None:
        """Drop a removed source's series."""
        try:
            self.latency.remove(source)
        except KeyError:
            pass

    def render(self) -> bytes:
        return generate_latest(self.registry)
