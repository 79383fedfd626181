"""Live sources: a file at its real pace, a network stream, a named pipe or a V4L2 camera -> timed chunks.

A source turns its media into the model's chunks with the rules of `media.py` (the same frame
sampling, resizing, audio and chunking as a file) and stamps each chunk with its place on the source's
presentation timeline (`media_start`, `media_end`, seconds), the clock time its last media arrived
(`captured`) and the seconds spent decoding it (`decode_s`: every packet of the chunk, not only the
last). `chunks()` runs in the live driver's decode thread (`feed.py`), so a source may block on the
network; it never blocks inference.

When a network chunk's media arrived is estimated from the packets, not from the moment the demuxer
hands over the packet that completes the chunk: FFmpeg's demuxer holds packets back (its probe at the
start, the PES packing of MPEG-TS, the decoder's frame reordering), and the last chunk before a stall
is completed only when the stall ends the connection. `ArrivalClock` takes, over the packets read in
the last `ARRIVAL_WINDOW_S` seconds, the least delay between a packet's decoding timestamp and the
moment it was read: the packets read at once show when media really arrives, so the buffering of the
others counts as latency. A backlog upstream of the reader (in the socket, the sender or the camera's
buffers) is not seen, nor one that lasts longer than the window.

- file (`clip.mp4`): decoded chunk by chunk with `iter_chunks`; a chunk is captured when its decoding
  starts, or with `realtime` when a camera would have delivered it, (k + 1) chunk durations after the
  start, then decoded (so the end of the file shows one chunk duration after its last chunk, when the
  next one would be due).
- network (`rtsp://`, `rtsps://`, `udp://`, `rtp://`, `srt://`, `tcp://`, `http(s)://` e.g. HLS), named
  pipe, V4L2 camera (`/dev/videoN`): one PyAV demuxer for video and audio, decoded as packets arrive.
  No data for `stall_timeout` seconds ("no data for 5 s"), or a read error, ends the connection: what it
  decoded is flushed into whole chunks, then a network source or camera reconnects after 0.5, 1, 2, 4,
  8, 8, ... seconds (each attempt reported) and gives up after `reconnect` attempts in a row without a
  chunk (None: never gives up). Opening waits `open_timeout` seconds for data the first time (a sender
  may start after us) and `stall_timeout` on every reconnect. The end of a stream (EOF: a pipe's
  writer closed it, an HLS playlist ended) ends the source; a named pipe is read by us (`PipeReader`),
  so its stall ends it too. A partial chunk at the end of a connection is dropped.
- A stream without an audio track is reported once per connection (a "warning" event): the model hears
  silence.

PyAV is the `media` extra (`pip install "mirasol-edge[media]"`), imported when a source opens.
"""
from __future__ import annotations

import collections
import math
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
from .arrival import ArrivalClock
from .pyav import (FrameConverter, MonoAudio, NoData, PipeReader, _import_av, ffmpeg_reason, frame_timing,
                   start_time)
from .video_files import iter_chunks

NETWORK_SCHEMES = ("rtsp", "rtsps", "udp", "rtp", "srt", "tcp", "http", "https")
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 8.0
PROBE_OPTIONS = {"analyzeduration": "1000000"}  # probe a live stream for 1 s, not FFmpeg's 5 s
OPEN_TIMEOUT_S = 10.0  # the least the first open waits for data (a sender may start after us)
FOREVER = "forever"  # reconnect attempts without end (cameras)

Report = Callable[[dict[str, Any]], None]


@dataclass
class TimedChunk:
    """One chunk of a source with its times (seconds of the driver's clock)."""

    index: int  # position in the source: 0, 1, ... (every chunk it captured, pushed or dropped later)
    video: np.ndarray  # [F, 3, H, W] float32 in [0, 1]
    audio: np.ndarray  # [n_mels, A] float32 log-mel
    captured: float  # its last media arrived
    decode_s: float  # decoding it took (demuxed packets to model arrays: decode, resize, log-mel)
    media_start: float = 0.0  # its span on the source's presentation timeline (seconds)
    media_end: float = 0.0
    ready: float = 0.0  # decoded and handed to the driver's queue (set by the driver)


