"""The native TensorRT backend: on a strict fake TensorRT and CUDA runtime in CI, and engines of the tiny bundles.

- Without TensorRT the backend imports and refuses clearly.
- On the fakes (tests/fake_tensorrt.py, tests/fake_cuda.py) every backend fix of issue 18 has its test: aligned and
  accepted addresses, synchronization, activation memory sized for the shapes run, contexts per device memory,
  copy counters, closing.
- The engine tests at the end (`built`) run against real TensorRT where `import tensorrt` and a GPU work, and against
  the fake elsewhere, on the tiny fp32, fp16 and int8 (TensorRT flavour) bundles.
"""
from __future__ import annotations

import dataclasses
import gc
import re
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx")

from mirasol.runtime import tensorrt_build as tb  # noqa: E402
from mirasol.runtime import tensorrt_plan as tp  # noqa: E402
from mirasol.runtime.backends import cuda  # noqa: E402
from mirasol.runtime.backends import tensorrt as trt_backend  # noqa: E402
from mirasol.runtime.bundle import Bundle, sha256_file  # noqa: E402
from mirasol.runtime.errors import BackendError, BundleError, InputError  # noqa: E402
from mirasol.runtime.manifest import AxisRange, GraphEntry, Manifest  # noqa: E402
from mirasol.runtime.pipeline import Pipeline  # noqa: E402

from .conftest import QUESTION  # noqa: E402

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
    feeds = {"av_memory": np.random.default_rng(3).standard_normal((1, 8, 64)).astype(np.float32)}
    want = session.run(feeds)
    monkeypatch.setattr(cuda, "synchronize", lambda stream, what: None)
    got = session.run(feeds)
    assert not all(np.array_equal(got[k], want[k]) for k in want)


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
    monkeypatch.setattr(trt_backend._Slot, "bind_scratch", lambda self, nbytes: None)
    fresh = trt_backend.TensorRTBackend().load(entry, engines)
    with pytest.raises(BackendError, match="execute_async_v3 failed"):
        fresh.run(_decoder_feeds(engines, 0, rng))
    assert "needs" in fake_tensorrt.device.log[-1] and "set_device_memory" in fake_tensorrt.device.log[-1]


def _run_in_threads(session, inputs: list) -> list:
    """The results of `session.run` on each of `inputs`, all called at once from as many threads."""
    results: list = [None] * len(inputs)
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, session.run(inputs[i])))
               for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


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
    for got, want in zip(_run_in_threads(session, inputs), [session.run(f) for f in inputs]):
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


# ---------------------------------------------------------------------------------------------------------------
# Engines of the tiny bundles: real TensorRT and a GPU where present, else the fake
# ---------------------------------------------------------------------------------------------------------------

def _real_tensorrt() -> str | None:
    """None when real TensorRT and a GPU are here, else why not."""
    try:
        import tensorrt  # noqa: F401, PLC0415
    except ImportError:
        return "TensorRT not installed"
    ok, why = trt_backend.is_available()
    return None if ok else why


REAL_TENSORRT = _real_tensorrt() is None
TOLERANCE = {"fp32": 1e-3, "fp16": 5e-2}  # engine kernels vs ONNX Runtime on CPU; int8: see _close


@dataclasses.dataclass
class Built:
    bundle: Path
    precision: str
    records: dict
    lines: list
    config: object


@pytest.fixture(scope="module", params=[("fp32", "fp32"), ("fp16", "fp16"), ("fp32", "fp16"), ("int8", "int8")],
                ids=lambda p: f"{p[0]}-bundle-{p[1]}-engines")
def built(request, tmp_path_factory, tiny_bundles, tiny_models):
    """Engines built for a copy of a tiny bundle, with real TensorRT where present, else with the fake (installed
    for every test of this module that uses these engines)."""
    bundle_precision, engine_precision = request.param
    source = {"fp32": tiny_bundles["ttm"], "fp16": tiny_bundles["ttm-fp16"]}.get(bundle_precision)
    source = source or request.getfixturevalue("tiny_int8_trt_bundle")
    with pytest.MonkeyPatch.context() as patch:
        if not REAL_TENSORRT:
            fake_tensorrt.install(patch)
        bundle = Path(shutil.copytree(source, tmp_path_factory.mktemp("engines") / "bundle"))
        lines: list[str] = []
        records = tb.build_engines(bundle, precision=engine_precision, workspace_mb=512, progress=lines.append)
        yield Built(bundle, engine_precision, records, lines, tiny_models["ttm"].config)


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


