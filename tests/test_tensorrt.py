"""The native TensorRT backend: on a strict fake TensorRT and CUDA runtime in CI, and engines of the tiny bundles.

- Without TensorRT the backend imports and refuses clearly.
- On the fakes (tests/fake_tensorrt.py, tests/fake_cuda.py) every backend fix of issue 18 has its test: aligned and
  accepted addresses, synchronization, activation memory sized for the shapes run, contexts per device memory,
  copy counters, closing.
- The engine tests of the tiny bundles are in test_tensorrt_engines.py.
"""
from __future__ import annotations

import gc
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx")

from mirasol.runtime.tensorrt import build as tb  # noqa: E402
from mirasol.runtime.tensorrt import plan as tp  # noqa: E402
from mirasol.runtime.tensorrt import cuda  # noqa: E402
from mirasol.runtime.tensorrt import backend as trt_backend  # noqa: E402
from mirasol.runtime.tensorrt import slots  # noqa: E402
from mirasol.runtime.bundle.reader import Bundle  # noqa: E402
from mirasol.runtime.errors import BackendError, BundleError, InputError  # noqa: E402
from mirasol.runtime.pipeline import Pipeline  # noqa: E402

from .conftest import QUESTION, run_in_threads  # noqa: E402

from . import fake_tensorrt  # noqa: E402


# ---------------------------------------------------------------------------------------------------------------
# The backend without TensorRT, and on the strict fake (the tiny bundle's graphs)
# ---------------------------------------------------------------------------------------------------------------

def test_backend_imports_without_tensorrt_and_refuses_clearly(tiny_bundles, tmp_path, monkeypatch):
    ok, why = trt_backend.is_available()
    assert isinstance(ok, bool) and why
    copy = Path(shutil.copytree(tiny_bundles["ttm"], tmp_path / "b"))
    bundle = Bundle.load(copy)
    if not ok:  # without TensorRT, that is what is said (not "build the engines")
        with pytest.raises(BackendError, match=f"the tensorrt backend cannot run here: {re.escape(why)}"):
            trt_backend.TensorRTBackend().load(bundle.graphs["combiner"], bundle)
    monkeypatch.setattr(trt_backend, "is_available", lambda: (True, "TensorRT present (pretended)"))
    with pytest.raises(BundleError, match=r"mirasol-build-engines .*b --precision fp32"):
        trt_backend.TensorRTBackend().load(bundle.graphs["combiner"], bundle)
    tp.record_engine(copy, "combiner", {"file": "combiner.fp16.engine", "build_args": ["--precision", "fp16", "--max",
                                                                                       "batch=1"]})
    bundle = Bundle.load(copy)
    with pytest.raises(BundleError, match=r"missing; build it on this device with: mirasol-build-engines \S+ "
                                          r"--precision fp16 --max batch=1"):
        trt_backend.TensorRTBackend().load(bundle.graphs["combiner"], bundle)


def test_device_array_metadata():
    array = cuda.DeviceArray((2, 3, 0, 4), np.float16, 0x1000)
    assert (array.ndim, array.size, array.nbytes, len(array)) == (4, 0, 0, 2)
    assert "float16" in repr(array)
    with pytest.raises(InputError):
        cuda.DeviceArray((2, -1), np.float32, 0)


@pytest.fixture
def engines(fake_tensorrt, tiny_bundles, tmp_path) -> Bundle:
    """The tiny fp32 TTM bundle with fp32 engines built by the fake."""
    copy = Path(shutil.copytree(tiny_bundles["ttm"], tmp_path / "bundle"))
    tb.build_engines(copy)
    return Bundle.load(copy)


def _decoder_feeds(bundle: Bundle, past: int, rng: np.random.Generator, text_len: int = 1) -> dict[str, np.ndarray]:
    entry = bundle.graphs["text_decoder"]
    sizes = {"batch": 1, "text_len": text_len, "memory_len": 8, "past_text": past}
    feeds = {}
    for t in entry.inputs:
        shape = [sizes.get(d, d) for d in t.shape]
        feeds[t.name] = (rng.integers(0, 256, shape) if t.dtype == "int64" else rng.standard_normal(shape)
                         ).astype(t.dtype)
    return feeds