def reconnect_attempts(value: Any) -> int | None:
    """`reconnect` as a source takes it: a count >= 0 (an int or its text), or "forever" (None)."""
    if value is None or value == FOREVER:
        return None
    count = value if isinstance(value, int) and not isinstance(value, bool) else None
    if isinstance(value, str) and value.strip().isdigit():
        count = int(value)
    if count is None or count < 0:
        raise InputError(f"reconnect must be a count of attempts >= 0 or {FOREVER!r}, got {value!r}")
    return count


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
                yield TimedChunk(index, *video_audio, captured=captured, decode_s=self.clock() - begin,
                                 media_start=index * chunk_seconds, media_end=(index + 1) * chunk_seconds)
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
        self.name = name
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
        self.chunk_seconds = chunk_seconds
        self.arrivals = ArrivalClock()

    @property
    def warning(self) -> str | None:
        """What a user must know about this connection's media (None: nothing)."""
        if self.audio is None:
            return f"{self.name} has no audio stream: the model hears silence"
        return None

    def media_span(self, chunk: int) -> tuple[float, float]:
        """Chunk `chunk` of this connection on the source's presentation timeline (seconds)."""
        origin = self.origin if self.origin is not None else self.fallback_origin
        return origin + chunk * self.chunk_seconds, origin + (chunk + 1) * self.chunk_seconds

    def captured(self, chunk: int, now: float) -> float:
        """When the media of chunk `chunk` had all arrived (the ArrivalClock's estimate, never after now)."""
        end = self.media_span(chunk)[1] - self.sampler.offset  # back on the packets' own timeline
        return self.arrivals.arrival(end, now)

    def read(self, packet: Any, now: float) -> None:
        """Note a demuxed packet's read time."""
        stamp = packet.dts if packet.dts is not None else packet.pts
        if stamp is not None and packet.time_base is not None:
            seconds = float(stamp * packet.time_base)
            if math.isfinite(seconds):
                self.arrivals.packet(now, seconds)

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

    def __init__(self, url: str, config: Any, kind: str, reconnect: int | None = 5, stall_timeout: float = 5.0,
                 options: Mapping[str, str] | None = None, clock: Callable[[], float] = time.monotonic,
                 open_timeout: float | None = None) -> None:
        self.name = url
        self.live = True
        self.kind = kind  # "network", "pipe" or "camera"
        self.params = MediaParams.from_config(config)
        self.reconnect = reconnect if kind != "pipe" else 0
        self.stall_timeout = stall_timeout
        self.open_timeout = max(stall_timeout, OPEN_TIMEOUT_S) if open_timeout is None else open_timeout
        self.options = dict(options or {})
        self.clock = clock
        self.pipe: PipeReader | None = None  # the named pipe being read (closed with its container)

    def _open(self, av: Any, wait: float) -> Any:
        options = {**PROBE_OPTIONS, **self.options}
        try:
            if self.kind == "pipe":  # read by us: FFmpeg's timeouts do not apply to a file
                self.pipe = PipeReader(self.name, self.stall_timeout, wait)
                return av.open(self.pipe, options=options)
            return av.open(self.name, format="v4l2" if self.kind == "camera" else None, options=options,
                           timeout=(wait, self.stall_timeout))
        except (av.FFmpegError, OSError) as error:
            self._close(None)
            reason = self._reason(av, error, wait)
            raise InputError(f"cannot open {self.kind} source {self.name}: {reason}") from error

    @staticmethod
    def _reason(av: Any, error: BaseException, waited: float) -> str:
        """What happened, in words: "no data for 5 s" for a timeout (never FFmpeg's "Immediate exit requested")."""
        if isinstance(error, NoData):
            return str(error)
        if isinstance(error, av.error.ExitError):  # PyAV's timeout interrupted FFmpeg
            return f"no data for {waited:g} s"
        return ffmpeg_reason(error)

    def _close(self, container: Any) -> None:
        if container is not None:
            container.close()
        if self.pipe is not None:
            self.pipe.close()
            self.pipe = None

    def _retry(self, error: InputError, failures: int, report: Report, stop: threading.Event) -> int:
        """Wait before the next attempt (reported), or raise `error` when no attempt is left."""
        if self.reconnect is not None and failures >= self.reconnect:
            if self.reconnect:
                raise InputError(f"{error}; gave up after {failures} reconnect attempts") from error
            raise error
        delay = min(BACKOFF_FIRST_S * 2 ** min(failures, 16), BACKOFF_MAX_S)
        report({"event": "reconnect", "source": self.name, "attempt": failures + 1,
                "of": FOREVER if self.reconnect is None else self.reconnect, "delay_s": delay, "error": str(error)})
        stop.wait(delay)
        return failures + 1

    def _timed(self, index: int, connection: _Connection, chunks: list[tuple[np.ndarray, np.ndarray]],
               decode_s: float) -> list[TimedChunk]:
        """`chunks` of `connection` as TimedChunks numbered from `index`; `decode_s` (the decoding since the
        previous chunk) is shared between them."""
        now = self.clock()
        first = connection.assembler.chunks_out - len(chunks)  # their numbers within the connection
        timed = []
        for i, (video, audio) in enumerate(chunks):
            start, end = connection.media_span(first + i)
            timed.append(TimedChunk(index + i, video, audio, captured=connection.captured(first + i, now),
                                    decode_s=decode_s / len(chunks), media_start=start, media_end=end))
        return timed

    def chunks(self, report: Report, stop: threading.Event) -> Iterator[TimedChunk]:
        av = _import_av()
        index = 0
        failures = 0  # attempts in a row that gave no chunk
        wait = self.open_timeout
        while not stop.is_set():
            try:
                container = self._open(av, wait)
            except InputError as error:
                failures = self._retry(error, failures, report, stop)
                wait = self.stall_timeout
                continue
            wait = self.stall_timeout
            failed: Exception | None = None
            try:
                connection = _Connection(av, container, self.params, self.name)
                if connection.warning:
                    report({"event": "warning", "source": self.name, "message": connection.warning})
                decoding = 0.0  # seconds spent decoding since the last chunk was completed
                try:
                    for packet in container.demux(*connection.streams):
                        begin = self.clock()
                        connection.read(packet, begin)
                        done = list(connection.decode(packet))
                        decoding += self.clock() - begin
                        if done:
                            for chunk in self._timed(index, connection, done, decoding):
                                yield chunk
                                index += 1
                            failures, decoding = 0, 0.0
                        if stop.is_set():
                            return
                except (av.FFmpegError, OSError) as error:
                    failed = error
                begin = self.clock()
                done = list(connection.end(failed is not None))
                if done:
                    yield from self._timed(index, connection, done, decoding + self.clock() - begin)
                    index += len(done)
            finally:
                self._close(container)
            if failed is None or stop.is_set():
                return
            reason = self._reason(av, failed, self.stall_timeout)
            if not isinstance(failed, (av.error.ExitError, NoData)):
                reason = f"read error ({reason})"
            failures = self._retry(InputError(f"{self.kind} source {self.name}: {reason}"), failures, report, stop)


