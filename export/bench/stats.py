"""Timing and its statistics: durations to median/p95, ratios, and engines timed in turn (round-robin)."""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


def stats_ms(seconds: Sequence[float]) -> dict[str, Any]:
    """Median, p95, mean, min (milliseconds) and the sample count of a list of durations in seconds."""
    if not seconds:
        return {"n": 0, "median_ms": None, "p95_ms": None, "mean_ms": None, "min_ms": None}
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    return {"n": int(ms.size), "median_ms": float(np.median(ms)), "p95_ms": float(np.percentile(ms, 95)),
            "mean_ms": float(ms.mean()), "min_ms": float(ms.min())}


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, None where either is missing or the denominator is not positive."""
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return float(numerator) / float(denominator)


def median(entry: dict[str, Any] | None) -> float | None:
    """The median ms of a measured report entry; None where it is absent or did not run."""
    return None if not entry or entry.get("status", "ok") != "ok" else entry.get("median_ms")


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, value) of one call."""
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def seconds_between(before: dict[str, Any], after: dict[str, Any], table: str, names: Sequence[str]
                    ) -> dict[str, float]:
    """Seconds per name that `Stream.timings` added to `table` between two snapshots (`timings.to_dict()`)."""
    return {name: after[table].get(name, 0.0) - before[table].get(name, 0.0) for name in names}


def snapshot(timings: Any) -> dict[str, dict[str, float]]:
    """A copy of `Stream.timings` now (its tables grow in place)."""
    return {table: dict(values) for table, values in timings.to_dict().items()}


@dataclass
class Engine:
    """One thing to time: `run(i)` does the i-th step. `before`/`after` run around each of its blocks, untimed."""

    run: Callable[[int], Any]
    every: int = 1  # take part in every k-th round only
    block: int | None = None  # calls per block (default: the interleave's)
    before: Callable[[], Any] | None = None
    after: Callable[[], Any] | None = None
    budget: float | None = None  # seconds: once its calls took this long (and `least` were timed), it stops
    least: int = 2


def interleave(engines: dict[str, Engine], rounds: int, block: int = 1, pause: float = 0.01
               ) -> dict[str, list[float]]:
    """Time the engines in turn, a block of calls each, `rounds` times; seconds per call, per engine.

    A change in machine load during the run falls on every engine alike. Blocks (rather than single calls)
    and a short pause before each keep one engine's idle worker threads (ONNX Runtime and OpenMP spin for a
    while after a call) from competing with the next engine: in one process they would, in a deployment not.
    """
    times: dict[str, list[float]] = {name: [] for name in engines}
    for r in range(rounds):
        for name, engine in engines.items():
            if r % engine.every:
                continue
            if engine.budget is not None and len(times[name]) >= engine.least and sum(times[name]) >= engine.budget:
                continue
            if engine.before is not None:
                engine.before()
            time.sleep(pause)
            size = engine.block or block
            for b in range(size):
                step = r * size + b
                start = time.perf_counter()
                engine.run(step)
                times[name].append(time.perf_counter() - start)
            if engine.after is not None:
                engine.after()
    return times


def sampled_every(rounds: int, seconds_per_call: float, budget: float, most: int, least: int = 2) -> int:
    """`every` for an expensive engine: about budget / cost samples (within [least, most]) spread over the rounds."""
    wanted = max(least, min(most, int(budget / max(seconds_per_call, 1e-9))))
    return max(1, rounds // wanted)
