"""One description per exported graph: IO names, dtypes, symbolic shapes, axis ranges, the module to trace.

The exporter, the validator, the manifest writer, the calibrator and the TensorRT profile builder all
read these; no shape is written anywhere else.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from mirasol.model import Mirasol, MirasolConfig
from mirasol.runtime.bundle.tensors import TensorInfo
from mirasol.runtime.bundle.manifest import AxisRange, CounterSpec, StateSpec, StepSpec

KV_PAIR = ("key", "value")


@dataclass(frozen=True)
class GraphSpec:
    name: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    axes: dict[str, AxisRange]
    build: Callable[[Mirasol], nn.Module]  # the module whose forward(*inputs) -> outputs is exported

    @property
    def file(self) -> str:
        return f"{self.name}.onnx"

    def trace_sizes(self) -> dict[str, int]:
        """Axis sizes of the example inputs: away from 0 and 1, which torch.export would specialise."""
        return {axis: max(2, min(r.opt, r.max)) if r.max >= 2 else r.max for axis, r in self.axes.items()}

    def validation_sizes(self) -> Iterator[dict[str, int]]:
        """Axis sizes to validate at: every axis at its min, opt and max (others at opt), deduplicated."""
        seen = set()
        for axis, r in self.axes.items():
            for size in (r.min, r.opt, r.max):
                sizes = {a: (size if a == axis else rr.opt) for a, rr in self.axes.items()}
                key = tuple(sorted(sizes.items()))
                if key not in seen:
                    seen.add(key)
                    yield sizes

    def example(self, sizes: dict[str, int], rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Seeded random inputs with the given axis sizes (integer inputs within their valid range)."""
        feeds = {}
        for tensor in self.inputs:
            shape = tuple(sizes[d] if isinstance(d, str) else d for d in tensor.shape)
            if tensor.name == "input_ids":
                feeds[tensor.name] = rng.integers(0, 256, shape, dtype=np.int64)
            elif tensor.name == "position":  # the text decoder's: tokens already in its cache
                feeds[tensor.name] = np.full(shape, sizes["past_text"], dtype=np.int64)
            else:
                feeds[tensor.name] = rng.standard_normal(shape).astype(np.float32)
        return feeds


def _kv(prefix: str, layers: int, heads: int, head_dim: int, length: str) -> tuple[TensorInfo, ...]:
    return tuple(TensorInfo(f"{prefix}_{kind}_{i}", "float32", ("batch", heads, length, head_dim))
                 for i in range(layers) for kind in KV_PAIR)


