"""Unimodal encoders: one chunk of video frames / log-mel spectrogram -> tokens of width d_model."""
from __future__ import annotations

import torch
from torch import nn

from .config import MirasolConfig
from .layers import Encoder


class VideoEncoder(nn.Module):
    """Tubelet embedding (t x p x p pixels -> one token) + a small ViT."""

    def __init__(self, config: MirasolConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.patch_embed = nn.Linear(c.tubelet_frames * 3 * c.patch_size * c.patch_size, c.encoder_dim)
        self.pos_embed = nn.Parameter(torch.randn(c.video_tokens, c.encoder_dim) * 0.02)
        self.encoder = Encoder(c.encoder_dim, c.encoder_heads, c.encoder_layers, c.mlp_ratio, c.norm_eps)
        self.proj = nn.Linear(c.encoder_dim, c.d_model)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """video: [B, F, 3, H, W] -> [B, video_tokens, d_model]"""
        c = self.config
        t, p, g = c.tubelet_frames, c.patch_size, c.image_size // c.patch_size
        x = video.reshape(-1, c.frames_per_chunk // t, t, 3, g, p, g, p)
        x = x.permute(0, 1, 4, 6, 2, 3, 5, 7).flatten(4).flatten(1, 3)  # [B, tokens, t*3*p*p]
        x = self.patch_embed(x) + self.pos_embed
        return self.proj(self.encoder(x))


class AudioEncoder(nn.Module):
    """Patches of the chunk's log-mel spectrogram (mels x frames) + a small ViT."""

    def __init__(self, config: MirasolConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.patch_embed = nn.Linear(c.audio_patch_mels * c.audio_patch_frames, c.encoder_dim)
        self.pos_embed = nn.Parameter(torch.randn(c.audio_tokens, c.encoder_dim) * 0.02)
        self.encoder = Encoder(c.encoder_dim, c.encoder_heads, c.encoder_layers, c.mlp_ratio, c.norm_eps)
        self.proj = nn.Linear(c.encoder_dim, c.d_model)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """audio: [B, n_mels, A] -> [B, audio_tokens, d_model]"""
        c = self.config
        pm, pf = c.audio_patch_mels, c.audio_patch_frames
        x = audio.reshape(-1, c.n_mels // pm, pm, c.audio_frames_per_chunk // pf, pf)
        x = x.permute(0, 1, 3, 2, 4).flatten(3).flatten(1, 2)  # [B, tokens, pm*pf]
        x = self.patch_embed(x) + self.pos_embed
        return self.proj(self.encoder(x))
