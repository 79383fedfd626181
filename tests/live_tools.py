"""Tools for the live tests and the README's live figures: a real-time MPEG-TS sender, a slowed backend.

    python -m tests.live_tools clip OUT.mp4 --chunks 30                 # a longer demo clip
    python -m tests.live_tools send CLIP.mp4 udp://127.0.0.1:5000     # or a named pipe's path
    python -m tests.live_tools slowed BUNDLE --chunks 30 --delay 1.5 [--policy block] [--json]

`clip` writes a held-out demo clip (as `mirasol-demo`, of any number of 1 s chunks). `send` remuxes
the clip's packets (no re-encoding: the same H.264 and AAC data as the file) into MPEG-TS at real-time
pace; to a UDP port it first waits until a receiver has bound that port on loopback, so nothing is
lost before the receiver listens. `slowed` writes a demo clip of `--chunks`
chunks, plays it at real pace through `LiveRun` with every combiner call slowed by `--delay` seconds
(inference slower than real time) and prints the summary.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from mirasol.runtime.backends import Backend, GraphSession, get_backend
from mirasol.runtime.bundle.reader import Bundle
from mirasol.runtime.bundle.manifest import GraphEntry

LOOPBACK = "127.0.0.1"


def udp_port_bound(port: int) -> bool:
    """Whether a socket is bound to UDP `port` on this machine (Linux: /proc/net/udp)."""
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        if any(int(line.split()[1].rsplit(":", 1)[1], 16) == port for line in lines):
            return True
    return False


def send(clip: str, target: str, wait_s: float = 30.0) -> None:
    """Remux `clip` as MPEG-TS to `target` (udp://127.0.0.1:PORT or a named pipe) at real-time pace."""
    import av

    url = target
    if target.startswith("udp://"):
        parts = urlsplit(target)
        if parts.hostname != LOOPBACK:
            raise SystemExit(f"send: only loopback ({LOOPBACK}) targets, got {parts.hostname}")
        deadline = time.monotonic() + wait_s
        while not udp_port_bound(parts.port):  # type: ignore[arg-type]
            if time.monotonic() > deadline:
                raise SystemExit(f"send: nothing listens on UDP port {parts.port} after {wait_s} s")
            time.sleep(0.01)
        url = f"{target}{'&' if '?' in target else '?'}pkt_size=1316"
    with av.open(clip) as source, av.open(url, "w", format="mpegts") as out:
        streams = {s.index: out.add_stream_from_template(s) for s in source.streams if s.type in ("video", "audio")}
        start, first = time.monotonic(), None
        for packet in source.demux(*[source.streams[i] for i in streams]):
            if packet.dts is None:  # the demuxer's end-of-stream marker
                continue
            t = float(packet.dts * packet.time_base)
            first = t if first is None else first
            delay = start + t - first - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            packet.stream = streams[packet.stream.index]
            out.mux(packet)


class SlowSession(GraphSession):
    """A graph whose every run sleeps `delay` seconds first."""

    def __init__(self, inner: GraphSession, delay: float) -> None:
        self.inner, self.delay = inner, delay
        self.name, self.inputs, self.outputs = inner.name, inner.inputs, inner.outputs

    def run(self, feeds: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None
            ) -> dict[str, np.ndarray]:
        time.sleep(self.delay)
        return self.inner.run(feeds, output_names)

    def close(self) -> None:
        self.inner.close()


class SlowBackend(Backend):
    """Another backend with the graphs named in `delays` slowed by that many seconds per run."""

    def __init__(self, inner: Backend | str, delays: Mapping[str, float]) -> None:
        self.inner = get_backend(inner)
        self.delays = dict(delays)
        self.name = f"slow {self.inner.name}"

    def load(self, entry: GraphEntry, bundle: Bundle) -> GraphSession:
        session = self.inner.load(entry, bundle)
        delay = self.delays.get(entry.name, 0.0)
        return SlowSession(session, delay) if delay else session


def write_demo_clip(path: str | Path, chunks: int, config=None, index: int = 0) -> Path:
    """A held-out demo clip of `chunks` chunks for `config` (default: the shipped demo model's)."""
    from mirasol.model.demo_task import DEMO_CHECKPOINT, TEST_SEED, DemoTask

    task = DemoTask(config or json.loads((DEMO_CHECKPOINT / "config.json").read_text()), num_chunks=chunks)
    return task.write(task.clip(TEST_SEED, index), path)


def slowed_run(bundle: str, chunks: int, delay: float, policy: str | None, latency_bound: float,
               queue_size: int | None, on_event=None) -> dict:
    """A demo clip of `chunks` chunks at real pace through a bundle whose combiner sleeps `delay` s a call."""
    from mirasol.runtime.media.live import LiveRun
    from mirasol.runtime.pipeline import Pipeline
    from mirasol.runtime.media.live_sources import FileSource

    pipe = Pipeline.load(bundle, backend=SlowBackend("onnxruntime", {"combiner": delay}))
    with tempfile.TemporaryDirectory(prefix="mirasol-live-") as folder:
        clip = write_demo_clip(Path(folder) / "clip.mp4", chunks, pipe.config)
        run = LiveRun(pipe.stream(), FileSource(str(clip), pipe.config, realtime=True), policy=policy,
                      latency_bound=latency_bound, queue_size=queue_size, on_event=on_event)
        return run.run()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.live_tools", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    clip = commands.add_parser("clip", help="write a held-out demo clip of --chunks 1 s chunks (mp4)")
    clip.add_argument("out")
    clip.add_argument("--chunks", type=int, default=30, help="chunks in the clip (default: %(default)s)")
    sender = commands.add_parser("send", help="remux a clip as MPEG-TS to a loopback UDP port or a named pipe")
    sender.add_argument("clip")
    sender.add_argument("target", help=f"udp://{LOOPBACK}:PORT or the path of a named pipe")
    slowed = commands.add_parser("slowed", help="a demo clip at real pace through a slowed bundle; prints the summary")
    slowed.add_argument("bundle")
    slowed.add_argument("--chunks", type=int, default=30, help="chunks in the clip (default: %(default)s)")
    slowed.add_argument("--delay", type=float, default=1.5,
                        help="seconds each combiner call sleeps (default: %(default)s)")
    slowed.add_argument("--policy", choices=["drop-oldest", "block"], default="drop-oldest")
    slowed.add_argument("--latency-bound", type=float, default=2.0, help="seconds (default: %(default)s)")
    slowed.add_argument("--queue-size", type=int, help="chunks (default: as many as fit in the bound)")
    slowed.add_argument("--json", action="store_true", help="print every record as a JSON line")
    args = parser.parse_args(argv)
    if args.command == "clip":
        print(write_demo_clip(args.out, args.chunks))
        return
    if args.command == "send":
        send(args.clip, args.target)
        return
    printer = (lambda event: print(json.dumps(event), flush=True)) if args.json else None
    summary = slowed_run(args.bundle, args.chunks, args.delay, args.policy, args.latency_bound, args.queue_size,
                         on_event=printer)
    if not args.json:
        print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    sys.exit(main())
