"""The TensorRT readiness check of ONNX graphs (export side, needs onnx; no TensorRT)."""
from __future__ import annotations

import json

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto as T  # noqa: E402
from onnx import helper as h  # noqa: E402
from onnx import numpy_helper as nh  # noqa: E402

from mirasol.export.tensorrt.readiness import check_bundle, check_model  # noqa: E402

from .onnx_graphs import AXES  # noqa: E402
from .onnx_graphs import model as _model  # noqa: E402
from .onnx_graphs import supported_model as _supported_model  # noqa: E402
from .onnx_graphs import weight as _w  # noqa: E402
from .onnx_graphs import write_bundle as _write_bundle  # noqa: E402
from .onnx_graphs import x_info as _x  # noqa: E402
from .onnx_graphs import y_info as _y  # noqa: E402


def _codes(findings, severity=None):
    return {f.code for f in findings if severity is None or f.severity == severity}


def _qdq_model(zero=0, zero_dtype=np.int8, consumer="MatMul", weight_quantized=True, input_quantized=True):
    s = nh.from_array(np.array(0.05, np.float32), "s")
    zp = nh.from_array(np.array(zero, zero_dtype), "zp")
    zp0 = nh.from_array(np.array(0, np.int8), "zp0")
    wq = nh.from_array(np.random.default_rng(1).integers(-8, 8, (4, 3)).astype(np.int8), "wq")
    nodes, inits = [], [s, zp, zp0, wq, _w()]
    xin = "x"
    if input_quantized:
        nodes += [h.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"], name="q_x"),
                  h.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xd"], name="dq_x")]
        xin = "xd"
    win = "w"
    if weight_quantized:
        nodes.append(h.make_node("DequantizeLinear", ["wq", "s", "zp0"], ["wd"], name="dq_w"))
        win = "wd"
    if consumer == "MatMul":
        nodes.append(h.make_node("MatMul", [xin, win], ["y"], name="mm"))
        out = _y()
    else:
        nodes.append(h.make_node(consumer, [xin], ["y"], name="act"))
        out = _y(shape=("batch", "seq", 4))
    return _model(nodes, [_x()], [out], inits, opset=13)


# ---------------------------------------------------------------------------------------------------------------
# Readiness (CI)
# ---------------------------------------------------------------------------------------------------------------

def test_supported_graph_passes():
    assert check_model(_supported_model(), axes=AXES, graph="block") == []


def test_unsupported_ops_are_errors():
    nodes = [h.make_node("Unique", ["x"], ["u"], name="uniq"), h.make_node("Frobnicate", ["x"], ["f"], name="frob"),
             h.make_node("FusedMatMul", ["x", "x"], ["y"], domain="com.microsoft", name="contrib")]
    model = _model(nodes, [_x()], [_y(shape=("batch", "seq", 4))])
    model.opset_import.append(h.make_opsetid("com.microsoft", 1))
    findings = check_model(model, axes=AXES)
    bad = {f.node for f in findings if f.code == "unsupported-op" and f.severity == "error"}
    assert bad == {"uniq", "frob", "contrib"}


def test_float64_tensor_is_an_error():
    nodes = [h.make_node("Cast", ["x"], ["d"], to=T.DOUBLE, name="to64"), h.make_node("Cast", ["d"], ["y"], to=T.FLOAT)]
    findings = check_model(_model(nodes, [_x()], [_y(shape=("batch", "seq", 4))]), axes=AXES)
    assert any(f.code == "float64" and f.severity == "error" and "'d'" in f.message for f in findings)
    findings = check_model(_model([h.make_node("Relu", ["x"], ["y"])], [_x(T.DOUBLE)],
                                  [_y(T.DOUBLE, ("batch", "seq", 4))]), axes=AXES)
    assert {f.message.split(" ")[2] for f in findings if f.code == "float64"} >= {"'x'", "'y'"}


def test_string_tensor_is_an_error():
    model = _model([h.make_node("Identity", ["x"], ["y"])], [_x(T.STRING)], [_y(T.STRING, ("batch", "seq", 4))])
    assert "dtype" in _codes(check_model(model, axes=AXES), "error")


def test_unbounded_dims_are_errors():
    model = _model([h.make_node("Relu", ["x"], ["y"])], [_x(shape=("batch", "s0", 4))], [_y(shape=("batch", "s0", 4))])
    findings = check_model(model, axes=AXES)
    assert [f.code for f in findings] == ["unbounded-dim"] and "'s0'" in findings[0].message
    unnamed = _x(shape=("batch", "seq", 4))
    unnamed.type.tensor_type.shape.dim[1].Clear()  # a dynamic dimension with neither value nor name
    model = _model([h.make_node("Relu", ["x"], ["y"])], [unnamed], [_y(shape=("batch", "seq", 4))])
    assert "unbounded-dim" in _codes(check_model(model, axes=AXES), "error")
    # the manifest's names win over the exporter's dim_params
    model = _model([h.make_node("Relu", ["x"], ["y"])], [_x(shape=("s0", "s1", 4))], [_y(shape=("s0", "s1", 4))])
    assert check_model(model, axes=AXES, inputs={"x": ("batch", "seq", 4)}) == []
    assert "unbounded-dim" in _codes(check_model(model, axes=AXES, inputs={"x": ("batch", "frames", 4)}))
    assert "rank-mismatch" in _codes(check_model(model, axes=AXES, inputs={"x": ("batch", "seq")}))


def test_symmetric_qdq_feeding_matmul_passes():
    assert check_model(_qdq_model(), axes=AXES, precision="int8") == []


def test_asymmetric_zero_point_is_an_error():
    findings = check_model(_qdq_model(zero=3), axes=AXES)
    assert {f.node for f in findings if f.code == "qdq-zero-point"} == {"q_x", "dq_x"}
    findings = check_model(_qdq_model(zero=128, zero_dtype=np.uint8), axes=AXES)
    assert any(f.code == "qdq-zero-point" and "uint8" in f.message for f in findings)


def test_qdq_placement_warnings():
    findings = check_model(_qdq_model(consumer="Softmax", weight_quantized=False), axes=AXES)
    assert [(f.severity, f.code, f.node) for f in findings] == [("warning", "qdq-unfused", "dq_x")]
    findings = check_model(_qdq_model(input_quantized=False), axes=AXES)
    assert [(f.severity, f.code, f.node) for f in findings] == [("warning", "qdq-partial", "mm")]
    assert "qdq-missing" in _codes(check_model(_supported_model(), axes=AXES, precision="int8"), "warning")


def test_op_newer_than_the_target_is_an_error():
    scale = nh.from_array(np.ones(4, np.float32), "g")
    model = _model([h.make_node("RMSNormalization", ["x", "g"], ["y"], axis=-1, name="rms")], [_x()],
                   [_y(shape=("batch", "seq", 4))], [scale], opset=23)
    assert "op-too-new" in _codes(check_model(model, axes=AXES, target="10.3"), "error")
    assert "op-too-new" not in _codes(check_model(model, axes=AXES, target="10.15"))


def test_restrictions_and_op_dtypes():
    shape_axes = [h.make_node("Shape", ["x"], ["sh"]), h.make_node("Slice", ["sh", "st", "en"], ["ax"]),
                  h.make_node("ReduceSum", ["x", "ax"], ["y"], keepdims=1, name="dyn_axes")]
    inits = [nh.from_array(np.array([2], np.int64), "st"), nh.from_array(np.array([3], np.int64), "en")]
    model = _model(shape_axes, [_x()], [_y(shape=("batch", "seq", 1))], inits, opset=18)
    assert any(f.node == "dyn_axes" and f.code == "op-restriction" for f in check_model(model, axes=AXES))
    # CumSum on int64 (e.g. positions from a mask): TensorRT's CumSum is floating point only
    ids = h.make_tensor_value_info("ids", T.INT64, ["batch", "seq"])
    out = h.make_tensor_value_info("pos", T.INT64, ["batch", "seq"])
    model = _model([h.make_node("CumSum", ["ids", "axis"], ["pos"], name="cumsum")], [ids], [out],
                   [nh.from_array(np.array(1, np.int64), "axis")])
    assert [(f.code, f.node) for f in check_model(model, axes=AXES)] == [("op-dtype", "cumsum")]


def test_opset_outside_the_parser_range():
    model = _model([h.make_node("Relu", ["x"], ["y"])], [_x()], [_y(shape=("batch", "seq", 4))], opset=8)
    assert "opset" in _codes(check_model(model, axes=AXES), "error")


def test_local_functions_are_checked():
    fn = h.make_function("local", "Bad", ["a"], ["b"], [h.make_node("Unique", ["a"], ["b"], name="inner")],
                         [h.make_opsetid("", 17)])
    model = _model([h.make_node("Bad", ["x"], ["y"], domain="local", name="call")], [_x()],
                   [_y(shape=("batch", "seq", 4))], functions=[fn])
    model.opset_import.append(h.make_opsetid("local", 1))
    assert any(f.code == "unsupported-op" and f.node == "call/inner" for f in check_model(model, axes=AXES))


def test_check_bundle(tmp_path):
    bundle = _write_bundle(tmp_path / "b", {"good": _supported_model(), "qdq": _qdq_model(zero=3)}, precision="int8")
    report = check_bundle(bundle)
    assert not report.ok and report.graphs == ["good", "qdq"]
    assert {(f.graph, f.code) for f in report.findings} == {("good", "qdq-missing"), ("qdq", "qdq-zero-point")}
    assert "2 error(s), 1 warning(s) in 2 graph(s)" in report.format()
    assert json.loads(json.dumps(report.to_dict()))["ok"] is False
    (bundle / "good.onnx").unlink()
    assert "missing-file" in _codes(check_bundle(bundle).findings)


def test_fixed_dimension_under_a_varying_axis_is_an_error():
    """A dimension the ONNX file fixes cannot take the range of the axis the manifest names there: TensorRT's
    builder refuses such a profile, so the export must say so."""
    fixed = _supported_model(x_shape=("batch", 8, 4))
    findings = check_model(fixed, axes=AXES, inputs={"x": ("batch", "seq", 4)})
    assert [(f.severity, f.code) for f in findings] == [("error", "fixed-dim")]
    assert "fixed to 8" in findings[0].message and "'seq' ranges 1..16" in findings[0].message
    assert check_model(fixed, axes={**AXES, "seq": (8, 8, 8)}, inputs={"x": ("batch", "seq", 4)}) == []
