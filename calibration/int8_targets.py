"""Quantization recipes: how a graph becomes int8, per target.

- `tensorrt`: explicit quantization in the layout TensorRT fuses: QDQ with calibrated ranges, symmetric int8
  activations and weights, per-channel weights (output-channel axis), Q/DQ only on the inputs of
  MatMul/Gemm/Conv (no output quantization, which TensorRT would have to undo before the norms and softmax
  that follow), a dedicated Q/DQ pair per consumer, removable activations kept. Measured (sweep, report) by
  emulating the Q/DQ in fp32, which is what TensorRT's int8 kernels compute: ONNX Runtime's CPU kernels would
  not. It is for TensorRT only (on ONNX Runtime's CPU it is slower than fp32), and the only int8 TensorRT builds.
- `cpu`: ONNX Runtime on x86, chosen by measurement (`python -m mirasol.export.bench.int8_options graphs|push`):
  QDQ with calibrated ranges, uint8 activations, int8 weights in 7 bits (reduce_range), per-tensor, MatMul
  outputs left float (ONNX Runtime fuses DQ -> MatMul into MatMulIntegerToFloat), only MatMuls by a constant
  weight. 7-bit weights because ONNX Runtime's AVX2 kernels without VNNI sum u8 x s8 pairs in int16, which
  saturates with full 8-bit weights.
- `cpu-dynamic`: the same MatMuls quantized dynamically (ranges computed per call, no calibrated ranges),
  7-bit weights (DynamicQuantizeMatMul): it adapts to inputs unlike the calibration data.

`mirasol-export` makes `cpu` by default and `tensorrt` when it builds engines; `mirasol-build-engines` refuses the
others, from the recipe the manifest records. What the measurements behind these choices showed, with the
machines and commands: docs/int8-int4.md.

Only MatMul/Gemm/Conv are quantized: they hold the weights and the FLOPs; quantizing normalizations or
softmax saves nothing on either target and costs accuracy.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort
from mirasol.runtime.errors import ExportError
from onnxruntime.quantization import QuantType
from onnxruntime.quantization.calibrate import TensorsData
from onnxruntime.quantization.onnx_quantizer import ONNXQuantizer
from onnxruntime.quantization.qdq_quantizer import QDQQuantizer
from onnxruntime.quantization.quant_utils import QuantizationMode, add_infer_metadata

from .external_data import lazy_weights
from .onnx_graph import remove_dead, sort_topologically

WEIGHT_OPS = ("MatMul", "Gemm", "Conv")


@dataclass(frozen=True)
class Int8Recipe:
    name: str
    quant_format: str  # "QDQ", "QOperator" (both with calibrated ranges) or "dynamic" (ranges per call)
    activation_type: str  # QuantType name: "QInt8" or "QUInt8"
    weight_type: str
    per_channel: bool
    reduce_range: bool = False
    op_types: tuple[str, ...] = WEIGHT_OPS
    extra_options: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    # measured how: False = ONNX Runtime's CPU int8 kernels (what the cpu recipe runs on); True = Q/DQ emulated
    # in fp32 with graph optimizations off (what a TensorRT engine computes; ORT's CPU kernels would not)
    emulate: bool = False

    def session_options(self) -> ort.SessionOptions:
        options = ort.SessionOptions()
        if self.emulate:
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        return options

    def backend_options(self) -> dict[str, Any]:
        """Options of the runtime's onnxruntime backend that run this recipe as it is measured."""
        return {"optimization": "disable"} if self.emulate else {}

    def settings(self) -> dict[str, Any]:
        return {"name": self.name, "format": self.quant_format, "activations": self.activation_type,
                "weights": self.weight_type, "per_channel": self.per_channel, "reduce_range": self.reduce_range,
                "op_types": list(self.op_types), "extra_options": self.extra_options, "note": self.note,
                "measured_with": "Q/DQ emulated in fp32 (onnxruntime, graph optimizations off)" if self.emulate
                else "onnxruntime CPU int8 kernels"}

    @property
    def const_b_only(self) -> bool:
        return self.quant_format == "dynamic" or bool(self.extra_options.get("MatMulConstBOnly"))

    @property
    def uses_ranges(self) -> bool:
        """Whether the graph is quantized with calibrated activation ranges (else they are computed per call)."""
        return self.quant_format != "dynamic"

    def quantizable(self, model: onnx.ModelProto) -> set[str]:
        """Names of the nodes this recipe quantizes in `model` (before any exclusion)."""
        from .groups import weight_elements
        initializers = {t.name for t in model.graph.initializer}

        def constant_b(node: onnx.NodeProto) -> bool:
            if self.quant_format == "dynamic":  # ONNX Runtime's rule: B is an initializer itself
                return node.input[1] in initializers
            return weight_elements(model, node) > 0
        return {n.name for n in model.graph.node if n.op_type in self.op_types
                and not (self.const_b_only and n.op_type == "MatMul" and not constant_b(n))}

    def quantize(self, model: onnx.ModelProto, ranges: TensorsData | None,
                 exclude: set[str] | frozenset[str] = frozenset(), weights_dir: Path | None = None
                 ) -> onnx.ModelProto:
        """A quantized copy of `model` (shape-inferred fp32) with `ranges` (None for dynamic); `exclude`d nodes
        stay fp32. A weightless `model` (`external_data.load_weightless`) has its weights read from `weights_dir`
        one at a time; the copy holds the new int8 weights, and points at the fp32 files for the others."""
        if self.uses_ranges and ranges is None:
            raise ExportError(f"int8 recipe {self.name} needs calibrated ranges")
        if self.const_b_only:  # the QDQ quantizer ignores MatMulConstBOnly: exclude activation x activation MatMuls
            exclude = set(exclude) | {n.name for n in model.graph.node if n.op_type in self.op_types} \
                - self.quantizable(model)
        quantized_nodes = self.quantizable(model) - set(exclude)
        model = copy.deepcopy(model)
        add_infer_metadata(model)
        args = dict(per_channel=self.per_channel, reduce_range=self.reduce_range,
                    weight_qType=getattr(QuantType, self.weight_type).tensor_type,
                    activation_qType=getattr(QuantType, self.activation_type).tensor_type,
                    tensors_range=ranges, nodes_to_quantize=[], nodes_to_exclude=sorted(exclude),
                    op_types_to_quantize=list(self.op_types), extra_options=dict(self.extra_options))
        if self.quant_format == "QDQ":
            quantizer = QDQQuantizer(model, **args)
        elif self.quant_format == "QOperator":
            quantizer = ONNXQuantizer(model, args.pop("per_channel"), args.pop("reduce_range"),
                                      QuantizationMode.QLinearOps, True, **args)
        elif self.quant_format == "dynamic":
            args.update(tensors_range=None, activation_qType=QuantType.QUInt8.tensor_type,
                        extra_options={"MatMulConstBOnly": True, **self.extra_options})
            quantizer = ONNXQuantizer(model, args.pop("per_channel"), args.pop("reduce_range"),
                                      QuantizationMode.IntegerOps, False, **args)
        else:
            raise ExportError(f"unknown quantization format {self.quant_format!r}")
        with lazy_weights(weights_dir) if weights_dir is not None else contextlib.nullcontext():
            quantizer.quantize_model()
        quantized = quantizer.model.model
        if self.quant_format == "QDQ":
            _float_outside_quantized_ops(quantized.graph, quantized_nodes)
        sort_topologically(quantized.graph)
        props = [(p.key, p.value) for p in quantized.metadata_props if p.key != "onnx.infer"]
        del quantized.metadata_props[:]
        onnx.helper.set_model_props(quantized, dict(props))
        # keep the fp32 graph's IO exactly (names, order, float32): the runtime and manifest depend on it
        _check_io(model, quantized, self.name)
        return quantized