def test_run_equals_onnxruntime_and_counts_copies(engines):
    import onnxruntime as ort  # noqa: PLC0415

    entry = engines.graphs["text_decoder"]
    session = trt_backend.TensorRTBackend().load(entry, engines)
    reference = ort.InferenceSession(str(engines.file(entry.file)), providers=["CPUExecutionProvider"])
    names = [o.name for o in entry.outputs]
    rng = np.random.default_rng(0)
    for past in (0, 3, 40):  # the empty cache, then buffers that grow
        feeds = _decoder_feeds(engines, past, rng)
        before = session.transfers.snapshot()
        got = session.run(feeds)
        for name, want in zip(names, reference.run(names, feeds)):
            np.testing.assert_array_equal(got[name], want)
        after = session.transfers.snapshot()
        assert after["host_to_device"] - before["host_to_device"] == sum(v.nbytes for v in feeds.values())
        assert after["device_to_host"] - before["device_to_host"] == sum(v.nbytes for v in got.values())
    # only the requested outputs come back
    before = session.transfers.snapshot()["device_to_host"]
    assert list(session.run(feeds, ["logits"])) == ["logits"]
    assert session.transfers.snapshot()["device_to_host"] - before == got["logits"].nbytes
    # bounds of the engine's profile, dtype conversion, wrong names
    with pytest.raises(InputError, match=r"size 96 along axis 'past_text'.*accepts 0\.\.95.*--max past_text=N"):
        session.run(_decoder_feeds(engines, 96, rng))
    converted = session.run({**feeds, "position": feeds["position"].astype(np.int32)})
    np.testing.assert_array_equal(converted["logits"], got["logits"])
    with pytest.raises(InputError, match="missing input"):
        session.run({"input_ids": feeds["input_ids"]})
    with pytest.raises(InputError, match="no output"):
        session.run(feeds, ["nope"])
    with pytest.raises(InputError, match="dtype"):
        session.run({**feeds, "input_ids": feeds["input_ids"].astype(np.float32)})


def test_carried_state_stays_on_the_device(engines):
    """present_* kept on the device and fed back as past_*: no copy of the cache either way."""
    session = trt_backend.TensorRTBackend().load(engines.graphs["text_decoder"], engines)
    caches = [t.name for t in engines.graphs["text_decoder"].outputs if t.name.startswith("present_")]
    rng = np.random.default_rng(1)
    feeds = _decoder_feeds(engines, 2, rng)
    host = session.run(feeds)
    kept = session.run(feeds, keep_on_device=caches)
    for name in caches:
        assert isinstance(kept[name], cuda.DeviceArray)
        np.testing.assert_array_equal(kept[name].numpy(), host[name])
    step = {**feeds, "position": feeds["position"] + 1, "input_ids": feeds["input_ids"][:, :1]}
    step.update({name.replace("present_", "past_"): kept[name] for name in caches})
    before = session.transfers.snapshot()
    on_device = session.run(step, keep_on_device=caches)
    moved = {k: session.transfers.snapshot()[k] - before[k] for k in before}
    assert moved["host_to_device"] == sum(step[n].nbytes for n in step if n.startswith(("input_ids", "position",
                                                                                         "cross_")))
    assert moved["device_to_host"] == on_device["logits"].nbytes
    hosted = session.run({**step, **{name.replace("present_", "past_"): host[name] for name in caches}})
    np.testing.assert_array_equal(on_device["logits"], hosted["logits"])
    window = on_device["present_key_0"].slice(2, -3)  # a window of the cache, on the device
    np.testing.assert_array_equal(window.numpy(), hosted["present_key_0"][:, :, -3:])
    joined = cuda.DeviceArray.concatenate([window, window], axis=2)
    np.testing.assert_array_equal(joined.numpy(), np.concatenate([window.numpy()] * 2, axis=2))
    np.testing.assert_array_equal(np.asarray(cuda.DeviceArray.zeros((2, 3), np.float32)), np.zeros((2, 3)))


