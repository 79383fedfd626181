"""Model configuration and presets."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any


@dataclass
class MirasolConfig:
    """Every size of the model. Derived sizes are properties, never stored twice."""

    preset: str = "custom"
    # media: a chunk is `frames_per_chunk` frames sampled at `fps` plus the audio of the same span
    fps: float = 4.0
    frames_per_chunk: int = 4
    num_frames: int = 16  # default clip length (chunks = num_frames // frames_per_chunk)
    image_size: int = 32
    patch_size: int = 8
    tubelet_frames: int = 2
    sample_rate: int = 16000
    n_fft: int = 400
    hop_length: int = 160
    n_mels: int = 32
    audio_patch_mels: int = 16
    audio_patch_frames: int = 10
    # unimodal encoders (small ViTs)
    encoder_dim: int = 64
    encoder_layers: int = 1
    encoder_heads: int = 2
    # combiner: "transformer" or "ttm"
    combiner: str = "transformer"
    combiner_layers: int = 1
    latents_per_chunk: int = 4  # m
    memory_size: int = 8  # M, TTM only
    # shared width of chunk latents, AV context and the text decoder
    d_model: int = 64
    # AV autoregressor
    av_layers: int = 2
    av_heads: int = 4
    av_window_chunks: int = 3  # W: a chunk attends to itself and the W-1 chunks before it
    # text decoder
    text_layers: int = 2
    text_heads: int = 4
    text_memory_chunks: int = 8  # the text decoder cross-attends to the last K chunks' av_context
    max_text_len: int = 96
    vocab_size: int = 259  # 256 bytes + BOS, EOS, PAD
    mlp_ratio: int = 4
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        problems = []
        if self.combiner not in ("transformer", "ttm"):
            problems.append(f"combiner must be 'transformer' or 'ttm', got {self.combiner!r}")
        if self.frames_per_chunk % self.tubelet_frames:
            problems.append("frames_per_chunk must be a multiple of tubelet_frames")
        if self.image_size % self.patch_size:
            problems.append("image_size must be a multiple of patch_size")
        if self.n_mels % self.audio_patch_mels:
            problems.append("n_mels must be a multiple of audio_patch_mels")
        if self.audio_frames_per_chunk % self.audio_patch_frames:
            problems.append(
                f"audio frames per chunk ({self.audio_frames_per_chunk}) must be a multiple of "
                f"audio_patch_frames ({self.audio_patch_frames})")
        for dim, heads, what in ((self.encoder_dim, self.encoder_heads, "encoder"),
                                 (self.d_model, self.av_heads, "av"),
                                 (self.d_model, self.text_heads, "text")):
            if dim % heads or (dim // heads) % 2:
                problems.append(f"{what}: width {dim} must split into {heads} heads of even size")
        if self.av_window_chunks < 1 or self.text_memory_chunks < 1:
            problems.append("av_window_chunks and text_memory_chunks must be >= 1")
        if self.num_frames % self.frames_per_chunk:
            problems.append("num_frames must be a multiple of frames_per_chunk")
        if problems:
            raise ValueError("invalid MirasolConfig: " + "; ".join(problems))

    # ---- derived sizes ----
    @property
    def samples_per_chunk(self) -> int:
        """Audio samples in one chunk's time span."""
        return round(self.sample_rate * self.frames_per_chunk / self.fps)

    @property
    def audio_frames_per_chunk(self) -> int:
        """A: log-mel frames per chunk (one per hop; the chunk is padded by n_fft - hop samples)."""
        return self.samples_per_chunk // self.hop_length

    @property
    def video_tokens(self) -> int:
        grid = self.image_size // self.patch_size
        return (self.frames_per_chunk // self.tubelet_frames) * grid * grid

    @property
    def audio_tokens(self) -> int:
        return (self.n_mels // self.audio_patch_mels) * (self.audio_frames_per_chunk // self.audio_patch_frames)

    @property
    def num_chunks(self) -> int:
        return self.num_frames // self.frames_per_chunk

    @property
    def av_cache_len(self) -> int:
        """Most past AV tokens a chunk can attend to: (W - 1) * m."""
        return (self.av_window_chunks - 1) * self.latents_per_chunk

    @property
    def text_memory_len(self) -> int:
        """Most AV tokens the text decoder cross-attends to: K * m."""
        return self.text_memory_chunks * self.latents_per_chunk

    @property
    def av_head_dim(self) -> int:
        return self.d_model // self.av_heads

    @property
    def text_head_dim(self) -> int:
        return self.d_model // self.text_heads

    # ---- serialisation ----
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MirasolConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown MirasolConfig keys: {unknown}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "MirasolConfig":
        return cls.from_dict(json.loads(text))

    def replace(self, **changes: Any) -> "MirasolConfig":
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, MirasolConfig] = {
    "tiny": MirasolConfig(preset="tiny"),
    "small": MirasolConfig(
        preset="small", image_size=64, patch_size=16, n_mels=64, audio_patch_mels=16,
        audio_patch_frames=20, encoder_dim=192, encoder_layers=2, encoder_heads=3,
        combiner="ttm", combiner_layers=2, latents_per_chunk=8, memory_size=16, d_model=384,
        av_layers=6, av_heads=6, av_window_chunks=8, text_layers=4, text_heads=6,
        text_memory_chunks=16, num_frames=64, max_text_len=128),
    "base": MirasolConfig(
        preset="base", image_size=128, patch_size=16, n_mels=80, audio_patch_mels=16,
        audio_patch_frames=20, encoder_dim=512, encoder_layers=6, encoder_heads=8,
        combiner="ttm", combiner_layers=4, latents_per_chunk=16, memory_size=32, d_model=1024,
        av_layers=16, av_heads=16, av_window_chunks=16, text_layers=8, text_heads=16,
        text_memory_chunks=32, num_frames=128, max_text_len=256),
    "mirasol3b": MirasolConfig(
        preset="mirasol3b", image_size=224, patch_size=16, n_mels=128, audio_patch_mels=16,
        audio_patch_frames=20, encoder_dim=768, encoder_layers=12, encoder_heads=12,
        combiner="ttm", combiner_layers=4, latents_per_chunk=32, memory_size=64, d_model=2048,
        av_layers=44, av_heads=16, av_window_chunks=32, text_layers=6, text_heads=16,
        text_memory_chunks=32, num_frames=128, max_text_len=512),
}


def get_preset(name: str, combiner: str | None = None) -> MirasolConfig:
    """A preset's config; `combiner` ("transformer" or "ttm") replaces its combiner."""
    try:
        config = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
    return config.replace(combiner=combiner) if combiner else config
