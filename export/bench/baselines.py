"""The PyTorch baselines: eager streaming with the carried state, re-running the whole clip, greedy decoding."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from mirasol.model import Mirasol, MirasolConfig, build_model


def pytorch_model(spec: dict[str, Any]) -> Mirasol:
    """The model a source spec names: {"checkpoint": dir}, {"config": dict, "seed": s} (a random init of a
    bundle's config) or {"preset": name, "seed": s}; in eval mode. The parent and its PyTorch child share it."""
    if spec.get("checkpoint"):
        return build_model(checkpoint=spec["checkpoint"])
    if spec.get("config"):
        torch.manual_seed(spec["seed"])
        return Mirasol(MirasolConfig.from_dict(spec["config"])).eval()
    return build_model(spec["preset"], seed=spec["seed"])


class TorchStepper:
    """PyTorch eager streaming: combiner_step + av_step with the carried state (the KV window av_step returns)."""

    def __init__(self, model: Mirasol, device: str = "cpu") -> None:
        self.model = model
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        c = model.config
        self.keep_contexts = c.text_memory_chunks
        self.memory = model.initial_memory(1, self.device)
        self.past = model.av_autoregressor.empty_cache(1, self.device)
        self.contexts: list[torch.Tensor] = []

    def push(self, video: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        """video [F, 3, H, W], audio [n_mels, A] -> av_context [1, m, D] of this chunk."""
        with torch.inference_mode():
            latents, self.memory = self.model.combiner_step(video[None], audio[None], self.memory)
            context, self.past = self.model.av_step(latents, self.past)  # present: the next step's window
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self.contexts = [*self.contexts, context][-self.keep_contexts:]
        return context

    def av_memory(self) -> torch.Tensor:
        """What the text decoder attends to: the last K chunks' contexts [1, K*m, D]."""
        return torch.cat(self.contexts, dim=1)


def clip_rerun(model: Mirasol, pool: Sequence[tuple[np.ndarray, np.ndarray]], chunks: int
               ) -> Callable[[int], torch.Tensor]:
    """The naive baseline: a call re-runs the whole clip of `chunks` chunks (cycling through the pool)."""
    c = model.config
    video = torch.from_numpy(np.stack([pool[i % len(pool)][0] for i in range(chunks)]).reshape(
        1, chunks * c.frames_per_chunk, 3, c.image_size, c.image_size))
    audio = torch.from_numpy(np.concatenate([pool[i % len(pool)][1] for i in range(chunks)], axis=1)[None])

    def rerun(_: int) -> torch.Tensor:
        with torch.inference_mode():
            return model.av_autoregressor.forward_clip(model.encode_chunks(video, audio))

    return rerun


def torch_generate(model: Mirasol, av_memory: torch.Tensor, prompt: list[int], new_tokens: int, cached: bool = True
                   ) -> list[int]:
    """Greedy tokens from the PyTorch text decoder, exactly `new_tokens` of them (EOS does not stop it).

    cached: model.text_step with the self-attention KV cache; else the whole sequence at every token.
    The cross-attention keys/values of the AV memory are computed once in both cases.
    """
    device = av_memory.device
    tokens: list[int] = []
    with torch.inference_mode():
        cross = model.text_cross_kv(av_memory)
        empty = model.text_decoder.empty_cache(1, device)
        zero = torch.zeros(1, dtype=torch.long, device=device)
        if cached:
            past, position = empty, zero
            ids = torch.tensor([prompt], device=device)
            for _ in range(new_tokens):
                logits, past = model.text_step(ids, position, cross, past)
                position = position + ids.shape[1]
                tokens.append(int(logits[0, -1].argmax()))
                ids = torch.tensor([[tokens[-1]]], device=device)
        else:
            for _ in range(new_tokens):
                logits, _ = model.text_step(torch.tensor([prompt + tokens], device=device), zero, cross, empty)
                tokens.append(int(logits[0, -1].argmax()))
    return tokens
