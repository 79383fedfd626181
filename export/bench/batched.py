"""The batched section: N streams pushed together (`Pipeline.push_streams`) against the same N pushed one by one,
for N = 1, 2, 4, 8, 16 and bundles exported for max batch 4 (the exporter's default), 8 and 16; beside it, what
batching can gain at most on the AV graph's weight MatMuls (their floor at N chunks' rows against one chunk's)."""
from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

import onnx

from mirasol.runtime.bundle.manifest import Manifest
from mirasol.runtime.pipeline import Pipeline, Stream

from ..bundle import export_bundle
from .context import Run
from .floors import weight_matrices
from .child_gemm import matmuls_session
from .stats import Engine, interleave, stats_ms, timed

STREAMS = (1, 2, 4, 8, 16)
MAX_BATCHES = (4, 8, 16)


def batched(run: Run) -> dict[str, Any]:
    """Chunks per second of push_streams against one by one, per stream count and bundle max batch, same run."""
    if "fp32" not in run.paths:
        return {"status": "skipped", "reason": "needs the fp32 bundle"}
    counts = (1, 2, 4) if run.quick else STREAMS
    bundles, notes = batch_bundles(run, () if run.quick else MAX_BATCHES)
    run.log(f"batched: {', '.join(map(str, counts))} streams, bundles of max batch {', '.join(map(str, bundles))}")
    pipes = {b: run.pipes["fp32"] if path == run.paths["fp32"] else Pipeline.load(path, threads=run.threads)
             for b, path in bundles.items()}
    pool = run.pool
    engines: dict[str, Engine] = {}
    for n in counts:
        alone = warm([run.pipes["fp32"].stream() for _ in range(n)], run.warmup, pool, None)
        engines[f"alone_{n}"] = Engine((lambda streams: lambda i: [s.push(*pool[(i + j) % len(pool)])
                                                                  for j, s in enumerate(streams)])(alone))
        for b, pipe in pipes.items():
            together = warm([pipe.stream() for _ in range(n)], run.warmup, pool, pipe)
            engines[f"together_{n}_max{b}"] = Engine((lambda p, streams: lambda i: p.push_streams(
                streams, [pool[(i + j) % len(pool)] for j in range(len(streams))]))(pipe, together))
    rounds = 2 if run.quick else 8
    times = interleave(engines, rounds, block=2)
    section: dict[str, Any] = {"status": "ok", "threads": run.threads, "rounds": rounds, "block": 2,
                               "bundles": {str(b): notes[b] for b in bundles},
                               "not_used": {str(b): note for b, note in notes.items() if b not in bundles},
                               "streams": {}}
    for n in counts:
        alone = [t / n for t in times[f"alone_{n}"]]
        entry: dict[str, Any] = {"alone": stats_ms(alone), "together": {}}
        for b in bundles:
            together = [t / n for t in times[f"together_{n}_max{b}"]]
            per_block = sorted(a / t for a, t in zip(alone, together))
            entry["together"][str(b)] = {
                **stats_ms(together), "runs_per_call": math.ceil(n / b),
                "speedup": entry["alone"]["median_ms"] / stats_ms(together)["median_ms"],
                "speedup_min": per_block[0], "speedup_max": per_block[-1]}
        section["streams"][str(n)] = entry
    section["matmul_bound"] = matmul_bound(run, counts)
    return section


def warm(streams: list[Stream], chunks: int, pool: list, pipe: Pipeline | None) -> list[Stream]:
    """Streams pushed past the window (carried state at full size), alone or together."""
    for i in range(chunks):
        batch = [pool[(i + j) % len(pool)] for j in range(len(streams))]
        if pipe is None:
            for stream, chunk in zip(streams, batch):
                stream.push(*chunk)
        else:
            pipe.push_streams(streams, batch)
    return streams


def batch_bundles(run: Run, sizes: tuple[int, ...]) -> tuple[dict[int, Path], dict[int, str]]:
    """fp32 bundles per max batch: the run's own, and for the other sizes bundles exported here from the same model,
    validated as every export is; one whose graphs are not the run's bundle's, byte for byte but the metadata where
    torch.export notes the batch range, is not used (the curve compares batch sizes, not exports)."""
    main = run.paths["fp32"]
    own = Manifest.read(main).max_batch
    bundles, notes = {own: main}, {own: "the run's fp32 bundle"}
    if run.report["export"]["fp32"].get("source") != "exported":
        return bundles, notes  # a given bundle: no model of its own to export others from
    for size in sizes:
        if size == own:
            continue
        out = main.parent / f"bundle-fp32-max-batch-{size}"
        seconds, _ = timed(lambda: export_bundle(run.model, out, "fp32", max_batch=size))
        if graph_digests(out) != graph_digests(main):
            notes[size] = f"exported in {seconds:.0f} s; its graphs differ from the validated bundle's: not used"
            continue
        bundles[size] = out
        notes[size] = f"exported and validated in {seconds:.0f} s; same graphs as the run's fp32 bundle (sha256 but metadata)"
    return dict(sorted(bundles.items())), notes


def graph_digests(bundle: Path) -> dict[str, str]:
    """sha256 per graph of everything but its metadata (where torch.export notes the batch range it was given)."""
    digests = {}
    for path in sorted(bundle.glob("*.onnx")):
        model = onnx.load(str(path))
        model.ClearField("metadata_props")
        model.graph.ClearField("metadata_props")
        digests[path.name] = hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()
    return digests


def matmul_bound(run: Run, counts: tuple[int, ...]) -> dict[str, Any]:
    """The AV graph's weight MatMuls alone at N chunks' rows, per chunk, against one chunk's: how much faster
    batching can make them (the rest of the step only adds to both sides), at the run's threads."""
    rows = run.config.latents_per_chunk
    matrices = weight_matrices(run.paths["fp32"] / Manifest.read(run.paths["fp32"]).graphs["av_autoregressor"].file)
    calls = {n: matmuls_session(matrices, rows * n, run.threads) for n in counts}
    for call in calls.values():
        call()
    engines = {str(n): Engine(lambda _, call=call: call()) for n, call in calls.items()}
    times = interleave(engines, 3 if run.quick else 10, block=5)
    per_chunk = {n: stats_ms(times[str(n)])["median_ms"] / n for n in counts}
    return {"graph": "av_autoregressor", "matmuls": len(matrices), "rows_per_chunk": rows, "threads": run.threads,
            "per_chunk_ms": {str(n): ms for n, ms in per_chunk.items()},
            "speedup": {str(n): per_chunk[1] / ms for n, ms in per_chunk.items()}}
