"""Media files (mp4, mkv, webm, avi, ...) decoded chunk by chunk with bounded memory: the video and the audio are
read by two demuxers of the same file, each pulled only as far as the current chunk needs (rules: the package
notes)."""
from __future__ import annotations

import itertools
import os
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from ..errors import InputError
from .chunking import ChunkAssembler, MediaParams
from .frames import FrameSampler
from .pyav import FrameConverter, MonoAudio, _import_av, ffmpeg_reason, frame_timing, start_time


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
