"""Media in: video files (mp4, mkv, webm, avi, ...) or a live source -> the model's per-chunk inputs.

Per chunk of `frames_per_chunk` frames at the config's `fps` (and the audio of the same span):
- `video` float32 [frames_per_chunk, 3, image_size, image_size], RGB in [0, 1];
- `audio` float32 [n_mels, audio_frames_per_chunk], the log-mel spectrogram (see `features.py`) of the
  chunk's mono waveform resampled to `sample_rate`.
Arrays are unbatched: the caller adds the batch axis.

Rules, the same for files and live sources:
- Frame k of the stream is the picture shown at time k / fps (the last source frame whose timestamp is
  <= k / fps; before the first source frame, the first one). Source frames are decoded to RGB at their
  own size and resized with an area filter in numpy (`resize_frame`), so a file and a live source given
  the same pixels give the same arrays. A non-square picture is squashed to a square, not cropped.
- Audio is downmixed to mono as the mean of its channels; time 0 of the audio is time 0 of the video
  (the container's start time), a late-starting audio track is zero-filled at its start.
- The stream ends with the last whole chunk of video; a trailing partial chunk is dropped. A clip
  shorter than one chunk is padded to one chunk (last frame repeated, zero audio) with a warning.
- No audio track: the audio is silence (the log-mel of zeros), with a warning. Audio that ends before
  the video is zero-filled (with a warning when more than half a chunk is missing).
- A missing, empty or corrupt file raises `InputError` naming the file.
- Live sources only (cameras, network streams: `sources.py`; `iter_live`): audio a whole chunk behind
  the video is given up (silence for that chunk) and audio more than two chunks ahead is trimmed, so a
  stalled track neither holds chunks back nor grows memory; a frame time that goes backwards or jumps
  far ahead (a timestamp wrap, a restarted sender) continues from the previous frame.

Decoding is chunk by chunk with bounded memory: the video and the audio are read by two demuxers of the
same file, each pulled only as far as the current chunk needs, so memory does not depend on the file's
length or on how its streams are interleaved. PyAV is imported lazily (`pip install "mirasol-edge[media]"`).
"""
from __future__ import annotations

import itertools
import math
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from .errors import InputError
from .features import AudioParams, audio_params, config_value, log_mel

_TIME_EPS = 1e-6  # seconds: a source frame stamped within this of a sampling time counts as shown at it


def _import_av() -> Any:
    try:
        import av
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError('decoding media files needs PyAV; install the extra: pip install "mirasol-edge[media]"',
                          name="av") from error
    import av.video.reformatter  # noqa: F401  (not always imported by `import av`)
    return av


@dataclass(frozen=True)
class MediaParams:
    """What media decoding needs from a model config (a manifest's config dict or a MirasolConfig)."""

    fps: float
    frames_per_chunk: int
    image_size: int
    audio: AudioParams

    @classmethod
    def from_config(cls, config: Any) -> "MediaParams":
        if isinstance(config, MediaParams):
            return config
        return cls(fps=float(config_value(config, "fps")),
                   frames_per_chunk=int(config_value(config, "frames_per_chunk")),
                   image_size=int(config_value(config, "image_size")), audio=audio_params(config))

    @property
    def samples_per_chunk(self) -> int:
        return self.audio.samples_per_chunk

    @property
    def audio_frames_per_chunk(self) -> int:
        return self.audio.audio_frames_per_chunk

    def chunk_log_mel(self, waveform: np.ndarray) -> np.ndarray:
        a = self.audio
        return log_mel(waveform, sample_rate=a.sample_rate, n_fft=a.n_fft, hop_length=a.hop_length,
                       n_mels=a.n_mels)


# ---------------------------------------------------------------- resizing (numpy, no PIL / cv2)
@lru_cache(maxsize=32)
def _area_weights(size_in: int, size_out: int) -> np.ndarray:
    """[size_out, size_in] float32: output pixel j averages input [j*s, (j+1)*s), s = size_in / size_out."""
    scale = size_in / size_out
    starts = np.arange(size_out) * scale
    ends = starts + scale
    left = np.arange(size_in)[None, :]
    overlap = np.clip(np.minimum(ends[:, None], left + 1) - np.maximum(starts[:, None], left), 0.0, None)
    weights = (overlap / overlap.sum(axis=1, keepdims=True)).astype(np.float32)
    weights.setflags(write=False)
    return weights


