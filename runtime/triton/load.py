"""Load figure: N concurrent streams of a bundle through a Triton server vs the same work in-process.

    python -m mirasol.runtime.triton.load BUNDLE [--streams 8] [--chunks 32] [--protocol grpc] [--questions 8]

Every mode pushes the same N x M chunks (seeded noise of the bundle's chunk shape) and reports chunks/s over
the whole run, CPU ms per chunk (all processes doing the work: on a machine shared with other work this is the
figure that still compares the modes) and the per-chunk latency (p50, p95):
- in-process, N threads: one Stream per thread on one shared Pipeline (what an app without a server does);
- in-process, one by one: one thread pushing the N streams' chunks in turn (the baseline of batching);
- in-process, push_streams: one thread, the N streams' chunks of each step in one Pipeline.push_streams call;
- Triton: N client threads, one sequence each, through the tritonserver of the nvidia-pytriton wheel on
  127.0.0.1 (a repository written by mirasol-triton with the options given), each waiting for its reply.
The server's contexts are checked against the in-process ones. For the server, the time its model spends per
request (Triton's compute_infer of each model call, over the requests) is set beside the time the graphs take for
a chunk in-process (pushed with push_streams, in batches as the server's): the difference is what serving through
the Python backend costs per request.

With `--questions Q`, every stream (after its chunks) is then asked Q questions, the same question each round
(prompts of one length, so that the streams' questions can be stacked): one by one in-process, with `ask_streams`,
and through the server (N client threads, one sequence each, each waiting for its answer). Reported as questions/s;
every mode's answers must equal the one-by-one ones.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict
from importlib import import_module
from pathlib import Path
from typing import Any

import numpy as np

from ..batched_questions import ask_streams
from ..cli.commandline import COUNT, HelpFormatter, bounded
from ..errors import MirasolError
from ..files.atomic import write_file
from ..files.ownership import check_output_file, has_json_format
from ..pipeline import Pipeline, Stream
from .model import load_pipeline
from .repository import add_serving_options, serving_options, write_repository
from .server import LocalServer

Chunk = tuple[np.ndarray, np.ndarray]
REPORT_FORMAT = "mirasol-triton-load"  # the --json report's "format", by which a later run knows it may replace it
REPORT = "Triton load report"
SEQUENCE_BASE = 1000  # the sequence IDs of the server's streams: 1000, 1001, ...
LOAD_QUESTION = "what is the man holding?"


def make_chunks(pipe: Pipeline, streams: int, chunks: int, seed: int = 0) -> list[list[Chunk]]:
    """Per stream, its chunks: video [F, 3, H, W] in [0, 1], audio log-mel [n_mels, A]."""
    rng = np.random.default_rng(seed)
    video, audio = pipe.chunk_inputs["video"], pipe.chunk_inputs["audio"]
    return [[(rng.random(video.shape[1:], dtype=np.float32).astype(video.dtype),
              rng.standard_normal(audio.shape[1:]).astype(audio.dtype)) for _ in range(chunks)]
            for _ in range(streams)]


def server_cpu_s(pid: int | None) -> tuple[float, float]:
    """CPU seconds used so far by the server process (Triton's core: endpoints, scheduling, the hand-off to the
    stubs) and by its children (the Python backend's model stubs: our model, graphs included); 0 without one."""
    if pid is None:
        return 0.0, 0.0
    import psutil

    root = psutil.Process(pid)
    return sum(root.cpu_times()[:2]), sum(sum(p.cpu_times()[:2]) for p in root.children(recursive=True))


def measure(name: str, count: int, run: Callable[[], list[float]], server_pid: int | None = None,
            unit: str = "chunk") -> dict[str, Any]:
    """Run one mode (it returns each unit's latency): units/s of wall time, CPU ms per unit (this process and
    the server's, so a machine shared with other work still compares the modes), p50/p95 latency."""
    cpu, server = time.process_time(), server_cpu_s(server_pid)
    start = time.perf_counter()
    latencies = np.asarray(run()) * 1e3
    wall = time.perf_counter() - start
    cpu, (core, stubs) = time.process_time() - cpu, (b - a for a, b in zip(server, server_cpu_s(server_pid)))
    figures = {"mode": name, f"{unit}s": count, "wall_s": wall, f"{unit}s_per_s": count / wall,
               f"cpu_ms_per_{unit}": (cpu + core + stubs) * 1e3 / count, "p50_ms": float(np.percentile(latencies, 50)),
               "p95_ms": float(np.percentile(latencies, 95))}
    if server_pid is not None:  # where the CPU went: the clients (this process), Triton's core, the model's stub
        figures.update({f"client_cpu_ms_per_{unit}": cpu * 1e3 / count, f"core_cpu_ms_per_{unit}": core * 1e3 / count,
                        f"model_cpu_ms_per_{unit}": stubs * 1e3 / count})
    return figures


@contextlib.contextmanager
def graph_time(pipe: Pipeline) -> Iterator[list[float]]:
    """Seconds spent in the graphs' run calls (every session of `pipe`) while in the block: [wall, CPU] (the CPU
    of this whole process meanwhile: the graphs' threads, while the one calling thread waits)."""
    spent = [0.0, 0.0]
    sessions = list(pipe.sessions.values())

    def timed(run: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            start, cpu = time.perf_counter(), time.process_time()
            try:
                return run(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - start
                spent[1] += time.process_time() - cpu
        return call

    for session in sessions:
        session.run = timed(session.run)  # type: ignore[method-assign]
    try:
        yield spent
    finally:
        for session in sessions:
            del session.run  # the class's method again


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


def model_counts(server: LocalServer, model: str) -> tuple[int, int, float]:
    """The model's inference and execution counts so far (their ratio is the mean batch of its calls), and the
    seconds its calls took (Triton's compute_infer: the model's execute, the Python backend's hand-off included)."""
    with urllib.request.urlopen(f"http://{server.http_url}/v2/models/{model}/stats", timeout=10) as reply:
        stats = json.load(reply)["model_stats"][0]
    seconds = sum(int(b["compute_infer"]["ns"]) for b in stats.get("batch_stats", [])) / 1e9
    return int(stats["inference_count"]), int(stats["execution_count"]), seconds


def served_figures(server: LocalServer, model: str, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """`run()`'s figures, with the mean batch of the model's calls meanwhile and its time per request."""
    before = model_counts(server, model)
    figures = run()
    after = model_counts(server, model)
    requests, calls, seconds = (a - b for a, b in zip(after, before))
    return {**figures, "mean_batch": requests / max(calls, 1), "model_ms_per_request": seconds * 1e3 / max(requests, 1)}


def through_server(server: LocalServer, data: list[list[Chunk]], protocol: str, model: str,
                   contexts: list[list[np.ndarray]], keep_open: bool = False) -> list[float]:
    """N client threads, one sequence each, every request waiting for its reply; the last chunk ends the sequence
    unless `keep_open`."""
    client_module = import_module(f"tritonclient.{protocol}")
    url = server.grpc_url if protocol == "grpc" else server.http_url

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
                    result = client.infer(model, inputs, sequence_id=SEQUENCE_BASE + i, sequence_start=k == 0,
                                          sequence_end=not keep_open and k == len(data[i]) - 1)
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


def ask_in_process(pipe: Pipeline, streams: list[Stream], rounds: int, tokens: int | None, together: bool,
                   answers: list[list[str]]) -> list[float]:
    """`rounds` questions to every stream: one by one, or each round in one ask_streams call."""
    latencies = []
    for _ in range(rounds):
        start = time.perf_counter()
        if together:
            got = ask_streams(pipe, streams, [LOAD_QUESTION] * len(streams), tokens)
            latencies += [time.perf_counter() - start] * len(streams)
        else:
            got = []
            for stream in streams:
                got.append(stream.ask(LOAD_QUESTION, tokens))
                latencies.append(time.perf_counter() - start)
                start = time.perf_counter()
        for out, answer in zip(answers, got):
            out.append(answer)  # type: ignore[arg-type]
    return latencies


def ask_through_server(server: LocalServer, data: list[list[Chunk]], rounds: int, protocol: str, model: str,
                       answers: list[list[str]]) -> Callable[[], list[float]]:
    """Start a sequence per stream with its chunks (now, untimed); returns the timed part: N client threads, each
    asking its sequence `rounds` questions, waiting for each answer (the last one ends the sequence)."""
    client_module = import_module(f"tritonclient.{protocol}")
    url = server.grpc_url if protocol == "grpc" else server.http_url
    question = client_module.InferInput("QUESTION", [1, 1], "BYTES")
    question.set_data_from_numpy(np.array([[LOAD_QUESTION.encode()]], dtype=np.object_))
    through_server(server, data, protocol, model, [[] for _ in data], keep_open=True)

    def worker(i: int) -> Callable[[list[float]], None]:
        def ask_all(out: list[float]) -> None:
            client = client_module.InferenceServerClient(url)
            try:
                for k in range(rounds):
                    start = time.perf_counter()
                    result = client.infer(model, [question], sequence_id=SEQUENCE_BASE + i,
                                          sequence_end=k == rounds - 1)
                    out.append(time.perf_counter() - start)
                    answers[i].append(result.as_numpy("ANSWER")[0, 0].decode())
            finally:
                client.close()
        return ask_all

    return lambda: run_threads([worker(i) for i in range(len(data))])


def format_table(results: list[dict[str, Any]], unit: str = "chunk") -> str:
    lines = [f"| mode | {unit}s/s | CPU ms/{unit} | p50 ms | p95 ms |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['mode']} | {r[f'{unit}s_per_s']:.1f} | {r[f'cpu_ms_per_{unit}']:.2f} | {r['p50_ms']:.2f} | "
              f"{r['p95_ms']:.2f} |" for r in results]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mirasol.runtime.triton.load",
                                     formatter_class=HelpFormatter,
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path, help="bundle directory (e.g. the demo: mirasol-export --out DIR)")
    parser.add_argument("--streams", type=bounded(int, 1, 1024), default=8, help="concurrent streams")
    parser.add_argument("--chunks", type=COUNT, default=32, help="chunks per stream")
    parser.add_argument("--questions", type=bounded(int, 0, 1 << 20), default=0,
                        help="then questions per stream (0: none)")
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
                   measure("in-process, one by one", total, lambda: one_by_one(pipe, data))]
        with graph_time(pipe) as graphs:
            results.append(measure("in-process, push_streams", total, lambda: batched(pipe, data)))
        results[-1].update(graph_ms_per_chunk=graphs[0] * 1e3 / total, graph_cpu_ms_per_chunk=graphs[1] * 1e3 / total)
        asked = _questions(pipe, data, args.questions, options.max_new_tokens or None)
        with tempfile.TemporaryDirectory(prefix="mirasol-triton-load-") as work:
            write_repository(args.bundle, Path(work) / "repo", options)
            with LocalServer(Path(work) / "repo", log_file=Path(work) / "server.log") as server:
                through_server(server, [data[0][:4]], args.protocol, options.model_name, [[]])  # warm-up
                name, pid = options.model_name, server.process.pid  # type: ignore[union-attr]
                results.append(served_figures(server, name, lambda: measure(
                    f"Triton {args.protocol}, {args.streams} streams", total,
                    lambda: through_server(server, data, args.protocol, name, served), pid)))
                if args.questions:
                    answers: list[list[str]] = [[] for _ in data]
                    timed = ask_through_server(server, data, args.questions, args.protocol, name, answers)
                    asked["results"].append(served_figures(server, name, lambda: measure(
                        f"Triton {args.protocol}, {args.streams} streams", len(data) * args.questions, timed, pid,
                        unit="question")))
                    asked["equal"] &= answers == asked["answers"]
    except MirasolError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    difference = max(float(np.abs(a - b).max()) for s, r in zip(served, reference) for a, b in zip(s, r))
    print(format_table(results))
    push, triton = results[2], results[3]
    print(f"\n{args.streams} streams x {args.chunks} chunks; push_streams vs one by one: "
          f"{push['chunks_per_s'] / results[1]['chunks_per_s']:.2f}x chunks/s, "
          f"{results[1]['cpu_ms_per_chunk'] / push['cpu_ms_per_chunk']:.2f}x less CPU; "
          f"mean batch in the server: {triton['mean_batch']:.2f}; "
          f"max |server - in-process| context: {difference:.2e}")
    print(f"per chunk: graphs {push['graph_ms_per_chunk']:.2f} ms, {push['graph_cpu_ms_per_chunk']:.2f} CPU ms "
          f"in-process (push_streams); the server's model "
          f"{triton['model_ms_per_request']:.2f} ms a request (its calls' time over their requests); CPU ms of the "
          f"clients {triton['client_cpu_ms_per_chunk']:.2f}, Triton's core {triton['core_cpu_ms_per_chunk']:.2f}, "
          f"the model's stub {triton['model_cpu_ms_per_chunk']:.2f}")
    if args.questions:
        print("\n" + format_table(asked["results"], unit="question"))
        ask, triton = asked["results"][1], asked["results"][-1]
        print(f"\n{args.streams} streams x {args.questions} questions; mean batch in the server: "
              f"{triton['mean_batch']:.2f}; answers equal in every mode: {asked['equal']}")
        print(f"per question: graphs {ask['graph_ms_per_question']:.2f} ms, {ask['graph_cpu_ms_per_question']:.2f} "
              f"CPU ms in-process (ask_streams); the server's "
              f"model {triton['model_ms_per_request']:.2f} ms a request; CPU ms of the clients "
              f"{triton['client_cpu_ms_per_question']:.2f}, Triton's core {triton['core_cpu_ms_per_question']:.2f}, "
              f"the model's stub {triton['model_cpu_ms_per_question']:.2f}")
    if args.json:
        report = {"streams": args.streams, "chunks": args.chunks, "options": asdict(options), "results": results,
                  "max_context_difference": difference, "questions": args.questions,
                  "question_results": asked["results"], "answers_equal": asked["equal"]}
        try:
            write_report(args.json, report)
        except MirasolError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
    return 0


def _questions(pipe: Pipeline, data: list[list[Chunk]], rounds: int, tokens: int | None) -> dict[str, Any]:
    """The in-process question modes on streams that took `data`'s chunks (results, answers, whether they agree)."""
    if not rounds:
        return {"results": [], "answers": [], "equal": True}
    streams = {mode: [pipe.stream() for _ in data] for mode in ("one by one", "ask_streams")}
    for group in streams.values():
        for stream, chunks in zip(group, data):
            for chunk in chunks:
                stream.push(*chunk)
    answers: dict[str, list[list[str]]] = {mode: [[] for _ in data] for mode in streams}
    count = len(data) * rounds
    results = []
    for mode in streams:
        with graph_time(pipe) as graphs:
            results.append(measure(f"in-process, {mode}", count, lambda: ask_in_process(
                pipe, streams[mode], rounds, tokens, mode == "ask_streams", answers[mode]), unit="question"))
        results[-1].update(graph_ms_per_question=graphs[0] * 1e3 / count,
                           graph_cpu_ms_per_question=graphs[1] * 1e3 / count)
    return {"results": results, "answers": answers["one by one"],
            "equal": answers["one by one"] == answers["ask_streams"]}


if __name__ == "__main__":
    sys.exit(main())
