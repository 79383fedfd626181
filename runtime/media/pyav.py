"""PyAV in: its frames to numpy (pictures converted once per source frame, audio resampled to mono), frame
times, and FFmpeg's error words. PyAV is imported lazily (`pip install "mirasol-edge[media]"`)."""
from __future__ import annotations

import math
import os
import select
from typing import Any

import numpy as np

from .frames import resize_frame


def _import_av() -> Any:
    try:
        import av
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError('decoding media files needs PyAV; install the extra: pip install "mirasol-edge[media]"',
                          name="av") from error
    import av.video.reformatter  # noqa: F401  (not always imported by `import av`)
    return av


def frame_timing(frame: Any, origin: float) -> tuple[float | None, float | None]:
    """A decoded PyAV frame's (time from `origin`, duration) in seconds; None where the stream lacks it."""
    time = frame.time - origin if frame.time is not None and math.isfinite(frame.time) else None
    duration = (float(frame.duration * frame.time_base)
                if frame.duration and frame.time_base is not None else None)
    return time, duration


class FrameConverter:
    """PyAV video frames -> resized float32 [3, size, size]; a source frame shown at several sampling
    times is converted once. One reformatter for the whole stream: VideoFrame.to_ndarray would set up a
    new swscale context for every frame, which costs more than the decoding itself at small sizes."""

    def __init__(self, av: Any, image_size: int) -> None:
        self.reformatter = av.video.reformatter.VideoReformatter()
        self.image_size = image_size
        self.converted_from: Any = None
        self.converted: np.ndarray | None = None

    def __call__(self, frame: Any) -> np.ndarray:
        if frame is not self.converted_from:
            rgb = self.reformatter.reformat(frame, format="rgb24", threads=1).to_ndarray()
            self.converted_from, self.converted = frame, resize_frame(rgb, self.image_size)
        return self.converted  # type: ignore[return-value]


class MonoAudio:
    """PyAV audio frames -> float32 mono samples at `sample_rate`, time 0 at `origin`: a track that
    starts late begins with silence, one that starts early is cut. `add(None)` flushes the resampler."""

    def __init__(self, av: Any, origin: float, sample_rate: int) -> None:
        self.av = av
        self.origin = origin
        self.sample_rate = sample_rate
        self.resampler: Any = None
        self.skip = 0  # samples still to drop (a track starting before time 0)

    def add(self, frame: Any) -> list[np.ndarray]:
        pieces = []
        if self.resampler is None:
            if frame is None:
                return pieces
            offset = round(((frame.time or 0.0) - self.origin) * self.sample_rate)
            if offset > 0:  # the track starts late: silence until it does
                pieces.append(np.zeros(offset, np.float32))
            self.skip = max(-offset, 0)
            self.resampler = self.av.AudioResampler(format="fltp", layout=frame.layout.name, rate=self.sample_rate)
        for out in self.resampler.resample(frame):
            samples = out.to_ndarray().reshape(len(out.layout.channels), -1)
            mono = samples[0] if samples.shape[0] == 1 else samples.mean(axis=0, dtype=np.float32)
            if self.skip:
                dropped = min(self.skip, mono.size)
                mono, self.skip = mono[dropped:], self.skip - dropped
            if mono.size:
                pieces.append(mono)
        return pieces


def ffmpeg_reason(error: BaseException) -> str:
    """FFmpeg's words for an error, without PyAV's '[Errno 1094995529] ...: path' wrapping."""
    reason = getattr(error, "strerror", None)
    return reason if isinstance(reason, str) and reason else str(error)


def media_comment(path: str | os.PathLike[str]) -> str | None:
    """A media file's "comment" tag, by which our writers know the clips they made (`write_test_clip`, mirasol-demo);
    None when it has none or cannot be read."""
    av = _import_av()
    try:
        with av.open(os.fspath(path)) as container:
            tags = {key.lower(): value for key, value in container.metadata.items()}
    except (av.FFmpegError, OSError, UnicodeDecodeError):
        return None
    return tags.get("comment")


def start_time(container: Any) -> float:
    """The container's start time in seconds (time 0 of every stream), 0 when it has none."""
    start = container.start_time
    return float(start) / 1_000_000 if start is not None else 0.0  # AV_TIME_BASE is microseconds


class PipeReader:
    """A named pipe read by us for PyAV (a file object), so that waiting for data has a timeout.

    Opening does not wait for a writer; reading waits at most `timeout` seconds for data (then raises
    NoData), `open_timeout` before the first; a writer that closes the pipe ends the stream (EOF)."""

    def __init__(self, path: str, timeout: float, open_timeout: float) -> None:
        self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        self.poll = select.poll()
        self.poll.register(self.fd, select.POLLIN)
        self.timeout = timeout
        self.waiting = open_timeout  # the wait for the next read

    def read(self, size: int) -> bytes:
        while True:
            if not self.poll.poll(1000 * self.waiting):
                raise NoData(self.waiting)
            try:
                data = os.read(self.fd, size)
            except BlockingIOError:
                continue
            self.waiting = self.timeout
            return data

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class NoData(OSError):
    """No data for `seconds` (a stalled pipe; FFmpeg's own timeouts raise av.ExitError)."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"no data for {seconds:g} s")
        self.seconds = seconds
