"""Live sources: a file at its real pace, a network stream, a named pipe or a V4L2 camera -> timed chunks.

A source turns its media into the model's chunks with the rules of `media.py` (the same frame
sampling, resizing, audio and chunking as a file) and stamps each chunk with the clock time its last
media arrived (`captured`) and the seconds spent decoding it (`decode_s`). `chunks()` runs in the
live driver's decode thread (`live.py`), so a source may block on the network; it never blocks
inference. A stream's capture time is when the packet that completed the chunk was read: a backlog
upstream of the reader (in the socket, the sender or the camera's buffers) is not seen.

- file (`clip.mp4`): decoded chunk by chunk with `iter_chunks`; a chunk is captured when its decoding
  starts, or with `realtime` when a camera would have delivered it, (k + 1) chunk durations after the
  start, then decoded (so the end of the file shows one chunk duration after its last chunk, when the
  next one would be due).
- network (`rtsp://`, `rtsps://`, `udp://`, `rtp://`, `srt://`, `tcp://`, `http(s)://` e.g. HLS), named
  pipe, V4L2 camera (`/dev/videoN`): one PyAV demuxer for video and audio, decoded as packets arrive.
  No data for `stall_timeout` seconds (`OPEN_TIMEOUT_S` at least when opening), or a read error, ends
  the connection: what it decoded is flushed into whole chunks, then a network source or camera
  reconnects after 0.5, 1, 2, 4, 8, 8, ... seconds (each attempt reported) and gives up after
  `reconnect` attempts in a row without a chunk. The end of a stream (EOF: a pipe's writer closed it,
  an HLS playlist ended) ends the source. A partial chunk at the end of a connection is dropped.

PyAV is the `media` extra (`pip install "mirasol-edge[media]"`), imported when a source opens.
"""
from __future__ import annotations

import collections
import os
import stat
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InputError
from .chunking import ChunkAssembler, MediaParams
from .frames import FrameSampler
from .pyav import FrameConverter, MonoAudio, _import_av, ffmpeg_reason, frame_timing, start_time
from .video_files import iter_chunks

NETWORK_SCHEMES = ("rtsp", "rtsps", "udp", "rtp", "srt", "tcp", "http", "https")
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 8.0
PROBE_OPTIONS = {"analyzeduration": "1000000"}  # probe a live stream for 1 s, not FFmpeg's 5 s
OPEN_TIMEOUT_S = 10.0  # the least an open waits for the first data (a sender may start after us)

Report = Callable[[dict[str, Any]], None]


@dataclass
class TimedChunk:
    """One chunk of a source with its times (seconds of the driver's clock)."""

    index: int  # position in the source: 0, 1, ... (every chunk it captured, pushed or dropped later)
    video: np.ndarray  # [F, 3, H, W] float32 in [0, 1]
    audio: np.ndarray  # [n_mels, A] float32 log-mel
    captured: float  # its last media arrived
    decode_s: float  # decoding it took (demuxed packets to model arrays: decode, resize, log-mel)


class Source(ABC):
    """Where chunks come from. `live`: it runs on its own clock (drop-oldest is the default policy)."""

    name: str
    live: bool

    @abstractmethod
    def chunks(self, report: Report, stop: threading.Event) -> Iterator[TimedChunk]:
        """The source's chunks in order until it ends or `stop` is set; `report` takes events such as
        reconnects ({"event": "reconnect", ...}); waits end early when `stop` is set."""


