"""Engines of the tiny fp32, fp16 and int8 (TensorRT recipe) bundles: built, recorded and run against real
TensorRT where `import tensorrt` and a GPU work, and against the strict fake (tests/fake_tensorrt.py) elsewhere."""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx")

from mirasol.runtime.tensorrt import build as tb  # noqa: E402
from mirasol.runtime.tensorrt import plan as tp  # noqa: E402
from mirasol.runtime.tensorrt import cuda  # noqa: E402
from mirasol.runtime.tensorrt import backend as trt_backend  # noqa: E402
from mirasol.runtime.bundle.reader import Bundle, sha256_file  # noqa: E402
from mirasol.runtime.errors import BundleError, InputError  # noqa: E402
from mirasol.runtime.bundle.manifest import AxisRange, GraphEntry, Manifest  # noqa: E402
from mirasol.runtime.pipeline import Pipeline  # noqa: E402

from . import fake_tensorrt  # noqa: E402
from .conftest import run_in_threads  # noqa: E402


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
    typing: str
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
        typing = "auto" if bundle_precision == engine_precision else "weak"  # fp16 of an fp32 bundle: weak by name
        records = tb.build_engines(bundle, precision=engine_precision, typing=typing, workspace_mb=512,
                                   progress=lines.append)
        yield Built(bundle, engine_precision, typing, records, lines, tiny_models["ttm"].config)


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
    assert tb.build_engines(built.bundle, precision=built.precision, typing=built.typing, workspace_mb=512,
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
        for got, want in zip(run_in_threads(session, inputs), [session.run(f) for f in inputs]):
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
    records = tb.build_engines(copy, precision=built.precision, typing=built.typing, graphs=[name],
                               axis_max={"batch": 1}, force=True)
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
