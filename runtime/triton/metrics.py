"""The model's own counters on Triton's metrics endpoint (`/metrics`, Prometheus text), through the Python backend's
custom metrics API, beside Triton's `nv_inference_*` figures. Labels: model, version and instance (each instance
is a process of its own; sum over `instance` for the model).

    mirasol_streams                      gauge      streams the instance holds now
    mirasol_chunks_total                 counter    chunks pushed
    mirasol_answers_total                counter    questions answered
    mirasol_answer_tokens_total          counter    tokens generated for them
    mirasol_answer_seconds               histogram  from a request's arrival in the model to its answer's last token
    mirasol_sequences_reclaimed_total    counter    sequences dropped by Triton's idle timeout, their streams freed
    mirasol_request_failures_total       counter    requests answered with an error, by reason: client (a bad
                                                    request: 400 / INVALID_ARGUMENT) or server
"""
from __future__ import annotations

from typing import Any

from .sequences import Counters

ANSWER_BUCKETS_S = [0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0]


class TritonCounters(Counters):
    """`Counters` kept in Triton metrics (`pb` is triton_python_backend_utils)."""

    def __init__(self, pb: Any, labels: dict[str, str]) -> None:
        family = pb.MetricFamily
        self._families: list[Any] = []

        def metric(name: str, description: str, kind: Any, **extra: Any) -> Any:
            if not self._families or self._families[-1][0] != name:
                self._families.append((name, family(name=name, description=description, kind=kind)))
            return self._families[-1][1].Metric(labels={**labels, **extra.pop("labels", {})}, **extra)

        self._metrics = {
            "streams": metric("mirasol_streams", "streams the model instance holds now", family.GAUGE),
            "chunks": metric("mirasol_chunks_total", "chunks pushed", family.COUNTER),
            "answers": metric("mirasol_answers_total", "questions answered", family.COUNTER),
            "tokens": metric("mirasol_answer_tokens_total", "answer tokens generated", family.COUNTER),
            "seconds": metric("mirasol_answer_seconds", "seconds from a request's arrival in the model to its "
                              "answer's last token", family.HISTOGRAM, buckets=ANSWER_BUCKETS_S),
            "reclaimed": metric("mirasol_sequences_reclaimed_total", "sequences dropped by the idle timeout whose "
                                "streams were freed", family.COUNTER),
            "client": metric("mirasol_request_failures_total", "requests answered with an error",
                             family.COUNTER, labels={"reason": "client"}),
            "server": metric("mirasol_request_failures_total", "requests answered with an error",
                             family.COUNTER, labels={"reason": "server"}),
        }

    def chunks(self, count: int) -> None:
        if count:
            self._metrics["chunks"].increment(count)

    def answered(self, seconds: float, tokens: int) -> None:
        self._metrics["answers"].increment(1)
        self._metrics["tokens"].increment(tokens)
        self._metrics["seconds"].observe(seconds)

    def reclaimed(self) -> None:
        self._metrics["reclaimed"].increment(1)

    def failed(self, client: bool) -> None:
        self._metrics["client" if client else "server"].increment(1)

    def streams(self, live: int) -> None:
        self._metrics["streams"].set(live)

    def close(self) -> None:
        """Drop the metrics, then their families (the Python backend wants them deleted in that order)."""
        self._metrics.clear()
        self._families.clear()