def open_source(spec: str, config: Any, realtime: bool = False, reconnect: int | None = 5,
                stall_timeout: float = 5.0, options: Mapping[str, str] | None = None,
                clock: Callable[[], float] = time.monotonic, open_timeout: float | None = None) -> Source:
    """The source `spec` names: a URL (see NETWORK_SCHEMES), `/dev/videoN`, a named pipe or a media file.

    `realtime` plays a file at its own pace (live sources always arrive at theirs); `options` are PyAV
    (FFmpeg) options of the demuxer or device, e.g. {"rtsp_transport": "tcp"} or {"video_size": "640x480"};
    `reconnect`: attempts in a row before giving up (None: forever); `open_timeout`: the first open's wait
    for data (default: the larger of stall_timeout and OPEN_TIMEOUT_S).
    """
    for name, value in (("stall_timeout", stall_timeout), ("open_timeout", open_timeout)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise InputError(f"live source {spec}: {name} must be a positive number of seconds, got {value}")
    _import_av()
    kind = source_kind(spec)
    if kind != "file":
        if realtime:
            raise InputError(f"live source {spec}: --realtime paces a file; a live source arrives at its own pace")
        if kind == "camera" and not os.path.exists(spec):
            raise InputError(f"camera {spec} does not exist (no such V4L2 device)")
        return StreamSource(spec, config, kind, reconnect=reconnect, stall_timeout=stall_timeout, options=options,
                            clock=clock, open_timeout=open_timeout)
    if options:
        raise InputError(f"live source {spec}: source options apply to network streams, pipes and cameras")
    return FileSource(spec, config, realtime=realtime, clock=clock)


def source_kind(spec: str) -> str:
    """What `spec` names: "network" (a URL of NETWORK_SCHEMES), "camera" (/dev/videoN), "pipe" (a named pipe)
    or "file" (any other path); a URL of another scheme is refused."""
    scheme = spec.split("://", 1)[0].lower() if "://" in spec else None
    if scheme is not None:
        if scheme not in NETWORK_SCHEMES:
            raise InputError(f"live source {spec}: unsupported scheme {scheme}://; use one of "
                             f"{', '.join(s + '://' for s in NETWORK_SCHEMES)}, /dev/videoN or a file")
        return "network"
    if spec.startswith("/dev/video"):
        return "camera"
    if os.path.exists(spec) and stat.S_ISFIFO(os.stat(spec).st_mode):
        return "pipe"
    return "file"
