"""TensorRT engine builds: planning (pure), the builder on a strict fake TensorRT, and the fakes' names.

- Planning (profiles, typing, flags, records) runs anywhere.
- The fakes (tests/fake_tensorrt.py, tests/fake_cuda.py) define only names the real bindings have: the tests below
  compare them with the name tables extracted from the tensorrt-cu12-bindings 10.3 / 11.x and cuda-bindings wheels
  (tests/tensorrt_api/), and re-extract the tables when the wheels can be downloaded.
- The builder runs on the fake: each builder fix of issue 18 has its test here.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

onnx = pytest.importorskip("onnx")

from mirasol.runtime.bundle.manifest import AxisRange, GraphEntry, Manifest  # noqa: E402
from mirasol.runtime.bundle.tensors import TensorInfo  # noqa: E402
from mirasol.runtime.errors import BackendError, BundleError  # noqa: E402
from mirasol.runtime.cli.build_engines import main as build_engines_main  # noqa: E402
from mirasol.runtime.tensorrt import build as tb  # noqa: E402
from mirasol.runtime.tensorrt import env as tensorrt_env  # noqa: E402
from mirasol.runtime.tensorrt import plan as tp  # noqa: E402

from . import (
    fake_cuda,
    fake_tensorrt,  # noqa: E402
)
from .fake_tensorrt import built_plan  # noqa: E402
from .onnx_graphs import supported_model, write_bundle  # noqa: E402
from .tensorrt_api import extract  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TRT_11 = fake_tensorrt.VERSIONS[1]


# ---------------------------------------------------------------------------------------------------------------
# Planning (no TensorRT)
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
    assert tp.profile_axes(entry) == {"batch": AxisRange(1, 1, 4), "text_len": AxisRange(1, 1, 32),
                                      "past_text": AxisRange(0, 64, 256)}
    axes = tp.profile_axes(entry, {"batch": 1, "past_text": 32})
    assert axes["batch"] == AxisRange(1, 1, 1) and axes["past_text"] == AxisRange(0, 32, 32)
    shapes = tp.input_shapes(entry, axes)
    assert shapes["past_key_0"] == {"min": [1, 2, 0, 8], "opt": [1, 2, 32, 8], "max": [1, 2, 32, 8]}
    assert shapes["input_ids"] == {"min": [1, 1], "opt": [1, 1], "max": [1, 32]}
    with pytest.raises(BundleError, match="above the bundle's maximum"):
        tp.profile_axes(entry, {"batch": 8})
    with pytest.raises(BundleError, match="below the axis minimum"):
        tp.profile_axes(_entry({**_entry().axes, "batch": AxisRange(2, 2, 4)}), {"batch": 1})
    with pytest.raises(BundleError, match="no range"):
        tp.profile_axes(_entry({"batch": AxisRange(1, 1, 4)}))


def test_fixed_network_dimensions_must_match_the_profile():
    entry = _entry()
    shape = tp.input_shapes(entry, tp.profile_axes(entry))["past_key_0"]
    tp.check_fixed_dims(entry, "past_key_0", (-1, 2, -1, 8), shape)
    with pytest.raises(BundleError, match=r"'dec': input 'past_key_0' dimension 2 is fixed to 64 .* axis "
                                          r"'past_text' spans 0\.\.256"):
        tp.check_fixed_dims(entry, "past_key_0", (-1, 2, 64, 8), shape)
    with pytest.raises(BundleError, match="rank 3 in the ONNX graph and 4 in the manifest"):
        tp.check_fixed_dims(entry, "past_key_0", (-1, 2, 8), shape)


def test_unknown_override_axis_is_refused(tmp_path):
    bundle = write_bundle(tmp_path / "b", {"good": supported_model()})
    manifest = Manifest.read(bundle)
    tp.check_axis_overrides(manifest, {"batch": 1, "seq": 4})
    with pytest.raises(BundleError, match="unknown axis 'past'"):
        tp.check_axis_overrides(manifest, {"past": 4})
    assert build_engines_main([str(bundle), "--max", "batch"]) == 2  # malformed AXIS=N: a usage error
    assert build_engines_main(["--help"]) == 0


def test_build_plan_per_precision():
    """Strongly typed by default, TF32 cleared unless asked for whatever the typing (issue 18, fix 1; issue 23)."""
    obey = ("OBEY_PRECISION_CONSTRAINTS",)
    for precision in ("fp32", "fp16", "int8"):
        assert tp.plan_build(precision, precision) == tp.BuildPlan(precision, True, (), ("TF32",))
    assert tp.plan_build("fp32", "fp32", tf32=True).clear_flags == ()
    assert tp.plan_build("fp32", "fp32", typing="weak") == tp.BuildPlan("fp32", False, (), ("TF32",))
    # weak typing only by name, pinning the rotary angles wherever fp16 is allowed
    assert tp.plan_build("fp16", "fp32", typing="weak") == \
        tp.BuildPlan("fp16", False, ("FP16", *obey), ("TF32",), ("rotary_angles",))
    assert tp.plan_build("int8", "int8", typing="weak") == \
        tp.BuildPlan("int8", False, ("INT8", "FP16", *obey), ("TF32",), ("rotary_angles",))
    assert tp.plan_build("int8", "int8", typing="weak", int8_fp16=False) == \
        tp.BuildPlan("int8", False, ("INT8",), ("TF32",))
    for precision in ("fp32", "int8"):  # TensorRT 11: always strongly typed, TF32 still cleared
        assert tp.plan_build(precision, precision, has_precision_flags=False) == \
            tp.BuildPlan(precision, True, (), ("TF32",))
    with pytest.raises(BundleError, match="from a fp32 bundle"):
        tp.plan_build("int8", "fp32")
    with pytest.raises(BundleError, match="TensorRT 11"):
        tp.plan_build("fp32", "fp32", typing="weak", has_precision_flags=False)


def test_advice_fits_the_installed_tensorrt():
    """fp16 engines from an fp32 bundle: refused by default, naming the fp16 export and --typing weak on TensorRT 10
    (which pins the rotary angles), only the export on 11 (issue 18, fix 3; issue 23)."""
    for typing in ("auto", "strong"):
        with pytest.raises(BundleError, match=r"mirasol-export --precision fp16\).*or build weakly typed with "
                                              r"--typing weak .*rotary-angle layers pinned to fp32") as on_10:
            tp.plan_build("fp16", "fp32", typing=typing)
    with pytest.raises(BundleError, match="export an fp16 bundle .*ModelOpt AutoCast") as on_11:
        tp.plan_build("fp16", "fp32", has_precision_flags=False)
    assert "--typing weak" not in str(on_11.value) and "AutoCast" not in str(on_10.value)


def test_int8_bundles_tensorrt_cannot_build_are_named_from_the_manifest(tmp_path):
    """The cpu int8 targets (uint8 activations with zero points) are refused from what the manifest records, with
    the export command that makes a bundle TensorRT builds; the tensorrt target passes (issue 23)."""
    from mirasol.calibration.int8_targets import INT8_TARGETS  # noqa: PLC0415

    bundle = write_bundle(tmp_path / "b", {"good": supported_model()})
    manifest = Manifest.read(bundle)
    assert tp.int8_problem(manifest, bundle) is None  # fp32: not int8
    manifest.precision = "int8"
    for target, recipe in INT8_TARGETS.items():
        manifest.quantization = {"recipe": recipe.settings(), "data": {"source": "clips/"}}
        problem = tp.int8_problem(manifest, bundle)
        if target == "tensorrt":
            assert problem is None
        else:
            assert f"its int8 target is '{target}'" in problem and "made for ONNX Runtime on the CPU" in problem
            assert problem.endswith(f"mirasol-export --checkpoint DIR --precision int8 --int8-target tensorrt "
                                    f"--calibration-data clips/ --out {bundle}-tensorrt")
    manifest.quantization = {}
    assert "does not say which int8 target" in tp.int8_problem(manifest, bundle)


def test_engine_names_commands_and_mismatch():
    assert tp.engine_file_name("text_decoder", "fp16") == "text_decoder.fp16.engine"
    with pytest.raises(BundleError):
        tp.engine_file_name("../x", "fp16")
    args = tp.build_args("fp16", {"batch": 1, "past_av": 64})
    assert args == ["--precision", "fp16", "--max", "batch=1", "--max", "past_av=64"]
    assert tp.build_args("fp32", tf32=True, workspace_mb=512, optimization_level=2) == \
        ["--precision", "fp32", "--workspace-mb", "512", "--tf32", "--opt-level", "2"]
    assert tensorrt_env.rebuild_command("my bundle", args=args) == \
        "mirasol-build-engines 'my bundle' --precision fp16 --max batch=1 --max past_av=64"
    record = {"tensorrt": "10.3.0", "gpu": "Orin", "compute_capability": "8.7"}
    assert tensorrt_env.engine_mismatch(record, {"name": "Orin", "compute_capability": "8.7"}, "10.3.0") is None
    why = tensorrt_env.engine_mismatch(record, {"name": "NVIDIA H100", "compute_capability": "9.0"}, "10.7.0")
    assert "TensorRT 10.3.0" in why and "compute capability 8.7" in why and "'Orin'" in why


def test_engine_record_rewrites_manifest_atomically(tmp_path):
    bundle = write_bundle(tmp_path / "b", {"good": supported_model()})
    before = set(p.name for p in bundle.iterdir())
    tp.record_engine(bundle, "good", {"file": "good.fp32.engine", "profile": {"batch": {"min": 1, "opt": 1, "max": 1}}})
    assert Manifest.read(bundle).graphs["good"].engine["file"] == "good.fp32.engine"
    assert set(p.name for p in bundle.iterdir()) == before  # no temporary file left behind
    with pytest.raises(BundleError):
        tp.record_engine(bundle, "nope", {})


# ---------------------------------------------------------------------------------------------------------------
# The fakes use the real bindings' names only
# ---------------------------------------------------------------------------------------------------------------

def _tensorrt_table() -> dict[str, dict[str, str]]:
    rows = extract.read_table(extract.TENSORRT_TABLE)
    versions = [column.removeprefix("tensorrt ") for column in rows.pop("name")]
    return {name: dict(zip(versions, row)) for name, row in rows.items()}


@pytest.mark.parametrize("version", fake_tensorrt.VERSIONS)
def test_fake_tensorrt_names_are_in_the_real_bindings(version):
    table = _tensorrt_table()
    names = fake_tensorrt.surface(fake_tensorrt.make_tensorrt(fake_cuda.Device(1 << 20), version))
    unlisted = sorted(names - set(table))
    assert not unlisted, (f"not in tests/tensorrt_api/tensorrt_names.tsv: {unlisted} "
                          f"(python -m tests.tensorrt_api.extract)")
    absent = sorted(n for n in names if table[n][version] == "absent")
    assert not absent, f"the fake TensorRT {version} defines names the real one lacks: {absent}"


def test_tensorrt_11_dropped_what_its_fake_drops():
    """The names only the TensorRT 10 fake has are not exact names of the TensorRT 11 bindings."""
    device = fake_cuda.Device(1 << 20)
    ten, eleven = (fake_tensorrt.surface(fake_tensorrt.make_tensorrt(device, v)) for v in fake_tensorrt.VERSIONS)
    table = _tensorrt_table()
    dropped = {name: table[name][TRT_11] for name in ten - eleven}
    assert dropped == {"BuilderFlag.FP16": "absent", "BuilderFlag.INT8": "tail",  # "INT8" is the tail of "UINT8"
                       "BuilderFlag.OBEY_PRECISION_CONSTRAINTS": "absent",
                       "NetworkDefinitionCreationFlag.EXPLICIT_BATCH": "absent", "ILayer.precision": "absent",
                       "ILayer.set_output_type": "absent"}
    assert table["BuilderFlag.FP16"][fake_tensorrt.VERSIONS[0]] == "exact"


@pytest.mark.parametrize("column", range(len(extract.CUDA_WHEELS)))
def test_fake_cudart_matches_cuda_bindings(column):
    """Parameter names, enum values and classes of the fake CUDA runtime are those of cuda-bindings 12.9 and of
    cuda-python 12.6.2.post1 (what a Jetson with JetPack 6 runs)."""
    table = extract.read_table(extract.CUDART_TABLE)
    assert table.pop("name")[column] == list(extract.CUDA_WHEELS)[column]
    assert extract.fake_cudart_table() == {name: row[column] for name, row in table.items()}


def _code_names(pattern: str, files: list[str]) -> set[str]:
    text = "\n".join((ROOT / f).read_text() for f in files)
    return {m.group(1) for m in re.finditer(pattern, text)}


def test_code_uses_only_names_the_fakes_define():
    """Module-level TensorRT and CUDA names the code reaches for (trt.X.Y, cudart().X) are in the fakes, which only
    have real names; the methods the code calls are exercised on the fakes by the tests below."""
    device = fake_cuda.Device(1 << 20)
    trt_names = fake_tensorrt.surface(fake_tensorrt.make_tensorrt(device))
    files = ["runtime/tensorrt/build.py", "runtime/tensorrt/backend.py", "runtime/tensorrt/env.py",
             "runtime/tensorrt/slots.py"]
    used = _code_names(r"\btrt\.([A-Za-z_]\w*(?:\.[A-Z_][A-Za-z_0-9]*)?)", files)
    used = {name for name in used if not name.startswith("IProgressMonitor.__")}
    assert used and used <= trt_names, sorted(used - trt_names)
    cuda_names = fake_tensorrt.surface(fake_cuda.make_cudart(device))
    files = ["runtime/tensorrt/cuda.py", "runtime/tensorrt/backend.py", "runtime/tensorrt/slots.py"]
    used = _code_names(r"\b(?:runtime|cudart\(\))\.(cuda\w*(?:\.cuda\w*)?)", files)
    assert used and used <= cuda_names, sorted(used - cuda_names)


def test_name_tables_match_the_wheels(request, tmp_path):
    """Re-extract the tables from the real wheels (downloaded once into pytest's cache, when it is on) and compare."""
    cache = getattr(request.config, "cache", None)
    wheels = Path(cache.mkdir("tensorrt-api-wheels")) if cache is not None else tmp_path
    try:
        tables = extract.extract(wheels)
    except Exception as unavailable:  # noqa: BLE001 - offline, or no pip: the committed tables stand
        pytest.skip(f"the wheels cannot be downloaded here: {unavailable}")
    assert tables == (extract.TENSORRT_TABLE.read_text(), extract.CUDART_TABLE.read_text())


# ---------------------------------------------------------------------------------------------------------------
# The builder on the strict fake (hand-made graphs)
# ---------------------------------------------------------------------------------------------------------------

def _flags_built(bundle: Path, graph: str) -> tuple[list[str], bool]:
    """The builder flags and typing the fake recorded in the engine it built."""
    plan = fake_tensorrt.built_plan(bundle, graph)
    return plan["flags"], plan["strongly_typed"]


def test_tf32_is_off_whatever_the_typing(fake_tensorrt, tmp_path):
    bundle = write_bundle(tmp_path / "b", {"good": supported_model()})
    tb.build_engines(bundle)
    assert _flags_built(bundle, "good") == ([], True)  # TensorRT's default has TF32 on: cleared
    tb.build_engines(bundle, tf32=True)
    assert _flags_built(bundle, "good") == (["TF32"], True)
    tb.build_engines(bundle, precision="fp16", typing="weak")
    assert _flags_built(bundle, "good") == (["FP16", "OBEY_PRECISION_CONSTRAINTS"], False)
    tb.build_engines(bundle, typing="weak")
    assert _flags_built(bundle, "good") == ([], False)


def test_fp16_engines_of_an_fp32_bundle_are_weak_by_name_with_the_rotary_angles_pinned(fake_tensorrt, tiny_bundles,
                                                                                        tmp_path, monkeypatch):
    """Strongly typed by default: an fp32 bundle asked for fp16 engines is refused before any build; --typing weak
    builds them with every rotary-angle layer (Cos, Sin and the float layers feeding them) pinned to fp32 under
    OBEY_PRECISION_CONSTRAINTS, which the fake checks; without the pins the fake flags the network (issue 23)."""
    import shutil  # noqa: PLC0415

    bundle = Path(shutil.copytree(tiny_bundles["ttm"], tmp_path / "bundle"))
    with pytest.raises(BundleError, match="--typing weak"):
        tb.build_engines(bundle, precision="fp16", graphs=["text_decoder"])
    assert not list(bundle.glob("*.engine"))
    lines: list[str] = []
    tb.build_engines(bundle, precision="fp16", typing="weak", graphs=["text_decoder"], progress=lines.append)
    plan = built_plan(bundle, "text_decoder")
    trig = {n.name for n in onnx.load(str(bundle / "text_decoder.onnx")).graph.node if n.op_type in ("Cos", "Sin")}
    assert not plan["strongly_typed"] and "OBEY_PRECISION_CONSTRAINTS" in plan["flags"]
    assert plan["weak_unpinned"] == [] and trig and trig < set(plan["pinned_fp32"])
    assert any(f"{len(plan['pinned_fp32'])} rotary-angle layer(s) pinned to fp32" in line for line in lines)
    assert Manifest.read(bundle).graphs["text_decoder"].engine["pinned_fp32"] == ["rotary_angles"]
    monkeypatch.setattr(tb, "pin_fp32", lambda trt, layers: 0)  # were the pins lost, the fake says so
    tb.build_engines(bundle, precision="fp16", typing="weak", graphs=["text_decoder"], force=True)
    assert set(built_plan(bundle, "text_decoder")["weak_unpinned"]) >= trig
    assert "are not pinned to fp32" in fake_tensorrt.device.log[-1]


def test_the_fake_refuses_layer_precisions_on_strongly_typed_networks(fake_tensorrt, tiny_bundles, tmp_path,
                                                                      monkeypatch):
    import shutil  # noqa: PLC0415

    bundle = Path(shutil.copytree(tiny_bundles["ttm"], tmp_path / "bundle"))
    strong_with_pins = tp.BuildPlan("fp32", True, (), ("TF32",), ("rotary_angles",))
    monkeypatch.setattr(tb, "plan_build", lambda *a, **k: strong_with_pins)
    with pytest.raises(BackendError, match="could not build the engine"):
        tb.build_engines(bundle, graphs=["text_decoder"])
    assert "precision set on a strongly typed network" in fake_tensorrt.device.log[-1]


def test_int8_bundle_for_the_cpu_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    """mirasol-build-engines reads the int8 target from the manifest and refuses before TensorRT is even imported,
    printing the export command that makes the right bundle (issue 23)."""
    from mirasol.calibration.int8_targets import CPU  # noqa: PLC0415

    bundle = write_bundle(tmp_path / "b", {"good": supported_model()}, precision="int8")
    manifest = Manifest.read(bundle)
    manifest.quantization = {"recipe": CPU.settings(), "data": {"source": "synthetic"}}
    manifest.write(bundle)
    monkeypatch.setattr(tb, "import_tensorrt", lambda: pytest.fail("TensorRT was reached"))
    assert build_engines_main([str(bundle)]) == 1
    line = capsys.readouterr().err.strip()
    assert line.startswith(f"error: {bundle} is an int8 bundle TensorRT cannot build: its int8 target is 'cpu'")
    assert ("mirasol-export --checkpoint DIR --precision int8 --int8-target tensorrt --calibration-data synthetic"
            in line)
    assert not list(bundle.glob("*.engine"))


def test_device_n_builds_on_gpu_n(monkeypatch, tmp_path):
    """--device 1 makes GPU 1 current before TensorRT builds (the fake records the device it built on)."""
    fake_tensorrt.install(monkeypatch, count=2)
    bundle = write_bundle(tmp_path / "b", {"good": supported_model()})
    assert build_engines_main([str(bundle), "--device", "1", "--quiet"]) == 0
    assert built_plan(bundle, "good")["device"] == 1
    tb.build_engines(bundle, force=True)
    assert built_plan(bundle, "good")["device"] == 0
    assert build_engines_main([str(bundle), "--device", "2", "--quiet"]) == 1  # no such GPU: an error line


def test_tensorrt_11_builds_strongly_typed_without_tf32(monkeypatch, tmp_path):
    fake_tensorrt.install(monkeypatch, version=TRT_11)
    bundle = write_bundle(tmp_path / "b", {"good": supported_model()})
    record = tb.build_engines(bundle)["good"]
    assert record["strongly_typed"] and record["tensorrt"] == TRT_11
    assert _flags_built(bundle, "good") == ([], True)
    with pytest.raises(BundleError, match="ModelOpt AutoCast"):
        tb.build_engines(bundle, precision="fp16")
    with pytest.raises(BundleError, match="TensorRT 11"):
        tb.build_engines(bundle, typing="weak")


def test_the_fake_refuses_precision_flags_on_strongly_typed_networks(fake_tensorrt, tmp_path, monkeypatch):
    """Were the plan to set FP16 on a strongly typed network, the build fails (as TensorRT's does)."""
    bundle = write_bundle(tmp_path / "b", {"good": supported_model()}, precision="fp16")
    monkeypatch.setattr(tb, "plan_build", lambda *a, **k: tp.BuildPlan("fp16", True, ("FP16",), ("TF32",)))
    with pytest.raises(BackendError, match="could not build the engine"):
        tb.build_engines(bundle)
    assert "cannot be set for a strongly typed network" in fake_tensorrt.device.log[-1]


def test_up_to_date_compares_every_build_option(fake_tensorrt, tmp_path):
    """Changing only --tf32, --opt-level or --workspace-mb rebuilds (issue 18, fix 2)."""
    bundle = write_bundle(tmp_path / "b", {"good": supported_model()})
    lines: list[str] = []
    first = tb.build_engines(bundle, progress=lines.append)["good"]
    assert tb.build_engines(bundle, progress=lines.append)["good"] == first and "up to date" in lines[-1]
    for option in ({"tf32": True}, {"optimization_level": 2}, {"workspace_mb": 512}):
        record = tb.build_engines(bundle, progress=lines.append, **option)["good"]
        assert "up to date" not in lines[-1] and record["build_args"] != first["build_args"], option
        assert tb.build_engines(bundle, progress=lines.append, **option)["good"] == record
        assert "up to date" in lines[-1]


def test_fixed_dimension_under_a_varying_axis_is_refused_by_name(fake_tensorrt, tmp_path, monkeypatch):
    """The builder names the graph, the input and the dimension instead of a bare RuntimeError (issue 18, fix 5)."""
    bundle = write_bundle(tmp_path / "b", {"fixed": supported_model(x_shape=("batch", 8, 4))},
                          shapes={"x": ("batch", "seq", 4), "y": ("batch", "seq", 3)})
    with pytest.raises(BundleError, match=r"graph 'fixed': input 'x' dimension 1 is fixed to 8 .*'seq' spans 1\.\.16"):
        tb.build_engines(bundle)
    good = write_bundle(tmp_path / "g", {"good": supported_model()})

    def refuse(self, input, min, opt, max):  # noqa: A002
        raise ValueError("min > opt")
    monkeypatch.setattr(fake_tensorrt.trt.IOptimizationProfile, "set_shape", refuse)
    with pytest.raises(BundleError, match=r"graph 'good': TensorRT refused the profile of input 'x' .*min > opt"):
        tb.build_engines(good)


def test_the_fake_checks_profiles_like_tensorrt(fake_tensorrt):
    profile = fake_tensorrt.trt.Builder(None).create_optimization_profile()
    with pytest.raises(ValueError):
        profile.set_shape("x", [1, 4], [1, 2], [1, 8])
    with pytest.raises(ValueError):
        profile.set_shape("x", [1, 4], [1, 4, 1], [1, 8])
    profile.set_shape("x", [1, 0], [1, 2], [1, 8])


def test_cli_reports_engine_and_context_memory(fake_tensorrt, tmp_path, capsys):
    bundle = write_bundle(tmp_path / "b", {"good": supported_model(), "other": supported_model()})
    assert build_engines_main([str(bundle), "--max-batch", "1", "--max", "seq=4", "--quiet"]) == 0
    out = capsys.readouterr().out
    record = Manifest.read(bundle).graphs["good"].engine
    assert record["profile"] == {"batch": {"min": 1, "opt": 1, "max": 1}, "seq": {"min": 1, "opt": 4, "max": 4}}
    assert record["context_memory_bytes"] == 1024 + 2 * 1 * 4 * 4 * 4  # the fake's model: at batch 1, seq 4
    assert re.search(r"good: good\.fp32\.engine \(fp32, TensorRT 10\.3\.0, Fake Orin, sm 8\.7\): engine "
                     r"0\.0 MB, context memory up to 0\.0 MB", out)
    assert "total: engines" in out
    assert build_engines_main([str(bundle), "--max", "batch=9"]) == 1
    assert "above the bundle's maximum" in capsys.readouterr().err


def test_timing_cache_survives_corruption_and_other_versions(fake_tensorrt, tmp_path):
    bundle = write_bundle(tmp_path / "b", {"good": supported_model()})
    (bundle / tb.TIMING_CACHE_FILE).write_bytes(b"garbage")
    lines: list[str] = []
    tb.build_engines(bundle, progress=lines.append)
    assert any("unreadable" in line for line in lines)
    assert (bundle / tb.TIMING_CACHE_FILE).read_bytes() == b"fake-timing-cache 10.3.0"
    (bundle / tb.TIMING_CACHE_FILE).write_bytes(b"fake-timing-cache 9.0")
    tb.build_engines(bundle, force=True, progress=lines.append)
    assert any("another TensorRT or GPU" in line for line in lines)


def test_export_makes_int8_for_tensorrt_when_it_builds_engines(tmp_path, monkeypatch, capsys):
    """`mirasol-export --precision int8 --engine` quantizes for TensorRT by default, and refuses a CPU int8 target
    before any work (issue 23)."""
    from mirasol.export import bundle as export_bundle_module  # noqa: PLC0415
    from mirasol.export import cli as export_cli  # noqa: PLC0415

    targets: list[str] = []

    def stop(*args, calibration=None, **kwargs):
        targets.append(calibration.target)
        raise KeyboardInterrupt  # stop before any export work
    monkeypatch.setattr(export_bundle_module, "export_bundle", stop)
    common = ["--preset", "tiny", "--precision", "int8", "--calibration-data", "synthetic", "-q"]
    assert export_cli.main([*common, "--out", str(tmp_path / "a"), "--engine"]) == 130
    assert export_cli.main([*common, "--out", str(tmp_path / "b")]) == 130
    assert targets == ["tensorrt", "cpu"]
    assert export_cli.main([*common, "--out", str(tmp_path / "c"), "--engine", "--int8-target", "cpu"]) == 2
    assert "cannot be built from --int8-target cpu" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
