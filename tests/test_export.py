"""Export: the graphs match PyTorch, the bundle is complete and checked, a failed export changes nothing."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from mirasol.export import bundle as bundle_module
from mirasol.export.bundle import export_bundle
from mirasol.export.specs import graph_specs
from mirasol.model import Mirasol, MirasolConfig, get_preset
from mirasol.export.validate import torch_reference
from mirasol.runtime.bundle.precisions import get_precision
from mirasol.runtime.bundle.reader import Bundle, sha256_file
from mirasol.runtime.errors import ExportError
from mirasol.runtime.pipeline import Pipeline

from .conftest import make_model

ROOT = Path(__file__).resolve().parents[1]

GRAPHS = ("combiner", "av_autoregressor", "text_cross_kv", "text_decoder")


@pytest.mark.parametrize("name", ["transformer", "ttm", "ttm-fp16"])
def test_bundle_is_complete_and_checked(tiny_bundles, name) -> None:
    path = tiny_bundles[name]
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format"] == "mirasol-bundle" and manifest["format_version"] == 1
    assert manifest["precision"] == ("fp16" if name.endswith("fp16") else "fp32")
    assert set(manifest["graphs"]) == set(GRAPHS)
    assert {"torch", "onnx", "opset", "mirasol-edge"} <= set(manifest["producer"])
    for graph_name, graph in manifest["graphs"].items():
        file = path / graph["file"]
        assert sha256_file(file) == graph["sha256"]
        onnx.checker.check_model(str(file), full_check=True)
        assert_names_no_source_path(file)
        model = onnx.load(str(file), load_external_data=False)
        props = {p.key: p.value for p in model.metadata_props}
        assert json.loads(props["mirasol.config"]) == manifest["config"]
        assert [i.name for i in model.graph.input] == [t["name"] for t in graph["inputs"]]
        assert [o.name for o in model.graph.output] == [t["name"] for t in graph["outputs"]]
        assert props["mirasol.precision"] == manifest["precision"]
        result = manifest["validation"][graph_name]
        assert result["passed"] and result["cases"] >= 2
    files = ["manifest.json", *(g["file"] for g in manifest["graphs"].values())]
    assert sorted(p.name for p in path.iterdir()) == sorted(files)  # the tokenizer lives in the manifest
    tokenizer = Bundle.load(path).tokenizer  # checksums verified on load
    assert tokenizer.decode(tokenizer.encode("héllo")) == "héllo"


@pytest.mark.parametrize("name", ["ttm", "ttm-fp16"])
@pytest.mark.parametrize("graph", GRAPHS)
def test_graph_matches_pytorch_at_every_axis_extreme(tiny_bundles, tiny_models, name, graph) -> None:
    """Independently of the export's own validation: fresh seed, every axis at min/opt/max, empty caches included."""
    precision = "fp16" if name.endswith("fp16") else "fp32"
    model = tiny_models["ttm"]
    spec = graph_specs(model.config)[graph]
    tolerance = get_precision(precision).tolerance
    pipe = Pipeline.load(tiny_bundles[name], verify=False)
    session = pipe.sessions[graph]
    rng = np.random.default_rng(1234)
    sizes_seen = {axis: set() for axis in spec.axes}
    for sizes in spec.validation_sizes():
        feeds = spec.example(sizes, rng)
        reference = torch_reference(spec, model, feeds)
        outputs = session.run(feeds)
        for output, ref in reference.items():
            assert outputs[output].shape == ref.shape
            error = float(np.abs(outputs[output] - ref).max()) if ref.size else 0.0
            assert error <= tolerance.abs + tolerance.rel * float(np.abs(ref).max(initial=0)), (output, sizes, error)
        for axis, size in sizes.items():
            sizes_seen[axis].add(size)
    for axis, r in spec.axes.items():
        assert {r.min, r.max} <= sizes_seen[axis]
    if "past_av" in spec.axes or "past_text" in spec.axes:
        assert 0 in sizes_seen.get("past_av", sizes_seen.get("past_text", set()))  # the empty cache


def test_fp16_rotary_angles_by_measurement(tiny_bundles) -> None:
    """The text decoder's angles reach max_text_len - 1 radians and lose too much in fp16: they stay fp32. The AV
    autoregressor's stay within [0, W) (positions relative to the window): fp16 costs them nothing measurable."""
    report = json.loads((tiny_bundles["ttm-fp16"] / "manifest.json").read_text())["quantization"]["fp16"]
    text, av = report["text_decoder"], report["av_autoregressor"]
    assert text["groups"]["rotary_angles"]["kept_fp32"] is True
    assert text["groups"]["rotary_angles"]["error_in_fp16"] > 2 * text["final_error"]
    assert av["groups"]["rotary_angles"]["kept_fp32"] is False
    assert av["groups"]["rotary_angles"]["error_in_fp16"] <= 1.1 * av["baseline_error"]
    fp16_weights = [t for t in onnx.load(str(tiny_bundles["ttm-fp16"] / "text_decoder.onnx")).graph.initializer
                    if t.data_type == onnx.TensorProto.FLOAT16]
    assert fp16_weights, "fp16 bundle has no fp16 weights"