def test_misaligned_and_refused_addresses_name_the_tensor(engines, fake_tensorrt, monkeypatch):
    """Issue 18, fix 4: a DeviceArray at an offset, and an address TensorRT refuses, are errors naming the tensor."""
    session = trt_backend.TensorRTBackend().load(engines.graphs["text_decoder"], engines)
    feeds = _decoder_feeds(engines, 2, np.random.default_rng(2))
    base = cuda.DeviceArray.from_numpy(np.concatenate([feeds["past_key_0"].ravel(), np.zeros(4, np.float32)]))
    shifted = cuda.DeviceArray(feeds["past_key_0"].shape, np.float32, base.ptr + 16, owner=base)
    with pytest.raises(InputError, match=r"input 'past_key_0' is a DeviceArray at address 0x[0-9a-f]+, which is not "
                                         r"256-byte aligned"):
        session.run({**feeds, "past_key_0": shifted})
    strategy = fake_tensorrt.trt.ExecutionContextAllocationStrategy.USER_MANAGED
    context = fake_tensorrt.trt.ICudaEngine({"inputs": [], "outputs": [], "dtypes": {}, "profile": {}, "path": ""}
                                            ).create_execution_context(strategy)
    assert not context.set_tensor_address("x", base.ptr + 16) and not context.set_tensor_address("x", 0)
    real = fake_tensorrt.trt.IExecutionContext.set_tensor_address
    monkeypatch.setattr(fake_tensorrt.trt.IExecutionContext, "set_tensor_address",
                        lambda self, name, memory: name != "present_value_1" and real(self, name, memory))
    with pytest.raises(BackendError, match=r"TensorRT refused device address 0x[0-9a-f]+ for tensor 'present_value_1'"):
        session.run(feeds)


def test_a_missing_synchronization_is_caught(engines, monkeypatch):
    """The fake performs queued copies and launches at cudaStreamSynchronize only: without it, results are wrong."""
    session = trt_backend.TensorRTBackend().load(engines.graphs["text_cross_kv"], engines)
    feeds, other = ({"av_memory": np.random.default_rng(seed).standard_normal((1, 8, 64)).astype(np.float32)}
                    for seed in (3, 4))
    want = session.run(feeds)
    session.run(other)
    monkeypatch.setattr(cuda, "synchronize", lambda stream, what: None)
    got = session.run(feeds)  # what the slot's pinned buffers held before the copies ran: the other call's
    assert not any(np.array_equal(got[k], want[k]) for k in want)


def test_context_memory_is_sized_for_the_shapes_run(engines, fake_tensorrt, monkeypatch):
    """Issue 18, fix 6: user-managed activation memory, grown with the shapes run, never the profile's maximum
    per context; and without it the (fake) engine does not run."""
    entry = engines.graphs["text_decoder"]
    session = trt_backend.TensorRTBackend(max_contexts=2).load(entry, engines)
    rng = np.random.default_rng(4)
    session.run(_decoder_feeds(engines, 0, rng))
    small = session.memory()
    assert small["contexts"] == 1 and 0 < small["activation_bytes"] < entry.engine["context_memory_bytes"] / 10
    session.run(_decoder_feeds(engines, 60, rng, text_len=8))
    assert session.memory()["activation_bytes"] > small["activation_bytes"]
    assert fake_tensorrt.device.static_context_bytes == 0  # no context reserved the maximum
    monkeypatch.setattr(slots.Slot, "set_shapes",
                        lambda self, shapes: [self.context.set_input_shape(n, s) for n, s in shapes.items()])
    fresh = trt_backend.TensorRTBackend().load(entry, engines)
    with pytest.raises(BackendError, match="execute_async_v3 failed"):
        fresh.run(_decoder_feeds(engines, 0, rng))
    assert "needs" in fake_tensorrt.device.log[-1] and "set_device_memory" in fake_tensorrt.device.log[-1]


