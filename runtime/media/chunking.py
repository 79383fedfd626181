"""Chunks from frames and samples as they arrive: the chunking rules of the package notes, shared by files and
live sources (`ChunkAssembler`), and `iter_live` for frames a caller decodes itself."""
from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InputError
from .frames import resize_frame
from .spectrogram import AudioParams, audio_params, config_value, log_mel


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
