"""TensorRT: readiness check (runs everywhere), engine-build planning, and the native backend (TensorRT + GPU).

The first half needs only numpy and onnx. The tests marked `tensorrt` build engines for an exported tiny bundle and
compare the native backend with ONNX Runtime; they skip with "TensorRT not installed" / "no CUDA GPU" elsewhere.
"""
from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto as T  # noqa: E402
from onnx import helper as h  # noqa: E402
from onnx import numpy_helper as nh  # noqa: E402

from mirasol.runtime import tensorrt_build as tb  # noqa: E402
from mirasol.runtime.backends import tensorrt as trt_backend  # noqa: E402
from mirasol.runtime.backends.base import TensorInfo  # noqa: E402
from mirasol.runtime.bundle import sha256_file  # noqa: E402
from mirasol.runtime.errors import BundleError, InputError  # noqa: E402
from mirasol.runtime.manifest import AxisRange, GraphEntry, Manifest, StepSpec  # noqa: E402
from mirasol.runtime.tensorrt_readiness import check_bundle, check_model  # noqa: E402

AXES = {"batch": (1, 1, 4), "seq": (1, 8, 16)}


# ---------------------------------------------------------------------------------------------------------------
# Hand-made ONNX models
# ---------------------------------------------------------------------------------------------------------------

def _model(nodes, inputs, outputs, inits=(), opset=17, functions=()):
    graph = h.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    return h.make_model(graph, opset_imports=[h.make_opsetid("", opset)], functions=list(functions))


def _x(dtype=T.FLOAT, shape=("batch", "seq", 4), name="x"):
    return h.make_tensor_value_info(name, dtype, list(shape))


def _y(dtype=T.FLOAT, shape=("batch", "seq", 3), name="y"):
    return h.make_tensor_value_info(name, dtype, list(shape))


def _w(name="w", shape=(4, 3)):
    return nh.from_array(np.random.default_rng(0).standard_normal(shape).astype(np.float32), name)


def _supported_model():
    """LayerNorm -> MatMul -> Add -> Softmax, like our transformer blocks."""
    scale = nh.from_array(np.ones(4, np.float32), "ln_scale")
    bias = nh.from_array(np.zeros(3, np.float32), "b")
    axes = nh.from_array(np.array([-1], np.int64), "axes")
    nodes = [h.make_node("LayerNormalization", ["x", "ln_scale"], ["n"], axis=-1),
             h.make_node("MatMul", ["n", "w"], ["m"]), h.make_node("Add", ["m", "b"], ["a"]),
             h.make_node("ReduceMean", ["a", "axes"], ["mean"], keepdims=1), h.make_node("Sub", ["a", "mean"], ["c"]),
             h.make_node("Softmax", ["c"], ["y"], axis=-1)]
    return _model(nodes, [_x()], [_y()], [scale, _w(), bias, axes], opset=18)


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


