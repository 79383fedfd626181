"""The floors section: a graph's weight MatMuls alone (x [rows, K] @ W [K, N] for every MatMul whose W is a weight,
on ONNX Runtime's kernels, no other node) against the whole graph on the same step's inputs, like for like: one
session run each, median per call, the same thread count, timed in turn. No rewrite of the graph's attention, norms
or rotary can make a step faster than its MatMuls with the same fp32 weights; the floor's own rate against the
measured GEMM rate and bandwidth says what those MatMuls can reach."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from mirasol.runtime.bundle.manifest import Manifest
from mirasol.runtime.pipeline import Pipeline

from .child_gemm import matmuls_session
from .context import Run
from .stats import Engine, interleave, ratio, stats_ms


def weight_matrices(path: Path) -> list[np.ndarray]:
    """The 2-D weights (initializers or constants) that the graph's MatMuls multiply by."""
    model = onnx.load(str(path))
    weights = {t.name: t for t in model.graph.initializer}
    weights.update({n.output[0]: n.attribute[0].t for n in model.graph.node
                    if n.op_type == "Constant" and n.attribute and n.attribute[0].t.dims})
    return [numpy_helper.to_array(weights[n.input[1]]) for n in model.graph.node
            if n.op_type == "MatMul" and n.input[1] in weights and len(weights[n.input[1]].dims) == 2]


def graph_feeds(run: Run, pipe: Pipeline) -> dict[str, dict[str, np.ndarray]]:
    """What the AV graph gets on a chunk at steady state (past the window) and the text decoder on one token half
    way through an answer, recorded from a stream of `pipe`."""
    recorded: dict[str, list[dict[str, np.ndarray]]] = {"av_autoregressor": [], "text_decoder": []}
    for name, calls in recorded.items():
        session = pipe.sessions[name]

        def recording(feeds, *args, _run=session.run, _calls=calls, **kwargs):  # type: ignore[no-untyped-def]
            _calls.append(dict(feeds))
            return _run(feeds, *args, **kwargs)

        session.run = recording  # type: ignore[method-assign]
    try:
        stream = pipe.stream()
        for i in range(run.warmup):
            stream.push(*run.pool[i % len(run.pool)])
        stream.token_ids(run.question, run.new_tokens)
    finally:
        for name in recorded:
            del pipe.sessions[name].run  # the session's own method again
    tokens = recorded["text_decoder"]
    return {"av_autoregressor": recorded["av_autoregressor"][-1], "text_decoder": tokens[len(tokens) // 2]}


def floors(run: Run) -> dict[str, Any]:
    """Per graph (the AV autoregressor on a chunk's latents, the text decoder on one token): its MatMuls alone
    and the graph, per call, at 1 thread and at the run's threads; floor / graph at each."""
    if run.primary != "fp32":
        return {"status": "skipped", "reason": "needs the fp32 bundle"}
    run.log("floors: each graph's weight MatMuls alone against the graph, per call, same threads")
    bundle = run.paths["fp32"]
    manifest = Manifest.read(bundle)
    ceiling = run.report.get("ceiling", {})
    pipes = {run.threads: run.pipes["fp32"]}
    if run.threads != 1:
        pipes[1] = run.extras.get("fp32_1thread") or Pipeline.load(bundle, threads=1)
    feeds = graph_feeds(run, run.pipes["fp32"])
    rows = {"av_autoregressor": run.config.latents_per_chunk, "text_decoder": 1}
    section: dict[str, Any] = {"status": "ok", "threads": run.threads, "graphs": {}}
    rounds = 4 if run.quick else 20
    for name, count in rows.items():
        matrices = weight_matrices(bundle / manifest.graphs[name].file)
        engines: dict[str, Engine] = {}
        for threads, pipe in sorted(pipes.items()):
            engines[f"floor_{threads}"] = warmed(matmuls_session(matrices, count, threads))
            session, step = pipe.sessions[name], feeds[name]
            engines[f"graph_{threads}"] = warmed(lambda session=session, step=step: session.run(step))
        times = interleave(engines, rounds, block=10)
        by_threads = {}
        for threads in sorted(pipes):
            floor_ms = stats_ms(times[f"floor_{threads}"])["median_ms"]
            graph_ms = stats_ms(times[f"graph_{threads}"])["median_ms"]
            by_threads[str(threads)] = {"floor_ms": floor_ms, "graph_ms": graph_ms, "ratio": ratio(floor_ms, graph_ms)}
        here = by_threads[str(run.threads)]
        flops = sum(2 * count * w.shape[0] * w.shape[1] for w in matrices)
        weight_bytes = sum(w.nbytes for w in matrices)
        section["graphs"][name] = {
            "matmuls": len(matrices), "rows": count, "weight_bytes": weight_bytes, "flops": flops,
            "floor_ms": here["floor_ms"], "floor_threads": run.threads, "graph_ms": here["graph_ms"],
            "floor_share_of_graph": here["ratio"], "by_threads": by_threads,
            "floor_fraction_of_gemm": ratio(flops / (here["floor_ms"] / 1e3), ceiling.get("gemm_flops_per_second")),
            "floor_fraction_of_bandwidth": ratio(weight_bytes / (here["floor_ms"] / 1e3),
                                                 ceiling.get("gemv_bytes_per_second"))}
    return section


def warmed(call: Callable[[], Any]) -> Engine:
    for _ in range(5):
        call()
    return Engine(lambda _: call())
