"""Next-token choice from logits: greedy, or temperature / top-k / top-p sampling with a seed."""
from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

from .errors import InputError


def as_integer(value: Any) -> int | None:
    """`value` as an int if it is an integer (Python or numpy, not a bool), else None."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        return None
    return int(value)


def as_number(value: Any) -> float | None:
    """`value` as a float if it is a real number (Python or numpy, not a bool), else None."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        return None
    return float(value)


class Sampler:
    def __init__(self, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None) -> None:
        t, k, p = as_number(temperature), as_integer(top_k), as_number(top_p)
        if t is None or k is None or p is None or not (math.isfinite(t) and t >= 0 and k >= 0 and 0 < p <= 1):
            raise InputError(f"sampling: need a finite number temperature >= 0, an integer top_k >= 0 and a number "
                             f"0 < top_p <= 1; got temperature={temperature!r}, top_k={top_k!r}, top_p={top_p!r}")
        s = None if seed is None else as_integer(seed)
        if seed is not None and (s is None or s < 0):
            raise InputError(f"sampling: seed must be None or an integer >= 0, got {seed!r}")
        self.temperature = t
        self.top_k = k
        self.top_p = p
        self.rng = np.random.default_rng(s)

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        """logits [B, vocab] (finite) -> token ids [B]."""
        if self.temperature == 0:
            return logits.argmax(axis=-1)
        scores = logits.astype(np.float64)
        # Shifted before dividing: every score <= 0 and the best exactly 0, so a tiny temperature gives -inf
        # for the others (probability 0), never inf - inf = NaN.
        with np.errstate(over="ignore"):
            scores = (scores - scores.max(axis=-1, keepdims=True)) / self.temperature
        if self.top_k:
            kth = np.sort(scores, axis=-1)[:, -min(self.top_k, scores.shape[-1])][:, None]
            scores = np.where(scores < kth, -np.inf, scores)
        probs = np.exp(scores)
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
