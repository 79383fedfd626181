"""mirasol.model: the PyTorch reference Mirasol model.

The names below load on first use (PEP 562): importing `mirasol.model.demo_task` or the commands (`model/cli.py`)
needs no PyTorch, so that where it is not installed a command says which extra brings it.
"""
from __future__ import annotations

from importlib import import_module
from typing import Any

_MODULE_OF = {"build_model": "checkpoint", "load_checkpoint": "checkpoint", "save_checkpoint": "checkpoint",
              "PRESETS": "config", "MirasolConfig": "config", "get_preset": "config",
              "clip_log_mel": "spectrogram", "log_mel": "spectrogram", "Mirasol": "mirasol",
              "count_parameters": "mirasol", "release_weights": "mirasol"}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_MODULE_OF[name]}", __name__), name)
    globals()[name] = value
    return value
