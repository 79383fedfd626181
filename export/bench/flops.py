"""The cost model of a step: FLOPs of one chunk step from the config, weight bytes per step from a bundle."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mirasol.runtime.manifest import Manifest


def _encoder_flops(tokens: int, dim: int, layers: int, mlp_ratio: int) -> int:
    """Matmuls of `layers` pre-norm blocks on `tokens` tokens: q/k/v/out projections, QK^T, AV, MLP."""
    projections = 4 * 2 * tokens * dim * dim
    attention = 2 * (2 * tokens * tokens * dim)
    mlp = 2 * (2 * tokens * dim * dim * mlp_ratio)
    return layers * (projections + attention + mlp)


def chunk_step_flops(config: Any) -> dict[str, int]:
    """FLOPs (2*M*N*K per matmul) of one chunk step at steady state (AV cache full), per component."""
    c = config
    e, d, r = c.encoder_dim, c.d_model, c.mlp_ratio
    tv, ta, m = c.video_tokens, c.audio_tokens, c.latents_per_chunk
    video = (2 * tv * (c.tubelet_frames * 3 * c.patch_size ** 2) * e
             + _encoder_flops(tv, e, c.encoder_layers, r) + 2 * tv * e * d)
    audio = (2 * ta * (c.audio_patch_mels * c.audio_patch_frames) * e
             + _encoder_flops(ta, e, c.encoder_layers, r) + 2 * ta * e * d)
    if c.combiner == "ttm":
        mem = c.memory_size
        reads = mem + tv + ta  # memory + video + audio tokens
        writes = mem + m + tv + ta  # memory + latents + inputs
        combiner = (2 * reads * d * d + 2 * reads * d * m + 2 * m * reads * d  # read: TokenLearner
                    + _encoder_flops(m, d, c.combiner_layers, r)  # process
                    + 2 * writes * d * d + 2 * writes * d * mem + 2 * mem * writes * d)  # write: TokenLearner
    else:
        combiner = _encoder_flops(tv + ta + m, d, c.combiner_layers, r)
    keys = c.av_cache_len + m
    av = c.av_layers * (4 * 2 * m * d * d + 2 * (2 * m * keys * d) + 2 * (2 * m * d * d * r))
    return {"video_encoder": video, "audio_encoder": audio, "combiner": combiner, "av_autoregressor": av,
            "total": video + audio + combiner + av}


def _graph_bytes(path: Path, manifest: Manifest, graphs: Sequence[str]) -> int:
    """Bytes of a bundle's graph files (their weights, mostly), external data included."""
    return sum((path / f).stat().st_size for g in graphs
               for f in (manifest.graphs[g].file, *manifest.graphs[g].external_data))


def step_weight_bytes(path: Path) -> dict[str, int]:
    """Bytes of the graphs one chunk step ("push") and one new token ("token": the generate step) read."""
    manifest = Manifest.read(path)
    return {"push": _graph_bytes(path, manifest, manifest.steps["push"].graphs),
            "token": _graph_bytes(path, manifest, manifest.steps["generate"].graphs)}
