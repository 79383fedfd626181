"""The floors section: a graph's weight MatMuls alone (x [rows, K] @ W [K, N] for every MatMul whose W is a weight,
on ONNX Runtime's kernels, no other node), timed on this machine beside what the whole graph took in this run.
No rewrite of the graph's attention, norms or rotary can make a step faster than its MatMuls with the same fp32
weights; the floor's own rate against the measured GEMM rate and bandwidth says what those MatMuls can reach."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from mirasol.runtime.bundle.manifest import Manifest

from .child_gemm import matmuls_session
from .context import Run
from .stats import ratio, stats_ms, timed


def weight_matrices(path: Path) -> list[np.ndarray]:
    """The 2-D weights (initializers or constants) that the graph's MatMuls multiply by."""
    model = onnx.load(str(path))
    weights = {t.name: t for t in model.graph.initializer}
    weights.update({n.output[0]: n.attribute[0].t for n in model.graph.node
                    if n.op_type == "Constant" and n.attribute and n.attribute[0].t.dims})
    return [numpy_helper.to_array(weights[n.input[1]]) for n in model.graph.node
            if n.op_type == "MatMul" and n.input[1] in weights and len(weights[n.input[1]].dims) == 2]


def floors(run: Run) -> dict[str, Any]:
    """Per graph (the AV autoregressor on a chunk's latents, the text decoder on one token): its MatMuls alone,
    at 1 thread and at the run's threads (the faster counts), against the graph's time in this run."""
    if run.primary != "fp32":
        return {"status": "skipped", "reason": "needs the fp32 bundle"}
    run.log("floors: each graph's weight MatMuls alone")
    bundle = run.paths["fp32"]
    manifest = Manifest.read(bundle)
    ceiling, report = run.report.get("ceiling", {}), run.report
    decode = report["text"].get("runtime_decode_tokens_per_second")
    graphs = {"av_autoregressor": (run.config.latents_per_chunk,
                                   report["overhead"]["per_graph_ms"].get("av_autoregressor")),
              "text_decoder": (1, 1e3 / decode if decode else None)}
    section: dict[str, Any] = {"status": "ok", "graphs": {}}
    calls = 20 if run.quick else 200
    for name, (rows, graph_ms) in graphs.items():
        matrices = weight_matrices(bundle / manifest.graphs[name].file)
        by_threads = {}
        for threads in sorted({1, run.threads}):
            call = matmuls_session(matrices, rows, threads)
            for _ in range(5):
                call()
            by_threads[threads] = stats_ms([timed(call)[0] for _ in range(calls)])
        best = min(by_threads, key=lambda t: by_threads[t]["median_ms"])
        floor_s = by_threads[best]["median_ms"] / 1e3
        flops = sum(2 * rows * w.shape[0] * w.shape[1] for w in matrices)
        weight_bytes = sum(w.nbytes for w in matrices)
        section["graphs"][name] = {
            "matmuls": len(matrices), "rows": rows, "weight_bytes": weight_bytes, "flops": flops,
            "floor_ms": floor_s * 1e3, "floor_threads": best,
            "floor_ms_by_threads": {str(t): s["median_ms"] for t, s in by_threads.items()},
            "floor_fraction_of_gemm": ratio(flops / floor_s, ceiling.get("gemm_flops_per_second")),
            "floor_fraction_of_bandwidth": ratio(weight_bytes / floor_s, ceiling.get("gemv_bytes_per_second")),
            "graph_ms": graph_ms, "floor_share_of_graph": ratio(floor_s * 1e3, graph_ms)}
    return section