def test_device_memory_is_set_after_every_shape_change(engines, fake_tensorrt, monkeypatch):
    """Issue 23: set_device_memory after every change of input shapes (as Polygraphy's runner does), not only when
    the memory grows: the fake refuses a context whose shapes changed since. Same shapes: nothing is set again."""
    entry = engines.graphs["text_decoder"]
    calls: list[int] = []
    real = fake_tensorrt.trt.IExecutionContext.set_device_memory
    monkeypatch.setattr(fake_tensorrt.trt.IExecutionContext, "set_device_memory",
                        lambda self, memory, size: (calls.append(size), real(self, memory, size)))
    session = trt_backend.TensorRTBackend(max_contexts=1).load(entry, engines)
    rng = np.random.default_rng(8)
    for past, expected in ((60, 1), (60, 1), (2, 2), (3, 3), (3, 3), (60, 4)):  # shrinking shapes too
        session.run(_decoder_feeds(engines, past, rng))
        assert len(calls) == expected, past
    assert len(set(calls)) == 1  # the memory never had to grow past the first (largest) shapes

    def only_when_growing(self, shapes):  # the defect: memory given only when it had to grow
        grown = self.scratch
        for name, shape in shapes.items():
            self.context.set_input_shape(name, shape)
        if grown is None:
            self.scratch = cuda.Allocation(int(self.context.update_device_memory_size_for_shapes()), stream=self.stream)
            self.context.set_device_memory(self.scratch.ptr, self.scratch.nbytes)
    monkeypatch.setattr(slots.Slot, "set_shapes", only_when_growing)
    defective = trt_backend.TensorRTBackend(max_contexts=1).load(entry, engines)
    defective.run(_decoder_feeds(engines, 60, rng))
    with pytest.raises(BackendError, match="execute_async_v3 failed"):
        defective.run(_decoder_feeds(engines, 2, rng))


def test_update_device_memory_size_failure_is_an_error(engines, fake_tensorrt, monkeypatch):
    """update_device_memory_size_for_shapes returns 0 on an error (NvInferRuntime.h): refused, naming the shapes."""
    monkeypatch.setattr(fake_tensorrt.trt.IExecutionContext, "update_device_memory_size_for_shapes", lambda self: 0)
    session = trt_backend.TensorRTBackend().load(engines.graphs["text_cross_kv"], engines)
    with pytest.raises(BackendError, match=r"update_device_memory_size_for_shapes failed \(it returned 0\) for "
                                           r"input shapes \{'av_memory': \(1, 8, 64\)\}"):
        session.run({"av_memory": np.zeros((1, 8, 64), np.float32)})


@pytest.mark.parametrize("total_gib, contexts", [(8, 1), (32, 2)])
def test_contexts_per_graph_follow_device_memory(monkeypatch, tiny_bundles, tmp_path, total_gib, contexts):
    fake = fake_tensorrt.install(monkeypatch, total_memory=total_gib << 30)
    copy = Path(shutil.copytree(tiny_bundles["ttm"], tmp_path / "bundle"))
    tb.build_engines(copy, graphs=["text_cross_kv"])
    bundle = Bundle.load(copy)
    backend = trt_backend.TensorRTBackend()
    session = backend.load(bundle.graphs["text_cross_kv"], bundle)
    assert backend.max_contexts == contexts
    inputs = [{"av_memory": np.random.default_rng(i).standard_normal((1, 4 + i % 5, 64)).astype(np.float32)}
              for i in range(8)]
    for got, want in zip(run_in_threads(session, inputs), [session.run(f) for f in inputs]):
        np.testing.assert_array_equal(got["cross_key_0"], want["cross_key_0"])
    assert session.memory()["contexts"] <= contexts
    session.close()
    assert fake.device.allocated == 0


