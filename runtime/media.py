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
        raise ImportError('decoding media files needs PyAV; install the extra: '
                          'pip install "mirasol-edge[media]"') from error
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
class _ChunkAssembler:
    """Collects resized frames and mono samples; hands out whole chunks."""

    def __init__(self, params: MediaParams) -> None:
        self.params = params
        self.frames: list[np.ndarray] = []
        self.samples: list[np.ndarray] = []
        self.num_samples = 0
        self.chunks_out = 0

    def add_frame(self, frame: np.ndarray) -> None:
        self.frames.append(frame)

    def add_samples(self, samples: np.ndarray) -> None:
        if samples.size:
            self.samples.append(samples)
            self.num_samples += samples.size

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

    def finish(self, source: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """At the end of the input: pad a clip shorter than one chunk; drop a trailing partial chunk."""
        p = self.params
        if self.chunks_out == 0 and self.frames and len(self.frames) < p.frames_per_chunk:
            seconds = len(self.frames) / p.fps
            warnings.warn(f"{source}: {len(self.frames)} frames ({seconds:.2f} s) is shorter than one chunk "
                          f"({p.frames_per_chunk} frames); padded by repeating the last frame and with "
                          f"zero audio", stacklevel=3)
            self.frames.extend([self.frames[-1]] * (p.frames_per_chunk - len(self.frames)))
        if len(self.frames) >= p.frames_per_chunk:
            yield self.pop()


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
        raise InputError(f"cannot read media file {path}: {error}") from error


def _start_time(container: Any) -> float:
    start = container.start_time
    return float(start) / 1_000_000 if start is not None else 0.0  # AV_TIME_BASE is microseconds


def _sampled_frames(av: Any, path: str, fps: float) -> Iterator[Any]:
    """The source VideoFrame shown at each time k / fps, k = 0, 1, ... until the video ends."""
    container = _open(av, path)
    try:
        if not container.streams.video:
            raise InputError(f"media file {path} has no video stream")
        stream = container.streams.video[0]
        origin = _start_time(container)
        rate = float(stream.average_rate or stream.guessed_rate or fps)
        k = 0
        previous = None
        previous_time = 0.0
        previous_duration = 1.0 / rate
        try:
            for frame in container.decode(stream):
                if frame.time is not None:
                    time = frame.time - origin
                else:
                    time = previous_time + previous_duration if previous is not None else 0.0
                while k / fps < time - _TIME_EPS:  # sampling times before this frame: the previous one
                    yield previous if previous is not None else frame
                    k += 1
                duration = (float(frame.duration * frame.time_base)
                            if frame.duration and frame.time_base is not None else 1.0 / rate)
                previous, previous_time, previous_duration = frame, time, duration
        except av.FFmpegError as error:
            raise InputError(f"error decoding the video of {path} near frame {k}: {error}") from error
        if previous is None:
            raise InputError(f"media file {path} has no decodable video frames")
        end = previous_time + previous_duration
        while k / fps < end - _TIME_EPS:
            yield previous
            k += 1
    finally:
        container.close()


def _mono_audio(av: Any, container: Any, path: str, sample_rate: int) -> Iterator[np.ndarray]:
    """float32 mono samples at sample_rate from the container's first audio stream, from time 0."""
    stream = container.streams.audio[0]
    origin = _start_time(container)
    resampler = None
    skip = 0  # samples still to drop (an audio track starting before time 0)
    try:
        for frame in itertools.chain(container.decode(stream), [None]):
            if resampler is None:
                if frame is None:
                    return
                offset = round(((frame.time or 0.0) - origin) * sample_rate)
                if offset > 0:  # the track starts late: silence until it does
                    yield np.zeros(offset, np.float32)
                skip = max(-offset, 0)
                resampler = av.AudioResampler(format="fltp", layout=frame.layout.name, rate=sample_rate)
            for out in resampler.resample(frame):
                samples = out.to_ndarray().reshape(len(out.layout.channels), -1)
                mono = samples[0] if samples.shape[0] == 1 else samples.mean(axis=0, dtype=np.float32)
                if skip:
                    dropped = min(skip, mono.size)
                    mono, skip = mono[dropped:], skip - dropped
                if mono.size:
                    yield mono
    except av.FFmpegError as error:
        raise InputError(f"error decoding the audio of {path}: {error}") from error


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
        assembler = _ChunkAssembler(p)
        # one reformatter for the whole file: VideoFrame.to_ndarray would set up a new swscale context
        # for every frame, which costs more than the decoding itself at small sizes
        reformatter = av.video.reformatter.VideoReformatter()
        converted_from, converted = None, None
        for frame in frames:
            if frame is not converted_from:  # a source frame shown at several sampling times: convert once
                rgb = reformatter.reformat(frame, format="rgb24", threads=1).to_ndarray()
                converted_from, converted = frame, resize_frame(rgb, p.image_size)
            assembler.add_frame(converted)
            if len(assembler.frames) == p.frames_per_chunk:
                assembler.add_samples(audio.read(p.samples_per_chunk - assembler.num_samples))
                audio.check_missing(assembler.num_samples, p.samples_per_chunk, assembler.chunks_out)
                yield assembler.pop()
        if assembler.chunks_out == 0:  # a clip shorter than one chunk: the audio it has, then zeros
            assembler.add_samples(audio.read(p.samples_per_chunk))
        yield from assembler.finish(path)
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
    and samples have arrived. Needs no PyAV.
    """
    p = MediaParams.from_config(config)
    samples_per_frame = p.audio.sample_rate / p.fps
    assembler = _ChunkAssembler(p)
    frames_seen = 0
    samples_seen = 0
    for frame, waveform in frames_and_audio:
        assembler.add_frame(resize_frame(frame, p.image_size))
        frames_seen += 1
        if waveform is None:  # no audio with this frame: silence up to where the audio should be
            wave = np.zeros(max(math.floor(frames_seen * samples_per_frame + 0.5) - samples_seen, 0),
                            np.float32)
        else:
            wave = np.asarray(waveform, dtype=np.float32)
            if wave.ndim == 2:
                wave = wave.mean(axis=0, dtype=np.float32)
            elif wave.ndim != 1:
                raise InputError(f"{source}: a waveform piece must be [n] or [channels, n], got {wave.shape}")
        samples_seen += wave.size
        assembler.add_samples(wave)
        while assembler.ready():
            yield assembler.pop()
    # the input has ended: whole chunks still waiting for audio get zero-filled audio
    while len(assembler.frames) >= p.frames_per_chunk:
        yield assembler.pop()
    yield from assembler.finish(source)
