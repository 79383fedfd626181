"""ONNX Runtime with the carried state on the device (issue 23): the backends onnxruntime-cuda / onnxruntime-tensorrt,
tested in CI through the same IOBinding code on the CPU provider (`OnnxRuntimeDeviceBackend("cpu")`), counting the
bytes a GPU would copy per chunk and per token exactly as tests/test_tensorrt.py does for TensorRT."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from mirasol.runtime.backends import REGISTRY, backend_entry, onnx_ops
from mirasol.runtime.backends import onnxruntime_checks as checks
from mirasol.runtime.backends.onnxruntime_device import (
    CACHE_DIR,
    OnnxRuntimeDeviceBackend,
    OrtDeviceArray,
    check_loaded,
    tensorrt_options,
)
from mirasol.runtime.bundle.reader import Bundle
from mirasol.runtime.errors import BackendError
from mirasol.runtime.files.ownership import MARKER_FILE, check_output_dir
from mirasol.runtime.pipeline import Pipeline
from mirasol.runtime.tensorrt.plan import input_shapes, profile_axes

from .conftest import QUESTION


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int64])
def test_one_operator_models_parse_and_run(dtype):
    onnx = pytest.importorskip("onnx")
    rng = np.random.default_rng(0)
    parts = [(rng.standard_normal((1, 2, n, 3)) * 10).astype(dtype) for n in (3, 0, 2)]
    concat = onnx_ops.concat_model(np.dtype(dtype), 4, 2, 3)
    onnx.checker.check_model(onnx.load_from_string(concat))
    session = ort.InferenceSession(concat, providers=["CPUExecutionProvider"])
    joined = session.run(None, {f"x{i}": p for i, p in enumerate(parts)})[0]
    np.testing.assert_array_equal(joined, np.concatenate(parts, axis=2))
    window = onnx_ops.slice_model(np.dtype(dtype), 4)
    onnx.checker.check_model(onnx.load_from_string(window))
    session = ort.InferenceSession(window, providers=["CPUExecutionProvider"])
    for start, stop in ((-2, (1 << 63) - 1), (1, 4), (0, 0)):
        bounds = {k: np.array([v], np.int64) for k, v in {"starts": start, "ends": stop, "axes": 2}.items()}
        np.testing.assert_array_equal(session.run(None, {"x": joined, **bounds})[0], joined[:, :, start:stop])


def _chunks(pipe: Pipeline, count: int, seed: int = 7) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(rng.random(pipe.chunk_inputs["video"].shape[1:], dtype=np.float32),
             rng.standard_normal(pipe.chunk_inputs["audio"].shape[1:]).astype(np.float32)) for _ in range(count)]


def test_pipeline_keeps_carried_state_on_the_device(tiny_bundles, tmp_path):
    """Through the Pipeline, per chunk only the caller's inputs go to the device and only the chunk's av_context comes
    back (the KV window, the TTM memory and the AV memory stay there, past the window too); per generated token only
    the token and its position go and only the logits come back: the bytes tests/test_tensorrt.py asserts for
    TensorRT. Outputs equal ONNX Runtime's without binding; the state saves and restores."""
    backend = OnnxRuntimeDeviceBackend("cpu")
    with Pipeline.load(tiny_bundles["ttm"]) as reference, Pipeline.load(tiny_bundles["ttm"], backend=backend) as pipe:
        want, stream = reference.stream(), pipe.stream()
        for i, (video, audio) in enumerate(_chunks(pipe, pipe.config["av_window_chunks"] + 3)):
            before = backend.transfers.snapshot()
            context = stream.push(video, audio)
            moved = {k: backend.transfers.snapshot()[k] - before[k] for k in before}
            memory = 0 if i else stream.state["ttm_memory"].nbytes  # the TTM memory's zeros, uploaded once
            counters = 8 * len(stream.counters)  # int64 counters (if the bundle has any) come from the host
            assert moved["host_to_device"] == video.nbytes + audio.nbytes + memory + counters, i
            assert moved["device_to_host"] == context.nbytes, i
            np.testing.assert_allclose(context, want.push(video, audio), atol=1e-6)
        assert all(isinstance(v, OrtDeviceArray) for v in stream.state.values())
        before = backend.transfers.snapshot()
        tokens = stream.token_ids(QUESTION, 6)
        moved = {k: backend.transfers.snapshot()[k] - before[k] for k in before}
        assert tokens == want.token_ids(QUESTION, 6)
        prompt, vocab = len(pipe.tokenizer.prompt(QUESTION)), pipe.bundle.graphs["text_decoder"].outputs[0].shape[-1]
        runs = len(tokens[0]) + (len(tokens[0]) < 6)  # decoder runs: one per token, plus the one that gave EOS
        assert moved["host_to_device"] == 8 * (prompt + runs - 1) + 8 * runs
        assert moved["device_to_host"] == 4 * vocab * (prompt + runs - 1)
        stream.save(tmp_path / "state.npz")
        restored = pipe.restore(tmp_path / "state.npz")
        video, audio = _chunks(pipe, 1, seed=9)[0]
        np.testing.assert_array_equal(restored.push(video, audio), stream.push(video, audio))