def _profile(entry: GraphEntry) -> dict[str, AxisRange]:
    return {a: AxisRange(**r) for a, r in entry.engine["profile"].items()}


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


def _sessions(bundle_dir: Path, **options):
    bundle = Bundle.load(bundle_dir)
    backend = trt_backend.TensorRTBackend(**options)
    return bundle, {name: backend.load(entry, bundle) for name, entry in bundle.graphs.items()}


def test_engines_built_and_recorded(built):
    manifest = Manifest.read(built.bundle)
    assert set(built.records) == set(manifest.graphs)
    for name, entry in manifest.graphs.items():
        record = entry.engine
        assert record["file"] == f"{name}.{built.precision}.engine" and (built.bundle / record["file"]).is_file()
        assert record["sha256"] == sha256_file(built.bundle / record["file"])
        assert record["gpu"] and record["compute_capability"] and record["tensorrt"]
        assert set(record["profile"]) <= set(entry.axes) and record["context_memory_bytes"] > 0
        assert record["build_args"][:2] == ["--precision", built.precision]
        if not REAL_TENSORRT:
            assert "TF32" not in fake_tensorrt.built_plan(built.bundle, name)["flags"]
    assert (built.bundle / tb.TIMING_CACHE_FILE).stat().st_size > 0
    assert any("building" in line for line in built.lines)
    again: list[str] = []
    assert tb.build_engines(built.bundle, precision=built.precision, workspace_mb=512,
                            progress=again.append) == built.records
    assert all("up to date" in line for line in again[1:])


@pytest.mark.parametrize("which", ["min", "opt"])
def test_native_backend_equals_onnxruntime(built, which):
    bundle, sessions = _sessions(built.bundle)
    rng = np.random.default_rng(0)
    for name, entry in bundle.graphs.items():
        feeds = _feeds(entry, _profile(entry), which, rng)
        reference = _ort(built.bundle, entry)
        want = dict(zip([o.name for o in reference.get_outputs()], reference.run(None, feeds)))
        got = sessions[name].run(feeds)
        for out in entry.outputs:
            _close(got[out.name], want[out.name], built.precision, f"{name}.{out.name} at {which} shapes")
        first = entry.outputs[0].name
        assert list(sessions[name].run(feeds, [first])) == [first]
        sessions[name].close()


def test_device_arrays_and_threads(built):
    bundle, sessions = _sessions(built.bundle, max_contexts=2)
    rng = np.random.default_rng(1)
    for name, entry in bundle.graphs.items():
        feeds = _feeds(entry, _profile(entry), "opt", rng)
        session = sessions[name]
        host = session.run(feeds)
        names = [o.name for o in entry.outputs]
        before = session.transfers.snapshot()
        kept = session.run(feeds, keep_on_device=names)
        assert session.transfers.snapshot()["device_to_host"] == before["device_to_host"]
        for out in names:
            assert isinstance(kept[out], cuda.DeviceArray)
            np.testing.assert_array_equal(kept[out].numpy(), host[out])
        on_device = {k: cuda.DeviceArray.from_numpy(v) for k, v in feeds.items()}
        before = session.transfers.snapshot()
        again = session.run(on_device)
        assert session.transfers.snapshot()["host_to_device"] == before["host_to_device"]
        for out in names:
            np.testing.assert_array_equal(again[out], host[out])
        inputs = [_feeds(entry, _profile(entry), "opt", np.random.default_rng(10 + i)) for i in range(6)]
        for got, want in zip(_run_in_threads(session, inputs), [session.run(f) for f in inputs]):
            for out in names:
                np.testing.assert_array_equal(got[out], want[out])
        assert session.memory()["contexts"] <= 2
        session.close()
    a = cuda.DeviceArray.from_numpy(np.arange(2 * 3 * 5 * 2, dtype=np.float32).reshape(2, 3, 5, 2))
    b = cuda.DeviceArray.from_numpy(np.ones((2, 3, 1, 2), np.float32))
    np.testing.assert_array_equal(a.slice(2, -3).numpy(), a.numpy()[:, :, -3:])
    np.testing.assert_array_equal(cuda.DeviceArray.concatenate([a, b], axis=2).numpy(),
                                  np.concatenate([a.numpy(), b.numpy()], axis=2))
    np.testing.assert_array_equal(cuda.DeviceArray.zeros((3, 0), np.int64).numpy(), np.zeros((3, 0), np.int64))


