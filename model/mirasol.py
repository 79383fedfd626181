"""The Mirasol model: encoders + combiner per chunk, AV autoregressor across chunks, text decoder.

`forward` runs a whole clip at once (the reference). The `*_step` methods take and return the carried
state explicitly: they are what the exporter traces and what streaming PyTorch inference runs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mirasol.runtime.bundle.tokenizer import ByteTokenizer

from .autoregressor import AVAutoregressor, KVCache
from .combiner import build_combiner
from .config import MirasolConfig
from .encoders import AudioEncoder, VideoEncoder
from .text_decoder import TextDecoder


class Mirasol(nn.Module):
    def __init__(self, config: MirasolConfig) -> None:
        super().__init__()
        self.config = config
        self.video_encoder = VideoEncoder(config)
        self.audio_encoder = AudioEncoder(config)
        self.combiner = build_combiner(config)
        self.av_autoregressor = AVAutoregressor(config)
        self.text_decoder = TextDecoder(config)

    # ---- carried state ----
    def initial_memory(self, batch: int, device: torch.device | None = None) -> torch.Tensor | None:
        """TTM memory at the start of a stream (zeros); None for the Transformer Combiner."""
        c = self.config
        return torch.zeros(batch, c.memory_size, c.d_model, device=device) if c.combiner == "ttm" else None

    # ---- streaming steps (traced by the exporter) ----
    def combiner_step(self, video: torch.Tensor, audio: torch.Tensor, memory: torch.Tensor | None
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """video [B, F, 3, H, W], audio [B, n_mels, A], memory [B, M, D] -> chunk_latents [B, m, D], memory"""
        return self.combiner(self.video_encoder(video), self.audio_encoder(audio), memory)

    def av_step(self, chunk_latents: torch.Tensor, past: KVCache) -> tuple[torch.Tensor, KVCache]:
        """chunk_latents [B, m, D], past keys/values (the window, keys unrotated) -> av_context [B, m, D], present"""
        return self.av_autoregressor.step(chunk_latents, past)

    def text_cross_kv(self, av_memory: torch.Tensor) -> KVCache:
        return self.text_decoder.cross_kv(av_memory)

    def text_step(self, input_ids: torch.Tensor, position: torch.Tensor, cross: KVCache, past: KVCache
                  ) -> tuple[torch.Tensor, KVCache]:
        return self.text_decoder(input_ids, position, cross, past)

    # ---- whole clip ----
    def encode_chunks(self, video: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        """video [B, N*F, 3, H, W], audio [B, n_mels, N*A] -> chunk latents [B, N, m, D]."""
        c = self.config
        videos = video.split(c.frames_per_chunk, dim=1)
        audios = audio.split(c.audio_frames_per_chunk, dim=2)
        if len(videos) != len(audios) or video.shape[1] % c.frames_per_chunk:
            raise ValueError(f"video of {video.shape[1]} frames and audio of {audio.shape[2]} mel frames "
                             f"do not form whole, equal numbers of chunks ({c.frames_per_chunk} frames, "
                             f"{c.audio_frames_per_chunk} mel frames each)")
        memory = self.initial_memory(video.shape[0], video.device)
        latents = []
        for chunk_video, chunk_audio in zip(videos, audios):
            chunk_latents, memory = self.combiner_step(chunk_video, chunk_audio, memory)
            latents.append(chunk_latents)
        return torch.stack(latents, dim=1)

    def av_memory(self, av_context: torch.Tensor) -> torch.Tensor:
        """What the text decoder attends to: the last K chunks of av_context [B, N, m, D] -> [B, S, D]."""
        return av_context[:, -self.config.text_memory_chunks:].flatten(1, 2)

    def forward(self, video: torch.Tensor, audio: torch.Tensor, input_ids: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole clip -> per-chunk av_context [B, N, m, D] and text logits [B, T, vocab]."""
        _, av_context, logits = self._clip_pass(video, audio, input_ids)
        return av_context, logits

    def _clip_pass(self, video: torch.Tensor, audio: torch.Tensor, input_ids: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The whole-clip pass: chunk latents [B, N, m, D], av_context [B, N, m, D], text logits [B, T, vocab]."""
        latents = self.encode_chunks(video, audio)
        av_context = self.av_autoregressor.forward_clip(latents)
        batch = input_ids.shape[0]
        logits, _ = self.text_step(input_ids, torch.zeros(batch, dtype=torch.long, device=input_ids.device),
                                   self.text_cross_kv(self.av_memory(av_context)),
                                   self.text_decoder.empty_cache(batch, input_ids.device))
        return latents, av_context, logits

    # ---- training ----
    def loss(self, video: torch.Tensor, audio: torch.Tensor, input_ids: torch.Tensor,
             target_ids: torch.Tensor, latent_weight: float = 0.1) -> dict[str, torch.Tensor]:
        """Text cross-entropy (targets PAD are ignored) + next-chunk latent prediction (MSE)."""
        latents, av_context, logits = self._clip_pass(video, audio, input_ids)
        text = F.cross_entropy(logits.flatten(0, 1), target_ids.flatten(), ignore_index=ByteTokenizer.PAD)
        if latents.shape[1] > 1:
            predicted = self.av_autoregressor.next_chunk_head(av_context[:, :-1])
            latent = F.mse_loss(predicted, latents[:, 1:].detach())
        else:
            latent = torch.zeros((), device=video.device)
        return {"loss": text + latent_weight * latent, "text": text, "latent": latent}

    # ---- reference generation ----
    @torch.no_grad()
    def generate(self, av_context: torch.Tensor, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        """Greedy answer for batch 1 with the KV cache; stops at EOS (not included)."""
        cross = self.text_cross_kv(self.av_memory(av_context))
        past = self.text_decoder.empty_cache(1, av_context.device)
        ids = torch.tensor([prompt_ids], device=av_context.device)
        position = torch.zeros(1, dtype=torch.long, device=av_context.device)
        answer: list[int] = []
        for _ in range(max_new_tokens):
            logits, past = self.text_step(ids, position, cross, past)
            position = position + ids.shape[1]
            token = int(logits[0, -1].argmax())
            if token == ByteTokenizer.EOS:
                break
            answer.append(token)
            ids = torch.tensor([[token]], device=av_context.device)
        return answer


def release_weights(model: nn.Module) -> None:
    """Free the storage of every parameter and buffer, in place: whoever else holds the same Parameter objects
    (an exporter's graph) sees the empty tensors too, so the memory really returns. The model is unusable after."""
    with torch.no_grad():
        for tensor in (*model.parameters(), *model.buffers()):
            tensor.data = torch.empty(0, dtype=tensor.dtype)


def count_parameters(model: Mirasol) -> dict[str, int]:
    """Parameters per component (tied weights counted once) and the total."""
    counts = {name: sum(p.numel() for p in module.parameters())
              for name, module in model.named_children()}
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts
