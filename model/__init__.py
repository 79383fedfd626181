"""mirasol.model: the PyTorch reference Mirasol model."""
from .checkpoint import build_model, load_checkpoint, save_checkpoint
from .config import PRESETS, MirasolConfig, get_preset
from .features import clip_log_mel, log_mel
from .mirasol import Mirasol, count_parameters, release_weights

__all__ = ["PRESETS", "Mirasol", "MirasolConfig", "build_model", "clip_log_mel", "count_parameters",
           "get_preset", "load_checkpoint", "log_mel", "release_weights", "save_checkpoint"]