def resize_frame(frame: np.ndarray, size: int) -> np.ndarray:
    """One picture, uint8 [H, W, 3] (or float in [0, 1]) -> float32 [3, size, size] RGB in [0, 1].

    Area filter (each output pixel is the mean of the input area it covers), separable, in numpy.
    """
    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise InputError(f"a video frame must be [H, W, 3] RGB, got shape {frame.shape}")
    pixels = frame.astype(np.float32)
    if frame.dtype == np.uint8:
        pixels *= np.float32(1.0 / 255.0)
    height, width = frame.shape[:2]
    rows = np.tensordot(_area_weights(height, size), pixels, axes=(1, 0))  # [size, W, 3]
    out = np.tensordot(rows, _area_weights(width, size), axes=(1, 1))  # [size, 3, size]
    return np.clip(out.transpose(1, 0, 2), 0.0, 1.0)


# ---------------------------------------------------------------- chunk assembly (shared by file and live)
class ChunkAssembler:
    """Collects resized frames and mono samples as they arrive; hands out whole chunks.

    The chunking rules of the module notes live here, for files and live sources alike. A file pulls
    exactly the audio each chunk needs; a live source adds whatever arrived and takes `live_chunks()`.
    """

    def __init__(self, params: MediaParams, source: str) -> None:
        self.params = params
        self.source = source
        self.frames: list[np.ndarray] = []
        self.samples: list[np.ndarray] = []
        self.num_samples = 0
        self.chunks_out = 0
        self.frames_seen = 0
        self.samples_seen = 0
        self.audio_late_warned = False
        self.audio_ahead_warned = False

    def add_frame(self, frame: np.ndarray) -> None:
        """One resized frame, float32 [3, image_size, image_size] (see `resize_frame`)."""
        self.frames.append(frame)
        self.frames_seen += 1

    def add_samples(self, samples: np.ndarray) -> None:
        """Mono float32 samples at the config's sample rate, following those already added."""
        if samples.size:
            self.samples.append(samples)
            self.num_samples += samples.size
            self.samples_seen += samples.size

    def add_audio(self, waveform: np.ndarray | None) -> None:
        """Audio that arrived: mono [n] or [channels, n] (averaged); None: silence up to the frames so far."""
        if waveform is None:
            due = math.floor(self.frames_seen * self.params.audio.sample_rate / self.params.fps + 0.5)
            self.add_samples(np.zeros(max(due - self.samples_seen, 0), np.float32))
            return
        wave = np.asarray(waveform, dtype=np.float32)
        if wave.ndim == 2:
            wave = wave.mean(axis=0, dtype=np.float32)
        elif wave.ndim != 1:
            raise InputError(f"{self.source}: a waveform piece must be [n] or [channels, n], got {wave.shape}")
        self.add_samples(wave)

    def take_samples(self, count: int) -> np.ndarray:
        """The next `count` samples, zero-filled past what has arrived."""
        data = np.concatenate(self.samples) if self.samples else np.zeros(0, np.float32)
        head, rest = data[:count], data[count:]
        self.samples = [rest] if rest.size else []
        self.num_samples = rest.size
        if head.size < count:
            head = np.concatenate([head, np.zeros(count - head.size, np.float32)])
        return head

    def ready(self) -> bool:
        p = self.params
        return len(self.frames) >= p.frames_per_chunk and self.num_samples >= p.samples_per_chunk

    def pop(self) -> tuple[np.ndarray, np.ndarray]:
        """One chunk from the first frames_per_chunk frames and samples_per_chunk samples (zero-filled)."""
        p = self.params
        video = np.stack(self.frames[:p.frames_per_chunk])
        del self.frames[:p.frames_per_chunk]
        audio = p.chunk_log_mel(self.take_samples(p.samples_per_chunk))
        self.chunks_out += 1
        return video, audio

    def live_chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The chunks whose frames and samples have arrived, with the live rules for a lagging track:
        audio a whole chunk behind the video is given up (that chunk's missing audio is silence) and
        audio more than two chunks ahead of the video is trimmed from its start, so neither waits or
        grows without bound when the other track stalls (each warned once)."""
        p = self.params
        while self.ready() or len(self.frames) >= 2 * p.frames_per_chunk:
            if not self.ready() and not self.audio_late_warned:
                self.audio_late_warned = True
                warnings.warn(f"{self.source}: the audio is more than a chunk behind the video (chunk "
                              f"{self.chunks_out}); its missing part is silence", stacklevel=2)
            yield self.pop()
        excess = self.num_samples - 3 * p.samples_per_chunk
        if excess > 0:
            if not self.audio_ahead_warned:
                self.audio_ahead_warned = True
                warnings.warn(f"{self.source}: the audio runs more than two chunks ahead of the video; "
                              f"its oldest samples are dropped", stacklevel=2)
            self.take_samples(excess)

    def finish(self, pad_short: bool = True) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """At the end of the input: the whole chunks still waiting (their missing audio zero-filled); a
        clip shorter than one chunk is padded (`pad_short`); a trailing partial chunk is dropped."""
        p = self.params
        if pad_short and self.chunks_out == 0 and self.frames and len(self.frames) < p.frames_per_chunk:
            seconds = len(self.frames) / p.fps
            warnings.warn(f"{self.source}: {len(self.frames)} frames ({seconds:.2f} s) is shorter than one "
                          f"chunk ({p.frames_per_chunk} frames); padded by repeating the last frame and with "
                          f"zero audio", stacklevel=3)
            self.frames.extend([self.frames[-1]] * (p.frames_per_chunk - len(self.frames)))
        while len(self.frames) >= p.frames_per_chunk:
            yield self.pop()


# ---------------------------------------------------------------- decoding rules (shared by file and live)
class FrameSampler:
    """Source frames in, the frames shown at the sampling times k / fps out (the module's rule).

    `add` takes each decoded source frame with its time (seconds from the stream's origin; None: right
    after the previous one) and duration (None: `default_duration`) and yields the source frames of the
    sampling times before it. With `max_gap` (live sources), a time that goes backwards or jumps ahead by
    more than max_gap seconds is a discontinuity (a timestamp wrap, a restarted sender): the source frame
    is taken as following the previous one, and `discontinuities` counts it.
    """

    def __init__(self, fps: float, default_duration: float, max_gap: float | None = None) -> None:
        self.fps = fps
        self.default_duration = default_duration
        self.max_gap = max_gap
        self.k = 0
        self.previous: Any = None
        self.previous_time = 0.0
        self.previous_duration = default_duration
        self.offset = 0.0
        self.discontinuities = 0

    def add(self, frame: Any, time: float | None, duration: float | None) -> Iterator[Any]:
        if time is None:
            time = self.previous_time + self.previous_duration if self.previous is not None else 0.0
        else:
            time += self.offset
        if self.max_gap is not None and self.previous is not None and not (
                -_TIME_EPS <= time - self.previous_time <= self.max_gap):
            follow = self.previous_time + self.previous_duration
            self.offset += follow - time
            time = follow
            self.discontinuities += 1
        while self.k / self.fps < time - _TIME_EPS:  # sampling times before this frame: the previous one
            yield self.previous if self.previous is not None else frame
            self.k += 1
        self.previous, self.previous_time = frame, time
        self.previous_duration = duration or self.default_duration

    def finish(self) -> Iterator[Any]:
        """The sampling times until the last source frame's end show it."""
        end = self.previous_time + self.previous_duration
        while self.previous is not None and self.k / self.fps < end - _TIME_EPS:
            yield self.previous
            self.k += 1


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


# ---------------------------------------------------------------- files
def _open(av: Any, path: str) -> Any:
    if not os.path.exists(path):
        raise InputError(f"media file {path} does not exist")
    if os.path.isdir(path):
        raise InputError(f"media file {path} is a directory")
    if not os.path.isfile(path):  # a FIFO or a device would block the decoder
        raise InputError(f"media file {path} is not a regular file")
    if os.path.getsize(path) == 0:
        raise InputError(f"media file {path} is empty")
    try:
        return av.open(path, mode="r")
    except (av.FFmpegError, UnicodeDecodeError) as error:
        raise InputError(f"cannot read media file {path}: {ffmpeg_reason(error)} (FFmpeg reads no video or audio "
                         f"in it)") from error


def start_time(container: Any) -> float:
    """The container's start time in seconds (time 0 of every stream), 0 when it has none."""
    start = container.start_time
    return float(start) / 1_000_000 if start is not None else 0.0  # AV_TIME_BASE is microseconds


def _sampled_frames(av: Any, path: str, fps: float) -> Iterator[Any]:
    """The source VideoFrame shown at each time k / fps, k = 0, 1, ... until the video ends."""
    container = _open(av, path)
    try:
        if not container.streams.video:
            raise InputError(f"media file {path} has no video stream")
        stream = container.streams.video[0]
        origin = start_time(container)
        sampler = FrameSampler(fps, 1.0 / float(stream.average_rate or stream.guessed_rate or fps))
        try:
            for frame in container.decode(stream):
                yield from sampler.add(frame, *frame_timing(frame, origin))
        except av.FFmpegError as error:
            raise InputError(f"error decoding the video of {path} near frame {sampler.k}: {ffmpeg_reason(error)}"
                             ) from error
        if sampler.previous is None:
            raise InputError(f"media file {path} has no decodable video frames")
        yield from sampler.finish()
    finally:
        container.close()


def _mono_audio(av: Any, container: Any, path: str, sample_rate: int) -> Iterator[np.ndarray]:
    """float32 mono samples at sample_rate from the container's first audio stream, from time 0."""
    mono = MonoAudio(av, start_time(container), sample_rate)
    try:
        for frame in itertools.chain(container.decode(container.streams.audio[0]), [None]):
            yield from mono.add(frame)
    except av.FFmpegError as error:
        raise InputError(f"error decoding the audio of {path}: {ffmpeg_reason(error)}") from error


class _MonoAudioReader:
    """Pull-based reader of a file's mono audio: read(n) returns up to n samples (fewer only at the end)."""

    def __init__(self, av: Any, path: str, sample_rate: int) -> None:
        self.path = path
        self.container = _open(av, path)
        self.has_audio = bool(self.container.streams.audio)
        self.source: Iterator[np.ndarray] = (_mono_audio(av, self.container, path, sample_rate)
                                             if self.has_audio else iter(()))
        self.pending = np.zeros(0, np.float32)
        self.ended = not self.has_audio
        self.warned = False

    def read(self, count: int) -> np.ndarray:
        pieces = [self.pending]
        have = self.pending.size
        while have < count and not self.ended:
            try:
                piece = next(self.source)
            except StopIteration:
                self.ended = True
                break
            pieces.append(piece)
            have += piece.size
        data = np.concatenate(pieces) if len(pieces) > 1 else pieces[0]
        self.pending = data[count:]
        return data[:count]

    def check_missing(self, have: int, need: int, chunk_index: int) -> None:
        if self.has_audio and not self.warned and need - have > need // 2:
            self.warned = True
            warnings.warn(f"{self.path}: the audio track ends before the video (chunk {chunk_index}); "
                          f"the rest of the audio is silence", stacklevel=4)

    def close(self) -> None:
        close = getattr(self.source, "close", None)
        if close is not None:
            close()
        self.container.close()


def iter_chunks(path: str | os.PathLike[str], config: Mapping[str, Any] | Any
                ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Decode a media file chunk by chunk: yields (video [F, 3, H, W], audio [n_mels, A]) float32.

    Streams with bounded memory (a one-hour file is never held whole). See the module notes for the
    sampling, padding and error rules.
    """
    if not isinstance(path, (str, os.PathLike)) or not isinstance(os.fspath(path), str):
        raise InputError(f"a media path must be a str or an os.PathLike, got {type(path).__name__}")
    av = _import_av()
    path = os.fspath(path)
    p = MediaParams.from_config(config)
    audio = _MonoAudioReader(av, path, p.audio.sample_rate)
    frames = _sampled_frames(av, path, p.fps)
    try:
        if not audio.has_audio:
            warnings.warn(f"{path} has no audio track; using silence", stacklevel=2)
        assembler = ChunkAssembler(p, path)
        convert = FrameConverter(av, p.image_size)
        for frame in frames:
            assembler.add_frame(convert(frame))
            if len(assembler.frames) == p.frames_per_chunk:
                assembler.add_samples(audio.read(p.samples_per_chunk - assembler.num_samples))
                audio.check_missing(assembler.num_samples, p.samples_per_chunk, assembler.chunks_out)
                yield assembler.pop()
        if assembler.chunks_out == 0:  # a clip shorter than one chunk: the audio it has, then zeros
            assembler.add_samples(audio.read(p.samples_per_chunk))
        yield from assembler.finish()
    finally:
        frames.close()
        audio.close()


def load_clip(path: str | os.PathLike[str], config: Mapping[str, Any] | Any, max_chunks: int | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
    """A whole clip (or its first max_chunks chunks): video [N*F, 3, H, W], audio [n_mels, N*A]."""
    videos, audios = [], []
    for video, audio in iter_chunks(path, config):
        if max_chunks is not None and len(videos) >= max_chunks:
            break
        videos.append(video)
        audios.append(audio)
    if not videos:  # iter_chunks raises or pads before this can happen; kept as a guard
        raise InputError(f"media file {os.fspath(path)} gave no chunks")
    return np.concatenate(videos), np.concatenate(audios, axis=1)


# ---------------------------------------------------------------- live sources
def iter_live(frames_and_audio: Iterable[tuple[np.ndarray, np.ndarray | None]],
              config: Mapping[str, Any] | Any, source: str = "live source"
              ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Chunks from a live source: an iterable of (frame, waveform piece), one item per frame.

    `frame` is one picture already sampled at the config's `fps`, uint8 [H, W, 3] RGB (or float in
    [0, 1]); `waveform` is the audio that arrived with it, float32 at the config's `sample_rate`, mono
    [n] or [channels, n] (averaged), of any length; None means no audio for that frame (its share of
    samples is silence). Yields (video [F, 3, H, W], audio [n_mels, A]) as soon as a chunk's frames
    and samples have arrived (a track that lags or runs ahead: `ChunkAssembler.live_chunks`). Needs
    no PyAV.
    """
    assembler = ChunkAssembler(MediaParams.from_config(config), source)
    for frame, waveform in frames_and_audio:
        assembler.add_frame(resize_frame(frame, assembler.params.image_size))
        assembler.add_audio(waveform)
        yield from assembler.live_chunks()
    yield from assembler.finish()