def _check_io(before: onnx.ModelProto, after: onnx.ModelProto, recipe: str) -> None:
    def io(m: onnx.ModelProto) -> list[tuple[str, int]]:
        return [(v.name, v.type.tensor_type.elem_type) for v in (*m.graph.input, *m.graph.output)]
    if io(before) != io(after):
        raise ExportError(f"{recipe} quantization changed the graph's inputs/outputs: {io(before)} -> {io(after)}")


def _float_outside_quantized_ops(graph: onnx.GraphProto, quantized: set[str]) -> None:
    """Give every reader of a Q/DQ'd activation that is not a quantized op the float value back.

    ONNX Runtime's QDQ quantizer routes all readers of a quantized tensor through its DequantizeLinear, even
    with DedicatedQDQPair: a LayerNormalization or Slice reading the same tensor as a MatMul then reads the
    quantized value, and a graph output (a KV cache) is written quantized. Here only the quantized ops keep
    reading the DequantizeLinear; graph outputs and every other reader read the original float tensor.
    """
    producer = {out: node for node in graph.node for out in node.output}
    outputs = {o.name for o in graph.output}
    for dq in [n for n in graph.node if n.op_type == "DequantizeLinear"]:
        q = producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear":
            continue  # a weight's DequantizeLinear (its int8 initializer has no QuantizeLinear)
        source, value = q.input[0], dq.output[0]
        readers = [n for n in graph.node if value in n.input]
        if value in outputs:  # the graph output keeps its name on the float tensor
            dequantized = f"{value}_dequantized"
            dq.output[0] = dequantized
            float_producer = producer.get(source)
            if float_producer is None or source in outputs:
                continue
            for i, name in enumerate(float_producer.output):
                if name == source:
                    float_producer.output[i] = value
            for node in graph.node:
                for i, name in enumerate(node.input):
                    if name == source:
                        node.input[i] = value
            producer[value] = float_producer
            for node in readers:
                if node.name in quantized:
                    for i, name in enumerate(node.input):
                        if name == value:
                            node.input[i] = dequantized
        else:
            for node in readers:
                if node.name not in quantized:
                    for i, name in enumerate(node.input):
                        if name == value:
                            node.input[i] = source
    remove_dead(graph)  # the Q/DQ pairs no reader uses any more


