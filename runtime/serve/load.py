"""The load figure: how many live sources the service holds at real-time pace within their latency bound.

    python -m mirasol.runtime.serve.load BUNDLE [--sources 1,2,4,8,16] [--seconds 20] [--standing-every 5]

For each mode (batched: one `push_streams` call a round; one by one: a `push` per chunk) and each number of
sources N, the service's inference thread runs in this process (the HTTP layer is not on the push path) with
N UDP sources on loopback, each fed at real-time pace by `python -m mirasol.runtime.media.sender` (other
processes, 16 sources each, their starts spread over one chunk: cameras are not in step) with a clip of a
camera's size (`--clip`, default: `write_test_clip`, 640x360 at 25 fps, H.264 + AAC). After `--warmup`
seconds it counts, over `--seconds`: the chunks due (N x seconds / chunk duration), pushed and dropped, the
latency of the pushed ones (capture to av_context: p50, p95, max) and how many were over the bound, the CPU
time of this process and the senders per chunk, the inference thread's push time per chunk, and with
`--standing-every K` a standing question on every source asked every K chunks (its cost per chunk: answer time
over the chunks it stood over). N *holds* when at most 1% of the chunks due were dropped or missing and the p95
latency is within the bound; the run goes
up the list of N until one does not hold. The machine's load average is printed with each row: on a shared
machine, repeat and report the spread.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ..cli.commandline import bounded, command_parser, existing_dir, run_command
from ..files.atomic import write_file
from ..files.ownership import check_output_file, has_json_format
from ..media.feed import Quantiles

SOURCES_PER_SENDER = 16
REPORT_FORMAT = "mirasol-serve-load"  # the --json report's "format", by which a later run knows it may replace it
REPORT = "load figure report"


class Collector:
    """Takes the service's events in place of the subscribers' hub: chunk and drop events, timed."""

    def __init__(self) -> None:
        self.events: list[tuple[float, dict[str, Any]]] = []
        self.subscribers: set = set()
        self.lost = 0

    def publish(self, event: dict[str, Any]) -> None:
        if event["event"] in ("chunk", "drop"):
            self.events.append((time.monotonic(), event))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _cpu_seconds(processes: list[subprocess.Popen]) -> tuple[float, float]:
    """CPU seconds of this process (the service) and of the senders (0 without psutil)."""
    own = time.process_time()
    try:
        import psutil
    except ImportError:
        return own, 0.0
    senders = 0.0
    for process in processes:
        try:
            senders += sum(psutil.Process(process.pid).cpu_times()[:2])
        except psutil.Error:
            pass
    return own, senders


def run_once(pipe: Any, clip: Path, count: int, batch: bool, seconds: float, warmup: float, bound: float,
             standing_every: int | None) -> dict[str, Any]:
    """One run: `count` sources for warmup + seconds; the figures of the measured window."""
    from .service import Limits, Service
    from .sources import SourceDefaults, open_spec, parse_source

    config = pipe.config
    chunk_s = float(config["frames_per_chunk"]) / float(config["fps"])
    service = Service(pipe, Limits(max_sources=count), SourceDefaults(latency_bound=bound, stall_timeout=2.0),
                      batch=batch)
    collector = Collector()
    service.hub = collector  # type: ignore[assignment]
    service.scheduler.start()
    ports = [_free_port() for _ in range(count)]
    senders: list[subprocess.Popen] = []
    try:
        for i, port in enumerate(ports):
            spec = parse_source({"id": f"s{i}", "url": f"udp://127.0.0.1:{port}"}, service.defaults, False, "")
            service.scheduler.call(service._add, spec, open_spec(spec, config)).result(timeout=30)
            if standing_every:
                service.scheduler.call(service._add_standing, f"s{i}", {
                    "question": "which colour appeared first?", "every": standing_every, "on": "change",
                    "max_new_tokens": 8}).result(timeout=30)
        loops = math.ceil((warmup + seconds + 10) / 10) + 1
        for first in range(0, count, SOURCES_PER_SENDER):
            targets = [f"udp://127.0.0.1:{p}" for p in ports[first:first + SOURCES_PER_SENDER]]
            senders.append(subprocess.Popen(
                [sys.executable, "-m", "mirasol.runtime.media.sender", str(clip), *targets, "--loops", str(loops),
                 "--spread", str(chunk_s)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        deadline = time.monotonic() + 60
        while len({e["source"] for _, e in collector.events if e["event"] == "chunk"}) < count:
            if time.monotonic() > deadline:
                raise RuntimeError("not every source delivered a chunk within 60 s")
            time.sleep(0.2)
        time.sleep(warmup)
        push = service.metrics.backend.labels("push")
        start, cpu0, push0 = time.monotonic(), _cpu_seconds(senders), push._value.get()
        standing0 = _standing(service)
        time.sleep(seconds)
        end, cpu1, push1 = time.monotonic(), _cpu_seconds(senders), push._value.get()
        standing1 = _standing(service)
        load = os.getloadavg()[0]
    finally:
        for sender in senders:
            sender.kill()
        service.close()
    window = [e for t, e in collector.events if start <= t < end]
    latency = Quantiles()
    pushed = dropped = over = 0
    for event in window:
        if event["event"] == "chunk":
            pushed += 1
            latency.add(event["latency_ms"])
            over += event["latency_ms"] > 1000 * bound
        else:
            dropped += 1
    due = count * seconds / chunk_s
    missing = max(due - pushed - dropped, 0.0)
    lost = (dropped + missing) / due
    p95 = latency.percentile(95)
    answer_s, chunks = standing1[0] - standing0[0], standing1[1] - standing0[1]
    return {"sources": count, "mode": "batched" if batch else "one by one", "due": round(due), "pushed": pushed,
            "dropped": dropped, "missing": round(missing), "lost_rate": round(lost, 4), "over_bound": over,
            "latency_ms": latency.to_dict(),
            "service_cpu_ms_per_chunk": round(1000 * (cpu1[0] - cpu0[0]) / max(pushed, 1), 2),
            "sender_cpu_ms_per_chunk": round(1000 * (cpu1[1] - cpu0[1]) / max(pushed, 1), 2),
            "push_ms_per_chunk": round(1000 * (push1 - push0) / max(pushed, 1), 2),
            "standing_ms_per_chunk": round(1000 * answer_s / chunks, 3) if chunks else None,
            "holds": lost <= 0.01 and p95 is not None and p95 <= 1000 * bound, "load_average": round(load, 1)}


def _standing(service: Any) -> tuple[float, int]:
    """Answer seconds and chunks of every standing question so far."""
    def total() -> tuple[float, int]:
        standings = [s for source in service.scheduler.sources.values() for s in source.standing.values()]
        return sum(s.answer_seconds for s in standings), sum(s.chunks for s in standings)
    return service.scheduler.call(total).result(timeout=30)


def markdown(rows: list[dict[str, Any]], bound: float) -> str:
    lines = ["| mode | sources | due | pushed | dropped + missing | lost | latency p50 / p95 / max ms | over bound "
             "| CPU ms/chunk: service, senders | push ms/chunk | standing ms/chunk | holds | load avg |",
             "|" + "---|" * 13]
    for r in rows:
        q = r["latency_ms"]
        lines.append(f"| {r['mode']} | {r['sources']} | {r['due']} | {r['pushed']} | {r['dropped']} + {r['missing']} | "
                     f"{100 * r['lost_rate']:.1f}% | {q['p50']} / {q['p95']} / {q['max']} | {r['over_bound']} | "
                     f"{r['service_cpu_ms_per_chunk']}, {r['sender_cpu_ms_per_chunk']} | {r['push_ms_per_chunk']} | "
                     f"{'-' if r['standing_ms_per_chunk'] is None else r['standing_ms_per_chunk']} | "
                     f"{'yes' if r['holds'] else 'no'} | {r['load_average']} |")
    held = {}
    for r in rows:
        if r["holds"]:
            held[r["mode"]] = max(held.get(r["mode"], 0), r["sources"])
    lines.append("")
    lines.append("Held within the bound (" + f"{1000 * bound:.0f} ms, <= 1% lost): " +
                 ", ".join(f"{mode} {n} sources" for mode, n in held.items()) if held else "none held")
    return "\n".join(lines)


def is_load_report(path: Path) -> bool:
    """Whether `path` holds a report this command wrote (never raises)."""
    return has_json_format(path, REPORT_FORMAT)


def write_report(path: Path, report: dict[str, Any]) -> None:
    """The --json report, written through the ownership rule (new, or a report of this command)."""
    write_file(path, json.dumps({"format": REPORT_FORMAT, **report}, indent=2) + "\n", is_load_report, REPORT)


def _load(args: argparse.Namespace) -> int:
    from ..media.sender import write_test_clip
    from ..pipeline import Pipeline

    if args.json is not None:
        check_output_file(args.json, is_load_report, REPORT)  # before any work
    counts = sorted({int(n) for n in args.sources.split(",") if n.strip()})
    if not counts or counts[0] < 1:
        raise ValueError(f"--sources: a comma-separated list of counts >= 1, got {args.sources!r}")
    modes = [m.strip() for m in args.modes.split(",")]
    if set(modes) - {"batched", "one-by-one"}:
        raise ValueError(f"--modes: batched and/or one-by-one, got {args.modes!r}")
    pipe = Pipeline.load(args.bundle, threads=args.threads) if args.threads else Pipeline.load(args.bundle)
    rows = []
    with tempfile.TemporaryDirectory(prefix="mirasol-load-") as folder:
        clip = args.clip or write_test_clip(Path(folder) / "camera.mp4", 10.0)
        for mode in modes:
            for count in counts:
                row = run_once(pipe, Path(clip), count, mode == "batched", args.seconds, args.warmup,
                               args.latency_bound, args.standing_every)
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
                if not row["holds"]:
                    break
    print(markdown(rows, args.latency_bound))
    if args.json is not None:
        write_report(args.json, {"bundle": str(args.bundle), "clip": str(args.clip or "write_test_clip 640x360 25 fps"),
                                 "seconds": args.seconds, "rows": rows})
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("python -m mirasol.runtime.serve.load", __doc__.split("\n")[0], quiet=False)
    parser.add_argument("bundle", type=existing_dir, help="bundle directory")
    parser.add_argument("--sources", default="1,2,4,8,16", help="numbers of sources to try, in rising order")
    parser.add_argument("--modes", default="batched,one-by-one", help="batched and/or one-by-one")
    parser.add_argument("--seconds", type=bounded(float, 1.0, 3600.0), default=20.0, help="measured seconds a run")
    parser.add_argument("--warmup", type=bounded(float, 0.0, 600.0), default=5.0,
                        help="seconds after every source's first chunk before measuring (0: none)")
    parser.add_argument("--latency-bound", type=bounded(float, 0.01, 3600.0), default=2.0, metavar="SECONDS",
                        help="each source's latency bound: a run holds when the p95 latency is within it")
    parser.add_argument("--standing-every", type=bounded(int, 1, 10_000), metavar="K",
                        help="a standing question on every source, asked every K chunks")
    parser.add_argument("--clip", type=Path, help="the clip each sender loops (default: 640x360, 25 fps, 10 s)")
    parser.add_argument("--threads", type=bounded(int, 1, 1024), help="onnxruntime intra-op threads")
    parser.add_argument("--json", type=Path, metavar="FILE",
                        help="also write the rows as JSON (a new file, or a report of this command: nothing else is "
                             "replaced)")
    return run_command(parser, _load, argv)


if __name__ == "__main__":
    sys.exit(main())