def test_graph_bytes_do_not_depend_on_where_they_are_written(tiny_bundles, tmp_path) -> None:
    """The same model exported to another folder gives the same graphs, byte for byte: no path and nothing of the run
    goes into a graph (the source paths in torch's stack traces are checked by `assert_names_no_source_path`)."""
    other = tmp_path / "a" / "much" / "longer" / "path" / "to" / "the" / "bundle"
    export_bundle(make_model("transformer"), other, precision="fp32")
    ours, theirs = (json.loads((p / "manifest.json").read_text())["graphs"] for p in (tiny_bundles["transformer"], other))
    assert {g: ours[g]["sha256"] for g in ours} == {g: theirs[g]["sha256"] for g in theirs}


def _snapshot(path):
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_failed_export_leaves_target_as_it_was(tiny_bundles, tmp_path, monkeypatch) -> None:
    target = tmp_path / "bundle"
    import shutil
    shutil.copytree(tiny_bundles["transformer"], target)
    before = _snapshot(target)
    calls = []

    def failing_validate(spec, *args, **kwargs):
        calls.append(spec.name)
        if len(calls) == 3:
            raise ExportError(f"injected failure validating {spec.name}")
        return {"cases": 0, "outputs": {}, "passed": True}

    monkeypatch.setattr(bundle_module, "compare_graph", failing_validate)
    with pytest.raises(ExportError, match="injected"):
        export_bundle(make_model("ttm"), target, precision="fp32")
    assert _snapshot(target) == before
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]  # no temporary directory left behind


def small_axes_config() -> MirasolConfig:
    """`small`'s every axis extreme (window 8 chunks of 8 latents, 16 chunks of AV memory, 128 text tokens) and its
    TTM memory, at a width and depth that export in seconds."""
    return get_preset("small").replace(image_size=32, patch_size=16, encoder_dim=48, encoder_layers=1,
                                       encoder_heads=2, combiner_layers=1, d_model=96, av_layers=2, text_layers=2)


def test_small_axis_extremes_export_validated(tmp_path) -> None:
    """The export's own validation (on by default, fp32 tolerance) at `small`'s axis extremes: the AV graph with an
    empty and a full window, the text decoder at position max_text_len - 1. The model is handed over
    (`release_model`): validation runs in ONNX Runtime after its weights were freed."""
    config = small_axes_config()
    small = get_preset("small")
    assert (config.av_cache_len, config.text_memory_len, config.max_text_len, config.combiner) == \
        (small.av_cache_len, small.text_memory_len, small.max_text_len, small.combiner)
    specs = graph_specs(config)
    assert {s["past_av"] for s in specs["av_autoregressor"].validation_sizes()} == {0, small.av_cache_len}
    assert max(s["past_text"] for s in specs["text_decoder"].validation_sizes()) == small.max_text_len - 1
    torch.manual_seed(0)
    model = Mirasol(config).eval()
    manifest = export_bundle(model, tmp_path / "b", release_model=True)
    assert set(manifest.validation) == set(GRAPHS)
    for result in manifest.validation.values():
        assert result["passed"] and result["tolerance"] == get_precision("fp32").tolerance.__dict__
    assert all(p.numel() == 0 for p in model.parameters())


def test_unknown_precision_is_refused(tmp_path) -> None:
    with pytest.raises(ExportError, match="precision"):
        export_bundle(make_model(), tmp_path / "b", precision="fp8")
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("name", ["transformer", "ttm", "ttm-fp16"])
def test_bundles_are_tensorrt_ready(tiny_bundles, name) -> None:
    """Every op, dtype, dynamic axis (and Q/DQ placement) of the real graphs is one TensorRT's parser takes."""
    from mirasol.export.tensorrt.readiness import check_bundle

    report = check_bundle(tiny_bundles[name])
    assert report.ok and not report.errors, report.format()
    assert set(report.graphs) == set(GRAPHS)


def test_int8_tensorrt_target_is_tensorrt_ready(tiny_int8_trt_bundle) -> None:
    """The int8 graphs meant for TensorRT: symmetric Q/DQ that its parser fuses, every op supported."""
    from mirasol.export.tensorrt.readiness import check_bundle

    out = tiny_int8_trt_bundle
    report = check_bundle(out)
    assert report.ok and not report.errors, report.format()
    assert json.loads((out / "manifest.json").read_text())["precision"] == "int8"
    for graph in json.loads((out / "manifest.json").read_text())["graphs"].values():
        assert_names_no_source_path(out / graph["file"])


def assert_names_no_source_path(file: Path) -> None:
    """No trace of the machine that exported the graph (the exporter stores stack traces with absolute paths):
    a bundle's bytes do not depend on, or reveal, where mirasol-edge was installed."""
    raw = file.read_bytes()
    assert str(ROOT).encode() not in raw and b'File "/' not in raw, f"{file.name} names source paths"
