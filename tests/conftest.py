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


@pytest.fixture(scope="session")
def tiny_int8_trt_bundle(tiny_bundles: dict[str, Path], tiny_models: dict[str, Mirasol],
                         tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An int8 bundle of the TTM model in the TensorRT flavour (explicit Q/DQ), calibrated on synthetic clips."""
    from mirasol.calibration.quantize import CalibrationOptions
    from mirasol.export.bundle import export_bundle

    out = tmp_path_factory.mktemp("int8-trt") / "bundle"
    export_bundle(tiny_models["ttm"], out, "int8", reference=tiny_bundles["ttm"],
                  calibration=CalibrationOptions("synthetic", clips=3, held_out=1, flavour="tensorrt", use_cache=False))
    return out


@pytest.fixture
def fake_tensorrt(monkeypatch: pytest.MonkeyPatch):
    """A strict fake TensorRT 10.3 and CUDA runtime (8 GB device) for one test (tests/fake_tensorrt.py)."""
    from .fake_tensorrt import install

    return install(monkeypatch)


@pytest.fixture(scope="session")
def demo_fp32_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped demo model (model/assets/demo) as a validated fp32 bundle."""
    from mirasol.export.bundle import export_bundle
    from mirasol.model import load_checkpoint
    from mirasol.model.demo_task import DEMO_CHECKPOINT

    path = tmp_path_factory.mktemp("demo") / "fp32"
    export_bundle(load_checkpoint(DEMO_CHECKPOINT), path, precision="fp32")
    return path
