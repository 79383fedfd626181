"""Combiners: fuse one chunk's video and audio tokens into m latent tokens.

Both share one signature, `forward(video_tokens, audio_tokens, memory) -> (chunk_latents, memory)`;
the Transformer Combiner has no memory (it passes None through).
"""
from __future__ import annotations

import torch
from torch import nn

from .config import MirasolConfig
from .layers import Encoder


class TransformerCombiner(nn.Module):
    """m learned latent tokens appended to the chunk's tokens; keep the m outputs."""

    def __init__(self, config: MirasolConfig) -> None:
        super().__init__()
        c = config
        self.latents = nn.Parameter(torch.randn(c.latents_per_chunk, c.d_model) * 0.02)
        self.modality = nn.Parameter(torch.randn(2, c.d_model) * 0.02)  # video, audio
        self.encoder = Encoder(c.d_model, c.av_heads, c.combiner_layers, c.mlp_ratio, c.norm_eps)

    def forward(self, video_tokens: torch.Tensor, audio_tokens: torch.Tensor,
                memory: torch.Tensor | None) -> tuple[torch.Tensor, None]:
        latents = self.latents.expand(video_tokens.shape[0], -1, -1)
        x = torch.cat([video_tokens + self.modality[0], audio_tokens + self.modality[1], latents], dim=1)
        m = self.latents.shape[0]
        return self.encoder(x)[:, -m:], None


class TokenLearner(nn.Module):
    """Learned soft selection of `num_tokens` tokens: [B, N, D] -> [B, num_tokens, D]."""

    def __init__(self, dim: int, num_tokens: int, eps: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.score = nn.Sequential(nn.Linear(dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, num_tokens))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.score(self.norm(x)).softmax(dim=1)  # [B, N, num_tokens], sums to 1 over N
        return weights.transpose(1, 2) @ x


class TTMCombiner(nn.Module):
    """Token Turing Machine: read from memory + inputs, process, write back to a fixed-size memory."""

    def __init__(self, config: MirasolConfig) -> None:
        super().__init__()
        c = config
        self.modality = nn.Parameter(torch.randn(3, c.d_model) * 0.02)  # memory, video, audio
        self.read = TokenLearner(c.d_model, c.latents_per_chunk, c.norm_eps)
        self.process = Encoder(c.d_model, c.av_heads, c.combiner_layers, c.mlp_ratio, c.norm_eps)
        self.write = TokenLearner(c.d_model, c.memory_size, c.norm_eps)

    def forward(self, video_tokens: torch.Tensor, audio_tokens: torch.Tensor,
                memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """memory: [B, M, D] -> chunk_latents [B, m, D], new memory [B, M, D]"""
        inputs = torch.cat([memory + self.modality[0], video_tokens + self.modality[1],
                            audio_tokens + self.modality[2]], dim=1)
        latents = self.process(self.read(inputs))
        new_memory = self.write(torch.cat([memory, latents, inputs[:, memory.shape[1]:]], dim=1))
        return latents, new_memory


def build_combiner(config: MirasolConfig) -> nn.Module:
    return TTMCombiner(config) if config.combiner == "ttm" else TransformerCombiner(config)
