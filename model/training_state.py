"""A training run's resumable state: one file, `resume.safetensors`, in the run's checkpoint directory.

It holds everything the next step depends on, so that a run resumed from it ends with the same weights as one
that never stopped (same seed, device and thread count):
- the model's weights (`model.*`) and the optimiser's state (`optimizer.<index>.<name>`: AdamW's step count and
  moments, per parameter in the optimiser's order);
- the random number generators' states (`rng.torch`, and `rng.cuda.<i>` per GPU);
- as JSON in the file's metadata: the step reached, the run's settings, the dataset's fingerprint, and the
  position in the data order. The order itself is a function of (seed, step) (`dataset_training.batch_at`),
  so the step is all a resumed run needs to continue it.

One file written atomically (no pickle): a run killed while saving keeps the previous state whole. It is replaced,
and removed when the run ends, only while it is a training state (`is_training_state`: its metadata says so).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from mirasol.runtime.errors import MirasolError
from mirasol.runtime.files.atomic import atomic_file, prepare_output_dir, remove_file

from .mirasol import Mirasol

RESUME_FILE = "resume.safetensors"
STATE_FORMAT = "mirasol-training-state"
STATE_VERSION = 1
TIED = "text_decoder.lm_head.weight"  # the same tensor as text_decoder.embed.weight
WHAT = "training state"


class ResumeError(MirasolError):
    """A run cannot be resumed (no state, a state of another run, a changed dataset)."""


@dataclass
class RunState:
    """What a run records besides tensors: where it is and what it is."""

    step: int
    settings: dict[str, Any]
    dataset: str  # `dataset.fingerprint`
    order: dict[str, int] = field(default_factory=dict)  # the data order's position, for people to read
    history: dict[str, Any] = field(default_factory=dict)
    train_seconds: float = 0.0


def is_training_state(path: Path) -> bool:
    """Whether `path` is a resume file a run wrote (its metadata's format says so); never raises."""
    try:
        with safe_open(str(path), "pt") as f:
            return (f.metadata() or {}).get("format") == STATE_FORMAT
    except (SafetensorError, OSError, ValueError):
        return False


def save_state(directory: Path, model: Mirasol, optimizer: torch.optim.Optimizer, state: RunState) -> Path:
    """Write `directory`/resume.safetensors atomically (`directory`: a checkpoint directory, made if new); returns
    its path."""
    tensors = {f"model.{name}": t.detach().contiguous().cpu() for name, t in model.state_dict().items()
               if name != TIED}
    for index, values in optimizer.state_dict()["state"].items():
        for name, value in values.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"optimizer state {index}.{name} is a {type(value).__name__}, not a tensor")
            tensors[f"optimizer.{index}.{name}"] = value.detach().contiguous().cpu()
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, rng in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = rng
    metadata = {"format": STATE_FORMAT, "version": str(STATE_VERSION), "state": json.dumps(state.__dict__)}
    path = prepare_output_dir(directory, "checkpoint") / RESUME_FILE
    with atomic_file(path, is_training_state, WHAT) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def remove_state(directory: Path) -> None:
    """Remove `directory`/resume.safetensors (a finished run needs it no more), if it is still a training state."""
    remove_file(directory / RESUME_FILE, is_training_state, WHAT)


def read_state(directory: Path) -> RunState:
    """The run state in `directory`/resume.safetensors (metadata only)."""
    path = directory / RESUME_FILE
    if not path.is_file():
        raise ResumeError(f"{directory} holds no run to resume (no {RESUME_FILE}); start the run without --resume")
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
        if metadata.get("format") != STATE_FORMAT or metadata.get("version") != str(STATE_VERSION):
            raise ResumeError(f"{path} is not a version-{STATE_VERSION} mirasol training state")
        return RunState(**json.loads(metadata["state"]))
    except (SafetensorError, OSError, KeyError, TypeError, ValueError) as bad:
        raise ResumeError(f"{path} cannot be read as a training state: {bad}") from None


def restore(directory: Path, model: Mirasol, optimizer: torch.optim.Optimizer) -> None:
    """Load the weights, optimiser state and RNG states of `directory`/resume.safetensors into a model and an
    optimiser built as the run built them."""
    path = directory / RESUME_FILE
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as bad:
        raise ResumeError(f"{path} cannot be read as a training state: {bad}") from None
    weights = {name[len("model."):]: t for name, t in tensors.items() if name.startswith("model.")}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if [n for n in missing if n != TIED] or unexpected:
        raise ResumeError(f"{path} does not fit the run's model: missing {missing}, unexpected {unexpected}")
    moments: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            moments.setdefault(int(index), {})[key] = tensor
    try:
        optimizer.load_state_dict({"state": moments, "param_groups": optimizer.state_dict()["param_groups"]})
    except (ValueError, KeyError, RuntimeError) as bad:
        raise ResumeError(f"{path}: the optimiser state does not fit the run's model: {bad}") from None
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[f"rng.cuda.{i}"] for i in range(torch.cuda.device_count()) if f"rng.cuda.{i}" in tensors]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