def _write_bundle(directory: Path, models: dict, precision="fp32", axes=None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    axes = axes or {"batch": AxisRange(1, 1, 4), "seq": AxisRange(1, 8, 16)}
    graphs, feeds = {}, []
    for name, model in models.items():
        path = directory / f"{name}.onnx"
        onnx.save(model, str(path))

        def info(v):
            dims = tuple(d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim)
            return TensorInfo(v.name, onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name, dims)
        graphs[name] = GraphEntry(name, path.name, hashlib.sha256(path.read_bytes()).hexdigest(),
                                  tuple(info(v) for v in model.graph.input), tuple(info(v) for v in model.graph.output),
                                  dict(axes))
        feeds += [v.name for v in model.graph.input]
    manifest = Manifest(config={}, precision=precision, graphs=graphs,
                        steps={"push": StepSpec(tuple(models), tuple(dict.fromkeys(feeds))), "ask": StepSpec(()),
                               "generate": StepSpec(())}, state=(), counters=(), tokenizer={})
    manifest.check()
    manifest.write(directory)
    return directory


def test_check_bundle(tmp_path):
    bundle = _write_bundle(tmp_path / "b", {"good": _supported_model(), "qdq": _qdq_model(zero=3)}, precision="int8")
    report = check_bundle(bundle)
    assert not report.ok and report.graphs == ["good", "qdq"]
    assert {(f.graph, f.code) for f in report.findings} == {("good", "qdq-missing"), ("qdq", "qdq-zero-point")}
    assert "2 error(s), 1 warning(s) in 2 graph(s)" in report.format()
    assert json.loads(json.dumps(report.to_dict()))["ok"] is False
    (bundle / "good.onnx").unlink()
    assert "missing-file" in _codes(check_bundle(bundle).findings)


# ---------------------------------------------------------------------------------------------------------------
# Engine-build planning (CI)
# ---------------------------------------------------------------------------------------------------------------

def _entry(axes=None):
    return GraphEntry("dec", "dec.onnx", "0" * 64,
                      (TensorInfo("input_ids", "int64", ("batch", "text_len")),
                       TensorInfo("past_key_0", "float32", ("batch", 2, "past_text", 8))),
                      (TensorInfo("logits", "float32", ("batch", "text_len", 259)),),
                      axes or {"batch": AxisRange(1, 1, 4), "text_len": AxisRange(1, 1, 32),
                               "past_text": AxisRange(0, 64, 256), "unused": AxisRange(1, 1, 1)})


def test_profile_from_manifest_axes_and_overrides():
    entry = _entry()
    assert tb.profile_axes(entry) == {"batch": AxisRange(1, 1, 4), "text_len": AxisRange(1, 1, 32),
                                      "past_text": AxisRange(0, 64, 256)}
    axes = tb.profile_axes(entry, {"batch": 1, "past_text": 32})
    assert axes["batch"] == AxisRange(1, 1, 1) and axes["past_text"] == AxisRange(0, 32, 32)
    shapes = tb.input_shapes(entry, axes)
    assert shapes["past_key_0"] == {"min": [1, 2, 0, 8], "opt": [1, 2, 32, 8], "max": [1, 2, 32, 8]}
    assert shapes["input_ids"] == {"min": [1, 1], "opt": [1, 1], "max": [1, 32]}
    with pytest.raises(BundleError, match="above the bundle's maximum"):
        tb.profile_axes(entry, {"batch": 8})
    with pytest.raises(BundleError, match="below the axis minimum"):
        tb.profile_axes(_entry({**_entry().axes, "batch": AxisRange(2, 2, 4)}), {"batch": 1})
    with pytest.raises(BundleError, match="no range"):
        tb.profile_axes(_entry({"batch": AxisRange(1, 1, 4)}))


def test_unknown_override_axis_is_refused(tmp_path):
    bundle = _write_bundle(tmp_path / "b", {"good": _supported_model()})
    manifest = Manifest.read(bundle)
    tb.check_axis_overrides(manifest, {"batch": 1, "seq": 4})
    with pytest.raises(BundleError, match="unknown axis 'past'"):
        tb.check_axis_overrides(manifest, {"past": 4})
    assert tb.main([str(bundle), "--max", "batch"]) == 1  # malformed AXIS=N, refused before TensorRT is needed
    assert tb.main(["--help"]) == 0


def test_build_plan_per_precision():
    assert tb.plan_build("fp32", "fp32") == tb.BuildPlan("fp32", False, (), ("TF32",))
    assert tb.plan_build("fp32", "fp32", tf32=True).clear_flags == ()
    assert tb.plan_build("fp16", "fp32") == tb.BuildPlan("fp16", False, ("FP16",), ("TF32",))
    assert tb.plan_build("fp16", "fp16").strongly_typed
    assert tb.plan_build("int8", "int8").set_flags == ("INT8", "FP16")
    assert tb.plan_build("int8", "int8", int8_fp16=False).set_flags == ("INT8",)
    assert tb.plan_build("int8", "int8", typing="strong") == tb.BuildPlan("int8", True, (), ("TF32",))
    assert tb.plan_build("int8", "int8", has_precision_flags=False).strongly_typed  # TensorRT 11
    with pytest.raises(BundleError, match="from a fp32 bundle"):
        tb.plan_build("int8", "fp32")
    with pytest.raises(BundleError, match="export an fp16 bundle"):
        tb.plan_build("fp16", "fp32", typing="strong")
    with pytest.raises(BundleError, match="TensorRT 11"):
        tb.plan_build("fp32", "fp32", typing="weak", has_precision_flags=False)


def test_engine_names_commands_and_mismatch():
    assert tb.engine_file_name("text_decoder", "fp16") == "text_decoder.fp16.engine"
    with pytest.raises(BundleError):
        tb.engine_file_name("../x", "fp16")
    args = tb.build_args("fp16", {"batch": 1, "past_av": 64})
    assert args == ["--precision", "fp16", "--max", "batch=1", "--max", "past_av=64"]
    assert tb.rebuild_command("my bundle", args=args) == \
        "mirasol-build-engines 'my bundle' --precision fp16 --max batch=1 --max past_av=64"
    record = {"tensorrt": "10.3.0", "gpu": "Orin", "compute_capability": "8.7"}
    assert tb.engine_mismatch(record, {"name": "Orin", "compute_capability": "8.7"}, "10.3.0") is None
    why = tb.engine_mismatch(record, {"name": "NVIDIA H100", "compute_capability": "9.0"}, "10.7.0")
    assert "TensorRT 10.3.0" in why and "compute capability 8.7" in why and "'Orin'" in why


def test_engine_record_rewrites_manifest_atomically(tmp_path):
    bundle = _write_bundle(tmp_path / "b", {"good": _supported_model()})
    before = set(p.name for p in bundle.iterdir())
    tb.record_engine(bundle, "good", {"file": "good.fp32.engine", "profile": {"batch": {"min": 1, "opt": 1, "max": 1}}})
    assert Manifest.read(bundle).graphs["good"].engine["file"] == "good.fp32.engine"
    assert set(p.name for p in bundle.iterdir()) == before  # no temporary file left behind
    with pytest.raises(BundleError):
        tb.record_engine(bundle, "nope", {})


# ---------------------------------------------------------------------------------------------------------------
# Native backend without TensorRT (CI)
# ---------------------------------------------------------------------------------------------------------------

def test_backend_imports_without_tensorrt_and_refuses_clearly(tmp_path, monkeypatch):
    ok, why = trt_backend.is_available()
    assert isinstance(ok, bool) and why
    bundle = _write_bundle(tmp_path / "b", {"good": _supported_model()})
    entry = Manifest.read(bundle).graphs["good"]
    backend = trt_backend.TensorRTBackend()
    with pytest.raises(BundleError, match=r"mirasol-build-engines .*b --precision fp32"):
        backend.load("good", str(bundle / "good.onnx"), entry.inputs, entry.outputs)
    tb.record_engine(bundle, "good", {"file": "good.fp16.engine", "build_args": ["--precision", "fp16", "--max",
                                                                                "batch=1"]})
    backend = trt_backend.TensorRTBackend(bundle)
    with pytest.raises(BundleError, match=r"missing; build it on this device with: mirasol-build-engines \S+ "
                                          r"--precision fp16 --max batch=1"):
        backend.load("good", str(bundle / "good.onnx"), entry.inputs, entry.outputs)


def test_device_array_metadata():
    array = trt_backend.DeviceArray((2, 3, 0, 4), np.float16, 0x1000)
    assert (array.ndim, array.size, array.nbytes, len(array)) == (4, 0, 0, 2)
    assert "float16" in repr(array)
    with pytest.raises(InputError):
        trt_backend.DeviceArray((2, -1), np.float32, 0)


# ---------------------------------------------------------------------------------------------------------------
# With TensorRT and a GPU
# ---------------------------------------------------------------------------------------------------------------

def _trt_skip_reason() -> str | None:
    try:
        import tensorrt  # noqa: F401, PLC0415
    except ImportError:
        return "TensorRT not installed"
    ok, why = trt_backend.is_available()
    return None if ok else f"no CUDA GPU ({why})"


_REASON = _trt_skip_reason()
TOLERANCE = {"fp32": 1e-3, "fp16": 5e-2}


def trt_only(test):
    """Marks a test `tensorrt` + `gpu` and skips it, with the reason, where TensorRT or the GPU is missing."""
    for mark in (pytest.mark.tensorrt, pytest.mark.gpu,
                 pytest.mark.skipif(_REASON is not None, reason=_REASON or "")):
        test = mark(test)
    return test


def _export(tmp_path_factory, precision: str):
    """An exported tiny bundle (the tests' model from conftest) and its model config."""
    bundle_module = pytest.importorskip("mirasol.export.bundle")
    from .conftest import make_model  # noqa: PLC0415

    model = make_model("ttm")
    out = tmp_path_factory.mktemp(f"tiny-{precision}") / "bundle"
    try:
        bundle_module.export_bundle(model, out, precision=precision)
    except Exception as unavailable:  # noqa: BLE001 - e.g. int8 export needs calibration data
        if precision == "int8":
            pytest.skip(f"no int8 tiny bundle: {unavailable}")
        raise
    return out, model.config


@pytest.fixture(scope="module", params=[("fp32", "fp32"), ("fp16", "fp16"), ("fp32", "fp16"), ("int8", "int8")],
                ids=lambda p: f"{p[0]}-bundle-{p[1]}-engines")
def built(request, tmp_path_factory):
    if _REASON is not None:
        pytest.skip(_REASON)
    bundle_precision, engine_precision = request.param
    bundle, config = _export(tmp_path_factory, bundle_precision)
    lines: list[str] = []
    records = tb.build_engines(bundle, precision=engine_precision, workspace_mb=512, progress=lines.append)
    return bundle, engine_precision, records, lines, config


def _feeds(entry: GraphEntry, axes: dict, which: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
    feeds = {}
    for t in entry.inputs:
        shape = [d if isinstance(d, int) else getattr(axes[d], which) for d in t.shape]
        dtype = np.dtype(t.dtype)
        if dtype.kind == "f":
            feeds[t.name] = (rng.standard_normal(shape) * 0.5).astype(dtype)
        elif t.name == "input_ids":
            feeds[t.name] = rng.integers(0, 256, shape).astype(dtype)
        else:
            feeds[t.name] = np.zeros(shape, dtype)
    return feeds


def _ort(bundle: Path, entry: GraphEntry):
    ort = pytest.importorskip("onnxruntime")
    try:
        return ort.InferenceSession(str(bundle / entry.file), providers=["CPUExecutionProvider"])
    except Exception as unsupported:  # noqa: BLE001 - e.g. fp16 kernels missing on CPU
        pytest.skip(f"ONNX Runtime CPU cannot run {entry.file}: {unsupported}")


def _close(got, want, precision: str, what: str) -> None:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    if precision == "int8":  # int8 engines vs ONNX Runtime running the Q/DQ graph in fp32: a coarse bound
        bound = 0.1 * max(1.0, float(np.abs(want).max(initial=0.0)))
        excess = float(np.abs(got - want).max(initial=0.0)) - bound
    else:
        tol = TOLERANCE[precision]
        excess = float((np.abs(got - want) - (tol + tol * np.abs(want))).max(initial=-1.0))
    assert excess <= 0, f"{what}: max abs error {float(np.abs(got - want).max(initial=0.0)):.3g} is over tolerance"


@trt_only
def test_engines_built_and_recorded(built):
    bundle, precision, records, lines, _ = built
    manifest = Manifest.read(bundle)
    assert set(records) == set(manifest.graphs)
    for name, entry in manifest.graphs.items():
        record = entry.engine
        assert record["file"] == f"{name}.{precision}.engine" and (bundle / record["file"]).is_file()
        assert record["sha256"] == sha256_file(bundle / record["file"])
        assert record["gpu"] and record["compute_capability"] and record["tensorrt"]
        assert set(record["profile"]) <= set(entry.axes)
    assert (bundle / tb.TIMING_CACHE_FILE).stat().st_size > 0
    assert any("building" in line for line in lines)
    again: list[str] = []
    assert tb.build_engines(bundle, precision=precision, progress=again.append) == records
    assert all("up to date" in line for line in again[1:])


def _sessions(bundle: Path, **options):
    manifest = Manifest.read(bundle)
    backend = trt_backend.TensorRTBackend(bundle, **options)
    return manifest, {name: backend.load(name, str(bundle / e.file), e.inputs, e.outputs)
                      for name, e in manifest.graphs.items()}


@trt_only
@pytest.mark.parametrize("which", ["min", "opt"])
def test_native_backend_equals_onnxruntime(built, which):
    bundle, precision, _, _, _ = built
    manifest, sessions = _sessions(bundle)
    rng = np.random.default_rng(0)
    for name, entry in manifest.graphs.items():
        axes = {a: AxisRange(**r) for a, r in entry.engine["profile"].items()}
        feeds = _feeds(entry, axes, which, rng)
        want = dict(zip([o.name for o in _ort(bundle, entry).get_outputs()],
                        _ort(bundle, entry).run(None, feeds)))
        got = sessions[name].run(feeds)
        for out in entry.outputs:
            _close(got[out.name], want[out.name], precision, f"{name}.{out.name} at {which} shapes")
        first = entry.outputs[0].name
        assert list(sessions[name].run(feeds, [first])) == [first]


@trt_only
def test_device_arrays_and_threads(built):
    bundle, precision, _, _, _ = built
    manifest, sessions = _sessions(bundle, max_contexts=2)
    rng = np.random.default_rng(1)
    for name, entry in manifest.graphs.items():
        axes = {a: AxisRange(**r) for a, r in entry.engine["profile"].items()}
        feeds = _feeds(entry, axes, "opt", rng)
        session = sessions[name]
        host = session.run(feeds)
        names = [o.name for o in entry.outputs]
        kept = session.run(feeds, keep_on_device=names)
        for out in names:
            assert isinstance(kept[out], trt_backend.DeviceArray)
            np.testing.assert_array_equal(kept[out].numpy(), host[out])
        on_device = {k: trt_backend.DeviceArray.from_numpy(v) for k, v in feeds.items()}
        again = session.run(on_device)
        for out in names:
            np.testing.assert_array_equal(again[out], host[out])
        # concurrent calls give the sequential results
        inputs = [_feeds(entry, axes, "opt", np.random.default_rng(10 + i)) for i in range(6)]
        expected = [session.run(f) for f in inputs]
        results: list = [None] * len(inputs)
        _run_threads(session, inputs, results)
        for got, want in zip(results, expected):
            for out in names:
                np.testing.assert_array_equal(got[out], want[out])
    a = trt_backend.DeviceArray.from_numpy(np.arange(2 * 3 * 5 * 2, dtype=np.float32).reshape(2, 3, 5, 2))
    b = trt_backend.DeviceArray.from_numpy(np.ones((2, 3, 1, 2), np.float32))
    np.testing.assert_array_equal(a.slice(2, -3).numpy(), a.numpy()[:, :, -3:])
    np.testing.assert_array_equal(trt_backend.DeviceArray.concatenate([a, b], axis=2).numpy(),
                                  np.concatenate([a.numpy(), b.numpy()], axis=2))
    np.testing.assert_array_equal(trt_backend.DeviceArray.zeros((3, 0), np.int64).numpy(), np.zeros((3, 0), np.int64))


def _run_threads(session, inputs, results) -> None:
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, session.run(inputs[i])))
               for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