class FileSource(Source):
    """A media file, decoded chunk by chunk; with `realtime`, released at the pace it plays."""

    def __init__(self, path: str, config: Any, realtime: bool = False,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not os.path.isfile(path):
            raise InputError(f"media file {path} does not exist" if not os.path.exists(path)
                             else f"media file {path} is not a regular file")
        self.name = path
        self.live = False
        self.params = MediaParams.from_config(config)
        self.realtime = realtime
        self.clock = clock

    def chunks(self, report: Report, stop: threading.Event) -> Iterator[TimedChunk]:
        chunk_seconds = self.params.frames_per_chunk / self.params.fps
        decoded = iter_chunks(self.name, self.params)
        start = self.clock()
        try:
            index = 0
            while True:
                captured = self.clock()
                if self.realtime:
                    captured = start + (index + 1) * chunk_seconds
                    if stop.wait(max(captured - self.clock(), 0.0)):
                        return
                begin = self.clock()
                video_audio = next(decoded, None)
                if video_audio is None:
                    return
                yield TimedChunk(index, *video_audio, captured=captured, decode_s=self.clock() - begin)
                index += 1
        finally:
            decoded.close()


class _Connection:
    """One connection's decoding: demuxed packets in, whole chunks out (the rules of media.py).

    Time 0 is the first video frame decoded (a stream joined mid-way has no start of its own; an AAC
    track's priming before it is cut, as a file's edit list would): audio that arrives before that
    frame waits for it (the last `AUDIO_WAITING` frames of it).
    """

    AUDIO_WAITING = 256

    def __init__(self, av: Any, container: Any, params: MediaParams, name: str) -> None:
        if not container.streams.video:
            raise InputError(f"{name} has no video stream")
        self.av = av
        self.params = params
        self.video = container.streams.video[0]
        self.audio = container.streams.audio[0] if container.streams.audio else None
        self.origin: float | None = None
        self.fallback_origin = start_time(container)  # when the first frame has no time
        rate = float(self.video.average_rate or self.video.guessed_rate or params.fps)
        chunk_seconds = params.frames_per_chunk / params.fps
        self.sampler = FrameSampler(params.fps, 1.0 / rate, max_gap=chunk_seconds)
        self.convert = FrameConverter(av, params.image_size)
        self.mono: MonoAudio | None = None
        self.audio_waiting: collections.deque[Any] = collections.deque(maxlen=self.AUDIO_WAITING)
        self.assembler = ChunkAssembler(params, name)

    @property
    def streams(self) -> tuple[Any, ...]:
        return (self.video,) if self.audio is None else (self.video, self.audio)

    def _frames(self, frames: list[Any], last: bool = False) -> None:
        shown: list[Any] = []
        for frame in frames:
            if frame.time_base is None:  # frames flushed out of the decoder may lack it
                frame.time_base = self.video.time_base
            if self.origin is None:
                self.origin = frame_timing(frame, 0.0)[0]
                if self.origin is None:
                    self.origin = self.fallback_origin
                if self.audio is not None:
                    self.mono = MonoAudio(self.av, self.origin, self.params.audio.sample_rate)
                    self._audio(list(self.audio_waiting))
            shown.extend(self.sampler.add(frame, *frame_timing(frame, self.origin)))
        if last:
            shown.extend(self.sampler.finish())
        for frame in shown:
            self.assembler.add_frame(self.convert(frame))
            if self.audio is None:
                self.assembler.add_audio(None)

    def _audio(self, frames: list[Any]) -> None:
        if self.mono is None:
            self.audio_waiting.extend(frames)
            return
        for frame in frames:
            for piece in self.mono.add(frame):
                self.assembler.add_samples(piece)

    def decode(self, packet: Any) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The chunks this packet completes."""
        if packet.stream.index == self.video.index:
            self._frames(packet.decode())
        else:
            self._audio(packet.decode())
        yield from self.assembler.live_chunks()

    def end(self, flush: bool) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The last whole chunks; `flush`: first drain the decoders (the demuxer stopped on an error)."""
        video_frames: list[Any] = []
        if flush:
            try:
                video_frames = self.video.decode(None)
                if self.audio is not None:
                    self._audio(self.audio.decode(None))
            except self.av.FFmpegError:
                pass
        self._frames(video_frames, last=True)
        if self.mono is not None:
            self._audio([None])
        yield from self.assembler.finish(pad_short=False)


class StreamSource(Source):
    """A network stream, named pipe or V4L2 camera: decoded as it arrives, reconnecting with backoff."""

    def __init__(self, url: str, config: Any, kind: str, reconnect: int = 5, stall_timeout: float = 5.0,
                 options: Mapping[str, str] | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = url
        self.live = True
        self.kind = kind  # "network", "pipe" or "camera"
        self.params = MediaParams.from_config(config)
        self.reconnect = reconnect if kind != "pipe" else 0
        self.stall_timeout = stall_timeout
        self.options = dict(options or {})
        self.clock = clock

    def _open(self, av: Any) -> Any:
        options = {**PROBE_OPTIONS, **self.options}
        try:
            if self.kind == "pipe":  # a file read: FFmpeg's timeouts do not apply
                return av.open(self.name, options=options)
            return av.open(self.name, format="v4l2" if self.kind == "camera" else None, options=options,
                           timeout=(max(self.stall_timeout, OPEN_TIMEOUT_S), self.stall_timeout))
        except (av.FFmpegError, OSError) as error:
            raise InputError(f"cannot open {self.kind} source {self.name}: {ffmpeg_reason(error)}") from error

    def _retry(self, error: InputError, failures: int, report: Report, stop: threading.Event) -> int:
        """Wait before the next attempt (reported), or raise `error` when no attempt is left."""
        if failures >= self.reconnect:
            if self.reconnect:
                raise InputError(f"{error}; gave up after {failures} reconnect attempts") from error
            raise error
        delay = min(BACKOFF_FIRST_S * 2 ** failures, BACKOFF_MAX_S)
        report({"event": "reconnect", "source": self.name, "attempt": failures + 1, "of": self.reconnect,
                "delay_s": delay, "error": str(error)})
        stop.wait(delay)
        return failures + 1

    def _timed(self, index: int, decode: Callable[[Any], Iterator[tuple[np.ndarray, np.ndarray]]], what: Any
               ) -> list[TimedChunk]:
        """The chunks `decode(what)` completes, numbered from `index`, captured now."""
        captured = self.clock()
        chunks = list(decode(what))
        decode_s = self.clock() - captured
        return [TimedChunk(index + i, video, audio, captured=captured, decode_s=decode_s)
                for i, (video, audio) in enumerate(chunks)]

    def chunks(self, report: Report, stop: threading.Event) -> Iterator[TimedChunk]:
        av = _import_av()
        index = 0
        failures = 0  # attempts in a row that gave no chunk
        while not stop.is_set():
            try:
                container = self._open(av)
            except InputError as error:
                failures = self._retry(error, failures, report, stop)
                continue
            failed: Exception | None = None
            try:
                connection = _Connection(av, container, self.params, self.name)
                try:
                    for packet in container.demux(*connection.streams):
                        for chunk in self._timed(index, connection.decode, packet):
                            yield chunk
                            index += 1
                            failures = 0
                        if stop.is_set():
                            return
                except (av.FFmpegError, OSError) as error:
                    failed = error
                for chunk in self._timed(index, connection.end, failed is not None):
                    yield chunk
                    index += 1
            finally:
                container.close()
            if failed is None or stop.is_set():
                return
            reason = "no data" if isinstance(failed, av.error.ExitError) else "read error"
            failures = self._retry(InputError(f"{self.kind} source {self.name}: {reason} ({failed})"),
                                   failures, report, stop)


def open_source(spec: str, config: Any, realtime: bool = False, reconnect: int = 5, stall_timeout: float = 5.0,
                options: Mapping[str, str] | None = None, clock: Callable[[], float] = time.monotonic) -> Source:
    """The source `spec` names: a URL (see NETWORK_SCHEMES), `/dev/videoN`, a named pipe or a media file.

    `realtime` plays a file at its own pace (live sources always arrive at theirs); `options` are PyAV
    (FFmpeg) options of the demuxer or device, e.g. {"rtsp_transport": "tcp"} or {"video_size": "640x480"}.
    """
    _import_av()
    scheme = spec.split("://", 1)[0].lower() if "://" in spec else None
    if scheme is not None and scheme not in NETWORK_SCHEMES:
        raise InputError(f"live source {spec}: unsupported scheme {scheme}://; use one of "
                         f"{', '.join(s + '://' for s in NETWORK_SCHEMES)}, /dev/videoN or a file")
    camera = spec.startswith("/dev/video")
    pipe = os.path.exists(spec) and stat.S_ISFIFO(os.stat(spec).st_mode)
    if scheme is not None or camera or pipe:
        if realtime:
            raise InputError(f"live source {spec}: --realtime paces a file; a live source arrives at its own pace")
        kind = "network" if scheme is not None else "camera" if camera else "pipe"
        if camera and not os.path.exists(spec):
            raise InputError(f"camera {spec} does not exist (no such V4L2 device)")
        return StreamSource(spec, config, kind, reconnect=reconnect, stall_timeout=stall_timeout, options=options,
                            clock=clock)
    if options:
        raise InputError(f"live source {spec}: source options apply to network streams, pipes and cameras")
    return FileSource(spec, config, realtime=realtime, clock=clock)