def test_refusals(built, tmp_path):
    copy = Path(shutil.copytree(built.bundle, tmp_path / "copy"))
    bundle, sessions = _sessions(copy)
    name, entry = next(iter(bundle.graphs.items()))
    too_big = {a: AxisRange(r.min, r.opt, r.max + 1) for a, r in _profile(entry).items()}
    if too_big:
        with pytest.raises(InputError, match="optimization profile"):
            sessions[name].run(_feeds(entry, too_big, "max", np.random.default_rng(2)))
    tp.record_engine(copy, name, {**entry.engine, "tensorrt": "9.9.9"})
    bundle = Bundle.load(copy)
    with pytest.raises(BundleError, match=rf"TensorRT 9\.9\.9.*mirasol-build-engines .*--precision {built.precision}"):
        trt_backend.TensorRTBackend().load(bundle.graphs[name], bundle)
    (copy / entry.engine["file"]).unlink()
    with pytest.raises(BundleError, match="missing; build it on this device with: mirasol-build-engines"):
        trt_backend.TensorRTBackend().load(bundle.graphs[name], bundle)


def test_profile_maximum_override(built, tmp_path):
    copy = Path(shutil.copytree(built.bundle, tmp_path / "copy"))
    manifest = Manifest.read(copy)
    name, entry = next((n, e) for n, e in manifest.graphs.items() if "batch" in tp.profile_axes(e))
    assert entry.axes["batch"].max >= 2
    records = tb.build_engines(copy, precision=built.precision, graphs=[name], axis_max={"batch": 1}, force=True)
    assert records[name]["profile"]["batch"]["max"] == 1 and "batch=1" in records[name]["build_args"]
    bundle, sessions = _sessions(copy)
    axes = {**_profile(entry), "batch": AxisRange(2, 2, 2)}
    with pytest.raises(InputError, match="--max batch=N"):
        sessions[name].run(_feeds(entry, axes, "opt", np.random.default_rng(3)))


def test_streaming_equals_batch_on_engines(built):
    """The TensorRT pipeline streams like the ONNX Runtime one, whose equality with the PyTorch whole-clip forward
    the export tests check: per-chunk av_context within tolerance for chunks past the KV window, and the same
    greedy answer in fp32."""
    from .conftest import random_clip  # noqa: PLC0415

    if built.precision == "int8":
        pytest.skip("int8 engines are compared graph by graph only")
    tolerance = "fp16" if built.precision == "fp16" else "fp32"
    config = built.config
    chunks = config.av_window_chunks + 3  # past the AV KV window
    video, audio = (x[0] for x in random_clip(config, chunks, seed=5))  # one clip, no batch axis
    with Pipeline.load(built.bundle) as reference, Pipeline.load(built.bundle, backend="tensorrt") as engines:
        ref_stream, trt_stream = reference.stream(), engines.stream()
        for i, (v, a) in enumerate(reference.split_clip(video, audio)):
            _close(trt_stream.push(v, a), ref_stream.push(v, a), tolerance, f"av_context of chunk {i}")
        if built.precision == "fp32":
            question = "What is the man holding?"
            assert trt_stream.ask(question, max_new_tokens=8) == ref_stream.ask(question, max_new_tokens=8)
            assert engines.answer(video, audio, question, max_new_tokens=8) == \
                reference.answer(video, audio, question, max_new_tokens=8)