@trt_only
def test_refusals(built, tmp_path):
    import shutil  # noqa: PLC0415

    bundle, precision, _, _, _ = built
    copy = Path(shutil.copytree(bundle, tmp_path / "copy"))
    manifest = Manifest.read(copy)
    name, entry = next(iter(manifest.graphs.items()))
    sessions = _sessions(copy)[1]
    axes = {a: AxisRange(**r) for a, r in entry.engine["profile"].items()}
    too_big = {a: AxisRange(r.min, r.opt, r.max + 1) for a, r in axes.items()}
    if axes:
        with pytest.raises(InputError, match="optimization profile"):
            sessions[name].run(_feeds(entry, too_big, "max", np.random.default_rng(2)))
    tb.record_engine(copy, name, {**entry.engine, "tensorrt": "9.9.9"})
    with pytest.raises(BundleError, match=rf"TensorRT 9\.9\.9.*mirasol-build-engines .*--precision {precision}"):
        trt_backend.TensorRTBackend(copy).load(name, str(copy / entry.file), entry.inputs, entry.outputs)
    (copy / entry.engine["file"]).unlink()
    with pytest.raises(BundleError, match="missing; build it on this device with: mirasol-build-engines"):
        trt_backend.TensorRTBackend(copy).load(name, str(copy / entry.file), entry.inputs, entry.outputs)


