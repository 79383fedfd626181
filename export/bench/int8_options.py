"""Measure int8 options on an fp32 bundle's graphs: error vs fp32 and latency, in one process, alternating.

    python -m mirasol.export.bench.int8_options graphs BUNDLE [--clips 2] [--rounds 15] [--candidates a,b,...]
    python -m mirasol.export.bench.int8_options push fp32=FP32_BUNDLE int8=INT8_BUNDLE ... [--rounds 6] [--chunks 16]

`graphs`: records each graph's real inputs by streaming synthetic clips through the fp32 bundle, calibrates
minmax ranges once, quantizes every graph with each candidate of `int8_targets.CPU_CANDIDATES` (plus ONNX
Runtime's dynamic quantization of MatMuls, which needs no calibration), and prints per graph the relative
RMS error vs fp32 on the recorded inputs and the median latency over alternating rounds (every candidate
once per round, in a shuffled order), on steady-state inputs: the AV autoregressor with a full cache, the
text decoder on one-token steps.

`push`: per-chunk `Stream.push` latency of bundles through the runtime Pipeline (default backend options, as
`mirasol-run` runs them), in one process, every chunk pushed to each bundle's stream in a random order; medians over
all chunks after a warm-up; and the relative RMS error of each bundle's av_context against the first bundle's over
the first stream's chunks.

What these measured on the `small` preset is summarised in `mirasol/calibration/int8_targets.py`.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from mirasol.runtime.bundle.manifest import Manifest
from mirasol.runtime.cli.commandline import COUNT, SEED, THREADS, HelpFormatter
from mirasol.runtime.pipeline import Pipeline

from ...calibration.data import load_clips
from ...calibration.int8_targets import CPU_CANDIDATES, TENSORRT, WEIGHT_OPS, Int8Recipe
from ...calibration.quantize import graph_error, stream_clips
from ...calibration.ranges import ranges_of
from ...calibration.record import Call, FeedRecorder, RecordingBackend


def _steady(graph: str, feeds: list[dict[str, np.ndarray]], config: dict, count: int) -> list[dict[str, np.ndarray]]:
    if graph == "av_autoregressor":
        full = (int(config["av_window_chunks"]) - 1) * int(config["latents_per_chunk"])
        chosen = [f for f in feeds if f["past_key_0"].shape[2] == full] or feeds
    elif graph == "text_decoder":
        chosen = [f for f in feeds if f["input_ids"].shape[1] == 1] or feeds
    else:
        chosen = feeds
    return chosen[:count]


def bench_graphs(bundle: Path, clips: int, rounds: int, names: list[str], per_round: int, seed: int,
                 threads: int | None = None) -> None:
    from onnxruntime.quantization.quant_utils import load_model_with_shape_infer

    from mirasol.runtime.backends.onnxruntime import OnnxRuntimeBackend

    manifest = Manifest.read(bundle)
    config = manifest.config
    clip_set = load_clips("synthetic", config, clips=clips, held_out=1, seed=seed)
    t0 = time.perf_counter()
    recorder = FeedRecorder(max_per_graph=48, seed=seed)
    with Pipeline.load(bundle, backend=RecordingBackend(OnnxRuntimeBackend(), recorder), verify=False) as pipe:
        stream_clips(pipe, clip_set.calibration, bar=False)
    print(f"recorded in {time.perf_counter() - t0:.1f}s: "
          + ", ".join(f"{g} {len(c)}" for g, c in recorder.calls.items()))
    candidates: dict[str, Int8Recipe] = {name: CPU_CANDIDATES[name] for name in names}
    candidates["tensorrt(emulated)"] = TENSORRT
    for graph, entry in manifest.graphs.items():
        path = bundle / entry.file
        feeds = recorder.feeds(graph)
        model = load_model_with_shape_infer(path)
        ranges = ranges_of(path, feeds, "minmax", WEIGHT_OPS)
        base_options = ort.SessionOptions()
        if threads:
            base_options.intra_op_num_threads = threads
        reference = ort.InferenceSession(str(path), sess_options=base_options, providers=["CPUExecutionProvider"])
        outputs = [o.name for o in reference.get_outputs()]
        calls = [Call(f, dict(zip(outputs, reference.run(outputs, f)))) for f in feeds]
        sessions = {"fp32": reference}
        errors = {"fp32": 0.0}
        sizes = {"fp32": path.stat().st_size}
        for name, recipe in candidates.items():
            quantized = recipe.quantize(model, ranges)
            options = recipe.session_options()
            data = quantized.SerializeToString()
            sizes[name] = len(data)
            if threads:
                options.intra_op_num_threads = threads
            sessions[name] = ort.InferenceSession(data, sess_options=options, providers=["CPUExecutionProvider"])
            errors[name] = graph_error(sessions[name], calls)[0]
        timing = _steady(graph, feeds, config, per_round)
        times: dict[str, list[float]] = {name: [] for name in sessions}
        cpu: dict[str, list[float]] = {name: [] for name in sessions}
        order = list(sessions)
        rng = np.random.default_rng(seed)
        for session in sessions.values():  # warm-up
            session.run(None, timing[0])
        for _ in range(rounds):
            for name in rng.permutation(order):
                session = sessions[name]
                start, start_cpu = time.perf_counter(), time.process_time()
                for feed in timing:
                    session.run(None, feed)
                times[name].append((time.perf_counter() - start) / len(timing))
                cpu[name].append((time.process_time() - start_cpu) / len(timing))
        base = float(np.median(times["fp32"]))
        base_cpu = float(np.median(cpu["fp32"]))
        print(f"\n{graph} ({len(feeds)} recorded calls; timing on {len(timing)} steady-state calls x {rounds} "
              f"rounds)")
        print(f"  {'variant':<44} {'rel err':>9} {'wall ms':>9} {'vs fp32':>8} {'cpu ms':>8} {'vs fp32':>8} "
              f"{'MB':>6}")
        for name in sessions:
            median, median_cpu = float(np.median(times[name])), float(np.median(cpu[name]))
            print(f"  {name:<44} {errors[name]:>9.4f} {median * 1e3:>9.3f} {base / median:>7.2f}x "
                  f"{median_cpu * 1e3:>8.3f} {base_cpu / median_cpu:>7.2f}x {sizes[name] / 1e6:>6.1f}")


def bench_push(bundles: dict[str, Path], rounds: int, chunks: int, seed: int, threads: int | None = None
               ) -> dict[str, float]:
    """Median per-chunk push latency of bundles (the first is the baseline), alternating chunk by chunk.

    Also the process CPU time per push: on a machine shared with other jobs it moves far less than wall time
    (with threads=1 it is the work itself; with more threads it includes the pool's spinning)."""
    pipes = {name: Pipeline.load(path, threads=threads) for name, path in bundles.items()}
    first = next(iter(pipes))
    config = pipes[first].config
    clip = load_clips("synthetic", config, clips=1, held_out=1, max_chunks=chunks, seed=seed).held_out[0]
    video, audio = clip.load()
    pieces = pipes[first].split_clip(video, audio)
    times: dict[str, list[float]] = {name: [] for name in pipes}
    cpu: dict[str, list[float]] = {name: [] for name in pipes}
    contexts: dict[str, list[np.ndarray]] = {name: [] for name in pipes}  # the first stream's, for the error
    rng = np.random.default_rng(seed)
    for round_index in range(rounds):
        streams = {name: pipe.stream() for name, pipe in pipes.items()}
        for index, (v, a) in enumerate(pieces):
            for name in rng.permutation(list(pipes)):
                start, start_cpu = time.perf_counter(), time.process_time()
                context = streams[name].push(v, a)
                if round_index > 0 or index > 0:  # the first push of all warms up
                    times[name].append(time.perf_counter() - start)
                    cpu[name].append(time.process_time() - start_cpu)
                if round_index == 0:
                    contexts[name].append(context)
    result = {name: float(np.median(t)) for name, t in times.items()}
    cpu_result = {name: float(np.median(t)) for name, t in cpu.items()}
    reference = np.concatenate(contexts[first])
    error = {name: float(np.linalg.norm(np.concatenate(c) - reference) / np.linalg.norm(reference))
             for name, c in contexts.items()}
    print(f"per-chunk push latency, median of {len(times[first])} chunks each ({rounds} streams of {len(pieces)} "
          f"chunks, bundles alternating in a random order per chunk, intra-op threads {threads or 'default'}):")
    for name, t in times.items():
        print(f"  {name:<12} wall median {result[name] * 1e3:7.2f} ms (p10 {np.percentile(t, 10) * 1e3:6.2f}, "
              f"p90 {np.percentile(t, 90) * 1e3:6.2f}) {result[first] / result[name]:.2f}x | "
              f"cpu median {cpu_result[name] * 1e3:7.2f} ms {cpu_result[first] / cpu_result[name]:.2f}x | "
              f"av_context rel. RMS error vs {first} {error[name]:.4f}")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mirasol.export.bench.int8_options", formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    graphs = sub.add_parser("graphs", help="error and latency of int8 candidates per graph",
                            formatter_class=HelpFormatter)
    graphs.add_argument("bundle", type=Path)
    graphs.add_argument("--clips", type=COUNT, default=2, help="calibration clips")
    graphs.add_argument("--rounds", type=COUNT, default=15, help="timing rounds")
    graphs.add_argument("--per-round", type=COUNT, default=4, help="steady-state calls timed per round")
    graphs.add_argument("--candidates", default=",".join(CPU_CANDIDATES))
    graphs.add_argument("--seed", type=SEED, default=0, help="seed of the clips")
    graphs.add_argument("--threads", type=THREADS, default=None, help="intra-op threads (default: onnxruntime's)")
    push = sub.add_parser("push", help="per-chunk push latency of bundles (the first is the baseline)",
                          formatter_class=HelpFormatter)
    push.add_argument("bundles", nargs="+", help="NAME=PATH or PATH")
    push.add_argument("--rounds", type=COUNT, default=6, help="timing rounds")
    push.add_argument("--chunks", type=COUNT, default=16, help="chunks pushed per round")
    push.add_argument("--seed", type=SEED, default=0, help="seed of the chunks")
    push.add_argument("--threads", type=THREADS, default=None, help="intra-op threads (default: onnxruntime's)")
    args = parser.parse_args(argv)
    if args.command == "graphs":
        bench_graphs(args.bundle, args.clips, args.rounds, args.candidates.split(","), args.per_round, args.seed,
                     args.threads)
    else:
        named = dict(b.split("=", 1) if "=" in b else (Path(b).name, b) for b in args.bundles)
        bench_push({name: Path(path) for name, path in named.items()}, args.rounds, args.chunks, args.seed,
                   args.threads)


if __name__ == "__main__":
    main()
