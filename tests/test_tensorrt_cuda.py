"""The CUDA side of the TensorRT backend on the strict fakes (issue 23): the CUDA runtime and TensorRT's CUDA major
against the driver's, stream-ordered memory for the carried state's slices and joins, pinned host buffers on the
hot path, engines mapped rather than read into bytes. The rules themselves (versions, pins) are tested in
test_install_pins.py."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx")

from mirasol.runtime.bundle.reader import Bundle  # noqa: E402
from mirasol.runtime.errors import BackendError  # noqa: E402
from mirasol.runtime.pipeline import Pipeline  # noqa: E402
from mirasol.runtime.tensorrt import backend as trt_backend  # noqa: E402
from mirasol.runtime.tensorrt import build as tb  # noqa: E402
from mirasol.runtime.tensorrt import cuda  # noqa: E402
from mirasol.runtime.tensorrt import cuda_versions  # noqa: E402

from . import fake_tensorrt  # noqa: E402

JETPACK_PIN = "pip install 'cuda-python==12.6.2.post1'"


@pytest.mark.parametrize("runtime, driver, jetson, problem", [
    (12060, 12060, True, None),  # JetPack 6 with the pinned 12.6 runtime
    (12090, 12060, True, f"cuda-python's CUDA runtime is 12.9 but the driver supports CUDA 12.6: {JETPACK_PIN}, or "
                         f"install the cuda-compat-12-9 package"),  # issue 23's Jetson: cuda-python>=12.6,<13
    (12090, 12060, False, None),  # a discrete GPU: CUDA minor version compatibility
    (13040, 12080, False, "cuda-python's CUDA runtime is 13.4 but the driver supports CUDA 12.8: pip install "
                          "'cuda-python>=12.8,<12.9', or a driver for CUDA 13 (r580 or newer)"),
    (12090, 0, False, "no NVIDIA driver: libcuda.so.1 cannot be loaded"),
])
def test_availability_compares_the_runtime_with_the_driver(monkeypatch, runtime, driver, jetson, problem):
    fake_tensorrt.install(monkeypatch, runtime_version=runtime, driver_version=driver, jetson=jetson)
    monkeypatch.setattr(cuda_versions, "tensorrt_wheels", lambda: {})
    ok, why = trt_backend.is_available()
    if problem is None:
        assert ok and why.endswith(f"1 CUDA device(s), driver CUDA {driver // 1000}.{driver % 1000 // 10}"), why
    else:
        assert not ok and why.startswith(problem), why


def test_a_tensorrt_built_for_a_newer_cuda_is_refused_at_load(monkeypatch, tiny_bundles, tmp_path):
    """TensorRT wheels for CUDA 13 under a CUDA 12 driver: said at load, with the extra that fits."""
    fake_tensorrt.install(monkeypatch, runtime_version=12090, driver_version=12080)
    monkeypatch.setattr(cuda_versions, "tensorrt_wheels", lambda: {"tensorrt-cu13-libs": (13, "10.13.3.9"),
                                                                   "tensorrt-cu13-bindings": (13, "10.13.3.9")})
    bundle = Bundle.load(shutil.copytree(tiny_bundles["ttm"], tmp_path / "b"))
    with pytest.raises(BackendError, match=r"TensorRT 10\.3\.0 \(tensorrt-cu13-bindings, tensorrt-cu13-libs\) is built "
                                           r"for CUDA 13, but the driver supports CUDA 12\.8: pip uninstall -y "
                                           r"tensorrt-cu13-bindings tensorrt-cu13-libs && pip install "
                                           r"'mirasol-edge\[tensorrt-cu12\]'"):
        trt_backend.TensorRTBackend().load(bundle.graphs["combiner"], bundle)


@pytest.fixture
def engines(fake_tensorrt, tiny_bundles, tmp_path) -> Path:
    copy = Path(shutil.copytree(tiny_bundles["ttm"], tmp_path / "bundle"))
    tb.build_engines(copy)
    return copy


def test_streams_run_without_device_wide_synchronization_nor_pageable_copies(engines, fake_tensorrt):
    """Past the first chunks (buffers grown), a chunk and a token cost no cudaMalloc / cudaFree (each synchronizes the
    whole device; the carried state's window and appends come from the stream-ordered pool) and every copy of the
    hot path goes through pinned memory (issue 23). The pool keeps freed memory (release threshold unlimited)."""
    rng = np.random.default_rng(0)
    device = fake_tensorrt.device
    with Pipeline.load(engines, backend="tensorrt") as pipe:
        stream = pipe.stream()
        chunks = [(rng.random(pipe.chunk_inputs["video"].shape[1:], dtype=np.float32),
                   rng.standard_normal(pipe.chunk_inputs["audio"].shape[1:]).astype(np.float32))
                  for _ in range(pipe.config["av_window_chunks"] + 3)]  # past the window: slices every chunk
        for video, audio in chunks[:2]:
            stream.push(video, audio)
        before = device.synchronizing_calls, device.pageable_copies
        for video, audio in chunks[2:]:
            stream.push(video, audio)
        stream.token_ids("what is it?", 4)
        assert (device.synchronizing_calls, device.pageable_copies) == before
    assert device.pool_release_threshold == (1 << 64) - 1


def test_without_memory_pools_plain_cudamalloc_still_works(monkeypatch, tiny_bundles, tmp_path):
    fake = fake_tensorrt.install(monkeypatch)
    monkeypatch.setattr(fake.cudart, "cudaDeviceGetAttribute", lambda attr, device: (fake.cudart.cudaError_t(0), 0))
    copy = Path(shutil.copytree(tiny_bundles["ttm"], tmp_path / "bundle"))
    tb.build_engines(copy, graphs=["text_cross_kv"])
    bundle = Bundle.load(copy)
    session = trt_backend.TensorRTBackend().load(bundle.graphs["text_cross_kv"], bundle)
    session.run({"av_memory": np.ones((1, 4, 64), np.float32)})
    window = cuda.DeviceArray.from_numpy(np.arange(12, dtype=np.float32).reshape(3, 4)).slice(0, 1)
    np.testing.assert_array_equal(window.numpy(), np.arange(4, 12, dtype=np.float32).reshape(2, 4))
    assert fake.device.synchronizing_calls > 0 and fake.device.pool_release_threshold is None


def test_engines_are_deserialized_from_a_memory_map(engines, fake_tensorrt):
    """Not read into Python bytes first (issue 23: 2-3x the engine in peak host memory)."""
    bundle = Bundle.load(engines)
    trt_backend.TensorRTBackend().load(bundle.graphs["text_decoder"], bundle)
    assert fake_tensorrt.device.deserialized_from[-1] == "mmap"


def test_pinned_buffers_view_and_free(fake_tensorrt):
    buffer = cuda.PinnedBuffer(64)
    view = buffer.view((2, 4), np.float32)
    view[:] = 1.5
    assert buffer.view((8,), np.float32).sum() == 12.0 and fake_tensorrt.device.is_pinned(buffer.ptr, 64)
    with pytest.raises(BackendError, match="cannot hold"):
        buffer.view((65,), np.float32)
    buffer.free()
    assert not fake_tensorrt.device.pinned
