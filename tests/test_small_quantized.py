"""int4 weights with the AV KV cache in int8 at `small` (tiny proves little): exported from a validated fp32 bundle
of the seeded `small` model, with the accuracy report the export writes against it, then streamed and asked through
the runtime with the cache held in int8."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mirasol.calibration.kv_cache import int8_states
from mirasol.calibration.quantize import CalibrationOptions
from mirasol.export.bundle import export_bundle
from mirasol.model import build_model
from mirasol.runtime.bundle.manifest import Manifest
from mirasol.runtime.pipeline import Pipeline


@pytest.fixture(scope="module")
def small_bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("small-quantized")
    model = build_model("small", seed=0)
    made = {"fp32": root / "fp32", "int4-kv8": root / "int4-kv8"}
    export_bundle(model, made["fp32"], "fp32")
    export_bundle(model, made["int4-kv8"], "int4", reference=made["fp32"], kv="int8",
                  calibration=CalibrationOptions("synthetic", clips=2, held_out=1, bar=False, use_cache=False))
    return made


def test_int4_with_an_int8_cache_at_small_reports_and_streams(small_bundles: dict[str, Path]) -> None:
    manifest = Manifest.read(small_bundles["int4-kv8"])
    assert manifest.precision == "int4"
    report = manifest.quantization
    assert all(w["onnxruntime_fused"]["MatMulNBits"] >= w["int4_weights"] > 0 for w in report["weights"].values())
    assert report["accuracy"]["av_context"]["cosine"] > 0.95  # docs/int8-int4.md: 0.983 at small without the cache
    states = int8_states(manifest)
    assert states and report["kv_cache"]["states"] == [s.name for s in states]
    with Pipeline.load(small_bundles["int4-kv8"]) as pipe, Pipeline.load(small_bundles["fp32"]) as fp32:
        stream, reference = pipe.stream(), fp32.stream()
        rng = np.random.default_rng(0)
        for _ in range(12):  # past the AV window: the int8 cache is appended, windowed and read back
            video = rng.random(pipe.chunk_inputs["video"].shape[1:], dtype=np.float32)
            audio = rng.standard_normal(pipe.chunk_inputs["audio"].shape[1:]).astype(np.float32)
            got, want = stream.push(video, audio), reference.push(video, audio)
            cosine = float(np.dot(got.ravel(), want.ravel()) / (np.linalg.norm(got) * np.linalg.norm(want)))
            assert cosine > 0.9, cosine
        assert all(stream.state[s.name].dtype == np.int8 for s in states)
        assert isinstance(stream.ask("which colour appeared first?", max_new_tokens=4), str)