@trt_only
def test_profile_maximum_override(built, tmp_path):
    import shutil  # noqa: PLC0415

    bundle, precision, _, _, _ = built
    copy = Path(shutil.copytree(bundle, tmp_path / "copy"))
    manifest = Manifest.read(copy)
    name, entry = next((n, e) for n, e in manifest.graphs.items() if "batch" in tb.profile_axes(e))
    if entry.axes["batch"].max < 2:
        pytest.skip("the tiny bundle's batch axis has max 1")
    records = tb.build_engines(copy, precision=precision, graphs=[name], axis_max={"batch": 1}, force=True)
    assert records[name]["profile"]["batch"]["max"] == 1 and "batch=1" in records[name]["build_args"]
    session = _sessions(copy)[1][name]
    axes = {a: AxisRange(**r) for a, r in entry.engine["profile"].items()}
    axes["batch"] = AxisRange(2, 2, 2)
    with pytest.raises(InputError, match="--max batch=N"):
        session.run(_feeds(entry, axes, "opt", np.random.default_rng(3)))


@trt_only
def test_streaming_equals_batch_on_engines(built):
    """The TensorRT pipeline streams like the ONNX Runtime one, whose equality with the PyTorch whole-clip forward
    the export tests check: per-chunk av_context within tolerance for chunks past the KV window, and the same
    greedy answer in fp32."""
    from mirasol.runtime.pipeline import Pipeline  # noqa: PLC0415

    from .conftest import random_clip  # noqa: PLC0415

    bundle, precision, _, _, config = built
    if precision == "int8":
        pytest.skip("int8 engines are compared graph by graph only")
    tolerance = "fp16" if precision == "fp16" else "fp32"
    reference = Pipeline.load(bundle, backend="onnxruntime")
    engines = Pipeline.load(bundle, backend="tensorrt")
    chunks = config.av_window_chunks + 3  # past the AV KV window
    video, audio = (x[0] for x in random_clip(config, chunks, seed=5))  # one clip, no batch axis
    ref_stream, trt_stream = reference.stream(), engines.stream()
    for i, (v, a) in enumerate(reference.split_clip(video, audio)):
        _close(trt_stream.push(v, a), ref_stream.push(v, a), tolerance, f"av_context of chunk {i}")
    if precision == "fp32":
        question = "What is the man holding?"
        assert trt_stream.ask(question, max_new_tokens=8) == ref_stream.ask(question, max_new_tokens=8)
        assert engines.answer(video, audio, question, max_new_tokens=8) == \
            reference.answer(video, audio, question, max_new_tokens=8)


