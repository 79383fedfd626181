"""Load figure: N concurrent streams of a bundle through a Triton server vs the same work in-process.

    python -m mirasol.runtime.triton.load BUNDLE [--streams 8] [--chunks 32] [--protocol grpc]

Every mode pushes the same N x M chunks (seeded noise of the bundle's chunk shape) and reports chunks/s over
the whole run, CPU ms per chunk (all processes doing the work: on a machine shared with other work this is the
figure that still compares the modes) and the per-chunk latency (p50, p95):
- in-process, N threads: one Stream per thread on one shared Pipeline (what an app without a server does);
- in-process, one by one: one thread pushing the N streams' chunks in turn (the baseline of batching);
- in-process, push_streams: one thread, the N streams' chunks of each step in one Pipeline.push_streams call;
- Triton: N client threads, one sequence each, through the tritonserver of the nvidia-pytriton wheel on
  127.0.0.1 (a repository written by mirasol-triton with the options given), each waiting for its reply.
The server's contexts are checked against the in-process ones.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from ..cli.commandline import COUNT, HelpFormatter, bounded
from ..errors import MirasolError
from ..files.atomic import write_file
from ..files.ownership import check_output_file, has_json_format
from ..pipeline import Pipeline
from .model import load_pipeline
from .repository import add_serving_options, serving_options, write_repository
from .server import LocalServer

Chunk = tuple[np.ndarray, np.ndarray]
REPORT_FORMAT = "mirasol-triton-load"  # the --json report's "format", by which a later run knows it may replace it
REPORT = "Triton load report"


def make_chunks(pipe: Pipeline, streams: int, chunks: int, seed: int = 0) -> list[list[Chunk]]:
    """Per stream, its chunks: video [F, 3, H, W] in [0, 1], audio log-mel [n_mels, A]."""
    rng = np.random.default_rng(seed)
    video, audio = pipe.chunk_inputs["video"], pipe.chunk_inputs["audio"]
    return [[(rng.random(video.shape[1:], dtype=np.float32).astype(video.dtype),
              rng.standard_normal(audio.shape[1:]).astype(audio.dtype)) for _ in range(chunks)]
            for _ in range(streams)]


def server_cpu_s(pid: int | None) -> float:
    """CPU seconds used so far by a process and its children (the server and its model stubs); 0 without one."""
    if pid is None:
        return 0.0
    import psutil

    root = psutil.Process(pid)
    return sum(sum(p.cpu_times()[:2]) for p in (root, *root.children(recursive=True)))


def measure(name: str, chunks: int, run: Callable[[], list[float]], server_pid: int | None = None) -> dict[str, Any]:
    """Run one mode (it returns each chunk's latency): chunks/s of wall time, CPU ms per chunk (this process and
    the server's, so a machine shared with other work still compares the modes), p50/p95 latency."""
    cpu = time.process_time() + server_cpu_s(server_pid)
    start = time.perf_counter()
    latencies = np.asarray(run()) * 1e3
    wall = time.perf_counter() - start
    cpu = time.process_time() + server_cpu_s(server_pid) - cpu
    return {"mode": name, "chunks": chunks, "wall_s": wall, "chunks_per_s": chunks / wall,
            "cpu_ms_per_chunk": cpu * 1e3 / chunks, "p50_ms": float(np.percentile(latencies, 50)),
            "p95_ms": float(np.percentile(latencies, 95))}


def run_threads(work: list[Callable[[list[float]], None]]) -> list[float]:
    """Run each worker in its own thread (each appends its latencies); returns all the latencies."""
    errors: list[BaseException] = []
    latencies: list[list[float]] = [[] for _ in work]

    def guarded(worker: Callable[[list[float]], None], out: list[float]) -> None:
        try:
            worker(out)
        except BaseException as error:  # reported in the main thread
            errors.append(error)

    threads = [threading.Thread(target=guarded, args=(w, out)) for w, out in zip(work, latencies)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return [x for out in latencies for x in out]


def threaded(pipe: Pipeline, data: list[list[Chunk]], contexts: list[list[np.ndarray]]) -> list[float]:
    """One thread per stream, each with its own Stream on the shared Pipeline."""
    def worker(i: int) -> Callable[[list[float]], None]:
        def push_all(out: list[float]) -> None:
            stream = pipe.stream()
            for chunk in data[i]:
                start = time.perf_counter()
                contexts[i].append(stream.push(*chunk))
                out.append(time.perf_counter() - start)
        return push_all

    return run_threads([worker(i) for i in range(len(data))])


def one_by_one(pipe: Pipeline, data: list[list[Chunk]]) -> list[float]:
    """One thread pushing each stream's chunk of a step in turn."""
    streams, latencies = [pipe.stream() for _ in data], []
    for step in range(len(data[0])):
        for stream, chunks in zip(streams, data):
            start = time.perf_counter()
            stream.push(*chunks[step])
            latencies.append(time.perf_counter() - start)
    return latencies


def batched(pipe: Pipeline, data: list[list[Chunk]]) -> list[float]:
    """One thread, each step's chunks in one push_streams call (every chunk waits for the whole call)."""
    streams, latencies = [pipe.stream() for _ in data], []
    for step in range(len(data[0])):
        start = time.perf_counter()
        pipe.push_streams(streams, [chunks[step] for chunks in data])
        latencies += [time.perf_counter() - start] * len(data)
    return latencies


def model_counts(server: LocalServer, model: str) -> tuple[int, int]:
    """The model's inference and execution counts so far (their ratio is the mean batch of its calls)."""
    with urllib.request.urlopen(f"http://{server.http_url}/v2/models/{model}/stats", timeout=10) as reply:
        stats = json.load(reply)["model_stats"][0]
    return int(stats["inference_count"]), int(stats["execution_count"])


def through_server(server: LocalServer, data: list[list[Chunk]], protocol: str, model: str,
                   contexts: list[list[np.ndarray]]) -> list[float]:
    """N client threads, one sequence each, every request waiting for its reply."""
    if protocol == "grpc":
        import tritonclient.grpc as client_module
        url = server.grpc_url
    else:
        import tritonclient.http as client_module  # type: ignore[no-redef]
        url = server.http_url

    def worker(i: int) -> Callable[[list[float]], None]:
        def send_all(out: list[float]) -> None:
            client = client_module.InferenceServerClient(url)
            try:
                for k, (video, audio) in enumerate(data[i]):
                    inputs = [client_module.InferInput("VIDEO", [1, *video.shape], "FP32"),
                              client_module.InferInput("AUDIO", [1, *audio.shape], "FP32")]
                    inputs[0].set_data_from_numpy(video[None])
                    inputs[1].set_data_from_numpy(audio[None])
                    start = time.perf_counter()
                    result = client.infer(model, inputs, sequence_id=1000 + i, sequence_start=k == 0,
                                          sequence_end=k == len(data[i]) - 1)
                    out.append(time.perf_counter() - start)
                    contexts[i].append(result.as_numpy("CONTEXT")[0])
            finally:
                client.close()
        return send_all

    return run_threads([worker(i) for i in range(len(data))])


def is_load_report(path: Path) -> bool:
    """Whether `path` holds a report this command wrote (never raises)."""
    return has_json_format(path, REPORT_FORMAT)


def write_report(path: Path, report: dict[str, Any]) -> None:
    """The --json report, written through the ownership rule (new, or a report of this command)."""
    write_file(path, json.dumps({"format": REPORT_FORMAT, **report}, indent=2), is_load_report, REPORT)


def format_table(results: list[dict[str, Any]]) -> str:
    lines = ["| mode | chunks/s | CPU ms/chunk | p50 ms | p95 ms |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['mode']} | {r['chunks_per_s']:.1f} | {r['cpu_ms_per_chunk']:.2f} | {r['p50_ms']:.2f} | "
              f"{r['p95_ms']:.2f} |" for r in results]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mirasol.runtime.triton.load",
                                     formatter_class=HelpFormatter,
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path, help="bundle directory (e.g. the demo: mirasol-export --out DIR)")
    parser.add_argument("--streams", type=bounded(int, 1, 1024), default=8, help="concurrent streams")
    parser.add_argument("--chunks", type=COUNT, default=32, help="chunks per stream")
    parser.add_argument("--protocol", choices=["grpc", "http"], default="grpc")
    parser.add_argument("--json", type=Path, help="also write the results here")
    add_serving_options(parser)
    args = parser.parse_args(argv)
    try:
        if args.json is not None:
            check_output_file(args.json, is_load_report, REPORT)  # before any work
        options = serving_options(args)
        pipe = load_pipeline(args.bundle, options.backend, options.threads)
        data = make_chunks(pipe, args.streams, args.chunks)
        total = args.streams * args.chunks
        warm = pipe.stream()
        for chunk in data[0][:4]:
            warm.push(*chunk)
        reference: list[list[np.ndarray]] = [[] for _ in data]
        served: list[list[np.ndarray]] = [[] for _ in data]
        results = [measure(f"in-process, {args.streams} threads", total, lambda: threaded(pipe, data, reference)),
                   measure("in-process, one by one", total, lambda: one_by_one(pipe, data)),
                   measure("in-process, push_streams", total, lambda: batched(pipe, data))]
        with tempfile.TemporaryDirectory(prefix="mirasol-triton-load-") as work:
            write_repository(args.bundle, Path(work) / "repo", options)
            with LocalServer(Path(work) / "repo", log_file=Path(work) / "server.log") as server:
                through_server(server, [data[0][:4]], args.protocol, options.model_name, [[]])  # warm-up
                inferences, executions = model_counts(server, options.model_name)
                results.append(measure(
                    f"Triton {args.protocol}, {args.streams} streams", total,
                    lambda: through_server(server, data, args.protocol, options.model_name, served),
                    server.process.pid))  # type: ignore[union-attr]
                after = model_counts(server, options.model_name)
                results[-1]["mean_batch"] = (after[0] - inferences) / (after[1] - executions)
    except MirasolError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    difference = max(float(np.abs(a - b).max()) for s, r in zip(served, reference) for a, b in zip(s, r))
    print(format_table(results))
    print(f"\n{args.streams} streams x {args.chunks} chunks; push_streams vs one by one: "
          f"{results[2]['chunks_per_s'] / results[1]['chunks_per_s']:.2f}x chunks/s, "
          f"{results[1]['cpu_ms_per_chunk'] / results[2]['cpu_ms_per_chunk']:.2f}x less CPU; "
          f"mean batch in the server: {results[3]['mean_batch']:.2f}; "
          f"max |server - in-process| context: {difference:.2e}")
    if args.json:
        report = {"streams": args.streams, "chunks": args.chunks, "options": asdict(options), "results": results,
                  "max_context_difference": difference}
        try:
            write_report(args.json, report)
        except MirasolError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
