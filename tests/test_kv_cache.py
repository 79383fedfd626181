"""The AV KV cache carried in int8: int8 state in the manifest and the stream, half of fp16's bytes, an error that
stays bounded over a long stream, a transform that is checked, and clear errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from mirasol.calibration.data import load_clips
from mirasol.calibration.kv_cache import KvCodec, int8_states, kv_states
from mirasol.calibration.quantize import CalibrationOptions
from mirasol.calibration.report import cosine
from mirasol.export.bundle import export_bundle
from mirasol.export.kv_cache import check_graph
from mirasol.export.specs import graph_specs
from mirasol.export.tensorrt.readiness import check_bundle
from mirasol.model import MirasolConfig
from mirasol.runtime.bundle.manifest import Manifest
from mirasol.runtime.errors import ExportError
from mirasol.runtime.pipeline import Pipeline

from .conftest import run_export_cli

CALIBRATION = CalibrationOptions("synthetic", clips=3, held_out=1, bar=False, use_cache=False)


@pytest.fixture(scope="module")
def bundles(tiny_bundles: dict[str, Path], tiny_models, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny TTM model in fp16 with the KV cache float and int8 (fp16 graphs: the int8 cache composes with
    a transformed precision; fp32 is in the slow tests and the long-stream measurement)."""
    root = tmp_path_factory.mktemp("kv")
    made = {"fp32": tiny_bundles["ttm"], "fp16": tiny_bundles["ttm-fp16"], "fp16-kv8": root / "fp16-kv8"}
    export_bundle(tiny_models["ttm"], made["fp16-kv8"], "fp16", reference=made["fp32"], calibration=CALIBRATION,
                  kv="int8")
    return made


def test_state_is_int8_in_the_manifest_and_the_stream(bundles: dict[str, Path]) -> None:
    manifest, float_manifest = Manifest.read(bundles["fp16-kv8"]), Manifest.read(bundles["fp16"])
    states = int8_states(manifest)
    assert [s.name for s in states] == [s.name for s in kv_states(manifest)] and len(states) == 4
    assert manifest.state == float_manifest.state and manifest.steps == float_manifest.steps
    report = manifest.quantization["kv_cache"]
    assert report["states"] == [s.name for s in states] and report["check"]["av_autoregressor"]["cases"] >= 2
    assert report["window_bytes_per_stream"]["int8"] * 2 == report["window_bytes_per_stream"]["float16"]
    with Pipeline.load(bundles["fp16-kv8"]) as pipe, Pipeline.load(bundles["fp16"]) as same:
        assert pipe.chunk_inputs["video"].dtype == same.chunk_inputs["video"].dtype
        clip = load_clips("synthetic", pipe.config, clips=1, held_out=1, seed=3).held_out[0]
        stream, float_stream = pipe.stream(), same.stream()
        video, audio = clip.load()
        for chunk_video, chunk_audio in pipe.split_clip(video, audio):
            stream.push(chunk_video, chunk_audio)
            float_stream.push(chunk_video, chunk_audio)
        for state in states:
            assert stream.state[state.name].dtype == np.int8
            assert stream.state[state.name].nbytes * 4 == float_stream.state[state.name].nbytes  # fp32 state


def test_context_error_stays_bounded_over_a_long_stream(bundles: dict[str, Path]) -> None:
    """Against the same graphs with float state, over 96 chunks (32 windows): the error at the end is no larger
    than in the first windows (a token is quantized once, when written)."""
    with Pipeline.load(bundles["fp16-kv8"]) as pipe, Pipeline.load(bundles["fp16"]) as same:
        clips = load_clips("synthetic", pipe.config, clips=1, held_out=24, seed=11).held_out
        stream, float_stream = pipe.stream(), same.stream()
        errors, cosines = [], []
        for clip in clips:
            video, audio = clip.load()
            for chunk_video, chunk_audio in pipe.split_clip(video, audio):
                got, want = stream.push(chunk_video, chunk_audio), float_stream.push(chunk_video, chunk_audio)
                errors.append(float(np.linalg.norm(got - want) / np.linalg.norm(want)))
                cosines.append(cosine(got, want))
    assert len(errors) == 96 and errors[0] == 0.0  # the first chunk reads an empty cache
    assert min(cosines) > 0.99
    early, late = np.median(errors[1:20]), np.median(errors[-20:])
    assert 0 < late <= 2 * early, (early, late)


def test_the_transform_is_checked(bundles: dict[str, Path], tmp_path: Path) -> None:
    """A wrong scale in the rewritten graph is caught by the check against the float graph."""
    manifest = Manifest.read(bundles["fp16-kv8"])
    entry = manifest.graphs["av_autoregressor"]
    path = bundles["fp16-kv8"] / entry.file
    spec = graph_specs(MirasolConfig.from_dict(manifest.config))["av_autoregressor"]
    codec = KvCodec.from_graph(path, int8_states(manifest))
    float_graph = bundles["fp16"] / entry.file
    assert check_graph(spec, float_graph, path, codec, None)["cases"] >= 2
    broken = onnx.load(str(path))
    inverse = next(t for t in broken.graph.initializer if t.name == "present_key_0__kv_inverse_scale")
    values = onnx.numpy_helper.to_array(inverse) * np.float16(1.5)
    inverse.CopyFrom(onnx.numpy_helper.from_array(values.astype(values.dtype), inverse.name))
    onnx.save(broken, str(tmp_path / "broken.onnx"))
    with pytest.raises(ExportError, match="changes the graph's results: present_key_0"):
        check_graph(spec, float_graph, tmp_path / "broken.onnx", codec, None)


def test_readiness_names_the_int8_network_io(bundles: dict[str, Path]) -> None:
    report = check_bundle(bundles["fp16-kv8"])
    assert report.ok, report.format()
    assert [f.graph for f in report.warnings if f.code == "int8-io"] == ["av_autoregressor"]


def test_int8_cache_needs_calibration_data(tmp_path: Path) -> None:
    result = run_export_cli(["--preset", "tiny", "--kv-cache", "int8", "--out", str(tmp_path / "b")])
    assert result.exit_code == 2 and "--kv-cache int8 needs --calibration-data" in result.output
    assert not (tmp_path / "b").exists()