TENSORRT = Int8Recipe(
    "tensorrt", "QDQ", "QInt8", "QInt8", per_channel=True,
    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "DedicatedQDQPair": True,
                   "QDQKeepRemovableActivations": True, "OpTypesToExcludeOutputQuantization": list(WEIGHT_OPS),
                   "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1}},
    note="TensorRT explicit quantization: symmetric int8, per-channel weights, Q/DQ on MatMul/Gemm/Conv inputs",
    emulate=True)

# Candidates measured for the CPU recipe (bench.py); CPU is the one chosen.
_NO_OUT = {"OpTypesToExcludeOutputQuantization": list(WEIGHT_OPS)}
CPU_CANDIDATES: dict[str, Int8Recipe] = {
    "qdq_s8s8": Int8Recipe("qdq_s8s8", "QDQ", "QInt8", "QInt8", per_channel=False,
                        note="ONNX Runtime's defaults: QDQ, int8 activations and weights"),
    "qdq_u8s8": Int8Recipe("qdq_u8s8", "QDQ", "QUInt8", "QInt8", per_channel=False,
                        note="QDQ, uint8 activations, int8 weights"),
    "qdq_u8s8_reduced": Int8Recipe("qdq_u8s8_reduced", "QDQ", "QUInt8", "QInt8", per_channel=False, reduce_range=True,
                                note="QDQ u8s8 with 7-bit weights (no u8*s8 pair-sum saturation without VNNI)"),
    "qdq_u8s8_reduced_noout": Int8Recipe(
        "qdq_u8s8_reduced_noout", "QDQ", "QUInt8", "QInt8", per_channel=False, reduce_range=True,
        extra_options=_NO_OUT, note="QDQ u8s8 7-bit weights, MatMul outputs left float (MatMulIntegerToFloat)"),
    "qdq_u8s8_reduced_noout_constb": Int8Recipe(
        "qdq_u8s8_reduced_noout_constb", "QDQ", "QUInt8", "QInt8", per_channel=False, reduce_range=True,
        extra_options={**_NO_OUT, "MatMulConstBOnly": True},
        note="as qdq_u8s8_reduced_noout, only MatMuls by a constant weight"),
    "qdq_u8s8_reduced_perchannel_noout_constb": Int8Recipe(
        "qdq_u8s8_reduced_perchannel_noout_constb", "QDQ", "QUInt8", "QInt8", per_channel=True, reduce_range=True,
        extra_options={**_NO_OUT, "MatMulConstBOnly": True},
        note="as qdq_u8s8_reduced_noout_constb, per-channel weights"),
    "qdq_u8u8_noout_constb": Int8Recipe(
        "qdq_u8u8_noout_constb", "QDQ", "QUInt8", "QUInt8", per_channel=False,
        extra_options={**_NO_OUT, "MatMulConstBOnly": True}, note="QDQ, uint8 activations and weights"),
    "qoperator_u8s8_reduced": Int8Recipe("qoperator_u8s8_reduced", "QOperator", "QUInt8", "QInt8", per_channel=False,
                                      reduce_range=True, note="QOperator (QLinearMatMul), u8s8, 7-bit weights"),
}
CPU_CANDIDATES["dynamic"] = Int8Recipe("dynamic", "dynamic", "QUInt8", "QInt8", per_channel=False, op_types=("MatMul",),
                                    note="dynamic quantization of MatMuls by a constant weight, 8-bit weights")
CPU_CANDIDATES["dynamic_reduced"] = Int8Recipe(
    "dynamic_reduced", "dynamic", "QUInt8", "QInt8", per_channel=False, reduce_range=True, op_types=("MatMul",),
    note="dynamic quantization of MatMuls by a constant weight, 7-bit weights")
CPU = Int8Recipe(
    "cpu", "QDQ", "QUInt8", "QInt8", per_channel=False, reduce_range=True,
    extra_options={**_NO_OUT, "MatMulConstBOnly": True},
    note="ONNX Runtime CPU (x86 AVX2, no VNNI), chosen by measurement: QDQ with calibrated ranges, uint8 "
         "activations, 7-bit int8 weights, MatMul outputs float (MatMulIntegerToFloat), only MatMuls by a "
         "constant weight")
CPU_DYNAMIC = Int8Recipe(
    "cpu-dynamic", "dynamic", "QUInt8", "QInt8", per_channel=False, reduce_range=True, op_types=("MatMul",),
    note="ONNX Runtime CPU: MatMuls by a constant weight quantized dynamically (ranges per call), 7-bit int8 "
         "weights (DynamicQuantizeMatMul)")
INT8_TARGETS = {"cpu": CPU, "cpu-dynamic": CPU_DYNAMIC, "tensorrt": TENSORRT}


def get_int8_recipe(name: str | Int8Recipe) -> Int8Recipe:
    if isinstance(name, Int8Recipe):
        return name
    try:
        return INT8_TARGETS[name]
    except KeyError:
        raise ExportError(f"unknown int8 target {name!r}; choose one of {sorted(INT8_TARGETS)}") from None
