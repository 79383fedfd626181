"""Transformer building blocks shared by every part of the model.

Attention always receives its keys/values explicitly, so the same module serves the whole-clip
forward (keys = the sequence itself, with a mask) and the streaming steps (keys = cache + new).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rotary_angles(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of rotary embeddings. positions: [B, T] (int) -> cos, sin: [B, 1, T, head_dim / 2].

    Angles are positions * inv_freq in float32: exact only while positions stay small (their float32
    spacing is 0.06 at 10^6), so callers keep them bounded (the AV window, the text context)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim)
    angles = positions.to(torch.float32)[:, None, :, None] * inv_freq  # [B, 1, T, hd/2]
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of x: [B, heads, T, head_dim]."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def written_out_attention(q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None
                          ) -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim), masked) v, as the exported graphs compute it: in plain MatMul, Softmax and
    Where nodes. SDPA's ONNX decomposition adds shape arithmetic and NaN handling around them (about 30% more
    nodes in the text decoder), which every call pays for in a runtime without a fused kernel."""
    scores = (q @ key.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1) @ value


class MLP(nn.Module):
    def __init__(self, dim: int, ratio: int) -> None:
        super().__init__()
        self.fc_in = nn.Linear(dim, dim * ratio)
        self.fc_out = nn.Linear(dim * ratio, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(F.gelu(self.fc_in(x), approximate="tanh"))


class Attention(nn.Module):
    """Multi-head attention with separate query and key/value sources."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, D] -> [B, heads, T, head_dim]"""
        return x.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split_heads(self.k_proj(x)), self.split_heads(self.v_proj(x))

    def attend(self, x: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               mask: torch.Tensor | None = None, rotary: tuple[torch.Tensor, torch.Tensor] | None = None
               ) -> torch.Tensor:
        """x: [B, T, D] queries; key/value: [B, heads, S, head_dim]; mask: [T, S] bool (True = attend)."""
        q = self.split_heads(self.q_proj(x))
        if rotary is not None:
            q = apply_rotary(q, *rotary)
        if torch.compiler.is_exporting():
            out = written_out_attention(q, key, value, mask)
        else:
            out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).flatten(2))


class EncoderBlock(nn.Module):
    """Pre-norm bidirectional transformer block (encoders, combiners)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, eps: float) -> None:
        super().__init__()
        self.norm_attn = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads)
        self.norm_mlp = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm_attn(x)
        x = x + self.attn.attend(h, *self.attn.keys_values(h))
        return x + self.mlp(self.norm_mlp(x))


class Encoder(nn.Module):
    """A stack of EncoderBlocks with a final norm."""

    def __init__(self, dim: int, heads: int, layers: int, mlp_ratio: int, eps: float) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(EncoderBlock(dim, heads, mlp_ratio, eps) for _ in range(layers))
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class DecoderBlock(nn.Module):
    """Pre-norm block with cached self-attention (rotary) and optional cross-attention.

    Takes the layer's past keys/values and returns them with this call's appended (the "present").
    rotate_cached: the cache holds keys rotated at their position (`rotary` covers this call's T tokens);
    otherwise it holds them unrotated and every call rotates all P + T keys by `rotary`, which then covers
    past + new (positions relative to the cache, recomputed at each call), the queries taking its last T.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: int, eps: float, cross_attention: bool,
                 rotate_cached: bool = True) -> None:
        super().__init__()
        self.rotate_cached = rotate_cached
        self.norm_self = nn.LayerNorm(dim, eps=eps)
        self.self_attn = Attention(dim, heads)
        if cross_attention:
            self.norm_cross = nn.LayerNorm(dim, eps=eps)
            self.cross_attn = Attention(dim, heads)
        self.norm_mlp = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, mlp_ratio)

    def forward(self, x: torch.Tensor, past_key: torch.Tensor, past_value: torch.Tensor,
                rotary: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None,
                cross_key: torch.Tensor | None = None, cross_value: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [B, T, D]; past_*: [B, heads, P, head_dim] -> x, present_* [B, heads, P + T, head_dim]"""
        h = self.norm_self(x)
        key, value = self.self_attn.keys_values(h)
        value = torch.cat([past_value, value], dim=2)
        if self.rotate_cached:
            key = present_key = torch.cat([past_key, apply_rotary(key, *rotary)], dim=2)
        else:
            present_key = torch.cat([past_key, key], dim=2)
            key = apply_rotary(present_key, *rotary)
            rotary = (rotary[0][:, :, past_key.shape[2]:], rotary[1][:, :, past_key.shape[2]:])
        x = x + self.self_attn.attend(h, key, value, mask, rotary)
        if cross_key is not None:
            x = x + self.cross_attn.attend(self.norm_cross(x), cross_key, cross_value)
        return x + self.mlp(self.norm_mlp(x)), present_key, value
