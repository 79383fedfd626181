"""int4 weights: the block-wise DequantizeLinear form, fused by ONNX Runtime (checked at export), accepted by the
TensorRT readiness check, close to fp32 on held-out clips; and its accuracy report."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto
from onnx import helper as h
from onnx import numpy_helper as nh

from mirasol.calibration.int4 import (block_size, check_fused, dequantize_blocks, pack, quantize_blocks,
                                      quantize_weights)
from mirasol.export.bundle import export_bundle
from mirasol.export.tensorrt.readiness import check_bundle, check_model
from mirasol.runtime.bundle.manifest import Manifest
from mirasol.runtime.errors import ExportError
from mirasol.runtime.pipeline import Pipeline

from .onnx_graphs import AXES, model as make_graph, x_info, y_info


@pytest.fixture(scope="module")
def int4_bundle(tiny_bundles: dict[str, Path], tiny_models, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("int4") / "bundle"
    export_bundle(tiny_models["ttm"], out, "int4", reference=tiny_bundles["ttm"])
    return out


def test_blocks_are_symmetric_positive_and_pack_low_nibble_first() -> None:
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((256, 6)).astype(np.float32)
    codes, scale = quantize_blocks(weight, 128)
    assert scale.shape == (2, 6) and (scale > 0).all() and codes.min() >= -8 and codes.max() <= 7
    error = np.linalg.norm(dequantize_blocks(codes, scale) - weight) / np.linalg.norm(weight)
    assert 0.05 < error < 0.15  # int4 on Gaussian weights: ~10%
    assert pack(np.array([[1, -2], [7, -8]], np.int8)) == bytes([0xE1, 0x87])
    assert block_size(256, 6) == 128 and block_size(192, 6) == 64 and block_size(160, 6) is None
    assert block_size(256, 259) is None  # TensorRT packs INT4 along the last dimension: it must be even


def test_int4_bundle_fuses_runs_and_reports(int4_bundle: Path, tiny_bundles: dict[str, Path]) -> None:
    manifest = Manifest.read(int4_bundle)
    assert manifest.precision == "int4"
    fp32 = Manifest.read(tiny_bundles["ttm"])
    assert manifest.state == fp32.state and all(manifest.graphs[n].inputs == g.inputs for n, g in fp32.graphs.items())
    report = manifest.quantization
    for graph, weights in report["weights"].items():
        assert weights["int4_weights"] > 0, graph
        assert weights["onnxruntime_fused"]["MatMulNBits"] >= weights["int4_weights"], graph
        assert weights["onnxruntime_fused"]["DequantizeLinear_int4"] == 0
        model = onnx.load(str(int4_bundle / manifest.graphs[graph].file))
        assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 21
        assert any(t.data_type == TensorProto.INT4 for t in model.graph.initializer)
    accuracy = report["accuracy"]
    assert accuracy["av_context"]["cosine"] > 0.97 and accuracy["answers"]["questions"] > 0
    assert all(s["cosine"] > 0.98 for outputs in accuracy["per_graph"].values() for s in outputs.values())
    # it is smaller than fp32, and it streams and answers through the runtime unchanged
    size = sum((int4_bundle / g.file).stat().st_size for g in manifest.graphs.values())
    fp32_size = sum((tiny_bundles["ttm"] / g.file).stat().st_size for g in fp32.graphs.values())
    assert size < 0.5 * fp32_size  # embeddings, norms and the odd-sized audio patch stay float at tiny
    with Pipeline.load(int4_bundle) as pipe:
        stream = pipe.stream()
        rng = np.random.default_rng(0)
        for _ in range(4):
            video = rng.random(pipe.chunk_inputs["video"].shape[1:], dtype=np.float32)
            audio = rng.standard_normal(pipe.chunk_inputs["audio"].shape[1:]).astype(np.float32)
            assert np.isfinite(stream.push(video, audio)).all()
        assert isinstance(stream.ask("what shape was the red one?", max_new_tokens=4), str)


def test_tensorrt_readiness_accepts_int4(int4_bundle: Path) -> None:
    report = check_bundle(int4_bundle)
    assert report.ok, report.format()
    assert {f.code for f in report.warnings} <= {"opset"}, report.format()
    assert not [f for f in check_bundle(int4_bundle, target="10.15").findings], "TensorRT 10.15 parses opset 21"


def _int4_graph(block: int, k: int = 128, n: int = 8, readers: int = 1) -> onnx.ModelProto:
    weight = np.random.default_rng(1).standard_normal((k, n)).astype(np.float32)
    nodes = [h.make_node("MatMul", ["x", "w"], [f"y{i}" if readers > 1 else "y"], name=f"mm{i}")
             for i in range(readers)]
    if readers > 1:
        nodes.append(h.make_node("Add", ["y0", "y1"], ["y"]))
    graph = make_graph(nodes, [x_info(shape=("batch", "seq", k))], [y_info(shape=("batch", "seq", n))],
                       [nh.from_array(weight, "w")], opset=20)
    if block == 128:
        return quantize_weights(graph, None)[0]
    codes, scale = quantize_blocks(weight, block)  # a hand-made form with another block size
    del graph.graph.initializer[:]
    graph.graph.initializer.extend([h.make_tensor("w4", TensorProto.INT4, [k, n], pack(codes), raw=True),
                                    nh.from_array(scale, "s")])
    graph.graph.node.insert(0, h.make_node("DequantizeLinear", ["w4", "s"], ["w"], axis=0, block_size=block))
    graph.opset_import[0].version = 21
    return graph


def test_a_form_that_does_not_fuse_is_an_export_error(tmp_path: Path) -> None:
    good = tmp_path / "good.onnx"
    onnx.save(_int4_graph(128), str(good))
    assert check_fused(good, 1)["MatMulNBits"] == 1
    # blocks of 48 (not a power of two); one DequantizeLinear read by two MatMuls: ONNX Runtime fuses neither
    for name, graph in (("block48.onnx", _int4_graph(48, k=96)), ("shared.onnx", _int4_graph(64, readers=2))):
        onnx.save(graph, str(tmp_path / name))
        with pytest.raises(ExportError, match="not fused"):
            check_fused(tmp_path / name, 1 if name == "block48.onnx" else 2)


def test_readiness_int4_rules(tmp_path: Path) -> None:
    assert not [f for f in check_model(_int4_graph(128), axes=AXES) if f.code != "opset"]
    bad = check_model(_int4_graph(48, k=96), axes=AXES)
    assert any(f.code == "int4" and f.severity == "error" and "block" in f.message for f in bad)
