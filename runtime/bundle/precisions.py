"""The precision registry: one entry per bundle precision says everything the toolkit decides by precision.

- how exported graphs are checked: the tolerance against PyTorch (`abs + rel * max|ref|`), or none when an
  accuracy report against the fp32 bundle checks them instead (int8, int4);
- whether the graphs carry Q/DQ nodes (the TensorRT readiness check expects them, or flags them);
- how TensorRT builds engines of this precision: from which bundle precisions (a strongly typed network, the
  default, takes its types from the graph), and which builder flags a weakly typed network needs;
- whether the export needs calibration data.

The graph transform of each precision (fp16 conversion, int8 quantization) needs PyTorch/ONNX tooling and lives
on the export side (`mirasol.export.precision_transforms`), keyed by the same names. Adding a precision means an entry
here and its transform there.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import MirasolError


@dataclass(frozen=True)
class Tolerance:
    """An output passes when max|got - reference| <= abs + rel * max|reference|."""

    abs: float
    rel: float

    def bound(self, scale: float) -> float:
        return self.abs + self.rel * scale


@dataclass(frozen=True)
class Precision:
    name: str
    description: str
    tolerance: Tolerance | None  # graph vs PyTorch at export; None: checked by the calibration accuracy report
    quantized: bool  # the graphs carry QuantizeLinear/DequantizeLinear nodes
    needs_calibration: bool
    engine_sources: tuple[str, ...]  # bundle precisions TensorRT engines of this precision are built from
    weak_flags: tuple[str, ...]  # BuilderFlags a weakly typed network needs (TensorRT 10; TensorRT 11 has none)
    weight_bytes: float  # bytes per weight element (the cost model)
    state_bytes: int  # bytes per carried state element (the cost model)
    weak_fp16_fallback: bool = False  # with weak typing, also allow fp16 for the layers left unquantized


# fp32: the design's 1e-4, plus 1e-5 of the output's scale: fp32 rounding grows with magnitude, and logits of
# +-40 differ by ~2e-4 between any two correct fp32 implementations (5e-6 relative). Outputs of unit scale,
# like av_context and the caches, are held to ~1e-4. fp16: 10-bit mantissas through a dozen layers; measured
# errors on the tiny and small presets are 1e-3..5e-3 of the output's scale, so 3e-2 leaves room without
# hiding a broken graph (a wrong rotary angle gives 2e-1).
PRECISIONS: dict[str, Precision] = {p.name: p for p in (
    Precision("fp32", "float32 weights and compute", Tolerance(1e-4, 1e-5), quantized=False,
              needs_calibration=False, engine_sources=("fp32",), weak_flags=(),
              weight_bytes=4, state_bytes=4),
    Precision("fp16", "float16 weights and compute, float32 kept where measurement demands",
              Tolerance(1e-3, 3e-2), quantized=False, needs_calibration=False,
              engine_sources=("fp32", "fp16"), weak_flags=("FP16",),
              weight_bytes=2, state_bytes=2),
    Precision("int8", "int8 Q/DQ calibrated on recorded activations", None, quantized=True,
              needs_calibration=True, engine_sources=("int8",), weak_flags=("INT8",), weight_bytes=1, state_bytes=2,
              weak_fp16_fallback=True),
    # int4: MatMul weights in blocks of 128 (or 64) with a float32 scale each, 0.5 + 4/128 bytes per weight; the
    # other weights (norms, biases, embeddings, weights no block size divides) stay float32. Weak typing: INT4 for
    # the weight-only DequantizeLinear, FP16 for the float layers (trtexec --int4 --fp16); strong typing (the
    # default) keeps the graph's fp32 activations.
    Precision("int4", "int4 weight-only blocks (DequantizeLinear, opset 21), float activations, no calibration",
              None, quantized=True, needs_calibration=False, engine_sources=("int4",), weak_flags=("INT4",),
              weight_bytes=0.5 + 4 / 128, state_bytes=2, weak_fp16_fallback=True),
)}
NAMES: tuple[str, ...] = tuple(PRECISIONS)


def get_precision(name: str) -> Precision:
    """The registry entry of `name`; an unknown name raises a MirasolError listing the known ones."""
    try:
        return PRECISIONS[name]
    except (KeyError, TypeError):
        raise MirasolError(f"precision {name!r} is not one of {NAMES}") from None
