"""AV autoregressor: a causal transformer over the sequence of chunk latents.

Tokens of one chunk see each other (bidirectional) and the chunks before them, at most
`av_window_chunks - 1` back; all m tokens of chunk t share the rotary position t.
"""
from __future__ import annotations

import torch
from torch import nn

from .config import MirasolConfig
from .layers import DecoderBlock, rotary_angles

KVCache = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (key, value): [B, heads, P, head_dim]


def window_mask(num_chunks: int, tokens_per_chunk: int, window: int, device: torch.device | None = None
                ) -> torch.Tensor:
    """[N*m, N*m] bool: query chunk q attends key chunk k iff q - window < k <= q."""
    chunk = torch.arange(num_chunks * tokens_per_chunk, device=device) // tokens_per_chunk
    distance = chunk[:, None] - chunk[None, :]
    return (distance >= 0) & (distance < window)


class AVAutoregressor(nn.Module):
    def __init__(self, config: MirasolConfig) -> None:
        super().__init__()
        c = config
        self.config = config
        self.slot_embed = nn.Parameter(torch.randn(c.latents_per_chunk, c.d_model) * 0.02)
        self.blocks = nn.ModuleList(
            DecoderBlock(c.d_model, c.av_heads, c.mlp_ratio, c.norm_eps, cross_attention=False)
            for _ in range(c.av_layers))
        self.norm = nn.LayerNorm(c.d_model, eps=c.norm_eps)
        self.next_chunk_head = nn.Linear(c.d_model, c.d_model)  # training only: predicts chunk t+1's latents

    def empty_cache(self, batch: int, device: torch.device | None = None) -> KVCache:
        c = self.config
        empty = torch.zeros(batch, c.av_heads, 0, c.av_head_dim, device=device)
        return [(empty, empty) for _ in self.blocks]

    def forward(self, latents: torch.Tensor, positions: torch.Tensor, past: KVCache,
                mask: torch.Tensor | None) -> tuple[torch.Tensor, KVCache]:
        """latents: [B, T, D] (T = chunks * m), positions: [B, T] chunk indices -> av_context [B, T, D]"""
        c = self.config
        x = latents + self.slot_embed.repeat(latents.shape[1] // c.latents_per_chunk, 1)
        rotary = rotary_angles(positions, c.av_head_dim, c.rope_theta)
        present = []
        for block, (past_key, past_value) in zip(self.blocks, past):
            x, key, value = block(x, past_key, past_value, rotary, mask)
            present.append((key, value))
        return self.norm(x), present

    def forward_clip(self, latents: torch.Tensor) -> torch.Tensor:
        """Whole clip at once: latents [B, N, m, D] -> av_context [B, N, m, D]."""
        b, n, m, d = latents.shape
        positions = (torch.arange(n * m, device=latents.device) // m).expand(b, -1)
        mask = window_mask(n, m, self.config.av_window_chunks, latents.device)
        context, _ = self(latents.reshape(b, n * m, d), positions, self.empty_cache(b, latents.device), mask)
        return context.reshape(b, n, m, d)

    def step(self, chunk_latents: torch.Tensor, chunk_index: torch.Tensor, past: KVCache
             ) -> tuple[torch.Tensor, KVCache]:
        """One chunk: chunk_latents [B, m, D], chunk_index [B] -> av_context [B, m, D], present.

        The caller keeps `past` within the window (its last (W-1)*m tokens); every past token is visible.
        """
        positions = chunk_index[:, None].expand(-1, chunk_latents.shape[1])
        return self(chunk_latents, positions, past, None)
