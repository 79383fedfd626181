"""Shared fixtures: tiny models and their exported bundles, built once per test session."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mirasol.model import Mirasol, get_preset


def make_model(combiner: str = "transformer", seed: int = 0) -> Mirasol:
    """A tiny model whose random text decoder gives varied, input-dependent greedy answers.

    A plain random init with tied embeddings repeats its input token; scaling the decoder blocks and
    randomising the final norm makes greedy token-identity tests meaningful.
    """
    torch.manual_seed(seed)
    model = Mirasol(get_preset("tiny").replace(combiner=combiner)).eval()
    with torch.no_grad():
        model.text_decoder.norm.weight.normal_(0, 1.0)
        for p in model.text_decoder.blocks.parameters():
            if p.ndim == 2:
                p.mul_(3)
    return model


def random_clip(config, chunks: int, seed: int = 0, batch: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """video [B, N*F, 3, H, W] in [0, 1], audio log-mel [B, n_mels, N*A]."""
    rng = np.random.default_rng(seed)
    video = rng.random((batch, chunks * config.frames_per_chunk, 3, config.image_size, config.image_size),
                       dtype=np.float32)
    audio = rng.standard_normal((batch, config.n_mels, chunks * config.audio_frames_per_chunk)).astype(np.float32)
    return video, audio


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, Mirasol]:
    return {name: make_model(name) for name in ("transformer", "ttm")}


@pytest.fixture(scope="session")
def tiny_bundles(tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Mirasol]) -> dict[str, Path]:
    """fp32 bundles of both combiner variants, and an fp16 bundle of the TTM one."""
    from mirasol.export.bundle import export_bundle

    root = tmp_path_factory.mktemp("bundles")
    paths = {}
    for name, model in tiny_models.items():
        paths[name] = root / f"{name}-fp32"
        export_bundle(model, paths[name], precision="fp32")
    paths["ttm-fp16"] = root / "ttm-fp16"
    export_bundle(tiny_models["ttm"], paths["ttm-fp16"], precision="fp16", reference=paths["ttm"])
    return paths
