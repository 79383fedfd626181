"""Tools for the live tests and the docs' live figures: demo clips, a real-time sender, a slowed backend, helpers.

    python -m tests.live_tools clip OUT.mp4 --chunks 30                 # a longer demo clip
    python -m tests.live_tools send CLIP.mp4 udp://127.0.0.1:5000     # or a named pipe's path
    python -m tests.live_tools slowed BUNDLE --chunks 30 --delay 1.5 [--policy block] [--json]

`clip` writes a held-out demo clip (as `mirasol-demo`, of any number of 1 s chunks). `send` is
`mirasol.runtime.media.sender` (the clip's packets remuxed into MPEG-TS at real-time pace; to a UDP port
once a receiver has bound it). `slowed` writes a demo clip of `--chunks` chunks, plays it at real pace
through `LiveRun` with every combiner call slowed by `--delay` seconds (inference slower than real time)
and prints the summary. The helpers below (subprocesses read line by line, free ports) serve the live and
service tests.
"""
from __future__ import annotations

import argparse
import json
import queue
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from mirasol.model import get_preset
from mirasol.runtime.backends import Backend, GraphSession, get_backend
from mirasol.runtime.bundle.reader import Bundle
from mirasol.runtime.bundle.manifest import GraphEntry
from mirasol.runtime.media.sender import send

REPO = Path(__file__).resolve().parent.parent
SHORT = get_preset("tiny").replace(fps=16.0, audio_patch_frames=5)  # 0.25 s chunks: real-time tests in seconds
SHORT_CHUNK_S = SHORT.frames_per_chunk / SHORT.fps


class Lines:
    """A subprocess pipe read line by line in a thread, with deadlines."""

    def __init__(self, pipe) -> None:
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, args=(pipe,), daemon=True).start()

    def _read(self, pipe) -> None:
        for line in pipe:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def until(self, predicate, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise AssertionError(f"timed out after {timeout} s; lines so far: {self.seen[-20:]}") from None
            if line is None:
                raise AssertionError(f"the stream ended; lines: {self.seen[-20:]}")
            self.seen.append(line)
            if predicate(line):
                return line

    def rest(self, timeout: float) -> list[str]:
        """The lines until the pipe closes."""
        deadline = time.monotonic() + timeout
        out = []
        while (line := self.lines.get(timeout=max(deadline - time.monotonic(), 0.01))) is not None:
            out.append(line)
        self.seen.extend(out)
        return out


def mirasol_run(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mirasol.runtime.cli.run", *args], cwd=REPO, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def sender(clip: Path, *targets: str, video_only: bool = False, loops: int = 1) -> subprocess.Popen:
    """`python -m mirasol.runtime.media.sender CLIP TARGET...` (real-time MPEG-TS to loopback UDP or a named pipe)."""
    return subprocess.Popen([sys.executable, "-m", "mirasol.runtime.media.sender", str(clip), *targets,
                             "--loops", str(loops), *(["--video-only"] if video_only else [])], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def events(lines: list[str], kind: str) -> list[dict]:
    return [e for e in map(json.loads, lines) if e["event"] == kind]


def write_ts(clip: Path, out: Path) -> Path:
    """The clip's packets remuxed into an MPEG-TS file (what the sender sends, all at once)."""
    import av

    with av.open(str(clip)) as source, av.open(str(out), "w", format="mpegts") as ts:
        streams = {s.index: ts.add_stream_from_template(s) for s in source.streams}
        for packet in source.demux():
            if packet.dts is not None:
                packet.stream = streams[packet.stream.index]
                ts.mux(packet)
    return out


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
    sending = commands.add_parser("send", help="remux a clip as MPEG-TS to a loopback UDP port or a named pipe")
    sending.add_argument("clip")
    sending.add_argument("target", help="udp://127.0.0.1:PORT or the path of a named pipe")
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
