"""Checkpoints: a directory with `config.json` and `model.safetensors` (no pickle)."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mirasol.runtime.files.atomic import atomic_file, prepare_output_dir, write_file

from .config import MirasolConfig, get_preset
from .mirasol import Mirasol

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def save_checkpoint(model: Mirasol, directory: str | Path) -> Path:
    """Write config.json and model.safetensors into `directory` (new, empty, or a checkpoint of ours)."""
    directory = prepare_output_dir(directory, "checkpoint")
    write_file(directory / CONFIG_FILE, model.config.to_json())
    state = {name: tensor.detach().contiguous().cpu() for name, tensor in model.state_dict().items()
             if name != "text_decoder.lm_head.weight"}  # tied to text_decoder.embed.weight
    with atomic_file(directory / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp))
    return directory


def load_checkpoint(directory: str | Path) -> Mirasol:
    directory = Path(directory)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"checkpoint {directory} has no {name}")
    config = MirasolConfig.from_json((directory / CONFIG_FILE).read_text())
    model = Mirasol(config)
    missing, unexpected = model.load_state_dict(load_file(str(directory / WEIGHTS_FILE)), strict=False)
    missing = [name for name in missing if name != "text_decoder.lm_head.weight"]
    if missing or unexpected:
        raise ValueError(f"checkpoint {directory} does not fit its config: missing {missing}, "
                         f"unexpected {unexpected}")
    return model.eval()


def build_model(preset: str = "tiny", seed: int = 0, checkpoint: str | Path | None = None,
                combiner: str | None = None) -> Mirasol:
    """A model from a checkpoint directory, or a preset (its combiner replaced by `combiner` if given) with a
    seeded random init; in eval mode."""
    if checkpoint is not None:
        return load_checkpoint(checkpoint)
    torch.manual_seed(seed)
    return Mirasol(get_preset(preset, combiner)).eval()

