"""int8 by post-training calibration: accuracy on held-out clips, the runtime unchanged, clear errors."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from mirasol.calibration.data import load_clips
from mirasol.calibration.quantize import CalibrationOptions
from mirasol.export.bundle import export_bundle
from mirasol.runtime.errors import ExportError
from mirasol.runtime.bundle.manifest import Manifest
from mirasol.runtime.pipeline import Pipeline

from .conftest import make_model


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny TTM model, its fp32 bundle and its int8 (cpu recipe) bundle calibrated on synthetic clips."""
    root = tmp_path_factory.mktemp("int8")
    model = make_model("ttm")
    made: dict[str, Any] = {"model": model, "fp32": root / "fp32", "int8": root / "int8", "cache": root / "cache"}
    export_bundle(model, made["fp32"], precision="fp32", validate=False)
    export_bundle(model, made["int8"], "int8", reference=made["fp32"],
                  calibration=CalibrationOptions("synthetic", clips=4, held_out=2, cache_dir=made["cache"], bar=False))
    return made


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_av_context_close_to_fp32_on_held_out_clips(bundles: dict[str, Any]) -> None:
    fp32, int8 = Pipeline.load(bundles["fp32"]), Pipeline.load(bundles["int8"])
    # clips of another seed than the calibration clips: never calibrated on
    clips = load_clips("synthetic", fp32.config, clips=1, held_out=2, seed=77).held_out
    calibrated = set(Manifest.read(bundles["int8"]).quantization["data"]["calibration_clips"])
    assert not calibrated & {c.name for c in clips}
    cosines, errors = [], []
    for clip in clips:
        video, audio = clip.load()
        s32, s8 = fp32.stream(), int8.stream()
        for chunk_video, chunk_audio in fp32.split_clip(video, audio):
            want, got = s32.push(chunk_video, chunk_audio), s8.push(chunk_video, chunk_audio)
            cosines.append(cosine(want, got))
            errors.append(float(np.abs(want - got).max()))
    assert len(cosines) >= 8
    assert min(cosines) >= 0.99, cosines
    assert max(errors) > 1e-4  # it really is quantized: int8 is not fp32 to fp32 precision


def test_graphs_are_int8(bundles: dict[str, Any]) -> None:
    manifest = Manifest.read(bundles["int8"])
    for graph in manifest.graphs.values():
        model = onnx.load(str(bundles["int8"] / graph.file))
        quantized_weights = [t for t in model.graph.initializer
                             if t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8) and len(t.dims) == 2]
        assert quantized_weights, f"{graph.file} has no int8 weight matrices"
        assert any(n.op_type == "DequantizeLinear" for n in model.graph.node)


def test_int8_bundle_runs_unchanged(bundles: dict[str, Any]) -> None:
    fp32_manifest, manifest = Manifest.read(bundles["fp32"]), Manifest.read(bundles["int8"])
    assert manifest.precision == "int8"
    assert manifest.state == fp32_manifest.state and manifest.steps == fp32_manifest.steps
    assert manifest.counters == fp32_manifest.counters
    for name, graph in manifest.graphs.items():
        assert graph.inputs == fp32_manifest.graphs[name].inputs
        assert graph.outputs == fp32_manifest.graphs[name].outputs
    report = manifest.quantization
    assert report["data"]["kind"] == "synthetic"
    assert set(report["accuracy"]["per_graph"]) == set(manifest.graphs)
    assert report["accuracy"]["answers"]["questions"] > 0
    pipe = Pipeline.load(bundles["int8"])
    config = pipe.config
    rng = np.random.default_rng(3)
    stream = pipe.stream()
    for _ in range(4):  # past the AV window of 3 chunks
        size = config["image_size"]
        video = rng.random((config["frames_per_chunk"], 3, size, size), dtype=np.float32)
        audio = rng.standard_normal((config["n_mels"], pipe.chunk_inputs["audio"].shape[-1])).astype(np.float32)
        context = stream.push(video, audio)
        assert context.shape == (config["latents_per_chunk"], config["d_model"]) and np.isfinite(context).all()
    answer = stream.ask("which colour appeared first?", max_new_tokens=8)
    assert isinstance(answer, str)


def test_rerun_with_same_data_uses_the_cache(bundles: dict[str, Any], tmp_path: Path) -> None:
    manifest = export_bundle(bundles["model"], tmp_path / "again", "int8", reference=bundles["fp32"],
                             calibration=CalibrationOptions("synthetic", clips=4, held_out=2,
                                                            cache_dir=bundles["cache"], bar=False))
    assert manifest.quantization["calibration"]["cached"] == sorted(manifest.graphs)
    first = Manifest.read(bundles["int8"])
    assert {n: g.sha256 for n, g in manifest.graphs.items()} == {n: g.sha256 for n, g in first.graphs.items()}


def test_empty_calibration_directory_is_a_clear_error(tmp_path: Path) -> None:
    empty = tmp_path / "clips"
    empty.mkdir()
    with pytest.raises(ExportError, match=r"calibration directory .*clips is empty"):
        export_bundle(make_model("transformer"), tmp_path / "out", "int8", calibration=CalibrationOptions(str(empty)))
    assert not (tmp_path / "out").exists()


def test_npz_directory_split_into_calibration_and_held_out(tmp_path: Path) -> None:
    config = make_model("transformer").config
    rng = np.random.default_rng(0)
    for i in range(5):
        np.savez(tmp_path / f"clip{i}.npz",
                 video=rng.random((2 * config.frames_per_chunk, 3, config.image_size, config.image_size),
                                  dtype=np.float32),
                 audio=rng.standard_normal((config.n_mels, 2 * config.audio_frames_per_chunk)).astype(np.float32))
    (tmp_path / "notes.txt").write_text("not a clip")
    clip_set = load_clips(tmp_path, config, clips=16, held_out=4)
    assert clip_set.kind == "real" and clip_set.generator == "npz"
    names = [c.name for c in clip_set.calibration], [c.name for c in clip_set.held_out]
    assert len(names[0]) == 4 and len(names[1]) == 1 and not set(names[0]) & set(names[1])
    video, audio = clip_set.calibration[0].load()
    assert video.shape == (2 * config.frames_per_chunk, 3, config.image_size, config.image_size)
    assert audio.shape == (config.n_mels, 2 * config.audio_frames_per_chunk)
    np.savez(tmp_path / "clip0.npz", video=np.zeros((3, 3, 5, 5), np.float32), audio=np.zeros((2, 2), np.float32))
    again = load_clips(tmp_path, config, clips=16, held_out=4)
    bad = next(c for c in again.calibration + again.held_out if c.name == "clip0.npz")
    with pytest.raises(ExportError, match=r"clip0\.npz: 'video' must be"):
        bad.load()
