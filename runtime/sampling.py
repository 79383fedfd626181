"""Next-token choice from logits: greedy, or temperature / top-k / top-p sampling with a seed."""
from __future__ import annotations

import math

import numpy as np

from .errors import InputError


class Sampler:
    def __init__(self, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None) -> None:
        if (not math.isfinite(temperature) or temperature < 0 or isinstance(top_k, bool)
                or not isinstance(top_k, int) or top_k < 0 or not 0 < top_p <= 1):
            raise InputError(f"sampling: need temperature >= 0, top_k >= 0, 0 < top_p <= 1; got "
                             f"temperature={temperature}, top_k={top_k}, top_p={top_p}")
        self.temperature = temperature
        self.top_k = top_k
        self.top_p = top_p
        self.rng = np.random.default_rng(seed)

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        """logits [B, vocab] -> token ids [B]."""
        if self.temperature == 0:
            return logits.argmax(axis=-1)
        scores = logits.astype(np.float64) / self.temperature
        if self.top_k:
            kth = np.sort(scores, axis=-1)[:, -min(self.top_k, scores.shape[-1])][:, None]
            scores = np.where(scores < kth, -np.inf, scores)
        probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        if self.top_p < 1:
            order = np.argsort(-probs, axis=-1)
            sorted_probs = np.take_along_axis(probs, order, axis=-1)
            drop = np.cumsum(sorted_probs, axis=-1) - sorted_probs > self.top_p
            mask = np.zeros_like(probs, dtype=bool)
            np.put_along_axis(mask, order, drop, axis=-1)
            probs = np.where(mask, 0.0, probs)
            probs /= probs.sum(axis=-1, keepdims=True)
        return np.array([self.rng.choice(probs.shape[-1], p=row) for row in probs])
