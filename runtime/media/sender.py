"""A real-time MPEG-TS sender on this machine: what a camera or an encoder would send, for tests and load figures.

    python -m mirasol.runtime.media.sender CLIP.mp4 udp://127.0.0.1:5000 [udp://127.0.0.1:5001 ...] [--loops N]

Each target gets the clip's packets remuxed (no re-encoding: the same H.264 and AAC data as the file) into
MPEG-TS at real-time pace, from a thread of its own; `loops` plays the clip that many times back to back
(timestamps continue). To a UDP port it first waits until a receiver has bound that port on loopback, and to
a named pipe until a reader has opened it, so nothing is lost before the receiver listens. A target that is not
udp:// must be an existing named pipe (opened by `open_pipe` of runtime/files/atomic.py: never a regular file
created or overwritten). Only loopback UDP targets: this is a test source, not a streaming server. `video_only`
leaves the audio out; `spread` starts the targets that many seconds apart in all (cameras are not in step).
`write_test_clip` makes a clip of a camera's size (moving bars and a tone, H.264 and AAC) for load figures,
through the ownership rule: the path is new or a test clip of ours (`is_test_clip`: its comment tag).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit

import numpy as np

from ..errors import InputError
from ..files.atomic import atomic_file, open_pipe
from .pyav import _import_av, media_comment

LOOPBACK = "127.0.0.1"
TEST_CLIP_COMMENT = "mirasol test clip"  # how write_test_clip knows its own clips (is_test_clip)


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


def _open_target(target: str, wait_s: float, stop: threading.Event) -> str | BinaryIO | None:
    """What to mux into: the URL of a loopback UDP port a receiver has bound, or the named pipe `target` opened
    once a reader has it (None: stopped while waiting)."""
    deadline = time.monotonic() + wait_s
    if target.startswith("udp://"):
        parts = urlsplit(target)
        if parts.hostname != LOOPBACK or parts.port is None:
            raise InputError(f"send: only loopback targets udp://{LOOPBACK}:PORT, got {target}")
        while not udp_port_bound(parts.port):
            if time.monotonic() > deadline:
                raise InputError(f"send: nothing listens on UDP port {parts.port} after {wait_s:g} s")
            if stop.wait(0.01):
                return None
        return f"{target}{'&' if '?' in target else '?'}pkt_size=1316"
    while (pipe := open_pipe(target, "named pipe target")) is None:
        if time.monotonic() > deadline:
            raise InputError(f"send: nothing reads the named pipe {target} after {wait_s:g} s")
        if stop.wait(0.01):
            return None
    return pipe


def send(clip: str | Path, target: str, wait_s: float = 30.0, loops: int = 1, video_only: bool = False,
         stop: threading.Event | None = None) -> None:
    """Remux `clip` as MPEG-TS to `target` (udp://127.0.0.1:PORT or an existing named pipe) at real-time pace,
    `loops` times."""
    av = _import_av()
    stop = stop or threading.Event()
    opened = _open_target(target, wait_s, stop)
    if opened is None:
        return
    kinds = ("video",) if video_only else ("video", "audio")
    with contextlib.ExitStack() as closing:
        if not isinstance(opened, str):  # a pipe: FFmpeg writes to its descriptor, closed after the muxer is
            opened = f"pipe:{closing.enter_context(opened).fileno()}"
        out = closing.enter_context(av.open(opened, "w", format="mpegts"))
        start, first, offset, streams = time.monotonic(), None, 0.0, None
        for _ in range(loops):
            end = offset
            with av.open(str(clip)) as source:
                chosen = [s for s in source.streams if s.type in kinds]
                if streams is None:
                    streams = {s.index: out.add_stream_from_template(s) for s in chosen}
                for packet in source.demux(*chosen):
                    if packet.dts is None:  # the demuxer's end-of-stream marker
                        continue
                    t = float(packet.dts * packet.time_base) + offset
                    end = max(end, t + float((packet.duration or 0) * packet.time_base))
                    first = t if first is None else first
                    if stop.wait(max(start + t - first - time.monotonic(), 0.0)):
                        return
                    shift = round(offset / packet.time_base)
                    packet.dts += shift
                    if packet.pts is not None:
                        packet.pts += shift
                    packet.stream = streams[packet.stream.index]
                    out.mux(packet)
            offset = end


def send_all(clip: str | Path, targets: Sequence[str], loops: int = 1, video_only: bool = False,
             stop: threading.Event | None = None, spread: float = 0.0) -> list[threading.Thread]:
    """`send` to every target from a thread each (started; daemon threads), `spread` seconds apart in all."""
    stop = stop or threading.Event()

    def one(target: str, delay: float) -> None:
        if not stop.wait(delay):
            send(clip, target, loops=loops, video_only=video_only, stop=stop)

    threads = [threading.Thread(target=one, args=(target, spread * i / len(targets)), name=f"send {target}",
                                daemon=True) for i, target in enumerate(targets)]
    for thread in threads:
        thread.start()
    return threads


def is_test_clip(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is a clip `write_test_clip` wrote (its comment tag says so)."""
    return media_comment(path) == TEST_CLIP_COMMENT


def write_test_clip(path: str | Path, seconds: float = 10.0, width: int = 640, height: int = 360, fps: int = 25,
                    sample_rate: int = 16000) -> Path:
    """An mp4 of moving colour bars (H.264) and a rising tone (AAC) of a camera's size, for load figures; `path` must
    be new or a test clip of ours (OutputError otherwise)."""
    av = _import_av()
    frames = round(seconds * fps)
    x = np.arange(width)[None, :, None]
    with atomic_file(path, is_test_clip, "test clip") as tmp, av.open(str(tmp), "w") as out:
        out.metadata["comment"] = TEST_CLIP_COMMENT
        video = out.add_stream("h264", rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.options = {"preset": "veryfast", "g": str(2 * fps)}
        audio = out.add_stream("aac", rate=sample_rate)
        audio.layout = "mono"
        for i in range(frames):
            phase = 2 * np.pi * (x / width + i / (2 * fps))
            rgb = (127 + 120 * np.sin(phase + np.array([0, 2, 4]))).astype(np.uint8).repeat(height, axis=0)
            out.mux(video.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        out.mux(video.encode(None))
        t = np.arange(round(seconds * sample_rate)) / sample_rate
        tone = (0.2 * np.sin(2 * np.pi * (300 + 30 * t) * t)).astype(np.float32)
        for start in range(0, tone.size, 1024):
            frame = av.AudioFrame.from_ndarray(tone[None, start:start + 1024], format="flt", layout="mono")
            frame.sample_rate = sample_rate
            out.mux(audio.encode(frame))
        out.mux(audio.encode(None))
    return Path(path)


def main(argv: Sequence[str] | None = None) -> int:
    from ..cli.commandline import bounded, command_parser, run_command  # the command line only

    parser = command_parser("python -m mirasol.runtime.media.sender", __doc__.split("\n")[0],
                            epilog="Examples:\n  python -m mirasol.runtime.media.sender clip.mp4 udp://127.0.0.1:5000")
    parser.add_argument("clip", help="a media file with H.264 (or other MPEG-TS-able) video")
    parser.add_argument("targets", nargs="+", help=f"udp://{LOOPBACK}:PORT or the path of an existing named pipe")
    parser.add_argument("--loops", type=bounded(int, 1, 1_000_000), default=1, metavar="N",
                        help="times the clip is played back to back")
    parser.add_argument("--video-only", action="store_true", help="send the video track alone")
    parser.add_argument("--spread", type=bounded(float, 0, 3600), default=0.0, metavar="SECONDS",
                        help="seconds between the first and the last start (0: all at once)")
    return run_command(parser, _send, argv)


def _send(args: argparse.Namespace) -> None:
    if len(args.targets) == 1:
        send(args.clip, args.targets[0], loops=args.loops, video_only=args.video_only)
        return
    for thread in send_all(args.clip, args.targets, loops=args.loops, video_only=args.video_only,
                           spread=args.spread):
        thread.join()


if __name__ == "__main__":
    sys.exit(main())
