"""Pictures: resizing to the model's square (numpy, no PIL / cv2) and the frame sampling rule (frame k is the
source frame shown at time k / fps)."""
from __future__ import annotations

from functools import lru_cache
from typing import Any, Iterator

import numpy as np

from ..errors import InputError

_TIME_EPS = 1e-6  # seconds: a source frame stamped within this of a sampling time counts as shown at it


@lru_cache(maxsize=32)
def _area_weights(size_in: int, size_out: int) -> np.ndarray:
    """[size_out, size_in] float32: output pixel j averages input [j*s, (j+1)*s), s = size_in / size_out."""
    scale = size_in / size_out
    starts = np.arange(size_out) * scale
    ends = starts + scale
    left = np.arange(size_in)[None, :]
    overlap = np.clip(np.minimum(ends[:, None], left + 1) - np.maximum(starts[:, None], left), 0.0, None)
    weights = (overlap / overlap.sum(axis=1, keepdims=True)).astype(np.float32)
    weights.setflags(write=False)
    return weights


def resize_frame(frame: np.ndarray, size: int) -> np.ndarray:
    """One picture, uint8 [H, W, 3] (or float in [0, 1]) -> float32 [3, size, size] RGB in [0, 1].

    Area filter (each output pixel is the mean of the input area it covers), separable, in numpy.
    """
    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise InputError(f"a video frame must be [H, W, 3] RGB, got shape {frame.shape}")
    pixels = frame.astype(np.float32)
    if frame.dtype == np.uint8:
        pixels *= np.float32(1.0 / 255.0)
    height, width = frame.shape[:2]
    rows = np.tensordot(_area_weights(height, size), pixels, axes=(1, 0))  # [size, W, 3]
    out = np.tensordot(rows, _area_weights(width, size), axes=(1, 1))  # [size, 3, size]
    return np.clip(out.transpose(1, 0, 2), 0.0, 1.0)


class FrameSampler:
    """Source frames in, the frames shown at the sampling times k / fps out (the module's rule).

    `add` takes each decoded source frame with its time (seconds from the stream's origin; None: right
    after the previous one) and duration (None: `default_duration`) and yields the source frames of the
    sampling times before it. With `max_gap` (live sources), a time that goes backwards or jumps ahead by
    more than max_gap seconds is a discontinuity (a timestamp wrap, a restarted sender): the source frame
    is taken as following the previous one, and `discontinuities` counts it.
    """

    def __init__(self, fps: float, default_duration: float, max_gap: float | None = None) -> None:
        self.fps = fps
        self.default_duration = default_duration
        self.max_gap = max_gap
        self.k = 0
        self.previous: Any = None
        self.previous_time = 0.0
        self.previous_duration = default_duration
        self.offset = 0.0
        self.discontinuities = 0

    def add(self, frame: Any, time: float | None, duration: float | None) -> Iterator[Any]:
        if time is None:
            time = self.previous_time + self.previous_duration if self.previous is not None else 0.0
        else:
            time += self.offset
        if self.max_gap is not None and self.previous is not None and not (
                -_TIME_EPS <= time - self.previous_time <= self.max_gap):
            follow = self.previous_time + self.previous_duration
            self.offset += follow - time
            time = follow
            self.discontinuities += 1
        while self.k / self.fps < time - _TIME_EPS:  # sampling times before this frame: the previous one
            yield self.previous if self.previous is not None else frame
            self.k += 1
        self.previous, self.previous_time = frame, time
        self.previous_duration = duration or self.default_duration

    def finish(self) -> Iterator[Any]:
        """The sampling times until the last source frame's end show it."""
        end = self.previous_time + self.previous_duration
        while self.previous is not None and self.k / self.fps < end - _TIME_EPS:
            yield self.previous
            self.k += 1