# ---------------------------------------------------------------------------------------------------------------
# Plumbing with a fake TensorRT and a fake CUDA runtime (CI). They run the ONNX graph with ONNX Runtime and use
# host memory as "device" memory: this exercises build_engines, the manifest records, loading, the slot pool,
# buffers, DeviceArrays and copies -- not TensorRT itself (that is what the `tensorrt` tests above are for).
# ---------------------------------------------------------------------------------------------------------------

def _fake_cuda_modules():
    import ctypes  # noqa: PLC0415
    import enum  # noqa: PLC0415
    import types  # noqa: PLC0415

    runtime = types.ModuleType("cuda.bindings.runtime")
    blocks: dict[int, object] = {}

    class cudaError_t(enum.IntEnum):  # noqa: N801
        cudaSuccess = 0
        cudaErrorInvalidValue = 1

    class cudaMemcpyKind(enum.IntEnum):  # noqa: N801
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2
        cudaMemcpyDeviceToDevice = 3

    class cudaDeviceAttr(enum.IntEnum):  # noqa: N801
        cudaDevAttrMemoryPoolsSupported = 115

    class cudaStream_t:  # noqa: N801
        count = 0

        def __init__(self):
            cudaStream_t.count += 1
            self.handle = 0x5000 + cudaStream_t.count

        def __int__(self):
            return self.handle

    def malloc(n, stream=None):
        buf = ctypes.create_string_buffer(int(n))
        blocks[ctypes.addressof(buf)] = buf
        return cudaError_t.cudaSuccess, ctypes.addressof(buf)

    def free(ptr, stream=None):
        blocks.pop(int(ptr), None)
        return (cudaError_t.cudaSuccess,)

    def memcpy(dst, src, n, kind, stream):
        ctypes.memmove(int(dst), int(src), int(n))
        return (cudaError_t.cudaSuccess,)

    def memcpy2d(dst, dpitch, src, spitch, width, height, kind, stream):
        for row in range(int(height)):
            ctypes.memmove(int(dst) + row * int(dpitch), int(src) + row * int(spitch), int(width))
        return (cudaError_t.cudaSuccess,)

    def memset(ptr, value, n, stream):
        ctypes.memset(int(ptr), int(value), int(n))
        return (cudaError_t.cudaSuccess,)

    ok = lambda *a: (cudaError_t.cudaSuccess,)  # noqa: E731
    runtime.__dict__.update(
        cudaError_t=cudaError_t, cudaMemcpyKind=cudaMemcpyKind, cudaDeviceAttr=cudaDeviceAttr,
        cudaMalloc=malloc, cudaMallocAsync=malloc, cudaFree=free, cudaFreeAsync=free, cudaMemcpyAsync=memcpy,
        cudaMemcpy2DAsync=memcpy2d, cudaMemsetAsync=memset, cudaStreamCreate=lambda: (cudaError_t.cudaSuccess,
                                                                                        cudaStream_t()),
        cudaStreamSynchronize=ok, cudaStreamDestroy=ok, cudaSetDevice=ok,
        cudaGetDeviceCount=lambda: (cudaError_t.cudaSuccess, 1),
        cudaDeviceGetAttribute=lambda attr, dev: (cudaError_t.cudaSuccess, 1), blocks=blocks)
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime = runtime
    cuda = types.ModuleType("cuda")
    cuda.bindings = bindings
    return {"cuda": cuda, "cuda.bindings": bindings, "cuda.bindings.runtime": runtime}


