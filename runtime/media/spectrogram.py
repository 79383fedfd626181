"""Waveform -> log-mel spectrogram in numpy: the runtime's copy of `mirasol.model.spectrogram`.

Same recipe as the PyTorch reference (the tests hold them equal within 1e-4): each chunk's samples,
right-padded with n_fft - hop zeros, framed every hop samples, periodic Hann window, |rfft|^2,
HTK-scale triangular mel filters from 0 Hz to Nyquist, log(x + 1e-6). A chunk of
`samples_per_chunk` samples gives `samples_per_chunk // hop_length` mel frames.

The runtime has no `MirasolConfig`; it sees the model config as the dict in a bundle's manifest. Every
function here takes either plain ints or such a mapping (an object with the same attributes, like a
`MirasolConfig`, works too). Never imports torch.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

LOG_OFFSET = 1e-6


@dataclass(frozen=True)
class AudioParams:
    """The sizes the audio path needs, derived from a model config the same way MirasolConfig does."""

    sample_rate: int
    n_fft: int
    hop_length: int
    n_mels: int
    samples_per_chunk: int

    @property
    def audio_frames_per_chunk(self) -> int:
        return self.samples_per_chunk // self.hop_length


def config_value(config: Any, key: str) -> Any:
    """`config[key]` for a mapping (a manifest's config dict), `config.key` for an object."""
    if isinstance(config, Mapping):
        if key not in config:
            raise KeyError(f"model config has no {key!r} (keys: {sorted(config)})")
        return config[key]
    return getattr(config, key)


def audio_params(config: Any) -> AudioParams:
    """AudioParams from a config mapping / object (keys are MirasolConfig's field names)."""
    sample_rate = int(config_value(config, "sample_rate"))
    fps = float(config_value(config, "fps"))
    frames_per_chunk = int(config_value(config, "frames_per_chunk"))
    return AudioParams(sample_rate=sample_rate, n_fft=int(config_value(config, "n_fft")),
                       hop_length=int(config_value(config, "hop_length")),
                       n_mels=int(config_value(config, "n_mels")),
                       samples_per_chunk=round(sample_rate * frames_per_chunk / fps))


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + hz / 700.0)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


@lru_cache(maxsize=16)
def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """[n_fft // 2 + 1, n_mels] float64 triangular filters on the HTK mel scale (cached, read-only)."""
    edges = _mel_to_hz(np.linspace(0.0, float(_hz_to_mel(np.float64(sample_rate / 2))), n_mels + 2))
    bins = np.arange(n_fft // 2 + 1, dtype=np.float64) * sample_rate / n_fft
    lower = (bins[:, None] - edges[None, :-2]) / (edges[1:-1] - edges[:-2])
    upper = (edges[None, 2:] - bins[:, None]) / (edges[2:] - edges[1:-1])
    bank = np.maximum(np.minimum(lower, upper), 0.0)
    bank.setflags(write=False)
    return bank


@lru_cache(maxsize=16)
def hann_window(n_fft: int) -> np.ndarray:
    """Periodic Hann window of n_fft samples (float64, cached, read-only)."""
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n_fft, dtype=np.float64) / n_fft)
    window.setflags(write=False)
    return window


def _resolve(config: Any, sample_rate: int | None, n_fft: int | None, hop_length: int | None,
             n_mels: int | None) -> tuple[int, int, int, int]:
    values = {"sample_rate": sample_rate, "n_fft": n_fft, "hop_length": hop_length, "n_mels": n_mels}
    for key, value in values.items():
        if value is None:
            if config is None:
                raise TypeError(f"log_mel needs {key} (or a config to read it from)")
            values[key] = int(config_value(config, key))
    return values["sample_rate"], values["n_fft"], values["hop_length"], values["n_mels"]


def log_mel(waveform: np.ndarray, config: Any = None, *, sample_rate: int | None = None,
            n_fft: int | None = None, hop_length: int | None = None, n_mels: int | None = None
            ) -> np.ndarray:
    """One chunk: waveform [..., samples] -> float32 log-mel [..., n_mels, samples // hop_length].

    Sizes come from keyword ints, else from `config` (a mapping or an object with those attributes).
    """
    sample_rate, n_fft, hop_length, n_mels = _resolve(config, sample_rate, n_fft, hop_length, n_mels)
    x = np.asarray(waveform, dtype=np.float64)
    if x.shape[-1] < hop_length:
        raise ValueError(f"a chunk needs at least hop_length={hop_length} samples, got {x.shape[-1]}")
    pad = [(0, 0)] * (x.ndim - 1) + [(0, n_fft - hop_length)]
    padded = np.pad(x, pad)
    num_frames = (padded.shape[-1] - n_fft) // hop_length + 1
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft, axis=-1)[..., ::hop_length, :]
    frames = frames[..., :num_frames, :]  # [..., A, n_fft]
    spectrum = np.fft.rfft(frames * hann_window(n_fft), axis=-1)
    power = spectrum.real ** 2 + spectrum.imag ** 2
    # einsum, not `@`: this product is tiny, and BLAS's thread wake-up costs more than it on a busy CPU
    mel = np.einsum("...af,fm->...am", power, mel_filterbank(sample_rate, n_fft, n_mels))  # [..., A, n_mels]
    return np.swapaxes(np.log(mel + LOG_OFFSET), -1, -2).astype(np.float32)


def clip_log_mel(waveform: np.ndarray, config: Any) -> np.ndarray:
    """Whole clip: waveform [..., N * samples_per_chunk] -> [..., n_mels, N * A], chunk by chunk.

    Equal to computing `log_mel` of every chunk and concatenating along the frame axis (each chunk is
    padded on its own, exactly as the streaming runtime sees it).
    """
    p = audio_params(config)
    x = np.asarray(waveform)
    if x.shape[-1] % p.samples_per_chunk:
        raise ValueError(f"waveform of {x.shape[-1]} samples is not a whole number of chunks of "
                         f"{p.samples_per_chunk} samples")
    chunks = x.reshape(*x.shape[:-1], -1, p.samples_per_chunk)  # [..., N, samples]
    mels = log_mel(chunks, sample_rate=p.sample_rate, n_fft=p.n_fft, hop_length=p.hop_length,
                   n_mels=p.n_mels)  # [..., N, n_mels, A]
    mels = np.moveaxis(mels, -3, -2)  # [..., n_mels, N, A]
    return np.ascontiguousarray(mels.reshape(*mels.shape[:-2], -1))

