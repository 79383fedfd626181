"""Waveform -> log-mel spectrogram, per chunk, in PyTorch.

`mirasol.runtime.media.spectrogram` computes the same in numpy (tests hold them equal); both follow this recipe:
the chunk's samples, right-padded with n_fft - hop zeros, framed every hop samples, periodic Hann
window, |rfft|^2, HTK-scale triangular mel filters from 0 Hz to Nyquist, log(x + 1e-6).
"""
from __future__ import annotations

import math

import torch

from .config import MirasolConfig

LOG_OFFSET = 1e-6


def mel_filterbank(config: MirasolConfig) -> torch.Tensor:
    """[n_fft // 2 + 1, n_mels] triangular filters on the HTK mel scale."""
    def to_mel(hz: torch.Tensor) -> torch.Tensor:
        return 2595.0 * torch.log10(1.0 + hz / 700.0)

    def to_hz(mel: torch.Tensor) -> torch.Tensor:
        return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)

    nyquist = torch.tensor(config.sample_rate / 2, dtype=torch.float64)
    edges = to_hz(torch.linspace(0.0, float(to_mel(nyquist)), config.n_mels + 2, dtype=torch.float64))
    bins = torch.arange(config.n_fft // 2 + 1, dtype=torch.float64) * config.sample_rate / config.n_fft
    lower = (bins[:, None] - edges[None, :-2]) / (edges[1:-1] - edges[:-2])
    upper = (edges[None, 2:] - bins[:, None]) / (edges[2:] - edges[1:-1])
    return torch.clamp(torch.minimum(lower, upper), min=0.0).to(torch.float32)


def log_mel(waveform: torch.Tensor, config: MirasolConfig) -> torch.Tensor:
    """One chunk: waveform [B, samples_per_chunk] -> log-mel [B, n_mels, audio_frames_per_chunk]."""
    c = config
    padded = torch.nn.functional.pad(waveform.to(torch.float64), (0, c.n_fft - c.hop_length))
    frames = padded.unfold(-1, c.n_fft, c.hop_length)  # [B, A, n_fft]
    window = 0.5 - 0.5 * torch.cos(2 * math.pi * torch.arange(c.n_fft, dtype=torch.float64) / c.n_fft)
    power = torch.fft.rfft(frames * window, dim=-1).abs() ** 2  # float64: quiet bands far below a tone
    mel = power @ mel_filterbank(c).to(torch.float64)  # [B, A, n_mels]
    return torch.log(mel + LOG_OFFSET).transpose(1, 2).to(torch.float32)


def clip_log_mel(waveform: torch.Tensor, config: MirasolConfig) -> torch.Tensor:
    """Whole clip: waveform [B, N * samples_per_chunk] -> [B, n_mels, N * A], chunk by chunk."""
    chunks = waveform.unflatten(-1, (-1, config.samples_per_chunk))  # [B, N, samples]
    mels = log_mel(chunks.flatten(0, 1), config)  # [B*N, n_mels, A]
    return mels.unflatten(0, (waveform.shape[0], -1)).permute(0, 2, 1, 3).flatten(2)
