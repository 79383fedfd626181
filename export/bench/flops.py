"""The cost model of a step: FLOPs of one chunk step from the config, weight bytes per step from a bundle."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mirasol.runtime.bundle.manifest import Manifest


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


def token_step_flops(config: Any, past: int) -> dict[str, int]:
    """FLOPs of one generated token (batch 1) with `past` tokens in the decoder's cache, per part."""
    c = config
    d, r, s = c.d_model, c.mlp_ratio, c.text_memory_len
    keys = past + 1
    self_attention = c.text_layers * (4 * 2 * d * d + 2 * (2 * keys * d))
    cross_attention = c.text_layers * (2 * 2 * d * d + 2 * (2 * s * d))  # q/out projections; K/V once per question
    mlp = c.text_layers * 2 * (2 * d * d * r)
    logits = 2 * d * c.vocab_size
    return {"self_attention": self_attention, "cross_attention": cross_attention, "mlp": mlp, "logits": logits,
            "total": self_attention + cross_attention + mlp + logits}


def step_parameters(config: Any) -> dict[str, int]:
    """Parameters a chunk step reads (encoders, combiner, AV autoregressor) and a token reads (the text decoder
    without the cross-attention K/V projections, which run once per question), from a weightless model."""
    import torch

    from mirasol.model import Mirasol

    with torch.device("meta"):
        model = Mirasol(config)
    chunk = sum(p.numel() for part in (model.video_encoder, model.audio_encoder, model.combiner,
                                       model.av_autoregressor) for p in part.parameters())
    chunk -= sum(p.numel() for p in model.av_autoregressor.next_chunk_head.parameters())  # training only
    decoder = model.text_decoder
    per_question = sum(p.numel() for block in decoder.blocks
                       for proj in (block.cross_attn.k_proj, block.cross_attn.v_proj) for p in proj.parameters())
    per_question += sum(p.numel() for p in decoder.memory_norm.parameters())
    return {"chunk": chunk, "token": sum(p.numel() for p in decoder.parameters()) - per_question,
            "question": per_question}


def step_costs(config: Any, weight_bytes: float, state_bytes: float, past_tokens: int = 32,
               kv_bytes: float | None = None) -> dict[str, Any]:
    """What one chunk step and one generated token (`past_tokens` in the cache) cost at steady state (windows full),
    with weights of `weight_bytes` and carried state of `state_bytes` per element (the AV KV window at `kv_bytes`,
    default `state_bytes`: 1 for an int8 KV cache): FLOPs, weight bytes read, carried state read and written by the
    graphs, and the bytes crossing host<->device per step when the state stays on the device ("io_device") and when
    it goes through the host every step ("io_host"). Inputs and returned outputs are float32, token ids and
    positions int64."""
    c = config
    params = step_parameters(c)
    m, d = c.latents_per_chunk, c.d_model
    kv = state_bytes if kv_bytes is None else kv_bytes
    memory = state_bytes * (c.memory_size * d if c.combiner == "ttm" else 0)
    av_window = kv * 2 * c.av_layers * c.av_cache_len * d  # keys and values of every layer, read and written back
    chunk_in = 4 * (c.frames_per_chunk * 3 * c.image_size ** 2 + c.n_mels * c.audio_frames_per_chunk)
    chunk_out = 4 * m * d  # av_context
    chunk_state = memory + av_window + state_bytes * c.text_memory_len * d
    text_past = 2 * c.text_layers * past_tokens * d
    text_present = 2 * c.text_layers * (past_tokens + 1) * d
    cross = 2 * c.text_layers * c.text_memory_len * d
    token_in, token_out = 16, 4 * c.vocab_size  # the token id and its position; one position's logits
    token_state = state_bytes * (text_past + cross)
    return {
        "weights_total_bytes": weight_bytes * (params["chunk"] + params["token"] + params["question"]),
        "chunk": {"flops": chunk_step_flops(c)["total"], "weight_bytes": weight_bytes * params["chunk"],
                  "state_read_bytes": memory + av_window,
                  "state_written_bytes": memory + av_window + state_bytes * m * d,
                  "io_device_bytes": chunk_in + chunk_out,
                  "io_host_bytes": chunk_in + chunk_out + 2 * chunk_state},
        "token": {"flops": token_step_flops(c, past_tokens)["total"], "weight_bytes": weight_bytes * params["token"],
                  "state_read_bytes": state_bytes * (text_past + cross),
                  "state_written_bytes": state_bytes * text_present,
                  "io_device_bytes": token_in + token_out,
                  "io_host_bytes": token_in + token_out + 2 * token_state},
    }
