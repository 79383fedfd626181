"""The chunks file (.npz) that `mirasol-run --chunks` reads and `mirasol-run --video X --save-chunks Y` writes: a
decoded clip, streamed again without PyAV (on a device without the media extra, in a benchmark, as int8
calibration data).

    header  uint8, JSON {"format": "mirasol-chunks", "version": 1, "source": "clip.mp4", "video_shape": [...],
            "audio_shape": [...]}
    video   float32 [N*F, 3, H, W], RGB in [0, 1]
    audio   float32 [n_mels, N*A], log-mel

A file without the header (made by hand: `np.savez("clip.npz", video=video, audio=audio)`) is read too; an
existing file is replaced only if it carries our header. No pickle; sizes are bounded before they are read.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..bundle.reader import BoundedNpz, state_file_format
from ..errors import InputError
from ..files.atomic import atomic_file
from ..files.ownership import check_output_file

CHUNKS_FORMAT = "mirasol-chunks"
CHUNKS_VERSION = 1
MAX_CHUNKS_FILE_BYTES = 8 << 30


def is_chunks_file(path: Path) -> bool:
    return state_file_format(path) == CHUNKS_FORMAT


def check_chunks_output(path: str | os.PathLike[str]) -> None:
    """Refuse `path` (before any decoding) unless a chunks file may be written there (the ownership rule)."""
    check_output_file(path, is_chunks_file, "chunks file")


def save_chunks(path: str | os.PathLike[str], video: np.ndarray, audio: np.ndarray, source: str,
                is_ours: Callable[[Path], bool] = is_chunks_file) -> Path:
    """Write video [N*F, 3, H, W] and audio [n_mels, N*A] (float32) decoded from `source`, atomically; an existing
    file at `path` is replaced only if `is_ours` says it is ours (by default: a chunks file)."""
    header = {"format": CHUNKS_FORMAT, "version": CHUNKS_VERSION, "source": source,
              "video_shape": list(video.shape), "audio_shape": list(audio.shape)}
    with atomic_file(path, is_ours, "chunks file") as tmp, open(tmp, "wb") as f:
        np.savez(f, header=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8),
                 video=np.asarray(video, np.float32), audio=np.asarray(audio, np.float32))
    return Path(path).absolute()


def load_chunks(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """(video [N*F, 3, H, W], audio [n_mels, N*A]) float32 of a chunks file; InputError naming it otherwise."""
    with BoundedNpz(path, f"chunks file {path}", max_bytes=MAX_CHUNKS_FILE_BYTES, error=InputError) as npz:
        return (npz.read("video", np.float32, ((1, 1 << 24), (3, 3), (1, 1 << 14), (1, 1 << 14))),
                npz.read("audio", np.float32, ((1, 1 << 12), (1, 1 << 28))))
