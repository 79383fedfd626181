"""The checks of one ONNX graph against TensorRT's ONNX parser (the rules listed in `readiness.py`)."""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from mirasol.runtime.bundle.precisions import PRECISIONS
from onnx import numpy_helper

from .findings import Finding
from .support_matrix import (
    INT4_BLOCK_SIZES,
    MATRIX_VERSION,
    OP_SINCE,
    OPSET_RANGE,
    QDQ_FUSABLE,
    QDQ_PASS_THROUGH,
    SUPPORTED_OPS,
    TRT_TYPES,
    TYPE_NAMES,
    UNSUPPORTED_ELEM,
    UNSUPPORTED_OPS,
    WEIGHTED_DATA_INPUTS,
)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in str(text).split(".") if p.isdigit())


def _axis_range(value: Any) -> tuple[int, int, int] | None:
    if value is None:
        return None
    if isinstance(value, Mapping):
        return int(value["min"]), int(value["opt"]), int(value["max"])
    if hasattr(value, "min") and hasattr(value, "max"):
        return int(value.min), int(value.opt), int(value.max)
    low, opt, high = value
    return int(low), int(opt), int(high)


class GraphChecker:
    """Checks one ONNX model; `run()` returns its findings."""

    def __init__(self, proto: Any, *, graph: str, axes: Mapping[str, Any] | None,
                 inputs: Mapping[str, Sequence[int | str]] | None, target: str, precision: str | None,
                 base_dir: Path | None) -> None:
        self.proto = proto
        self.graph_name = graph
        self.axes = dict(axes) if axes is not None else None
        self.manifest_inputs = dict(inputs) if inputs is not None else None
        self.target = target
        self.precision = precision
        self.base_dir = base_dir
        self.findings: list[Finding] = []
        self.functions = {(f.domain, f.name): f for f in proto.functions}
        try:
            self.inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False)
        except Exception as failed:  # noqa: BLE001 - keep going with the declared types
            self.inferred = proto
            self.add("warning", "", f"ONNX shape inference failed ({failed}); dtype checks use declared types only",
                     "shape-inference")
        self.types: dict[str, int] = {}
        self._collect_types(self.inferred.graph)

    def add(self, severity: str, node: str, message: str, code: str) -> None:
        self.findings.append(Finding(severity, self.graph_name, node, message, code))

    def run(self) -> list[Finding]:
        self.check_opset()
        self.check_io_dims()
        self.check_dtypes(self.proto.graph)
        self.check_nodes(self.proto.graph.node, self.proto.graph, depth=0)
        self.check_qdq(self.proto.graph)
        return self.findings

    # -- types --------------------------------------------------------------------------------------------------
    def _collect_types(self, graph: Any) -> None:
        for info in [*graph.input, *graph.output, *graph.value_info]:
            if info.type.HasField("tensor_type") and info.type.tensor_type.elem_type:
                self.types[info.name] = info.type.tensor_type.elem_type
        for init in graph.initializer:
            self.types[init.name] = init.data_type
        for node in graph.node:
            if node.op_type == "Constant" and node.output:
                for attr in node.attribute:
                    if attr.name == "value" and attr.t is not None:
                        self.types[node.output[0]] = attr.t.data_type
            for attr in node.attribute:
                for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                    self._collect_types(sub)

    # -- opset --------------------------------------------------------------------------------------------------
    def check_opset(self) -> None:
        for opset in self.proto.opset_import:
            if opset.domain in ("", "ai.onnx"):
                low, high = OPSET_RANGE[MATRIX_VERSION]
                if not low <= opset.version <= high:
                    self.add("error", "", f"opset {opset.version} is outside the opsets TensorRT "
                             f"{MATRIX_VERSION} parses ({low} to {high})", "opset")
                elif opset.version > OPSET_RANGE["10.0"][1] and _version(self.target) < _version(MATRIX_VERSION):
                    int4 = bool(self._int4_weights())
                    why = (" (for the INT4 weights' block-wise DequantizeLinear, which onnx-tensorrt imports from the "
                           "scale's shape since TensorRT 10.0)" if int4 else "")
                    remedy = ("" if int4 else f", or export with opset {OPSET_RANGE['10.0'][1]} or lower")
                    self.add("warning", "", f"opset {opset.version}{why}: TensorRT 10.0 documents opsets up to "
                             f"{OPSET_RANGE['10.0'][1]} and {MATRIX_VERSION} up to {high}; check that TensorRT "
                             f"{self.target} parses it (build the engines once){remedy}", "opset")

    # -- dynamic input dimensions -------------------------------------------------------------------------------
    def check_io_dims(self) -> None:
        initializers = {i.name for i in self.proto.graph.initializer}
        for info in self.proto.graph.input:
            if info.name in initializers or not info.type.HasField("tensor_type"):
                continue
            dims = list(info.type.tensor_type.shape.dim) if info.type.tensor_type.HasField("shape") else None
            declared = self.manifest_inputs.get(info.name) if self.manifest_inputs is not None else None
            if self.manifest_inputs is not None and declared is None:
                self.add("error", "", f"graph input {info.name!r} is not in the manifest, so no profile bounds it",
                         "unbounded-dim")
                continue
            if dims is None:
                if declared is None:
                    self.add("error", "", f"graph input {info.name!r} has no shape (unknown rank): TensorRT needs the "
                             f"rank and a bounded range for every dynamic dimension", "unbounded-dim")
                continue
            if declared is not None and len(declared) != len(dims):
                self.add("error", "", f"graph input {info.name!r} has rank {len(dims)} in the ONNX file but "
                         f"{len(declared)} in the manifest", "rank-mismatch")
                continue
            for i, dim in enumerate(dims):
                symbol: int | str | None
                if declared is not None:
                    symbol = declared[i]
                elif dim.HasField("dim_value"):
                    symbol = int(dim.dim_value)
                elif dim.HasField("dim_param") and dim.dim_param:
                    symbol = dim.dim_param
                else:
                    symbol = None
                if symbol is None or (isinstance(symbol, int) and symbol < 0):
                    self.add("error", "", f"input {info.name!r} dimension {i} is dynamic without a name, so no "
                             f"optimization profile can bound it; name it (dynamic_shapes) and give it a range",
                             "unbounded-dim")
                elif isinstance(symbol, str) and self.axes is not None:
                    rng = _axis_range(self.axes.get(symbol))
                    if rng is None:
                        self.add("error", "", f"input {info.name!r} dimension {i} is {symbol!r}, which has no "
                                 f"min/opt/max in the manifest axes ({', '.join(sorted(self.axes)) or 'none'}): "
                                 f"TensorRT cannot bound it", "unbounded-dim")
                    elif not 0 <= rng[0] <= rng[1] <= rng[2]:
                        self.add("error", "", f"axis {symbol!r} range {rng} is not 0 <= min <= opt <= max", "bad-range")
                    elif dim.HasField("dim_value") and (rng[0], rng[2]) != (dim.dim_value, dim.dim_value):
                        self.add("error", "", f"input {info.name!r} dimension {i} is fixed to {dim.dim_value} in the "
                                 f"ONNX file, but axis {symbol!r} ranges {rng[0]}..{rng[2]}: TensorRT's builder "
                                 f"refuses a profile that varies a fixed dimension; export the dimension as dynamic, "
                                 f"or give the axis the range {dim.dim_value}..{dim.dim_value}", "fixed-dim")
                elif isinstance(symbol, int) and dim.HasField("dim_value") and dim.dim_value != symbol:
                    self.add("error", "", f"input {info.name!r} dimension {i} is {dim.dim_value} in the ONNX file and "
                             f"{symbol} in the manifest", "rank-mismatch")

    # -- dtypes -------------------------------------------------------------------------------------------------
    def check_dtypes(self, graph: Any) -> None:
        io_names = {i.name for i in graph.input} | {o.name for o in graph.output}
        seen: set[str] = set()
        for name, elem in self.types.items():
            if name in seen or not name:
                continue
            seen.add(name)
            type_name = TYPE_NAMES.get(elem, f"type {elem}")
            what = "graph input/output" if name in io_names else "tensor"
            if elem == 11:
                self.add("error", "", f"{what} {name!r} is float64: TensorRT has no float64 (its parser only casts "
                         f"DOUBLE down to FLOAT, clamping); export it as float32", "float64")
            elif elem in (8, 14, 15):
                self.add("error", "", f"{what} {name!r} is {type_name}, which TensorRT has no type for", "dtype")
            elif elem in UNSUPPORTED_ELEM or type_name not in TRT_TYPES:
                self.add("error", "", f"{what} {name!r} is {UNSUPPORTED_ELEM.get(elem, type_name)}, which "
                         f"TensorRT has no type for", "dtype")
            elif elem == 2 and name not in io_names and not self._is_qdq_constant(name):
                self.add("warning", "", f"tensor {name!r} is uint8: TensorRT supports UINT8 only as a network input or "
                         f"output type", "dtype")

    def _is_qdq_constant(self, name: str) -> bool:
        return any(node.op_type in ("QuantizeLinear", "DequantizeLinear") and name in node.input
                   for node in self.proto.graph.node)

    # -- operators ----------------------------------------------------------------------------------------------
    def check_nodes(self, nodes: Iterable[Any], graph: Any, depth: int, via: str = "") -> None:
        constants = self._constant_names(graph)
        for node in nodes:
            label = node.name or f"{node.op_type}({', '.join(node.output)})"
            label = f"{via}/{label}" if via else label
            domain = node.domain or ""
            if (domain, node.op_type) in self.functions:
                if depth < 8:
                    function = self.functions[(domain, node.op_type)]
                    self.check_nodes(function.node, graph, depth + 1, via=label)
                continue
            if domain not in ("", "ai.onnx"):
                self.add("error", label, f"{node.op_type} of domain {domain!r} is not an ONNX operator "
                         f"TensorRT's parser knows (it would need a TensorRT plugin)", "unsupported-op")
                continue
            self.check_op(node, label, constants)
            for attr in node.attribute:
                subgraphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
                for sub in subgraphs:
                    if depth < 8:
                        self.check_nodes(sub.node, sub, depth + 1, via=f"{label}.{attr.name}")

    def check_op(self, node: Any, label: str, constants: set[str]) -> None:
        op = node.op_type
        if op in UNSUPPORTED_OPS:
            self.add("error", label, f"{op} is not supported by TensorRT's ONNX parser (support matrix "
                     f"{MATRIX_VERSION})", "unsupported-op")
            return
        if op not in SUPPORTED_OPS:
            self.add("error", label, f"{op} is not in TensorRT's ONNX parser support matrix ({MATRIX_VERSION})",
                     "unsupported-op")
            return
        since = OP_SINCE.get(op)
        if since and _version(self.target) < _version(since):
            self.add("error", label, f"{op} needs TensorRT {since} or newer; the target is TensorRT {self.target}",
                     "op-too-new")
        types, _ = SUPPORTED_OPS[op]
        data = node.input[0] if node.input else ""
        elem = self.types.get(data) if data else None
        if elem is not None:
            type_name = TYPE_NAMES.get(elem, str(elem))
            if type_name not in types:
                self.add("error", label, f"{op} on {type_name} input {data!r}: TensorRT's {op} supports "
                         f"{', '.join(types)}", "op-dtype")
        # Restrictions of the matrix that our exports can hit.
        if op.startswith("Reduce") and len(node.input) > 1 and node.input[1] and node.input[1] not in constants:
            self.add("error", label, f"{op}: axes must be an initializer (here {node.input[1]!r} is computed)",
                     "op-restriction")
        if op in ("Squeeze", "Unsqueeze") and len(node.input) > 1 and node.input[1] and node.input[1] not in constants:
            self.add("warning", label, f"{op}: axes must be resolvable to a constant (here {node.input[1]!r} is "
                     f"computed)", "op-restriction")
        if op == "CumSum" and len(node.input) > 1 and node.input[1] not in constants:
            self.add("error", label, "CumSum: axis must be a build-time constant", "op-restriction")
        if op == "LayerNormalization" and any(o for o in node.output[1:]):
            self.add("error", label, "LayerNormalization: only the first output Y is supported", "op-restriction")
        if op == "Dropout" and len(node.input) > 2 and node.input[2] and node.input[2] not in constants:
            self.add("error", label, "Dropout: is_training must be an initializer that is False", "op-restriction")

    def _constant_names(self, graph: Any) -> set[str]:
        names = {i.name for i in graph.initializer}
        names.update(n.output[0] for n in graph.node if n.op_type == "Constant" and n.output)
        return names

    # -- Q/DQ ---------------------------------------------------------------------------------------------------
    def check_qdq(self, graph: Any) -> None:
        nodes = list(graph.node)
        producers = {out: n for n in nodes for out in n.output if out}
        consumers: dict[str, list[Any]] = {}
        for n in nodes:
            for name in n.input:
                if name:
                    consumers.setdefault(name, []).append(n)
        outputs = {o.name for o in graph.output}
        inputs = {i.name for i in graph.input}
        int4 = self._int4_weights()
        has_qdq = False
        io_qdq: list[str] = []
        for node in nodes:
            if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
                continue
            label = node.name or f"{node.op_type}({', '.join(node.output)})"
            self._check_qdq_params(node, label, graph)
            if (node.op_type == "DequantizeLinear" and node.input[0] in inputs) or (
                    node.op_type == "QuantizeLinear" and node.output[0] in outputs):
                io_qdq.append(node.input[0] if node.op_type == "DequantizeLinear" else node.output[0])
                continue  # int8 network I/O (a carried int8 KV cache): quantized at the boundary, not for a MatMul
            has_qdq = True
            if node.input[0] in int4:
                self._check_int4_weight(node, label, int4[node.input[0]], consumers, graph)
                continue
            if node.op_type == "QuantizeLinear":
                for user in consumers.get(node.output[0], []):
                    if user.op_type != "DequantizeLinear":
                        self.add("error", label, f"QuantizeLinear output feeds {user.op_type} "
                                 f"{user.name or user.output[0]!r}: TensorRT needs every QuantizeLinear followed by a "
                                 f"DequantizeLinear", "qdq-pair")
                if node.output[0] in outputs:
                    self.add("warning", label, "a quantized tensor is a graph output", "qdq-pair")
            else:
                source = producers.get(node.input[0])
                if source is not None and source.op_type not in ("QuantizeLinear", "Constant"):
                    self.add("warning", label, f"DequantizeLinear input comes from {source.op_type}, not from a "
                             f"QuantizeLinear or a constant", "qdq-pair")
                reached = self._qdq_reaches(node.output[0], consumers, outputs, set())
                if not reached:
                    users = (", ".join(sorted({u.op_type for u in consumers.get(node.output[0], [])}))
                             or "a graph output")
                    self.add("warning", label, f"DequantizeLinear feeds {users}, which TensorRT does not fuse with "
                             f"Q/DQ (it runs in float: the Q/DQ pair costs time and gains nothing); quantize the "
                             f"inputs of MatMul/Gemm/Conv instead", "qdq-unfused")
        if has_qdq:
            for node in nodes:
                data_inputs = WEIGHTED_DATA_INPUTS.get(node.op_type)
                if not data_inputs:
                    continue
                quantized = [self._dequantized(node.input[i], producers) for i in data_inputs if i < len(node.input)]
                weight_only = any(producers.get(node.input[i]) is not None and producers[node.input[i]].input[0] in int4
                                  for i in data_inputs if i < len(node.input))
                if any(quantized) and not all(quantized) and not weight_only:
                    label = node.name or f"{node.op_type}({', '.join(node.output)})"
                    self.add("warning", label, f"{node.op_type} has Q/DQ on only some of its data inputs; "
                             f"TensorRT runs it in int8 only when all of them are quantized (quantize all inputs "
                             f"of weighted ops)", "qdq-partial")
        if io_qdq:
            self.add("warning", "", f"int8 network inputs/outputs through Q/DQ at the boundary ({len(io_qdq)}, e.g. "
                     f"{io_qdq[0]!r}: an int8 KV cache): the parser imports INT8 network I/O; not yet built on a "
                     f"device: build the engines once, or export with --kv-cache float", "int8-io")
        expects_qdq = self.precision in PRECISIONS and PRECISIONS[self.precision].quantized
        if expects_qdq and not has_qdq:
            self.add("warning", "", f"the bundle is {self.precision} but this graph has no QuantizeLinear/"
                     "DequantizeLinear: TensorRT builds it in floating point", "qdq-missing")
        if self.precision in PRECISIONS and not expects_qdq and has_qdq:
            self.add("warning", "", f"the bundle is {self.precision} but this graph has Q/DQ nodes", "qdq-unexpected")

    def _int4_weights(self) -> dict[str, Any]:
        """The INT4 initializers (weights) by name."""
        return {t.name: t for t in self.proto.graph.initializer if t.data_type == 22}

    def _check_int4_weight(self, node: Any, label: str, weight: Any, consumers: Mapping[str, list[Any]],
                           graph: Any) -> None:
        """INT4 is weight-only in TensorRT: a DequantizeLinear of a constant rank-2 weight feeding a MatMul/Gemm's
        weight input, with per-block scales (blocks of 64 or 128 along one axis) and an even last dimension."""
        if node.op_type != "DequantizeLinear":
            self.add("error", label, "INT4 is weight-only in TensorRT: only a DequantizeLinear of an INT4 constant",
                     "int4")
            return
        dims = list(weight.dims)
        scale = next((t for t in graph.initializer if t.name == node.input[1]), None) if len(node.input) > 1 else None
        block = next((a.i for a in node.attribute if a.name == "block_size"), 0)
        if len(dims) != 2:
            self.add("error", label, f"INT4 weight {weight.name!r} has rank {len(dims)}; TensorRT's INT4 weight-only "
                     f"quantization takes rank-2 weights", "int4")
        elif block not in INT4_BLOCK_SIZES or scale is None or len(scale.dims) != 2 or sum(
                d // max(int(s), 1) == 1 for d, s in zip(dims, scale.dims)) != 1:
            self.add("error", label, f"INT4 weight {weight.name!r}: TensorRT needs per-block scales, blocks of "
                     f"{' or '.join(map(str, INT4_BLOCK_SIZES))} along one axis (block_size {block}, scale "
                     f"{list(scale.dims) if scale is not None else 'not a constant'})", "int4")
        elif dims[-1] % 2:
            self.add("error", label, f"INT4 weight {weight.name!r} {dims}: TensorRT packs INT4 two per byte along the "
                     f"last dimension, which must be even", "int4")
        for user in consumers.get(node.output[0], []):
            if user.op_type not in ("MatMul", "Gemm") or list(user.input).index(node.output[0]) != 1:
                self.add("error", label, f"INT4 weight {weight.name!r} feeds {user.op_type} "
                         f"{user.name or user.output[0]!r}: TensorRT's INT4 is weight-only, for a MatMul/Gemm's "
                         f"weight input", "int4")

    def _dequantized(self, name: str, producers: Mapping[str, Any]) -> bool:
        seen = 0
        node = producers.get(name)
        while node is not None and seen < 16:
            if node.op_type == "DequantizeLinear":
                return True
            if node.op_type not in QDQ_PASS_THROUGH or not node.input:
                return False
            node = producers.get(node.input[0])
            seen += 1
        return False

    def _qdq_reaches(self, name: str, consumers: Mapping[str, list[Any]], outputs: set[str], seen: set[str]) -> bool:
        """True when every path from `name` reaches a fusable op (through pass-through ops only)."""
        if name in seen:
            return True
        seen.add(name)
        users = consumers.get(name, [])
        if not users or name in outputs:
            return False
        for user in users:
            if user.op_type in QDQ_FUSABLE:
                continue
            if user.op_type in QDQ_PASS_THROUGH:
                if not all(self._qdq_reaches(out, consumers, outputs, seen) for out in user.output if out):
                    return False
                continue
            return False
        return True

    def _check_qdq_params(self, node: Any, label: str, graph: Any) -> None:
        op = node.op_type
        scale = self._constant(node.input[1], graph) if len(node.input) > 1 else None
        if len(node.input) > 1 and scale is None:
            self.add("warning", label, f"{op}: the scale {node.input[1]!r} is not a constant; TensorRT expects "
                     f"build-time constant scales", "qdq-scale")
        elif scale is not None and np.any(~(scale > 0)):
            self.add("error", label, f"{op}: scales must be positive (found {scale.min()!r})", "qdq-scale")
        zero_name = node.input[2] if len(node.input) > 2 else ""
        if zero_name:
            zero = self._constant(zero_name, graph)
            if zero is None:
                self.add("error", label, f"{op}: the zero point {zero_name!r} is not a constant; TensorRT requires a "
                         f"constant zero point of 0 (symmetric quantization)", "qdq-zero-point")
            elif np.any(zero != 0):
                self.add("error", label, f"{op}: zero point {zero_name!r} is {np.unique(zero)[:4].tolist()}, not 0: "
                         f"TensorRT only does symmetric quantization (zero_point must be 0)", "qdq-zero-point")
            elem = self.types.get(zero_name)
        else:
            elem = None
        # The quantized type: the zero point's type, else QuantizeLinear's output_dtype, else uint8 (ONNX default).
        if op == "QuantizeLinear" and elem is None:
            elem = next((a.i for a in node.attribute if a.name == "output_dtype" and a.i), 2)
        if op == "DequantizeLinear" and elem is None:
            elem = self.types.get(node.input[0])
        if elem == 2:
            self.add("error", label, f"{op} quantizes to uint8 (asymmetric); TensorRT needs signed int8 with "
                     f"zero point 0 (uint8 Q/DQ is only for DLA)", "qdq-zero-point")

    def _constant(self, name: str, graph: Any) -> np.ndarray | None:
        for init in graph.initializer:
            if init.name == name:
                return self._to_array(init)
        for node in graph.node:
            if node.op_type == "Constant" and node.output and node.output[0] == name:
                for attr in node.attribute:
                    if attr.name == "value":
                        return self._to_array(attr.t)
                    if attr.name in ("value_float", "value_int"):
                        return np.asarray(attr.f if attr.name == "value_float" else attr.i)
                    if attr.name in ("value_floats", "value_ints"):
                        return np.asarray(list(attr.floats) if attr.name == "value_floats" else list(attr.ints))
        return None

    def _to_array(self, tensor: Any) -> np.ndarray | None:
        try:
            if tensor.data_location == 1:  # TensorProto.EXTERNAL
                return numpy_helper.to_array(tensor, str(self.base_dir) if self.base_dir else "")
            return numpy_helper.to_array(tensor)
        except Exception:  # noqa: BLE001 - external data not reachable: treat as unknown
            return None