def test_many_streams_batched_and_threads(tiny_bundles):
    """push_streams stacks device states (host parts uploaded), then windows them back per stream, on the device."""
    backend = OnnxRuntimeDeviceBackend("cpu")
    with Pipeline.load(tiny_bundles["ttm"]) as reference, Pipeline.load(tiny_bundles["ttm"], backend=backend) as pipe:
        chunks = _chunks(pipe, 3)
        streams, wants = [pipe.stream() for _ in range(3)], [reference.stream() for _ in range(3)]
        for step in range(2):
            got = pipe.push_streams(streams, [chunks[(i + step) % 3] for i in range(3)])
            for i, want in enumerate(wants):
                np.testing.assert_allclose(got[i], want.push(*chunks[(i + step) % 3]), atol=1e-6)


def test_a_kept_output_survives_later_calls(tiny_bundles):
    """A fresh IOBinding per call: an OrtValue kept from one call is not overwritten by the next (reusing one binding
    corrupts it in onnxruntime 1.19-1.26)."""
    bundle = Bundle.load(tiny_bundles["ttm"])
    session = OnnxRuntimeDeviceBackend("cpu").load(bundle.graphs["text_cross_kv"], bundle)
    rng = np.random.default_rng(1)
    first = session.run({"av_memory": rng.standard_normal((1, 8, 64)).astype(np.float32)},
                        keep_on_device={"cross_key_0"})
    kept = first["cross_key_0"].numpy()
    session.run({"av_memory": rng.standard_normal((1, 4, 64)).astype(np.float32)}, keep_on_device={"cross_key_0"})
    np.testing.assert_array_equal(first["cross_key_0"].numpy(), kept)


class _FellBack:
    def get_providers(self) -> list[str]:
        return ["CPUExecutionProvider"]


def test_a_silent_fallback_to_the_cpu_is_refused():
    with pytest.raises(BackendError, match=r"onnxruntime did not load CUDAExecutionProvider for graph 'g': the "
                                           r"session would run on \['CPUExecutionProvider'\].*mirasol-doctor"):
        check_loaded(_FellBack(), "CUDAExecutionProvider", "graph 'g'", "cuda")


def test_a_gpu_provider_on_the_cpu_wheel_names_the_extra(monkeypatch):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here")
    monkeypatch.setattr(checks, "jetson_release", lambda: None)
    with pytest.raises(BackendError, match=r"has no CUDAExecutionProvider .*pip uninstall -y onnxruntime "
                                           r"onnxruntime-gpu && pip install 'mirasol-edge\[onnxruntime-cu12\]'"):
        backend_entry("onnxruntime-cuda").create()
    monkeypatch.setattr(checks, "jetson_release", lambda: {"l4t": "36.4.3"})
    assert "jetson-ai-lab.io/jp6/cu126" in checks.check_tensorrt(None)


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_tensorrt_provider_options_come_from_the_manifest(tiny_bundles, tmp_path, precision):
    bundle = Bundle.load(tiny_bundles["ttm"])
    entry = bundle.graphs["text_decoder"]
    options = tensorrt_options(entry, precision, tmp_path / "cache", 1, 512)
    shapes = input_shapes(entry, profile_axes(entry))
    for which in ("min", "opt", "max"):
        listed = dict(part.split(":") for part in options[f"trt_profile_{which}_shapes"].split(","))
        assert listed == {name: "x".join(map(str, shape[which])) for name, shape in shapes.items()}
    assert options["trt_fp16_enable"] == (precision == "fp16") and options["trt_int8_enable"] == (precision == "int8")
    assert options["trt_engine_cache_path"] == options["trt_timing_cache_path"] == str(tmp_path / "cache")
    assert (options["device_id"], options["trt_max_workspace_size"]) == (1, 512 << 20)


def test_the_provider_cache_is_ours_inside_the_bundle(tiny_bundles, tmp_path):
    """Made under the ownership rule: marked, and a bundle holding it is still recognised as ours (re-exportable)."""
    copy = Path(shutil.copytree(tiny_bundles["ttm"], tmp_path / "bundle"))
    backend = OnnxRuntimeDeviceBackend("cpu")
    cache = backend._cache(Bundle.load(copy))
    assert cache == copy.absolute() / CACHE_DIR and (cache / MARKER_FILE).is_file()
    (cache / "text_decoder_engine.engine").write_bytes(b"engine")
    assert check_output_dir(copy, "bundle") == copy.absolute()


def test_registry_names_the_device_backends():
    assert {"onnxruntime-cuda", "onnxruntime-tensorrt"} <= set(REGISTRY)
    for name in ("onnxruntime-cuda", "onnxruntime-tensorrt"):
        entry = REGISTRY[name]
        assert entry.device == "gpu" and entry.backend_class() is OnnxRuntimeDeviceBackend
        assert entry.fixed_options == {"execution": name.split("-")[1]}
