"""Hostile inputs, round 2 (issue 13, items 3 to 7): no hang, nothing read from outside the bundle, no poisoned
state, and a MirasolError with a clear message for every probe.
"""
from __future__ import annotations

import dataclasses
import os
import re
import struct
import threading
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mirasol.runtime.backends.base import GraphSession
from mirasol.runtime.bundle.reader import Bundle, sha256_file
from mirasol.runtime.errors import BackendError, BundleError, InputError
from mirasol.runtime.pipeline import Pipeline

from .conftest import QUESTION, chunk, copy_bundle, finishes_within, read_manifest, stream_snapshot, write_manifest


def _stream(pipe: Pipeline, chunks: int):
    stream = pipe.stream()
    for i in range(chunks):
        stream.push(*chunk(pipe, i))
    return stream


# ---- 3. a suspended ask_iter blocks nothing ------------------------------------------------------------------

def test_suspended_ask_iter_blocks_nothing_in_the_same_thread(shared_pipeline, tmp_path) -> None:
    expected = _stream(shared_pipeline, 3).ask(QUESTION, max_new_tokens=12)
    after_push = _stream(shared_pipeline, 4).ask(QUESTION, max_new_tokens=12)

    def scenario() -> None:
        stream = _stream(shared_pipeline, 3)
        answer = stream.ask_iter(QUESTION, max_new_tokens=12)
        first = next(answer)
        stream.push(*chunk(shared_pipeline, 3))  # while the answer is suspended, in the same thread
        assert stream.ask(QUESTION, max_new_tokens=12) == after_push
        assert "".join(stream.ask_iter(QUESTION, max_new_tokens=12)) == after_push
        stream.save(tmp_path / "state.npz")
        abandoned = stream.ask_iter(QUESTION, max_new_tokens=12)
        next(abandoned)  # suspended and never resumed
        assert stream.token_ids(QUESTION, 12) == _stream(shared_pipeline, 4).token_ids(QUESTION, 12)
        assert first + "".join(answer) == expected  # resumed later: the answer about the chunks it was asked on

    finishes_within(60, scenario)
    assert shared_pipeline.restore(tmp_path / "state.npz").ask(QUESTION, max_new_tokens=12) == after_push


def test_suspended_ask_iter_blocks_nothing_across_threads(shared_pipeline) -> None:
    expected = _stream(shared_pipeline, 3).ask(QUESTION, max_new_tokens=12)
    stream = _stream(shared_pipeline, 3)
    suspended, resume = threading.Event(), threading.Event()
    pieces: list[str] = []

    def asker() -> None:
        answer = stream.ask_iter(QUESTION, max_new_tokens=12)
        pieces.append(next(answer))
        suspended.set()
        resume.wait(60)
        pieces.extend(answer)

    thread = threading.Thread(target=asker, daemon=True)
    thread.start()
    assert suspended.wait(60)
    finishes_within(60, lambda: (stream.push(*chunk(shared_pipeline, 3)), stream.ask(QUESTION, max_new_tokens=4)))
    resume.set()
    thread.join(60)
    assert not thread.is_alive() and "".join(pieces) == expected


# ---- 4. nothing outside the bundle is read through a graph file ----------------------------------------------

def _external(bundle: Path, location: str, listed: bool, write_to: Path | None = None) -> None:
    """Move combiner.onnx's largest initializer to external data at `location` (its bytes written to `write_to`,
    default bundle/location), and update the manifest: the graph's checksum, and its external_data if `listed`."""
    import onnx

    path = bundle / "combiner.onnx"
    model = onnx.load(str(path))
    tensor = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    data = tensor.raw_data
    (write_to or bundle / location).write_bytes(data)
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(len(data)))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    path.write_bytes(model.SerializeToString())
    manifest = read_manifest(bundle)
    manifest["graphs"]["combiner"]["sha256"] = sha256_file(path)
    if listed:
        manifest["graphs"]["combiner"]["external_data"] = [location]
        manifest["graphs"]["combiner"]["external_sha256"] = {location: sha256_file(bundle / location)}
    write_manifest(bundle, manifest)


def test_listed_external_data_loads_and_runs(tiny_bundle, shared_pipeline, tmp_path) -> None:
    bundle = copy_bundle(tiny_bundle, tmp_path)
    _external(bundle, "combiner.onnx.data", listed=True)
    pipe = Pipeline.load(bundle)
    assert np.array_equal(pipe.stream().push(*chunk(pipe, 0)), shared_pipeline.stream().push(*chunk(pipe, 0)))


