"""int4 weights: weight-only, block-wise, in the one graph form that TensorRT builds and ONNX Runtime fuses.

Decode on a device is bound by the bytes of weights it reads; int4 reads half of int8's. Every `MatMul` by a 2-D
weight initializer W [K, N] (how the exporter writes an `nn.Linear`) becomes

    DequantizeLinear(W_int4 [K, N], scale [K / bs, N], axis=0, block_size=bs) -> MatMul input B     (opset 21)

symmetric, no zero point, blocks of `bs` along K (the input dimension), one positive scale per block and output
column: s = max(max / 7, -min / 8) over the block, codes round(w / s) in [-8, 7]. Activations stay float (fp32 here;
a TensorRT build runs them in fp16).

Why this form (measured with onnxruntime 1.32 and read from onnx-tensorrt 10.x; docs/int8-int4.md has more):
- ONNX Runtime fuses it at graph optimization level "extended" and above into `MatMulNBits` (accuracy level 4:
  int8 activations, integer dot products), as fast as `MatMulNBits` written directly. It does NOT fuse, silently
  (the DequantizeLinear then runs on every call, or is folded back to fp32 weights), when the block size is not a
  power of two >= 16, when blocks run along N, or when one DequantizeLinear feeds two MatMuls. So each MatMul gets
  its own DequantizeLinear, and the exporter checks the optimized graph: every int4 DequantizeLinear must have
  become a MatMulNBits.
- TensorRT (10.0+) imports it as INT4 weight-only quantization: blocks of 64 or 128 along one of the last two
  dimensions, zero point 0, positive scales, an even last dimension (INT4 packs two values per byte).
  `MatMulNBits` is a contrib op TensorRT does not parse, and the negative scales ONNX Runtime's own int4 quantizer
  uses are illegal there; this form serves both.
- Blocks of 128 where K allows, else 64 (both TensorRT's; 128: fewer scales and faster in ONNX Runtime; 64: less
  weight error). A weight whose K divides by neither, or whose N is odd, stays float.

`quantize_weights(model, weights_dir)` edits a weightless graph (`external_data`): each weight is read from its file,
quantized and added as a packed INT4 initializer (two codes per byte, the first in the low nibble); the fp32
weight goes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from mirasol.runtime.errors import ExportError

from .external_data import read_tensor

BLOCK_SIZES = (128, 64)  # preferred first; both TensorRT's
OPSET = 21  # DequantizeLinear with int4 and block_size
LOW, HIGH = -8, 7
FUSED_OP = "MatMulNBits"  # what ONNX Runtime turns DequantizeLinear(int4) -> MatMul into


@dataclass
class Int4Report:
    """What became int4 in one graph, and what stayed float and why."""

    quantized: list[str] = field(default_factory=list)  # weight names
    block_sizes: dict[int, int] = field(default_factory=dict)  # block size -> weights
    int4_parameters: int = 0
    float_weights: dict[str, str] = field(default_factory=dict)  # MatMul weights kept float -> why
    weight_error: float = 0.0  # relative Frobenius error of the int4 weights, all of them together

    def to_dict(self) -> dict[str, Any]:
        return {"int4_weights": len(self.quantized), "block_sizes": {str(k): v for k, v in self.block_sizes.items()},
                "int4_parameters": self.int4_parameters, "float_weights": self.float_weights,
                "weight_error": self.weight_error}


def block_size(k: int, n: int) -> int | None:
    """The block size for a [K, N] weight, or None when it stays float."""
    if n % 2:
        return None
    return next((b for b in BLOCK_SIZES if k % b == 0), None)


def quantize_blocks(weight: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """int8 codes in [-8, 7] of `weight` [K, N] and positive scales [K / block, N] (float32)."""
    k, n = weight.shape
    blocks = weight.astype(np.float32).reshape(k // block, block, n)
    scale = np.maximum(blocks.max(axis=1) / HIGH, blocks.min(axis=1) / LOW)
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)  # an all-zero block: any positive scale
    codes = np.clip(np.rint(blocks / scale[:, None, :]), LOW, HIGH).astype(np.int8)
    return codes.reshape(k, n), scale


def dequantize_blocks(codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    k, n = codes.shape
    block = k // scale.shape[0]
    return (codes.reshape(-1, block, n).astype(np.float32) * scale[:, None, :]).reshape(k, n)


def pack(codes: np.ndarray) -> bytes:
    """ONNX INT4 storage: the flattened codes two per byte, the first in the low nibble."""
    flat = (codes.reshape(-1).astype(np.int8).view(np.uint8) & 0x0F)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()


def quantize_weights(model: onnx.ModelProto, weights_dir: Path | None) -> tuple[onnx.ModelProto, Int4Report]:
    """Every MatMul weight of `model` that fits becomes int4 (see the module's docstring); edits `model`."""
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    report = Int4Report()
    error_sq = norm_sq = 0.0
    codes_of: dict[str, tuple[TensorProto, TensorProto]] = {}
    added: list[onnx.NodeProto] = []
    for node in list(graph.node):
        if node.op_type != "MatMul" or len(node.input) < 2 or node.input[1] not in initializers:
            continue
        name = node.input[1]
        tensor = initializers[name]
        if len(tensor.dims) != 2 or tensor.data_type != TensorProto.FLOAT:
            report.float_weights[name] = f"{len(tensor.dims)}-D {helper.tensor_dtype_to_np_dtype(tensor.data_type)}"
            continue
        k, n = (int(d) for d in tensor.dims)
        block = block_size(k, n)
        if block is None:
            report.float_weights[name] = f"[{k}, {n}]: " + ("N is odd" if n % 2 else
                                                           f"K divides by none of {BLOCK_SIZES}")
            continue
        if name not in codes_of:
            weight = read_tensor(tensor, weights_dir or ".")
            codes, scale = quantize_blocks(weight, block)
            error_sq += float(((dequantize_blocks(codes, scale) - weight) ** 2).sum())
            norm_sq += float((weight.astype(np.float64) ** 2).sum())
            packed = helper.make_tensor(f"{name}__int4", TensorProto.INT4, [k, n], pack(codes), raw=True)
            codes_of[name] = (packed, numpy_helper.from_array(scale, f"{name}__int4_scale"))
            graph.initializer.extend(codes_of[name])
            report.quantized.append(name)
            report.block_sizes[block] = report.block_sizes.get(block, 0) + 1
            report.int4_parameters += k * n
            del weight, codes
        packed, scale_tensor = codes_of[name]
        # one DequantizeLinear per MatMul: ONNX Runtime fuses a DequantizeLinear with exactly one reader
        dequantized = f"{node.name or name}__int4_weight"
        added.append(helper.make_node("DequantizeLinear", [packed.name, scale_tensor.name], [dequantized],
                                      name=f"{node.name or name}__int4_dequantize", axis=0, block_size=block))
        node.input[1] = dequantized
    if not codes_of:
        return model, report
    used = {name for node in graph.node for name in node.input}
    for name in codes_of:
        if name not in used:
            graph.initializer.remove(initializers[name])
    nodes = added + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = max(opset.version, OPSET)
    report.weight_error = float(np.sqrt(error_sq / norm_sq)) if norm_sq else 0.0
    return model, report


def int4_dequantizers(model: onnx.ModelProto) -> list[str]:
    """Names of the DequantizeLinear nodes of int4 weights in `model`."""
    int4 = {t.name for t in model.graph.initializer if t.data_type == TensorProto.INT4}
    return [n.name for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in int4]


def check_fused(graph_path: Path, expected: int) -> dict[str, int]:
    """Load `graph_path` in ONNX Runtime as the runtime does (CPU, all optimizations), save the optimized graph, and
    count: every int4 DequantizeLinear must have become a MatMulNBits. Raises ExportError naming the ones that did
    not (they would run a dequantization on every call, or be folded back into fp32 weights, silently)."""
    import tempfile

    import onnxruntime as ort

    from .external_data import load_weightless

    with tempfile.TemporaryDirectory(prefix="mirasol-int4-check-") as scratch:
        optimized = Path(scratch) / "optimized.onnx"
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # not the warning that an optimized model may be hardware specific
        options.optimized_model_filepath = str(optimized)
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                         "optimized.onnx.data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        try:
            ort.InferenceSession(str(graph_path), sess_options=options, providers=["CPUExecutionProvider"])
        except Exception as failure:  # noqa: BLE001 - onnxruntime raises its own types
            raise ExportError(f"onnxruntime cannot load the int4 graph {graph_path.name}: {failure}") from None
        result = load_weightless(optimized)
    ops: dict[str, int] = {}
    for node in result.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    left = int4_dequantizers(result)
    if left or ops.get(FUSED_OP, 0) != expected:
        raise ExportError(f"{graph_path.name}: onnxruntime fused {ops.get(FUSED_OP, 0)} of {expected} int4 weights "
                          f"into {FUSED_OP}; not fused: {left[:5]} (an int4 DequantizeLinear that does not fuse runs "
                          f"on every call or is folded back to fp32 weights)")
    return {"DequantizeLinear_int4": 0, FUSED_OP: ops.get(FUSED_OP, 0), "MatMul": ops.get("MatMul", 0)}