def test_pipeline_keeps_carried_state_on_the_device(engines):
    """Through the Pipeline on TensorRT, per chunk only the caller's inputs go to the device and only the chunk's
    av_context comes back (the KV window, the TTM memory and the AV memory stay there); per generated token only the
    token and its position go, only the logits come back. Outputs equal ONNX Runtime's."""
    rng = np.random.default_rng(7)
    with Pipeline.load(engines.path) as reference, Pipeline.load(engines.path, backend="tensorrt") as pipe:
        window = pipe.config["av_window_chunks"]
        chunks = [(rng.random(pipe.chunk_inputs["video"].shape[1:], dtype=np.float32),
                   rng.standard_normal(pipe.chunk_inputs["audio"].shape[1:]).astype(np.float32))
                  for _ in range(window + 3)]  # past the KV window: the window is kept on the device too
        want, stream = reference.stream(), pipe.stream()
        for i, (video, audio) in enumerate(chunks):
            before = cuda.TRANSFERS.snapshot()
            context = stream.push(video, audio)
            moved = {k: cuda.TRANSFERS.snapshot()[k] - before[k] for k in before}
            memory = 0 if i else stream.state["ttm_memory"].nbytes  # the TTM memory's zeros, uploaded once
            counters = 8 * len(stream.counters)  # int64 counters (if the bundle has any) come from the host
            assert moved["host_to_device"] == video.nbytes + audio.nbytes + memory + counters, i
            assert moved["device_to_host"] == context.nbytes, i
            np.testing.assert_allclose(context, want.push(video, audio), atol=1e-6)
        assert all(isinstance(v, cuda.DeviceArray) for v in stream.state.values())
        before = cuda.TRANSFERS.snapshot()
        tokens = stream.token_ids(QUESTION, 6)
        moved = {k: cuda.TRANSFERS.snapshot()[k] - before[k] for k in before}
        assert tokens == want.token_ids(QUESTION, 6)
        prompt, vocab = len(pipe.tokenizer.prompt(QUESTION)), pipe.bundle.graphs["text_decoder"].outputs[0].shape[-1]
        runs = len(tokens[0]) + (len(tokens[0]) < 6)  # decoder runs: one per token, plus the one that gave EOS
        # in: the prompt, then one token per run, and each run's int64 position; out: each input position's logits
        assert moved["host_to_device"] == 8 * (prompt + runs - 1) + 8 * runs
        assert moved["device_to_host"] == 4 * vocab * (prompt + runs - 1)
        restored = Path(engines.path.parent / "state.npz")
        stream.save(restored)
        assert pipe.restore(restored).state.keys() == stream.state.keys()


def test_sessions_and_pipelines_close(engines, fake_tensorrt):
    rng = np.random.default_rng(5)
    with Pipeline.load(engines.path, backend="tensorrt") as pipe:
        video = rng.random(pipe.chunk_inputs["video"].shape[1:], dtype=np.float32)
        audio = rng.standard_normal(pipe.chunk_inputs["audio"].shape[1:]).astype(np.float32)
        pipe.stream().push(video, audio)
        assert fake_tensorrt.device.allocated > 0
    gc.collect()
    assert fake_tensorrt.device.allocated == 0  # every context, buffer and stream freed
    with pytest.raises(BackendError, match="closed"):
        pipe.stream().push(video, audio)
    pipe.close()  # idempotent
    with Pipeline.load(engines.path) as ort_pipe:
        ort_pipe.stream().push(video, audio)
    with pytest.raises(BackendError, match="closed"):
        ort_pipe.stream().push(video, audio)


def test_engine_refusals_name_the_rebuild_command(engines):
    name = "text_cross_kv"
    record = engines.graphs[name].engine
    cases = [({**record, "compute_capability": "7.2", "gpu": "Xavier"},
              r"compute capability 7\.2.*Rebuild it here with: mirasol-build-engines \S+ --precision fp32"),
             ({**record, "onnx_sha256": "f" * 64}, "another version"),
             ({**record, "sha256": "0" * 64}, "does not match its recorded sha256")]
    for changed, message in cases:
        tp.record_engine(engines.path, name, changed)
        bundle = Bundle.load(engines.path)
        with pytest.raises(BundleError, match=message):
            trt_backend.TensorRTBackend().load(bundle.graphs[name], bundle)
