"""The AV autoregressor's KV cache carried in int8: fixed per-(head, channel) scales, quantized when written,
dequantized in the graph.

At mirasol3b the carried AV window is 179 M values (44 layers x keys and values x 992 tokens x 2048): 341 MiB in
fp16 per stream, read and written every chunk. In int8 it is half that. The graph takes `past_*` as int8 and
returns `present_*` as int8:

    past (int8) -> DequantizeLinear(scale 1, zero 0) -> Mul(scale[1, H, 1, hd]) -> the float graph
    the float graph -> Mul(1 / scale[1, H, 1, hd]) -> QuantizeLinear(scale 1, zero 0) -> present (int8)

Only standard ops with constant scalar scales and zero points of 0, which TensorRT's Q/DQ rules allow; the
per-channel part is an elementwise Mul (ONNX per-axis Q/DQ takes a 1-D scale only). The wiring does not change and
nothing new is carried: the manifest declares the state tensors int8, and the runtime carries them as it carries any
array. The graph already returns the next window; a token is quantized once, when it is written (re-quantizing a
dequantized value with the same scale gives it back), so the error does not grow with the stream.

The scales: `HEADROOM` x the per-(head, channel) largest magnitude of the `present_*` outputs of the fp32 graph while
the calibration clips stream, / 127: without headroom, values beyond the calibrated range clip when the input moves
away from the calibration scenes (docs/int8-int4.md measures the error over 1,000 chunks). Keys are cached before
rotation, where per-channel scales suit their outlier channels.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from mirasol.runtime.bundle.manifest import Manifest, StateSpec
from mirasol.runtime.errors import ExportError

from .external_data import load_weightless, read_tensor
from .onnx_graph import sort_topologically

KV_CACHES = ("float", "int8")  # how the AV KV cache is carried: as the graph computes it, or int8
HEADROOM = 2.0  # scale = HEADROOM * calibrated absmax / 127
SCALE_SUFFIX = "__kv_scale"  # initializer of a past input's scale [1, H, 1, hd]
INVERSE_SUFFIX = "__kv_inverse_scale"
INT8_MAX = 127.0


def kv_states(manifest: Manifest) -> list[StateSpec]:
    """The carried KV caches a windowed graph feeds itself: its output replaces its input along a bounded axis
    (the AV autoregressor's keys and values; the text decoder's caches live one question and stay float)."""
    return [s for s in manifest.state if s.graph == s.source_graph and s.window is not None
            and s.update == "replace" and s.scope == "stream"]


class KvAbsmax:
    """An observer (`record.RecordingBackend`): the per-(head, channel) largest |value| of each KV state's output
    over every call ([B, H, P, hd] arrays: the max over batch and positions)."""

    def __init__(self, states: Sequence[StateSpec]) -> None:
        self.outputs = {(s.source_graph, s.output): s.name for s in states}
        self.absmax: dict[str, np.ndarray] = {}

    def add(self, graph: str, feeds: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> None:
        for name, value in outputs.items():
            state = self.outputs.get((graph, name))
            if state is None or not value.size:
                continue
            peak = np.abs(np.asarray(value, dtype=np.float32)).max(axis=(0, 2))
            self.absmax[state] = peak if state not in self.absmax else np.maximum(self.absmax[state], peak)


def scales_from_absmax(absmax: np.ndarray, headroom: float = HEADROOM) -> np.ndarray:
    """Scales [H, hd] = headroom * absmax / 127; a channel that never moved gets its head's smallest nonzero scale
    (or 1/127: all zeros), so that a value arriving there later is still represented."""
    scale = headroom * np.asarray(absmax, dtype=np.float64) / INT8_MAX
    for head in scale:
        moving = head[head > 0]
        head[head <= 0] = moving.min() if moving.size else 1.0 / INT8_MAX
    return scale.astype(np.float32)


def quantize_graph(model: onnx.ModelProto, states: Sequence[StateSpec], scales: Mapping[str, np.ndarray]
                   ) -> onnx.ModelProto:
    """Make the KV `states` of a graph int8 at its inputs and outputs (`scales[state]`: [H, hd]). Edits `model` (a
    weightless proto is enough: only small constants and nodes are added)."""
    graph = model.graph
    inputs = {i.name: i for i in graph.input}
    outputs = {o.name: o for o in graph.output}
    added: list[onnx.NodeProto] = []
    for state in states:
        past, present = inputs.get(state.input), outputs.get(state.output)
        if past is None or present is None:
            raise ExportError(f"graph {graph.name!r} has no input {state.input!r} / output {state.output!r} of "
                              f"state {state.name!r}")
        elem = past.type.tensor_type.elem_type
        if elem not in (TensorProto.FLOAT, TensorProto.FLOAT16) or present.type.tensor_type.elem_type != elem:
            raise ExportError(f"state {state.name!r}: {state.input!r} is not a float tensor (already int8?)")
        dtype = helper.tensor_dtype_to_np_dtype(elem)
        scale = np.asarray(scales[state.name], dtype=np.float32)[None, :, None, :]
        unit = f"{state.name}__kv_one"
        graph.initializer.extend([
            numpy_helper.from_array(np.array(1.0, dtype), unit),
            numpy_helper.from_array(np.array(0, np.int8), f"{state.name}__kv_zero"),
            numpy_helper.from_array(scale.astype(dtype), state.input + SCALE_SUFFIX),
            numpy_helper.from_array((1.0 / scale).astype(dtype), state.output + INVERSE_SUFFIX)])
        float_past, float_present = f"{state.input}__float", f"{state.output}__float"
        for node in graph.node:
            node.input[:] = [float_past if n == state.input else n for n in node.input]
            node.output[:] = [float_present if n == state.output else n for n in node.output]
            node.input[:] = [float_present if n == state.output else n for n in node.input]
        added += [
            helper.make_node("DequantizeLinear", [state.input, unit, f"{state.name}__kv_zero"],
                             [f"{state.input}__dequantized"], name=f"{state.input}__kv_dequantize"),
            helper.make_node("Mul", [f"{state.input}__dequantized", state.input + SCALE_SUFFIX], [float_past],
                             name=f"{state.input}__kv_scale"),
            helper.make_node("Mul", [float_present, state.output + INVERSE_SUFFIX], [f"{state.output}__scaled"],
                             name=f"{state.output}__kv_scale"),
            helper.make_node("QuantizeLinear", [f"{state.output}__scaled", unit, f"{state.name}__kv_zero"],
                             [state.output], name=f"{state.output}__kv_quantize")]
        past.type.tensor_type.elem_type = TensorProto.INT8
        present.type.tensor_type.elem_type = TensorProto.INT8
    graph.node.extend(added)
    sort_topologically(graph)
    return model


class KvCodec:
    """What a graph with an int8 KV cache takes and gives, from and to float values: `encode` quantizes the KV
    inputs of a feed dict, `decode` dequantizes the KV outputs of a result dict (the other tensors pass as they
    are)."""

    def __init__(self, scales: Mapping[str, np.ndarray]) -> None:
        self.scales = {name: np.asarray(s, dtype=np.float32) for name, s in scales.items()}

    @classmethod
    def from_graph(cls, path: Path, states: Sequence[StateSpec]) -> "KvCodec":
        model = load_weightless(path)
        initializers = {t.name: t for t in model.graph.initializer}
        scales: dict[str, np.ndarray] = {}
        for state in states:
            tensor = initializers.get(state.input + SCALE_SUFFIX)
            if tensor is None:
                raise ExportError(f"{path}: int8 state {state.name!r} has no scale {state.input + SCALE_SUFFIX!r}")
            scales[state.input] = scales[state.output] = read_tensor(tensor, path.parent).astype(np.float32)
        return cls(scales)

    def encode(self, values: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {name: quantize(v, self.scales[name]) if name in self.scales else v for name, v in values.items()}

    def decode(self, values: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {name: v.astype(np.float32) * self.scales[name] if name in self.scales else v
                for name, v in values.items()}


def quantize(values: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """int8 codes of `values` with `scale` (what the graph's Mul + QuantizeLinear compute: round half to even,
    saturating)."""
    return np.clip(np.rint(values.astype(np.float32) * (1.0 / scale)), -128, 127).astype(np.int8)


def int8_states(manifest: Manifest) -> list[StateSpec]:
    """The KV states this bundle carries in int8."""
    return [s for s in kv_states(manifest) if manifest.graphs[s.graph].input(s.input).dtype == "int8"]


def kv_codecs(bundle: str | Path) -> dict[str, KvCodec]:
    """Per graph of `bundle` whose KV cache is int8, its codec (read from the graph's scale constants)."""
    manifest = Manifest.read(bundle)
    states = int8_states(manifest)
    graphs = sorted({s.graph for s in states})
    return {g: KvCodec.from_graph(Path(bundle) / manifest.graphs[g].file, [s for s in states if s.graph == g])
            for g in graphs}