def _fake_tensorrt_module():
    import ctypes  # noqa: PLC0415
    import enum  # noqa: PLC0415
    import types  # noqa: PLC0415

    import onnxruntime as ort  # noqa: PLC0415

    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.3.0"

    class Logger:
        WARNING, VERBOSE = 2, 4

        def __init__(self, level):
            self.level = level

    class BuilderFlag(enum.IntEnum):
        FP16, INT8, TF32 = 0, 1, 2

    class NetworkDefinitionCreationFlag(enum.IntEnum):
        STRONGLY_TYPED = 0

    class MemoryPoolType(enum.IntEnum):
        WORKSPACE = 0

    class TensorIOMode(enum.IntEnum):
        INPUT, OUTPUT = 1, 2

    class IProgressMonitor:
        def __init__(self):
            pass

    class _Tensor:
        def __init__(self, name):
            self.name, self.is_shape_tensor = name, False

    class Network:
        def __init__(self, flags):
            self.flags, self.inputs, self.outputs, self.path = flags, [], [], None

        num_inputs = property(lambda self: len(self.inputs))
        num_outputs = property(lambda self: len(self.outputs))
        get_input = lambda self, i: self.inputs[i]  # noqa: E731
        get_output = lambda self, i: self.outputs[i]  # noqa: E731

    class OnnxParser:
        def __init__(self, network, logger):
            self.network, self.num_errors = network, 0

        def parse_from_file(self, path):
            model = onnx.load(path)
            inits = {i.name for i in model.graph.initializer}
            self.network.inputs = [_Tensor(v.name) for v in model.graph.input if v.name not in inits]
            self.network.outputs = [_Tensor(v.name) for v in model.graph.output]
            self.network.path = path
            return True

    class TimingCache:
        def __init__(self, data):
            self.data = bytes(data) or b"fake-timing-cache"

        def serialize(self):
            return self.data

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, low, opt, high):
            self.shapes[name] = [list(low), list(opt), list(high)]

    class Config:
        def __init__(self):
            self.flags, self.profiles, self.cache, self.progress_monitor = set(), [], None, None
            self.builder_optimization_level = 3

        set_memory_pool_limit = lambda self, pool, size: None  # noqa: E731
        set_flag = lambda self, f: self.flags.add(f)  # noqa: E731
        clear_flag = lambda self, f: self.flags.discard(f)  # noqa: E731
        add_optimization_profile = lambda self, p: self.profiles.append(p) or 0  # noqa: E731
        create_timing_cache = lambda self, data: TimingCache(data)  # noqa: E731

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache
            return True

    class Builder:
        def __init__(self, logger):
            pass

        create_network = lambda self, flags: Network(flags)  # noqa: E731
        create_builder_config = lambda self: Config()  # noqa: E731
        create_optimization_profile = lambda self: Profile()  # noqa: E731

        def build_serialized_network(self, network, config):
            monitor = config.progress_monitor
            if monitor is not None:
                monitor.phase_start("Building engine", None, 4)
                for step in range(4):
                    assert monitor.step_complete("Building engine", step)
                monitor.phase_finish("Building engine")
            return json.dumps({"path": network.path, "inputs": [t.name for t in network.inputs],
                               "outputs": [t.name for t in network.outputs],
                               "profile": config.profiles[0].shapes, "flags": sorted(config.flags)}).encode()

    class Engine:
        def __init__(self, plan):
            self.plan = plan
            self.session = ort.InferenceSession(plan["path"], providers=["CPUExecutionProvider"])
            self.names = plan["inputs"] + plan["outputs"]
            self.types = {v.name: v.type for v in [*self.session.get_inputs(), *self.session.get_outputs()]}

        num_io_tensors = property(lambda self: len(self.names))
        get_tensor_name = lambda self, i: self.names[i]  # noqa: E731
        get_tensor_mode = lambda self, n: (TensorIOMode.INPUT if n in self.plan["inputs"]  # noqa: E731
                                           else TensorIOMode.OUTPUT)
        get_tensor_dtype = lambda self, n: self.types[n]  # noqa: E731
        get_tensor_profile_shape = lambda self, n, i: self.plan["profile"][n]  # noqa: E731
        is_shape_inference_io = lambda self, n: False  # noqa: E731
        create_execution_context = lambda self: Context(self)  # noqa: E731

    class Context:
        def __init__(self, engine):
            self.engine, self.shapes, self.addresses, self.cache = engine, {}, {}, {}

        def set_input_shape(self, name, shape):
            self.shapes[name] = tuple(shape)
            return True

        def _inputs(self, read):
            feeds = {}
            for v in self.engine.session.get_inputs():
                dtype = nptype(v.type)
                shape = self.shapes[v.name]
                if read:
                    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
                    raw = ctypes.string_at(self.addresses[v.name], n) if n else b""
                    feeds[v.name] = np.frombuffer(raw, dtype).reshape(shape).copy()
                else:
                    feeds[v.name] = np.zeros(shape, dtype)
            return feeds

        def get_tensor_shape(self, name):
            if name in self.shapes:
                return self.shapes[name]
            key = tuple(sorted(self.shapes.items()))
            if key not in self.cache:
                outs = self.engine.session.run(None, self._inputs(read=False))
                self.cache[key] = {o.name: a.shape for o, a in zip(self.engine.session.get_outputs(), outs)}
            return self.cache[key][name]

        def set_tensor_address(self, name, ptr):
            assert ptr, f"null address for {name}"
            self.addresses[name] = int(ptr)
            return True

        def execute_async_v3(self, stream):
            outs = self.engine.session.run(None, self._inputs(read=True))
            for o, a in zip(self.engine.session.get_outputs(), outs):
                a = np.ascontiguousarray(a)
                ctypes.memmove(self.addresses[o.name], a.ctypes.data, a.nbytes)
            return True

    class Runtime:
        def __init__(self, logger):
            pass

        deserialize_cuda_engine = lambda self, data: Engine(json.loads(bytes(data)))  # noqa: E731

    def nptype(ort_type):
        return {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
                "tensor(int32)": np.int32, "tensor(bool)": np.bool_}[ort_type]

    trt.__dict__.update(Logger=Logger, BuilderFlag=BuilderFlag,
                        NetworkDefinitionCreationFlag=NetworkDefinitionCreationFlag, MemoryPoolType=MemoryPoolType,
                        TensorIOMode=TensorIOMode, IProgressMonitor=IProgressMonitor,
                        OnnxParser=OnnxParser, Builder=Builder, Runtime=Runtime, nptype=nptype)
    return trt