@pytest.mark.parametrize("location", ["/etc/passwd", "../outside.data", "sub/link", "unlisted.data"])
def test_external_data_outside_the_manifest_is_refused(tiny_bundle, tmp_path, location) -> None:
    bundle = copy_bundle(tiny_bundle, tmp_path)
    outside = tmp_path / "outside.data"
    if location == "sub/link":
        (bundle / "sub").mkdir()
        (bundle / "sub" / "link").symlink_to(outside)  # every path component: the link is one level down
    write_to = outside if location in ("/etc/passwd", "../outside.data", "sub/link") else None
    _external(bundle, location, listed=False, write_to=write_to)
    message = f"graph 'combiner' reads external data from {location!r}, which is not one of the files"
    for verify in (True, False):
        with pytest.raises(BundleError, match=message):
            Bundle.load(bundle, verify=verify)


def test_external_data_locations_are_found_everywhere(tmp_path) -> None:
    """Initializers, Constant nodes' tensors and subgraphs (If branches) are all walked."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from mirasol.runtime.bundle.graph_files import external_data_locations

    def external(name: str, location: str) -> TensorProto:
        tensor = numpy_helper.from_array(np.ones(1, np.float32), name)
        tensor.ClearField("raw_data")
        tensor.data_location = TensorProto.EXTERNAL
        entry = tensor.external_data.add()
        entry.key, entry.value = "location", location
        return tensor

    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    branch = helper.make_graph([helper.make_node("Constant", [], ["y"], value=external("s", "deep/../../x"))],
                               "branch", [], [out])
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["c"], value=external("c", "/abs")),
         helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=branch)],
        "g", [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])], [out], [external("w", "w.data")])
    path = tmp_path / "crafted.onnx"
    path.write_bytes(helper.make_model(graph).SerializeToString())
    assert external_data_locations(path) == {"w.data", "/abs", "deep/../../x"}
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(ValueError):
        external_data_locations(path)
    assert onnx.__version__  # the walker itself does not need onnx (the runtime has no onnx dependency)


# ---- 5. no poisoned stream -----------------------------------------------------------------------------------

def test_extreme_inputs_do_not_poison_the_stream(shared_pipeline, tmp_path) -> None:
    reference = _stream(shared_pipeline, 2)
    stream = _stream(shared_pipeline, 2)
    before = stream_snapshot(stream)
    video, audio = chunk(shared_pipeline, 9)
    with pytest.raises(InputError, match=r"push: graph '\w+' output '\w+' holds NaN or inf .*the stream was not "
                                         r"changed"):
        stream.push(video, np.full_like(audio, 3e38))
    after = stream_snapshot(stream)
    assert after.keys() == before.keys() and all(
        np.array_equal(after[t][k], before[t][k]) for t in ("state", "counters") for k in before[t])
    stream.save(tmp_path / "state.npz")  # restorable: nothing non-finite was carried
    restored = shared_pipeline.restore(tmp_path / "state.npz")
    context = reference.push(*chunk(shared_pipeline, 2))
    for s in (stream, restored):  # on as if the poisoned chunk had never come
        assert np.array_equal(s.push(*chunk(shared_pipeline, 2)), context)
        assert s.ask(QUESTION, max_new_tokens=8) == reference.ask(QUESTION, max_new_tokens=8)


def test_masked_array_hiding_nan_is_refused(shared_pipeline) -> None:
    video, audio = chunk(shared_pipeline, 0)
    audio[0, 0] = np.nan
    hidden = np.ma.masked_array(audio, mask=np.isnan(audio))
    stream = shared_pipeline.stream()
    with pytest.raises(InputError, match="input 'audio' of graph 'combiner': contains NaN or inf"):
        stream.push(video, hidden)
    assert stream.chunks == 0 and stream.state == {}


class _Tampering(GraphSession):
    """A session whose outputs are changed by `tamper` (a broken graph or backend)."""

    def __init__(self, inner: GraphSession, tamper: Callable[[dict[str, np.ndarray]], None]) -> None:
        self.inner, self.tamper = inner, tamper
        self.name, self.inputs, self.outputs = inner.name, inner.inputs, inner.outputs

    def run(self, feeds: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        outputs = self.inner.run(feeds, output_names)
        self.tamper(outputs)
        return outputs

    def close(self) -> None:
        self.inner.close()


def _tampered(bundle: Path, step: str, tamper: Callable[[dict[str, np.ndarray]], None]) -> Pipeline:
    pipe = Pipeline.load(bundle)
    plan = pipe._plans[step]
    plan.calls[-1] = dataclasses.replace(plan.calls[-1], session=_Tampering(plan.calls[-1].session, tamper))
    return pipe


def _poison(name: str) -> Callable[[dict[str, np.ndarray]], None]:
    def tamper(outputs: dict[str, np.ndarray]) -> None:
        outputs[name] = outputs[name].copy()
        outputs[name].flat[-1] = np.nan
    return tamper


def test_non_finite_new_state_is_not_committed(tiny_bundle) -> None:
    pipe = _tampered(tiny_bundle, "push", _poison("present_key_1"))
    stream = pipe.stream()
    with pytest.raises(InputError, match="graph 'av_autoregressor' output 'present_key_1' holds NaN or inf"):
        stream.push(*chunk(pipe, 0))
    assert stream.chunks == 0 and stream.state == {} and stream.batch is None


def test_non_finite_logits_are_a_backend_error(tiny_bundle) -> None:
    pipe = _tampered(tiny_bundle, "generate", _poison("logits"))
    stream = _stream(pipe, 2)
    before = stream_snapshot(stream)
    with pytest.raises(BackendError, match="generate: graph 'text_decoder' output 'logits' holds NaN or inf"):
        stream.ask(QUESTION, max_new_tokens=4)
    assert all(np.array_equal(stream.state[k], before["state"][k]) for k in before["state"])


def test_output_shape_other_than_the_manifest_is_refused(tiny_bundle, tmp_path) -> None:
    bundle = copy_bundle(tiny_bundle, tmp_path)
    manifest = read_manifest(bundle)
    av_context = next(t for t in manifest["graphs"]["av_autoregressor"]["outputs"] if t["name"] == "av_context")
    av_context["shape"][1] += 1  # the manifest promises another number of latents than the graph gives
    write_manifest(bundle, manifest)
    stream = Pipeline.load(bundle).stream()
    with pytest.raises(BackendError, match=r"push: graph 'av_autoregressor' output 'av_context' is float32 "
                                           r"\[1, 4, 64\], the manifest says float32 \['batch', 5, 64\]"):
        stream.push(*chunk(stream.pipeline, 0))
    assert stream.chunks == 0 and stream.state == {}


# ---- 6. a MirasolError, with a clear message, for each probe -------------------------------------------------

def _patch_zip(source: Path, target: Path, local: int, central: int, value: int, mask: bool = False) -> Path:
    """Copy a zip, setting a 2-byte field of every local header (at `local`) and central header (at `central`)."""
    data = bytearray(source.read_bytes())
    for signature, offset in ((b"PK\x03\x04", local), (b"PK\x01\x02", central)):
        start = data.find(signature)
        while start != -1:
            old = struct.unpack_from("<H", data, start + offset)[0]
            struct.pack_into("<H", data, start + offset, old | value if mask else value)
            start = data.find(signature, start + 4)
    target.write_bytes(bytes(data))
    return target


def _bad_deflate(source: Path, target: Path) -> Path:
    """The state file's entries deflated, the first one's deflate stream starting with a reserved block type."""
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))
    data = bytearray(target.read_bytes())
    name_length, extra_length = struct.unpack_from("<HH", data, 26)
    data[30 + name_length + extra_length] = 0x07  # BFINAL=1, BTYPE=3 (reserved)
    target.write_bytes(bytes(data))
    return target


STATE_PROBES = {
    "bad deflate data": (lambda src, dst: _bad_deflate(src, dst), "is not readable: Error -3"),
    "compression method 99": (lambda src, dst: _patch_zip(src, dst, 8, 10, 99),
                              "uses zip compression method 99"),
    "encrypted flag": (lambda src, dst: _patch_zip(src, dst, 6, 8, 0x1, mask=True), "is encrypted"),
}


@pytest.mark.parametrize("probe", list(STATE_PROBES))
def test_state_file_probes(shared_pipeline, tmp_path, probe) -> None:
    make, words = STATE_PROBES[probe]
    saved = _stream(shared_pipeline, 2).save(tmp_path / "good.npz")
    bad = make(saved, tmp_path / "bad.npz")
    with pytest.raises(BundleError, match=f"state file {bad}.*{words}"):
        shared_pipeline.restore(bad)


@pytest.mark.parametrize("options, words", [
    ({"seed": -1}, "seed must be None or an integer >= 0, got -1"),
    ({"seed": "abc"}, "seed must be None or an integer >= 0, got 'abc'"),
    ({"seed": 1.5}, "seed must be None or an integer >= 0, got 1.5"),
    ({"temperature": "0.7"}, "temperature='0.7'"),
    ({"temperature": None}, "temperature=None"),
    ({"top_p": "0.9"}, "top_p='0.9'"),
    ({"top_p": None}, "top_p=None"),
    ({"top_k": 2.0}, "top_k=2.0"),
    ({"max_new_tokens": True}, "max_new_tokens must be an int in [1, 70] for this question (context 96 - prompt 26), "
                               "got True"),
])
def test_generation_argument_probes(shared_pipeline, options, words) -> None:
    stream = _stream(shared_pipeline, 1)
    for ask in (lambda: stream.ask(QUESTION, **{"max_new_tokens": 4, **options}),
                lambda: "".join(stream.ask_iter(QUESTION, **{"max_new_tokens": 4, **options}))):
        with pytest.raises(InputError) as error:
            ask()
        assert words in str(error.value)


def test_numpy_integers_are_integers(shared_pipeline) -> None:
    stream = _stream(shared_pipeline, 2)
    assert stream.ask(QUESTION, max_new_tokens=np.int64(6)) == stream.ask(QUESTION, max_new_tokens=6)
    sampled = dict(temperature=np.float32(0.8), top_p=np.float64(0.9), seed=np.uint32(3))
    assert (stream.token_ids(QUESTION, 6, top_k=np.int64(5), **sampled)
            == stream.token_ids(QUESTION, 6, top_k=5, temperature=0.8, top_p=0.9, seed=3))


def test_tiny_temperature_is_greedy_not_nan(shared_pipeline) -> None:
    stream = _stream(shared_pipeline, 2)
    assert stream.ask(QUESTION, max_new_tokens=12, temperature=5e-324, seed=0) == stream.ask(QUESTION,
                                                                                            max_new_tokens=12)


def _npz_clip(pipe: Pipeline, path: Path) -> Path:
    parts = [chunk(pipe, i) for i in range(2)]
    np.savez(path, video=np.concatenate([v for v, _ in parts]), audio=np.concatenate([a for _, a in parts], axis=1))
    return path


@pytest.mark.parametrize("kind, words", [
    ("bad deflate data", "is not readable: Error -3"),
    ("a directory", "is a directory, not a file"),
    ("a FIFO", "is not a regular file (a FIFO, socket or device)"),
])
def test_run_cli_chunks_probes(shared_pipeline, tiny_bundle, tmp_path, capsys, kind, words) -> None:
    from mirasol.runtime.cli.run import main

    path = tmp_path / "clip.npz"
    if kind == "bad deflate data":
        _bad_deflate(_npz_clip(shared_pipeline, tmp_path / "good.npz"), path)
    elif kind == "a directory":
        path.mkdir()
    else:
        os.mkfifo(path)
    assert finishes_within(60, lambda: main([str(tiny_bundle), "--chunks", str(path), "--question", QUESTION])) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: chunks file {path}") and words in lines[0], lines


@pytest.mark.parametrize("kind, words", [
    ("a directory", "is a directory, not a file"),
    ("a FIFO", "is not a regular file (a FIFO, socket or device)"),
    ("missing", "does not exist"),
])
def test_restore_path_probes(shared_pipeline, tmp_path, kind, words) -> None:
    path = tmp_path / "state.npz"
    if kind == "a directory":
        path.mkdir()
    elif kind == "a FIFO":
        os.mkfifo(path)
    with pytest.raises(BundleError, match=re.escape(f"state file {path} {words}") + "$"):
        finishes_within(60, lambda: shared_pipeline.restore(path))
    with pytest.raises(InputError, match="a path must be a str or an os.PathLike, got bytes"):
        shared_pipeline.restore(os.fsencode(path))


def test_unreadable_graph_file(tiny_bundle, tmp_path, monkeypatch) -> None:
    import mirasol.runtime.bundle.reader as bundle_module

    bundle = copy_bundle(tiny_bundle, tmp_path)
    graph = bundle / "text_decoder.onnx"
    if os.geteuid() != 0:  # permission bits bind
        graph.chmod(0)
        with pytest.raises(BundleError, match="text_decoder.onnx: graph 'text_decoder' cannot be read"):
            Bundle.load(bundle)
        graph.chmod(0o644)
    real = bundle_module.sha256_file

    def unreadable(path: Path, *args: Any) -> str:
        if path.name == graph.name:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *args)

    monkeypatch.setattr(bundle_module, "sha256_file", unreadable)
    with pytest.raises(BundleError, match="text_decoder.onnx: graph 'text_decoder' cannot be read: Permission denied"):
        Bundle.load(bundle)


@pytest.mark.parametrize("where", ["an extra entry", "a graph file"])
def test_self_referencing_symlink_in_the_bundle(tiny_bundle, tmp_path, where) -> None:
    bundle = copy_bundle(tiny_bundle, tmp_path)
    name = "loop" if where == "an extra entry" else "combiner.onnx"
    (bundle / name).unlink(missing_ok=True)
    (bundle / name).symlink_to(name)
    with pytest.raises(BundleError, match=f"{name} cannot be resolved \\(a symlink loop\\?\\)"):
        Bundle.load(bundle)


def test_graph_file_that_is_not_a_regular_file(tiny_bundle, tmp_path) -> None:
    bundle = copy_bundle(tiny_bundle, tmp_path)
    (bundle / "combiner.onnx").unlink()
    os.mkfifo(bundle / "combiner.onnx")
    with pytest.raises(BundleError, match="file 'combiner.onnx' named in the manifest is not a regular file"):
        finishes_within(60, lambda: Bundle.load(bundle))


def test_media_path_probes(shared_pipeline, tmp_path) -> None:
    pytest.importorskip("av")
    from mirasol.runtime.media.video_files import load_clip

    with pytest.raises(InputError, match="a media path must be a str or an os.PathLike, got bytes"):
        load_clip(b"clip.mp4", shared_pipeline.config)
    os.mkfifo(tmp_path / "pipe.mp4")
    with pytest.raises(InputError, match="pipe.mp4 is not a regular file"):
        finishes_within(60, lambda: load_clip(tmp_path / "pipe.mp4", shared_pipeline.config))


@pytest.mark.parametrize("key, value, words", [
    ("fps", 0, "config.fps: expected a number in [0.001, 1000], got 0"),
    ("fps", -4.0, "config.fps: expected a number in [0.001, 1000], got -4.0"),
    ("fps", 1e300, "config.fps: expected a number in [0.001, 1000], got 1e+300"),
    ("fps", "4", "config.fps: expected a number in [0.001, 1000], got '4'"),
    ("hop_length", 0, "config.hop_length: expected an integer in [1, 65536], got 0"),
    ("hop_length", 160.0, "config.hop_length: expected an integer in [1, 65536], got 160.0"),
    ("image_size", 10**9, "config.image_size: expected an integer in [1, 8192], got 1000000000"),
    ("image_size", True, "config.image_size: expected an integer in [1, 8192], got True"),
    ("frames_per_chunk", 0, "config.frames_per_chunk: expected an integer in [1, 4096], got 0"),
    ("sample_rate", -16000, "config.sample_rate: expected an integer in [1, 384000], got -16000"),
    ("sample_rate", None, "config.sample_rate: expected an integer in [1, 384000], got None"),
    ("sample_rate", 10, "a chunk of sample_rate * frames_per_chunk / fps = 10 audio samples must hold at least "
                        "hop_length (160)"),
])
def test_manifest_config_value_probes(tiny_bundle, tmp_path, key, value, words) -> None:
    bundle = copy_bundle(tiny_bundle, tmp_path)
    manifest = read_manifest(bundle)
    manifest["config"][key] = value
    write_manifest(bundle, manifest)
    with pytest.raises(BundleError) as error:
        Pipeline.load(bundle)
    assert words in str(error.value)


# ---- 7. messages that say what is wrong ----------------------------------------------------------------------

def test_question_given_as_bytes(shared_pipeline) -> None:
    stream = _stream(shared_pipeline, 1)
    with pytest.raises(InputError, match="^ask: the question must be a str, got bytes$"):
        stream.ask(QUESTION.encode())


def test_tensorrt_backend_without_tensorrt_says_so(tiny_bundle) -> None:
    from mirasol.runtime.tensorrt.backend import is_available

    available, why = is_available()
    if available:
        pytest.skip("TensorRT is available here: the message under test is the one without it")
    with pytest.raises(BackendError) as error:
        Pipeline.load(tiny_bundle, backend="tensorrt")
    assert str(error.value) == f"the tensorrt backend cannot run here: {why}"
    assert "mirasol-build-engines" not in str(error.value)

