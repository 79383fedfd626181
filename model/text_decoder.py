"""Text decoder: causal language model over bytes, cross-attending to the AV memory."""
from __future__ import annotations

import torch
from torch import nn

from .autoregressor import KVCache
from .config import MirasolConfig
from .layers import DecoderBlock, rotary_angles


class TextDecoder(nn.Module):
    def __init__(self, config: MirasolConfig) -> None:
        super().__init__()
        c = config
        self.config = config
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        self.memory_norm = nn.LayerNorm(c.d_model, eps=c.norm_eps)
        self.blocks = nn.ModuleList(
            DecoderBlock(c.d_model, c.text_heads, c.mlp_ratio, c.norm_eps, cross_attention=True)
            for _ in range(c.text_layers))
        self.norm = nn.LayerNorm(c.d_model, eps=c.norm_eps)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        self.lm_head.weight = self.embed.weight

    def empty_cache(self, batch: int, device: torch.device | None = None) -> KVCache:
        c = self.config
        empty = torch.zeros(batch, c.text_heads, 0, c.text_head_dim, device=device)
        return [(empty, empty) for _ in self.blocks]

    def cross_kv(self, av_memory: torch.Tensor) -> KVCache:
        """Cross-attention keys/values of the AV memory [B, S, D], computed once per question."""
        memory = self.memory_norm(av_memory)
        return [block.cross_attn.keys_values(memory) for block in self.blocks]

    def forward(self, input_ids: torch.Tensor, position: torch.Tensor, cross: KVCache, past: KVCache
                ) -> tuple[torch.Tensor, KVCache]:
        """input_ids [B, T], position [B] (tokens already cached) -> logits [B, T, vocab], present."""
        new = input_ids.shape[1]
        cached = past[0][0].shape[2]
        offsets = torch.arange(new, device=input_ids.device)
        rotary = rotary_angles(position[:, None] + offsets, self.config.d_model // self.config.text_heads,
                               self.config.rope_theta)
        mask = torch.arange(cached + new, device=input_ids.device)[None, :] <= (offsets[:, None] + cached)
        x = self.embed(input_ids)
        present = []
        for block, (past_key, past_value), (cross_key, cross_value) in zip(self.blocks, past, cross):
            x, key, value = block(x, past_key, past_value, rotary, mask, cross_key, cross_value)
            present.append((key, value))
        return self.lm_head(self.norm(x)), present