@pytest.fixture
def fake_tensorrt(monkeypatch):
    import sys  # noqa: PLC0415

    pytest.importorskip("onnxruntime")
    for name, module in {**_fake_cuda_modules(), "tensorrt": _fake_tensorrt_module()}.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(trt_backend, "_cudart_module", None)
    monkeypatch.setattr(trt_backend, "_mempool", {})
    monkeypatch.setattr(trt_backend, "_local", threading.local())
    monkeypatch.setattr(tb, "_loggers", {})
    monkeypatch.setattr(tb, "gpu_info", lambda device=0: {"name": "Fake Orin", "compute_capability": "8.7"})
    return sys.modules["tensorrt"]


def _cache_model():
    """A decoder-like graph: present = concat(past, new) along axis 2, out = x @ w."""
    x = h.make_tensor_value_info("x", T.FLOAT, ["batch", "seq", 4])
    past = h.make_tensor_value_info("past_key_0", T.FLOAT, ["batch", 2, "past", 4])
    ids = h.make_tensor_value_info("position", T.INT64, ["batch"])
    out = h.make_tensor_value_info("y", T.FLOAT, ["batch", "seq", 3])
    present = h.make_tensor_value_info("present_key_0", T.FLOAT, ["batch", 2, "total", 4])
    shifted = h.make_tensor_value_info("next_position", T.INT64, ["batch"])
    nodes = [h.make_node("MatMul", ["x", "w"], ["y"]), h.make_node("Unsqueeze", ["x", "one"], ["x1"]),
             h.make_node("Concat", ["x1", "x1"], ["x2"], axis=1), h.make_node("Concat", ["past_key_0", "x2"],
                                                                               ["present_key_0"], axis=2),
             h.make_node("Add", ["position", "step"], ["next_position"])]
    inits = [_w(), nh.from_array(np.array([1], np.int64), "one"), nh.from_array(np.array(1, np.int64), "step")]
    return _model(nodes, [x, past, ids], [out, present, shifted], inits, opset=17)


