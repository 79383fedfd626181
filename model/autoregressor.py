"""AV autoregressor: a causal transformer over the sequence of chunk latents.

Tokens of one chunk see each other (bidirectional) and the chunks before them, at most
`av_window_chunks - 1` back. Rotary positions are chunk offsets counted from the oldest chunk the call
sees: all m tokens of a chunk share one, the whole clip counts from its first chunk, and a streaming step
from the oldest chunk in its cache, so a step's angles stay within [0, W) however long the stream runs.
Rotary attention depends only on the offset between query and key, so both give the same output; the
cache holds keys unrotated, and each step rotates them by their offset inside the current window.
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
            DecoderBlock(c.d_model, c.av_heads, c.mlp_ratio, c.norm_eps, cross_attention=False, rotate_cached=False)
            for _ in range(c.av_layers))
        self.norm = nn.LayerNorm(c.d_model, eps=c.norm_eps)
        self.next_chunk_head = nn.Linear(c.d_model, c.d_model)  # training only: predicts chunk t+1's latents

    def empty_cache(self, batch: int, device: torch.device | None = None) -> KVCache:
        c = self.config
        empty = torch.zeros(batch, c.av_heads, 0, c.av_head_dim, device=device)
        return [(empty, empty) for _ in self.blocks]

    def forward(self, latents: torch.Tensor, past: KVCache, mask: torch.Tensor | None
                ) -> tuple[torch.Tensor, KVCache]:
        """latents: [B, T, D] (T = chunks * m) after P cached tokens -> av_context [B, T, D], present (unrotated).

        Cached token i and new token j sit at chunk offsets i // m and (P + j) // m.
        """
        c = self.config
        x = latents + self.slot_embed.repeat(latents.shape[1] // c.latents_per_chunk, 1)
        tokens = torch.arange(past[0][0].shape[2] + latents.shape[1], device=latents.device)
        positions = torch.div(tokens, c.latents_per_chunk, rounding_mode="trunc")  # >= 0: trunc == floor, one Div
        rotary = rotary_angles(positions[None], c.av_head_dim, c.rope_theta)  # [1, 1, P + T, hd/2]
        present = []
        for block, (past_key, past_value) in zip(self.blocks, past):
            x, key, value = block(x, past_key, past_value, rotary, mask)
            present.append((key, value))
        return self.norm(x), present

    def forward_clip(self, latents: torch.Tensor) -> torch.Tensor:
        """Whole clip at once: latents [B, N, m, D] -> av_context [B, N, m, D]."""
        b, n, m, d = latents.shape
        mask = window_mask(n, m, self.config.av_window_chunks, latents.device)
        context, _ = self(latents.reshape(b, n * m, d), self.empty_cache(b, latents.device), mask)
        return context.reshape(b, n, m, d)

    def step(self, chunk_latents: torch.Tensor, past: KVCache) -> tuple[torch.Tensor, KVCache]:
        """One chunk: chunk_latents [B, m, D], past within the window -> av_context [B, m, D], present.

        Every past token is visible. present is already the next step's window: the last (W-1)*m tokens (whole
        chunks) of past + this chunk, so a caller carries it as it is, with no copy of its own.
        """
        context, present = self(chunk_latents, past, None)
        start = torch.sym_max(present[0][0].shape[2] - self.config.av_cache_len, 0)
        return context, [(key[:, :, start:], value[:, :, start:]) for key, value in present]
