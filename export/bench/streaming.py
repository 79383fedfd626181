"""The chunk-step sections: streaming (per-chunk latency against PyTorch), overhead (outside the backend's run
calls) and flatness (latency along a long stream)."""
from __future__ import annotations

import gc
from typing import Any

import numpy as np

from mirasol.runtime.bundle.precisions import NAMES as PRECISION_NAMES

from .baselines import TorchStepper, clip_rerun
from .context import Pushes, Run, extra_note
from .stats import Engine, interleave, median, ratio, sampled_every, seconds_between, snapshot, stats_ms, timed

FLAT_POINTS = (1, 8, 32, 128)


def streaming(run: Run) -> dict[str, Any]:
    """Per-chunk latency at steady state of every runtime pipeline, PyTorch eager stepping the same model with
    the same carried state, and PyTorch re-running the whole clip so far; timed round-robin."""
    pool, torch_pool, primary = run.pool, run.torch_pool, run.primary
    run.log(f"streaming: {run.rounds * run.block} timed chunks per engine after {run.warmup} warm-up chunks")
    streams = {p: pipe.stream() for p, pipe in {**run.pipes, **run.extras}.items()}
    stepper = TorchStepper(run.model)
    stepper1 = TorchStepper(run.model) if run.extras else None
    for i in range(run.warmup):
        for stream in streams.values():
            stream.push(*pool[i % len(pool)])
        stepper.push(*torch_pool[i % len(pool)])
        if stepper1 is not None:
            run.with_threads(1)()
            stepper1.push(*torch_pool[i % len(pool)])
            run.with_threads(run.threads)()
    naive = clip_rerun(run.model, pool, run.chunks)
    naive_cost, _ = timed(lambda: naive(0))  # also the warm-up
    engines: dict[str, Engine] = {}
    for name, stream in streams.items():
        engines[f"runtime_{name}"] = Engine((lambda s: lambda i: s.push(*pool[i % len(pool)]))(stream))
    engines["pytorch_eager_step"] = Engine(lambda i: stepper.push(*torch_pool[i % len(pool)]))
    if stepper1 is not None:
        engines["pytorch_eager_step_1thread"] = Engine(lambda i: stepper1.push(*torch_pool[i % len(pool)]),
                                                       before=run.with_threads(1), after=run.with_threads(run.threads))
    engines["pytorch_naive_rerun"] = Engine(naive, block=1, budget=20.0,
                                            every=sampled_every(run.rounds, naive_cost, 20.0, most=run.rounds))
    before = snapshot(streams[primary].timings)
    gc.collect()
    times = interleave(engines, run.rounds, run.block)
    run.pushes = Pushes(times[f"runtime_{primary}"], before, snapshot(streams[primary].timings))

    section: dict[str, Any] = {"unit": "ms per chunk", "engines": {}}
    for name, samples in times.items():
        section["engines"][name] = {"status": "ok", **stats_ms(samples)}
        if extra_note(name):
            section["engines"][name]["note"] = extra_note(name)
    section["engines"]["pytorch_naive_rerun"]["chunks_so_far"] = run.chunks
    export = run.report["export"]
    for p in PRECISION_NAMES:
        if p not in run.pipes:
            section["engines"][f"runtime_{p}"] = {"status": export.get(p, {}).get("status", "not measured"),
                                                 "reason": export.get(p, {}).get("reason", "not requested")}
    base = median(section["engines"][f"runtime_{primary}"])
    section["primary"] = f"runtime_{primary}"
    section["speedup_vs_primary"] = {
        name: ratio(median(entry), base) for name, entry in section["engines"].items()
        if name != f"runtime_{primary}" and median(entry) is not None}
    return section


def overhead(run: Run) -> dict[str, Any]:
    """The share of the primary runtime's push wall time (the streaming section's timed pushes) spent outside
    the backend's run calls, split into input checks and state update."""
    pushes = run.pushes
    wall = float(np.sum(pushes.seconds))
    push_graphs = run.pipes[run.primary].bundle.manifest.steps["push"].graphs
    per_graph = seconds_between(pushes.before, pushes.after, "graph_seconds", push_graphs)
    graph = sum(per_graph.values())
    step = seconds_between(pushes.before, pushes.after, "step_seconds", ["push"])["push"]
    return {
        "engine": f"runtime_{run.primary}", "chunks": len(pushes.seconds), "wall_seconds": wall,
        "graph_seconds": graph, "step_seconds": step,
        "fraction_outside_run_calls": ratio(wall - graph, wall),
        "fraction_in_push_checks": ratio(wall - step, wall),
        "fraction_in_state_update": ratio(step - graph, wall),
        "per_graph_ms": {g: 1e3 * seconds / max(1, len(pushes.seconds)) for g, seconds in per_graph.items()}}


def flatness(run: Run) -> dict[str, Any]:
    """Per-chunk latency of the primary runtime at chunk 1, 8, 32, 128 of long streams, with the carried state's
    bytes there (bounded state: flat)."""
    pool, pipe = run.pool, run.pipes[run.primary]
    points = [p for p in FLAT_POINTS if p <= run.flat_chunks]
    streams = 2 if run.quick else max(3, min(6, run.repeats // 6))
    run.log(f"flatness: {streams} streams of {run.flat_chunks} chunks")
    per_index: dict[int, list[float]] = {p: [] for p in points}
    state_bytes: dict[int, int] = {}
    for s in range(streams):
        stream = pipe.stream()
        for i in range(1, run.flat_chunks + 1):
            seconds, _ = timed(lambda: stream.push(*pool[(i + s) % len(pool)]))
            if i in per_index:
                per_index[i].append(seconds)
                state_bytes[i] = int(sum(v.nbytes for v in stream.state.values()))
    section = {"engine": f"runtime_{run.primary}", "streams": streams, "stream_chunks": run.flat_chunks,
               "chunks": {str(i): {**stats_ms(per_index[i]), "state_bytes": state_bytes[i]} for i in points}}
    last = max(points)
    section["compare"] = {"at": last, "against": 8 if 8 in points else None,
                          "ratio": ratio(median(section["chunks"][str(last)]), median(section["chunks"].get("8")))}
    return section