def test_build_and_run_with_fake_tensorrt(fake_tensorrt, tmp_path):
    import onnxruntime as ort  # noqa: PLC0415

    axes = {"batch": AxisRange(1, 1, 4), "seq": AxisRange(1, 2, 8), "past": AxisRange(0, 4, 16)}
    bundle = _write_bundle(tmp_path / "b", {"dec": _cache_model()}, axes=axes)
    lines: list[str] = []
    records = tb.build_engines(bundle, axis_max={"past": 8}, progress=lines.append)
    record = records["dec"]
    assert record["file"] == "dec.fp32.engine" and record["profile"]["past"] == {"min": 0, "opt": 4, "max": 8}
    assert record["flags"] == [] and record["gpu"] == "Fake Orin" and record["tensorrt"] == "10.3.0"
    assert record["build_args"] == ["--precision", "fp32", "--max", "past=8"]
    assert Manifest.read(bundle).graphs["dec"].engine == record
    assert (bundle / "timing.cache").read_bytes() == b"fake-timing-cache"
    assert "[dec] Building engine (4 steps)" in lines and "[dec] Building engine: 1/4" in lines
    assert tb.build_engines(bundle, axis_max={"past": 8}, progress=lines.append) == records  # up to date
    assert "up to date" in lines[-1]
    assert tb.build_engines(bundle, precision="fp16", graphs=["dec"])["dec"]["flags"] == ["FP16"]
    tb.build_engines(bundle, axis_max={"past": 8}, force=True)

    entry = Manifest.read(bundle).graphs["dec"]
    session = trt_backend.TensorRTBackend(bundle, max_contexts=2).load("dec", str(bundle / "dec.onnx"), entry.inputs,
                                                                      entry.outputs)
    reference = ort.InferenceSession(str(bundle / "dec.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)

    def feeds(past_len, seq=2):
        return {"x": rng.standard_normal((1, seq, 4)).astype(np.float32),
                "past_key_0": rng.standard_normal((1, 2, past_len, 4)).astype(np.float32),
                "position": np.array([past_len], np.int64)}

    for past_len in (0, 3, 6):  # includes the empty cache; buffers grow
        f = feeds(past_len)
        got, want = session.run(f), dict(zip(["y", "present_key_0", "next_position"], reference.run(None, f)))
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    assert list(session.run(feeds(1), ["y"])) == ["y"]
    # carried state stays on the "device": outputs kept, fed back without copies, windowed on the device
    f = feeds(2)
    kept = session.run(f, keep_on_device=["present_key_0"])
    assert isinstance(kept["present_key_0"], trt_backend.DeviceArray) and isinstance(kept["y"], np.ndarray)
    np.testing.assert_array_equal(kept["present_key_0"].numpy(), np.concatenate([f["past_key_0"], np.stack(
        [f["x"], f["x"]], axis=1)], axis=2))
    window = kept["present_key_0"].slice(2, -3)
    step = session.run({"x": f["x"], "past_key_0": window, "position": f["position"]})
    np.testing.assert_array_equal(step["present_key_0"][:, :, :3], window.numpy())
    joined = trt_backend.DeviceArray.concatenate([window, window], axis=2)
    np.testing.assert_array_equal(joined.numpy(), np.concatenate([window.numpy()] * 2, axis=2))
    np.testing.assert_array_equal(np.asarray(trt_backend.DeviceArray.zeros((2, 3), np.float32)), np.zeros((2, 3)))
    # bounds of the engine's profile, dtype conversion, wrong names
    with pytest.raises(InputError, match=r"size 9 along axis 'past'.*accepts 0\.\.8.*--max past=N"):
        session.run(feeds(9))
    converted = session.run({**feeds(1), "position": np.array([1], np.int32)})
    assert converted["next_position"].dtype == np.int64
    with pytest.raises(InputError, match="missing input"):
        session.run({"x": f["x"]})
    with pytest.raises(InputError, match="no output"):
        session.run(f, ["nope"])
    with pytest.raises(InputError, match="dtype"):
        session.run({**f, "x": f["x"].astype(np.int64)})
    # many threads share the session; two execution contexts at most
    inputs = [feeds(i % 5) for i in range(12)]
    expected = [reference.run(None, x) for x in inputs]
    results: list = [None] * len(inputs)
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, session.run(inputs[i])))
               for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, expected):
        np.testing.assert_array_equal(got["present_key_0"], want[1])
    assert len(session._slots) <= 2
    session.close()
    # refusals with the command that rebuilds
    tb.record_engine(bundle, "dec", {**entry.engine, "compute_capability": "7.2", "gpu": "Xavier"})
    with pytest.raises(BundleError, match=r"compute capability 7\.2.*Rebuild it here with: mirasol-build-engines "
                                          r"\S+ --precision fp32 --max past=8"):
        trt_backend.TensorRTBackend(bundle).load("dec", str(bundle / "dec.onnx"), entry.inputs, entry.outputs)
    tb.record_engine(bundle, "dec", {**entry.engine, "onnx_sha256": "f" * 64})
    with pytest.raises(BundleError, match="another version"):
        trt_backend.TensorRTBackend(bundle).load("dec", str(bundle / "dec.onnx"), entry.inputs, entry.outputs)


def test_cli_with_fake_tensorrt(fake_tensorrt, tmp_path, capsys):
    bundle = _write_bundle(tmp_path / "b", {"good": _supported_model()})
    assert tb.main([str(bundle), "--max-batch", "1", "--max", "seq=4", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "good: good.fp32.engine (fp32, TensorRT 10.3.0, Fake Orin, sm 8.7)" in out
    engine = Manifest.read(bundle).graphs["good"].engine
    assert engine["profile"] == {"batch": {"min": 1, "opt": 1, "max": 1}, "seq": {"min": 1, "opt": 4, "max": 4}}
    assert tb.main([str(bundle), "--max", "batch=9"]) == 1
    assert "above the bundle's maximum" in capsys.readouterr().err