def _pairs(flat: tuple[torch.Tensor, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(zip(flat[0::2], flat[1::2]))


def _flat(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, ...]:
    return tuple(t for pair in pairs for t in pair)


class CombinerGraph(nn.Module):
    def __init__(self, model: Mirasol) -> None:
        super().__init__()
        self.model = model

    def forward(self, video: torch.Tensor, audio: torch.Tensor, *memory_in: torch.Tensor) -> tuple[torch.Tensor, ...]:
        latents, memory_out = self.model.combiner_step(video, audio, memory_in[0] if memory_in else None)
        return (latents,) if memory_out is None else (latents, memory_out)


class AVGraph(nn.Module):
    def __init__(self, model: Mirasol) -> None:
        super().__init__()
        self.model = model

    def forward(self, chunk_latents: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        context, present = self.model.av_step(chunk_latents, _pairs(past))
        return (context, *_flat(present))


class TextCrossKVGraph(nn.Module):
    def __init__(self, model: Mirasol) -> None:
        super().__init__()
        self.model = model

    def forward(self, av_memory: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return _flat(self.model.text_cross_kv(av_memory))


class TextDecoderGraph(nn.Module):
    def __init__(self, model: Mirasol) -> None:
        super().__init__()
        self.model = model
        self.layers = model.config.text_layers

    def forward(self, input_ids: torch.Tensor, position: torch.Tensor, *caches: torch.Tensor
                ) -> tuple[torch.Tensor, ...]:
        cross, past = caches[: 2 * self.layers], caches[2 * self.layers:]
        logits, present = self.model.text_step(input_ids, position, _pairs(cross), _pairs(past))
        return (logits, *_flat(present))


def graph_specs(config: MirasolConfig, max_batch: int = 4) -> dict[str, GraphSpec]:
    """The four graphs of a config, in the order a stream runs them."""
    c = config
    batch = AxisRange(1, 1, max_batch)
    hidden = ("batch", c.latents_per_chunk, c.d_model)
    ttm = c.combiner == "ttm"
    memory = (TensorInfo("memory_in", "float32", ("batch", c.memory_size, c.d_model)),) if ttm else ()
    memory_out = (TensorInfo("memory_out", "float32", ("batch", c.memory_size, c.d_model)),) if ttm else ()
    text_kv = dict(layers=c.text_layers, heads=c.text_heads, head_dim=c.text_head_dim)
    av_kv = dict(layers=c.av_layers, heads=c.av_heads, head_dim=c.av_head_dim)
    specs = [
        GraphSpec(
            "combiner",
            inputs=(TensorInfo("video", "float32", ("batch", c.frames_per_chunk, 3, c.image_size, c.image_size)),
                    TensorInfo("audio", "float32", ("batch", c.n_mels, c.audio_frames_per_chunk)), *memory),
            outputs=(TensorInfo("chunk_latents", "float32", hidden), *memory_out),
            axes={"batch": batch}, build=CombinerGraph),
        GraphSpec(
            "av_autoregressor",
            inputs=(TensorInfo("chunk_latents", "float32", hidden), *_kv("past", length="past_av", **av_kv)),
            outputs=(TensorInfo("av_context", "float32", hidden), *_kv("present", length="present_av", **av_kv)),
            axes={"batch": batch, "past_av": AxisRange(0, c.av_cache_len, c.av_cache_len)},
            build=AVGraph),
        GraphSpec(
            "text_cross_kv",
            inputs=(TensorInfo("av_memory", "float32", ("batch", "memory_len", c.d_model)),),
            outputs=_kv("cross", length="memory_len", **text_kv),
            axes={"batch": batch, "memory_len": AxisRange(c.latents_per_chunk, c.text_memory_len, c.text_memory_len)},
            build=TextCrossKVGraph),
        GraphSpec(
            "text_decoder",
            inputs=(TensorInfo("input_ids", "int64", ("batch", "text_len")),
                    TensorInfo("position", "int64", ("batch",)),
                    *_kv("cross", length="memory_len", **text_kv), *_kv("past", length="past_text", **text_kv)),
            outputs=(TensorInfo("logits", "float32", ("batch", "text_len", c.vocab_size)),
                     *_kv("present", length="present_text", **text_kv)),
            axes={"batch": batch, "text_len": AxisRange(1, 16, c.max_text_len),
                  "memory_len": AxisRange(c.latents_per_chunk, c.text_memory_len, c.text_memory_len),
                  "past_text": AxisRange(0, 32, c.max_text_len - 1)},
            build=TextDecoderGraph),
    ]
    return {spec.name: spec for spec in specs}


def derived_axes(spec: GraphSpec) -> dict[str, AxisRange]:
    """Ranges of output-only axes (present_text = past_text + new; present_av: past_av + m, within the window),
    so every symbolic name has a range."""
    axes = dict(spec.axes)
    if "past_av" in axes:
        past, m = axes["past_av"], spec.inputs[0].shape[1]
        axes["present_av"] = AxisRange(*(min(size + m, past.max) for size in (past.min, past.opt, past.max)))
    if "past_text" in axes:
        past, new = axes["past_text"], axes["text_len"]
        axes["present_text"] = AxisRange(past.min + new.min, past.opt + new.opt, past.max + new.max)
    return axes


def wiring(config: MirasolConfig) -> tuple[dict[str, StepSpec], tuple[StateSpec, ...], tuple[CounterSpec, ...]]:
    """How a stream chains the graphs: the steps, the carried state and the counters."""
    c = config
    steps = {
        "push": StepSpec(("combiner", "av_autoregressor"), inputs=("video", "audio"), returns="av_context"),
        "ask": StepSpec(("text_cross_kv",)),
        "generate": StepSpec(("text_decoder",), inputs=("input_ids",), returns="logits"),
    }
    state: list[StateSpec] = []
    if c.combiner == "ttm":
        state.append(StateSpec("ttm_memory", "combiner", "memory_in", "combiner", "memory_out", init="zeros"))
    for i in range(c.av_layers):
        for kind in KV_PAIR:
            state.append(StateSpec(f"av_{kind}_{i}", "av_autoregressor", f"past_{kind}_{i}", "av_autoregressor",
                                   f"present_{kind}_{i}", init="empty", axis=2, window=c.av_cache_len))
    state.append(StateSpec("av_memory", "text_cross_kv", "av_memory", "av_autoregressor", "av_context",
                           init="empty", update="append", axis=1, window=c.text_memory_len))
    for i in range(c.text_layers):
        for kind in KV_PAIR:
            state.append(StateSpec(f"text_cross_{kind}_{i}", "text_decoder", f"cross_{kind}_{i}", "text_cross_kv",
                                   f"cross_{kind}_{i}", init="empty", axis=2, scope="question"))
            state.append(StateSpec(f"text_{kind}_{i}", "text_decoder", f"past_{kind}_{i}", "text_decoder",
                                   f"present_{kind}_{i}", init="empty", axis=2, scope="question"))
    counters = (CounterSpec("position", "text_decoder", "position", length_of=("input_ids", 1), scope="question"),)
    return steps, tuple(state), counters
