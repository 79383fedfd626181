"""Tiny ONNX models of one operator (Concat, Slice), written as protobuf bytes without the `onnx` package.

A backend that keeps the carried state on its device through ONNX Runtime (`onnxruntime_device.py`) appends to it
and windows it with these, run by ONNX Runtime on the same device: the state never goes through the host. The
runtime ships without `onnx`, so the few fields these models need are encoded here (onnx.proto: ModelProto,
GraphProto, NodeProto, AttributeProto, ValueInfoProto, TypeProto, TensorShapeProto); tests/test_onnxruntime_device.py
checks the bytes parse with `onnx` and run.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np

IR_VERSION = 8  # read by every onnxruntime this package supports (1.19+)
OPSET = 13
# onnx.TensorProto.DataType of the dtypes a bundle's tensors have
ELEMENT_TYPES = {np.dtype(np.float32): 1, np.dtype(np.uint8): 2, np.dtype(np.int8): 3, np.dtype(np.int32): 6,
                 np.dtype(np.int64): 7, np.dtype(np.bool_): 9, np.dtype(np.float16): 10}
_INT_ATTRIBUTE = 2  # AttributeProto.AttributeType.INT


def _varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1  # negative int64 as two's complement, as protobuf does
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _int(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(value)


def _bytes(field: int, data: bytes | str) -> bytes:
    raw = data.encode() if isinstance(data, str) else data
    return _varint((field << 3) | 2) + _varint(len(raw)) + raw


def _tensor_value(name: str, element: int, dims: Iterable[str]) -> bytes:
    """ValueInfoProto: a tensor of `element` type whose dimensions are all symbolic (named `dims`)."""
    shape = b"".join(_bytes(1, _bytes(2, dim)) for dim in dims)  # TensorShapeProto.dim: Dimension.dim_param
    tensor_type = _int(1, element) + _bytes(2, shape)  # TypeProto.Tensor: elem_type, shape
    return _bytes(1, name) + _bytes(2, _bytes(1, tensor_type))  # name, type (TypeProto.tensor_type)


def _model(op: str, inputs: list[bytes], input_names: list[str], attributes: dict[str, int], rank_out: int,
           element: int) -> bytes:
    attribute = b"".join(_bytes(5, _bytes(1, key) + _int(3, value) + _int(20, _INT_ATTRIBUTE))
                         for key, value in attributes.items())
    node = (b"".join(_bytes(1, name) for name in input_names) + _bytes(2, "y") + _bytes(3, op) + _bytes(4, op)
            + attribute)
    output = _tensor_value("y", element, (f"y{k}" for k in range(rank_out)))
    graph = _bytes(1, node) + _bytes(2, op.lower()) + b"".join(_bytes(11, i) for i in inputs) + _bytes(12, output)
    opset = _bytes(1, "") + _int(2, OPSET)
    return _int(1, IR_VERSION) + _bytes(7, graph) + _bytes(8, opset)


def element_type(dtype: np.dtype) -> int:
    try:
        return ELEMENT_TYPES[np.dtype(dtype)]
    except KeyError:
        raise TypeError(f"no ONNX element type for {dtype}") from None


def concat_model(dtype: np.dtype, rank: int, axis: int, count: int) -> bytes:
    """y = Concat(x0, ..., x{count-1}, axis): tensors of `dtype` and `rank`, any sizes."""
    element = element_type(dtype)
    names = [f"x{i}" for i in range(count)]
    inputs = [_tensor_value(name, element, (f"{name}_{k}" for k in range(rank))) for name in names]
    return _model("Concat", inputs, names, {"axis": axis}, rank, element)


def slice_model(dtype: np.dtype, rank: int) -> bytes:
    """y = Slice(x, starts, ends, axes): `starts`, `ends`, `axes` int64 [1] inputs (host memory for every
    execution provider's Slice kernel: they are its parameters, not data)."""
    element = element_type(dtype)
    inputs = [_tensor_value("x", element, (f"x_{k}" for k in range(rank)))]
    inputs += [_tensor_value(name, ELEMENT_TYPES[np.dtype(np.int64)], ("one",)) for name in ("starts", "ends", "axes")]
    return _model("Slice", inputs, ["x", "starts", "ends", "axes"], {}, rank, element)
