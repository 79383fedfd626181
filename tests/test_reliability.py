"""Reliability and security (issue 9): one error hierarchy, bad inputs refused with names, bundles that cannot
run code or reach outside their directory, CLIs that fail with one clear line.

The shared tiny bundle is exported once per session (`tiny_bundle`, in conftest.py); tests that change a bundle
change a copy.
"""
from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mirasol.runtime.bundle import Bundle, sha256_file
from mirasol.runtime.errors import BackendError, BundleError, ExportError, InputError, MirasolError, OutputError
from mirasol.runtime.manifest import MANIFEST_FILE, MAX_MANIFEST_BYTES
from mirasol.runtime.pipeline import STATE_FORMAT, STATE_VERSION, Pipeline

from .conftest import (QUESTION, VENV_BIN, assert_same_stream_state, chunk, copy_bundle, read_manifest,
                       run_export_cli as _export_cli, stream_snapshot, write_manifest)

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------------------------
# 1. One error hierarchy
# ---------------------------------------------------------------------------------------------------------------

def test_one_error_hierarchy() -> None:
    for error in (BundleError, InputError, BackendError, ExportError, OutputError):
        assert issubclass(error, MirasolError)
    assert issubclass(InputError, ValueError)  # callers catching ValueError for bad arguments keep working
    assert len({BundleError, InputError, BackendError, ExportError, OutputError}) == 5


# ---------------------------------------------------------------------------------------------------------------
# 2. Bad inputs: each refused with the right type and a message naming the thing
# ---------------------------------------------------------------------------------------------------------------

def _nan_at(a: np.ndarray, value: float) -> np.ndarray:
    a = a.copy()
    a.flat[3] = value
    return a


BAD_CHUNKS = {
    # name: (change(video, audio) -> (video, audio), words the message must hold)
    "video rank": (lambda v, a: (v[0], a), ["'video'", "combiner", "rank", "(3, 32, 32)"]),
    "video rank 6": (lambda v, a: (v[None, None], a), ["'video'", "rank 5", "(1, 1, 4, 3, 32, 32)"]),
    "video frames": (lambda v, a: (v[:3], a), ["'video'", "shape", "[1, 4, 3, 32, 32]", "[1, 3, 3, 32, 32]"]),
    "audio mel frames": (lambda v, a: (v, a[:, :99]), ["'audio'", "[1, 32, 100]", "[1, 32, 99]"]),
    "video float64": (lambda v, a: (v.astype(np.float64), a), ["'video'", "dtype float32", "float64"]),
    "audio int64": (lambda v, a: (v, a.astype(np.int64)), ["'audio'", "dtype float32", "int64"]),
    "video float16": (lambda v, a: (v.astype(np.float16), a), ["'video'", "float16"]),
    "audio NaN": (lambda v, a: (v, _nan_at(a, np.nan)), ["'audio'", "NaN or inf"]),
    "video +inf": (lambda v, a: (_nan_at(v, np.inf), a), ["'video'", "NaN or inf"]),
    "audio -inf": (lambda v, a: (v, _nan_at(a, -np.inf)), ["'audio'", "NaN or inf"]),
    "empty chunk": (lambda v, a: (v[:0], a[:, :0]), ["'video'", "empty", "(1, 0, 3, 32, 32)"]),
    "batch between inputs": (lambda v, a: (np.stack([v, v]), a[None]), ["'audio'", "batch 1", "other input's 2"]),
}


@pytest.mark.parametrize("case", list(BAD_CHUNKS))
def test_bad_chunk_is_refused_naming_the_input(shared_pipeline, case) -> None:
    change, words = BAD_CHUNKS[case]
    stream = shared_pipeline.stream()
    with pytest.raises(InputError) as error:
        stream.push(*change(*chunk(shared_pipeline, 0)))
    for word in words:
        assert word in str(error.value), (case, str(error.value))
    assert stream.chunks == 0 and stream.batch is None and stream.state == {}  # nothing changed


def test_batch_between_state_and_input_is_refused(shared_pipeline) -> None:
    stream = shared_pipeline.stream()
    stream.push(*chunk(shared_pipeline, 0, batch=2))
    before = stream_snapshot(stream)
    with pytest.raises(InputError, match=r"carries state for batch 2, the chunk has batch 1"):
        stream.push(*chunk(shared_pipeline, 1))
    with pytest.raises(InputError, match=r"carries state for batch 2, the chunk has batch 3"):
        stream.push(*chunk(shared_pipeline, 1, batch=3))
    assert_same_stream_state(before, stream_snapshot(stream))


def test_non_array_chunk_is_refused(shared_pipeline) -> None:
    video, audio = chunk(shared_pipeline, 0)
    with pytest.raises(InputError, match="'video' of graph 'combiner': expected a numpy array, got list"):
        shared_pipeline.stream().push(video.tolist(), audio)
    with pytest.raises(InputError, match="'video' of graph 'combiner': expected a numpy array, got NoneType"):
        shared_pipeline.stream().push(None, audio)


def test_non_array_audio_is_refused(shared_pipeline) -> None:
    video, audio = chunk(shared_pipeline, 0)
    with pytest.raises(InputError, match="'audio'.*expected a numpy array, got list"):
        shared_pipeline.stream().push(video, audio.tolist())


BAD_QUESTIONS = {
    "empty": ("", {}, ["question is empty"]),
    "blank": (" \n\t ", {}, ["question is empty"]),
    "not a str": (None, {}, ["question must be a str, got NoneType"]),
    "too long": ("x" * 200, {}, ["question is 202 tokens", "context holds 96"]),
    "max_new_tokens 0": (QUESTION, {"max_new_tokens": 0}, ["max_new_tokens", "got 0"]),
    "max_new_tokens -1": (QUESTION, {"max_new_tokens": -1}, ["max_new_tokens", "got -1"]),
    "max_new_tokens past context": (QUESTION, {"max_new_tokens": 71}, ["max_new_tokens", "[1, 70]", "got 71"]),
    "max_new_tokens float": (QUESTION, {"max_new_tokens": 2.5}, ["max_new_tokens", "got 2.5"]),
    "max_new_tokens str": (QUESTION, {"max_new_tokens": "8"}, ["max_new_tokens", "got '8'"]),
    "temperature < 0": (QUESTION, {"temperature": -1.0}, ["temperature=-1.0"]),
    "top_p 0": (QUESTION, {"top_p": 0.0}, ["top_p=0.0"]),
    "top_k < 0": (QUESTION, {"top_k": -2}, ["top_k=-2"]),
}


@pytest.mark.parametrize("case", list(BAD_QUESTIONS))
def test_bad_question_is_refused_naming_it(shared_pipeline, case) -> None:
    question, options, words = BAD_QUESTIONS[case]
    stream = shared_pipeline.stream()
    stream.push(*chunk(shared_pipeline, 0))
    before = stream_snapshot(stream)
    with pytest.raises(InputError) as error:
        stream.ask(question, **options)
    for word in words:
        assert word in str(error.value), (case, str(error.value))
    after = stream_snapshot(stream)
    after["state"] = {k: v for k, v in after["state"].items() if k in before["state"]}
    after["counters"] = {k: v for k, v in after["counters"].items() if k in before["counters"]}
    assert_same_stream_state(before, after)


def test_question_before_any_chunk_is_refused(shared_pipeline) -> None:
    with pytest.raises(InputError, match="push at least one chunk"):
        shared_pipeline.stream().ask(QUESTION)


def test_question_that_is_not_utf8_encodable_is_refused(shared_pipeline) -> None:
    stream = shared_pipeline.stream()
    stream.push(*chunk(shared_pipeline, 0))
    with pytest.raises(InputError, match="question"):
        stream.ask("bad \udcff byte")


def test_nan_temperature_is_refused(shared_pipeline) -> None:
    stream = shared_pipeline.stream()
    stream.push(*chunk(shared_pipeline, 0))
    with pytest.raises(InputError, match="temperature"):
        stream.ask(QUESTION, max_new_tokens=2, temperature=float("nan"))


def test_bad_whole_clip_is_refused(shared_pipeline) -> None:
    video, audio = chunk(shared_pipeline, 0)
    with pytest.raises(InputError, match=r"clip: expected video \[frames, 3, H, W\].*got video \(3, 32, 32\)"):
        shared_pipeline.split_clip(video[0], audio)
    with pytest.raises(InputError, match="4 frames and 100 mel frames each"):
        shared_pipeline.split_clip(np.concatenate([video, video[:1]]), audio)


# ---- bundles -----------------------------------------------------------------------------------------------

def test_bundle_directory_missing(tmp_path) -> None:
    with pytest.raises(BundleError, match=f"bundle directory {tmp_path / 'nope'} does not exist"):
        Pipeline.load(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(BundleError, match="is not a directory"):
        Bundle.load(tmp_path / "file")


def test_manifest_missing(tiny_bundle, tmp_path) -> None:
    bundle = copy_bundle(tiny_bundle, tmp_path)
    (bundle / MANIFEST_FILE).unlink()
    with pytest.raises(BundleError, match=f"{bundle / MANIFEST_FILE} is missing: .* is not a mirasol bundle"):
        Bundle.load(bundle)


@pytest.mark.parametrize("content, words", [
    (b"{not json", ["not valid JSON", "line 1"]),
    (b"", ["not valid JSON"]),
    (b"\xff\xfe{}", ["not valid JSON", "utf-8"]),
    (b"[1, 2]", ["expected a JSON object", "[1, 2]"]),
    (b'{"format": "mirasol-bundle", "format": "x"}', ["key 'format' appears twice"]),
    (b'{"format": NaN}', ["not a mirasol bundle manifest (format nan"]),
    (b"[" * 100_000 + b"]" * 100_000, ["not valid JSON"]),
])
def test_manifest_not_json(tiny_bundle, tmp_path, content, words) -> None:
    bundle = copy_bundle(tiny_bundle, tmp_path)
    (bundle / MANIFEST_FILE).write_bytes(content)
    with pytest.raises(BundleError) as error:
        Bundle.load(bundle)
    assert str(bundle / MANIFEST_FILE) in str(error.value)
    for word in words:
        assert word in str(error.value)


def test_manifest_with_nan_in_its_reports_loads(tiny_bundle, tmp_path) -> None:
    bundle = copy_bundle(tiny_bundle, tmp_path)
    data = read_manifest(bundle)
    data["validation"] = {"combiner": {"max_rel_error": float("inf"), "max_abs_error": float("nan")}}
    write_manifest(bundle, data)  # json.dumps writes Infinity / NaN
    assert Bundle.load(bundle).manifest.validation["combiner"]["max_rel_error"] == float("inf")


def test_manifest_over_the_size_limit_is_not_read(tiny_bundle, tmp_path) -> None:
    bundle = copy_bundle(tiny_bundle, tmp_path)
    with open(bundle / MANIFEST_FILE, "r+b") as f:
        f.truncate(MAX_MANIFEST_BYTES + 10)  # sparse: costs no disk
    with pytest.raises(BundleError, match=f"over the {MAX_MANIFEST_BYTES}-byte manifest limit"):
        Bundle.load(bundle)


@pytest.mark.parametrize("version, words", [
    (2, ["format version 2 is newer than this runtime reads (up to 1)", "upgrade mirasol-edge"]),
    (0, ["format version 0 is not supported"]),
    ("1", ["format_version: expected an integer, got '1'"]),
    (True, ["format_version: expected an integer, got True"]),
])
def test_manifest_format_version(tiny_bundle, tmp_path, version, words) -> None:
    bundle = copy_bundle(tiny_bundle, tmp_path)
    data = read_manifest(bundle)
    data["format_version"] = version
    write_manifest(bundle, data)
    with pytest.raises(BundleError) as error:
        Bundle.load(bundle)
    for word in words:
        assert word in str(error.value)


def test_manifest_of_another_format(tiny_bundle, tmp_path) -> None:
    bundle = copy_bundle(tiny_bundle, tmp_path)
    data = read_manifest(bundle)
    data["format"] = "tensorflow-saved-model"
    write_manifest(bundle, data)
    with pytest.raises(BundleError, match="not a mirasol bundle manifest .*'tensorflow-saved-model'"):
        Bundle.load(bundle)


def _delete(data: Any, path: tuple) -> None:
    for key in path[:-1]:
        data = data[key]
    del data[path[-1]]


def _set(data: Any, path: tuple, value: Any) -> None:
    for key in path[:-1]:
        data = data[key]
    data[path[-1]] = value


MISSING_KEYS = [
    (("graphs",), "missing key graphs"),
    (("steps",), "missing key steps"),
    (("state",), "missing key state"),
    (("counters",), "missing key counters"),
    (("config",), "missing key config"),
    (("tokenizer",), "missing key tokenizer"),
    (("precision",), "missing key precision"),
    (("graphs", "combiner", "sha256"), "missing key graphs.combiner.sha256"),
    (("graphs", "text_decoder", "inputs"), "missing key graphs.text_decoder.inputs"),
    (("graphs", "av_autoregressor", "inputs", 0, "dtype"), "missing key graphs.av_autoregressor.inputs[0].dtype"),
    (("graphs", "text_cross_kv", "axes", "memory_len", "max"), "missing key graphs.text_cross_kv.axes.memory_len.max"),
    (("state", 0, "output"), "missing key state[0].output"),
    (("counters", 0, "input"), "missing key counters[0].input"),
    (("steps", "push"), "step 'push' is missing"),
    (("steps", "generate", "graphs"), "missing key steps.generate.graphs"),
    (("graphs", "text_cross_kv"), "state av_memory names graph 'text_cross_kv', which the bundle does not have"),
    (("config", "max_text_len"), "config.max_text_len: expected a positive integer, got None"),
]


@pytest.mark.parametrize("path, message", MISSING_KEYS, ids=[".".join(map(str, p)) for p, _ in MISSING_KEYS])
def test_manifest_missing_key(tiny_bundle, tmp_path, path, message) -> None:
    bundle = copy_bundle(tiny_bundle, tmp_path)
    data = read_manifest(bundle)
    _delete(data, path)
    write_manifest(bundle, data)
    with pytest.raises(BundleError) as error:
        Pipeline.load(bundle)
    assert message in str(error.value)
    assert str(bundle / MANIFEST_FILE) in str(error.value)


BAD_VALUES = [
    (("graphs", "combiner", "sha256"), "abc", "graphs.combiner.sha256: expected a sha256"),
    (("graphs", "combiner", "inputs", 0, "dtype"), "float128", "graphs.combiner.inputs[0].dtype: expected one of"),
    (("graphs", "combiner", "inputs", 0, "shape", 1), -4, "graphs.combiner.inputs[0].shape[1]: expected an integer"),
    (("graphs", "combiner", "inputs", 0, "shape"), "batch", "graphs.combiner.inputs[0].shape: expected a JSON list"),
    (("graphs", "combiner", "axes", "batch"), {"min": 4, "opt": 1, "max": 2}, "expected min <= opt <= max"),
    (("graphs", "combiner", "inputs"), {}, "graphs.combiner.inputs: expected a JSON list"),
    (("state", 0, "window"), 0, "state[0].window: expected an integer in [1,"),
    (("state", 0, "axis"), 9, "state av_key_0: axis 9 is not an axis of av_autoregressor.past_key_0"),
    (("state", 0, "init"), "random", "state[0].init: expected one of ('zeros', 'empty')"),
    (("state", 0, "scope"), "forever", "state[0].scope: expected one of ('stream', 'question')"),
    (("state", 0, "colour"), "red", "state[0]: unknown keys ['colour']"),
    (("state", 0, "graph"), "nope", "state av_key_0 names graph 'nope', which the bundle does not have"),
    (("state", 0, "output"), "nope", "graph 'av_autoregressor' has no output 'nope'"),
    (("state", 1, "name"), "av_key_0", "state/counter name 'av_key_0' is used twice"),
    (("counters", 0, "step"), 1, "counter position: give exactly one of 'step' and 'length_of'"),
    (("counters", 0, "length_of"), ["input_ids", 5], "axis 5 is outside 'input_ids' of rank 2"),
    (("steps", "push", "inputs"), ["video"], "input 'audio' of graph 'combiner' is fed by nothing"),
    (("steps", "push", "inputs"), ["video", "audio", "colour"], "step 'push' takes input 'colour'"),
    (("steps", "push", "returns"), "nope", "step 'push' returns 'nope', which no graph produces"),
    (("steps", "generate", "returns"), None, "step 'generate' returns nothing"),
    (("tokenizer", "vocab_size"), 300, "tokenizer: unsupported tokenizer"),
    (("config", "frames_per_chunk"), "4", "config.frames_per_chunk: expected an integer in [1, 4096], got '4'"),
    (("config",), [], "config: expected a JSON object, got []"),
    (("graphs",), [], "graphs: expected a JSON object, got []"),
]


@pytest.mark.parametrize("path, value, message", BAD_VALUES,
                         ids=[f"{'.'.join(map(str, p))}={v!r}" for p, v, _ in BAD_VALUES])
def test_manifest_bad_value(tiny_bundle, tmp_path, path, value, message) -> None:
    bundle = copy_bundle(tiny_bundle, tmp_path)
    data = read_manifest(bundle)
    _set(data, path, value)
    write_manifest(bundle, data)
    with pytest.raises(BundleError) as error:
        Pipeline.load(bundle)
    assert message in str(error.value)


def test_graph_file_missing(tiny_bundle, tmp_path) -> None:
    bundle = copy_bundle(tiny_bundle, tmp_path)
    (bundle / "av_autoregressor.onnx").unlink()
    with pytest.raises(BundleError, match="file 'av_autoregressor.onnx' named in the manifest is missing"):
        Pipeline.load(bundle)


def test_graph_file_truncated(tiny_bundle, tmp_path) -> None:
    bundle = copy_bundle(tiny_bundle, tmp_path)
    path = bundle / "text_decoder.onnx"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(BundleError, match=r"text_decoder.onnx: checksum of graph 'text_decoder' is .* the manifest "
                                          r"says .*altered or truncated"):
        Pipeline.load(bundle)
    with pytest.raises(BundleError, match=r"text_decoder.onnx: graph 'text_decoder' is not a readable ONNX file"):
        Pipeline.load(bundle, verify=False)  # without the checksums, the external-data check refuses it by name


def test_graph_file_altered(tiny_bundle, tmp_path) -> None:
    bundle = copy_bundle(tiny_bundle, tmp_path)
    path = bundle / "combiner.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, somewhere in the weights
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"combiner.onnx: checksum of graph 'combiner'"):
        Bundle.load(bundle)


def test_graph_whose_io_does_not_match_its_manifest_entry(tiny_bundle, tmp_path) -> None:
    bundle = copy_bundle(tiny_bundle, tmp_path)
    data = read_manifest(bundle)
    # the combiner entry names the text decoder's file (with the right checksum): its IO differs
    data["graphs"]["combiner"]["file"] = "text_decoder.onnx"
    data["graphs"]["combiner"]["sha256"] = data["graphs"]["text_decoder"]["sha256"]
    write_manifest(bundle, data)
    with pytest.raises(BackendError, match=r"graph 'combiner' at .*text_decoder.onnx: its IO .* does not match the "
                                           r"manifest's"):
        Pipeline.load(bundle)
    data = read_manifest(copy_bundle(tiny_bundle, tmp_path, "b2"))
    data["graphs"]["combiner"]["inputs"][0]["dtype"] = "float16"
    write_manifest(tmp_path / "b2", data)
    with pytest.raises(BackendError, match=r"graph 'combiner': 'video' is tensor\(float\) in the file but float16"):
        Pipeline.load(tmp_path / "b2")


# ---- state files -------------------------------------------------------------------------------------------

def _other_bundle(tiny_bundle: Path, tmp_path: Path) -> Path:
    """A valid bundle with other graphs (one graph's metadata changed, its checksum updated)."""
    import onnx

    other = copy_bundle(tiny_bundle, tmp_path, "other")
    model = onnx.load(str(other / "combiner.onnx"))
    onnx.helper.set_model_props(model, {"note": "another bundle"})
    onnx.save(model, str(other / "combiner.onnx"))
    data = read_manifest(other)
    data["graphs"]["combiner"]["sha256"] = sha256_file(other / "combiner.onnx")
    write_manifest(other, data)
    return other


def _saved_state(pipe: Pipeline, path: Path, chunks: int = 3) -> Path:
    stream = pipe.stream()
    for i in range(chunks):
        stream.push(*chunk(pipe, i))
    return stream.save(path)


def test_state_file_from_another_bundle(tiny_bundle, shared_pipeline, tmp_path) -> None:
    state = _saved_state(shared_pipeline, tmp_path / "state.npz")
    other = Pipeline.load(_other_bundle(tiny_bundle, tmp_path))
    with pytest.raises(BundleError, match=f"state file {state} was saved with another bundle"):
        other.restore(state)
    with pytest.raises(BundleError, match="saved with another bundle"):
        other.bundle.read_state(state, STATE_FORMAT, STATE_VERSION)


def _write_state(path: Path, header: Any, arrays: dict[str, np.ndarray]) -> Path:
    with open(path, "wb") as f:
        np.savez(f, header=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8), **arrays)
    return path


def _state_parts(pipe: Pipeline, tmp_path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    with np.load(_saved_state(pipe, tmp_path / "good.npz"), allow_pickle=False) as data:
        header = json.loads(bytes(data["header"]).decode())
        return header, {name: data[name] for name in data.files if name != "header"}


def test_state_file_round_trip_through_the_bounded_reader(shared_pipeline, tmp_path) -> None:
    header, arrays = _state_parts(shared_pipeline, tmp_path)
    read_header, read_arrays = shared_pipeline.bundle.read_state(tmp_path / "good.npz", STATE_FORMAT, STATE_VERSION)
    assert read_header == header and read_arrays.keys() == arrays.keys()
    assert all(np.array_equal(read_arrays[k], arrays[k]) and read_arrays[k].dtype == arrays[k].dtype for k in arrays)


def _huge_npy_member(path: Path, member: str, shape: tuple[int, ...]) -> None:
    """Replace one array of an .npz by a tiny entry whose npy header promises `shape` (a size bomb)."""
    header = {"descr": "<f4", "fortran_order": False, "shape": shape}
    import io
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, header)
    buffer.write(b"\0" * 64)
    entries = {}
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            entries[info.filename] = archive.read(info)
    entries[member] = buffer.getvalue()
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)


BAD_STATE_FILES = {
    # name: (how to make it, words of the message of the bounded reader)
    "not a zip": (lambda p, h, a: p.write_bytes(b"PK\x03\x04 garbage"), ["is not a readable .npz"]),
    "size bomb header": (lambda p, h, a: (_write_state(p, h, a), _huge_npy_member(p, "state/av_key_0.npy", (1 << 40,))),
                         ["state/av_key_0", "expected shape within [1, 4, '0..8', 16]", "[1099511627776]"]),
    "wrong heads": (lambda p, h, a: _write_state(p, h, {**a, "state/av_key_0": np.zeros((1, 3, 8, 16), np.float32)}),
                    ["state/av_key_0", "expected shape within [1, 4, '0..8', 16], got [1, 3, 8, 16]"]),
    "past the window": (lambda p, h, a: _write_state(p, h, {**a, "state/av_memory": np.zeros((1, 40, 64), np.float32)}),
                        ["state/av_memory", "'0..32'", "got [1, 40, 64]"]),
    "wrong dtype": (lambda p, h, a: _write_state(p, h, {**a, "state/av_memory": a["state/av_memory"].astype("f8")}),
                    ["state/av_memory", "expected dtype float32, got float64"]),
    "object array": (lambda p, h, a: _write_state(p, h, {**a, "state/av_memory": np.array([object()])}),
                     ["state/av_memory", "expected dtype float32"]),
    "missing array": (lambda p, h, a: _write_state(p, h, {k: v for k, v in a.items() if k != "state/av_value_1"}),
                      ["state/av_value_1 is missing"]),
    "extra array": (lambda p, h, a: _write_state(p, h, {**a, "state/extra": np.zeros(3, np.float32)}),
                    ["unexpected entries ['state/extra.npy']"]),
    "batch not an int": (lambda p, h, a: _write_state(p, {**h, "batch": "abc"}, a), ["batch must be an integer"]),
    "batch too large": (lambda p, h, a: _write_state(p, {**h, "batch": 5}, a), ["batch must be an integer in [1, 4]"]),
    "negative chunks": (lambda p, h, a: _write_state(p, {**h, "chunks": -1}, a), ["chunks must be a non-negative"]),
    "header not an object": (lambda p, h, a: _write_state(p, [1, 2], a), ["header is not a JSON object"]),
    "unknown format": (lambda p, h, a: _write_state(p, {**h, "version": 99}, a), ["unknown format", "v99"]),
    "NaN in the cache": (lambda p, h, a: _write_state(p, h, {**a, "state/av_memory": a["state/av_memory"] * np.nan}),
                         ["state/av_memory holds NaN or inf"]),
}


@pytest.mark.parametrize("case", list(BAD_STATE_FILES))
def test_bad_state_file_is_refused_by_the_bounded_reader(shared_pipeline, tmp_path, case) -> None:
    make, words = BAD_STATE_FILES[case]
    header, arrays = _state_parts(shared_pipeline, tmp_path)
    path = tmp_path / "bad.npz"
    make(path, header, arrays)
    with pytest.raises(BundleError) as error:
        shared_pipeline.bundle.read_state(path, STATE_FORMAT, STATE_VERSION)
    assert str(path) in str(error.value)
    for word in words:
        assert word in str(error.value), str(error.value)


@pytest.mark.parametrize("case", list(BAD_STATE_FILES))
def test_bad_state_file_is_refused_by_restore(shared_pipeline, tmp_path, case) -> None:
    make, _ = BAD_STATE_FILES[case]
    header, arrays = _state_parts(shared_pipeline, tmp_path)
    path = tmp_path / "bad.npz"
    make(path, header, arrays)
    with pytest.raises(BundleError, match="state file"):
        shared_pipeline.restore(path)


def test_bounded_npz_bounds_sizes_before_reading(shared_pipeline, tmp_path) -> None:
    from mirasol.runtime.bundle import BoundedNpz

    state = _saved_state(shared_pipeline, tmp_path / "state.npz")
    with pytest.raises(BundleError, match=r"state.npz is \d+ bytes, over the 1000-byte limit"):
        BoundedNpz(state, str(state), max_bytes=1000).__enter__()
    bomb = tmp_path / "bomb.npz"
    np.savez_compressed(bomb, video=np.zeros((64, 3, 64, 64), np.float32))  # 3 MB of zeros in a few KB
    assert bomb.stat().st_size < 100_000
    with pytest.raises(InputError, match=r"bomb.npz: its entries declare \d+ bytes, over the 1000000-byte limit"):
        with BoundedNpz(bomb, str(bomb), max_bytes=1_000_000, error=InputError):
            pass
    with BoundedNpz(bomb, "clip", max_bytes=10_000_000, error=InputError) as npz:
        assert npz.names == {"video"}
        assert npz.read("video", np.float32, ((1, 100), (3, 3), (1, 64), (1, 64))).shape == (64, 3, 64, 64)
        with pytest.raises(InputError, match=r"clip: video: expected shape within \['1..32', 3, 64, 64\], got "
                                             r"\[64, 3, 64, 64\]"):
            npz.read("video", np.float32, ((1, 32), (3, 3), (64, 64), (64, 64)))
        with pytest.raises(InputError, match="clip: audio is missing"):
            npz.read("audio", np.float32, ((1, 10),))
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    with pytest.raises(BundleError, match=f"state file {truncated}"):
        shared_pipeline.bundle.read_state(truncated, STATE_FORMAT, STATE_VERSION)


def test_state_file_never_unpickles(shared_pipeline, tmp_path) -> None:
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    header, arrays = _state_parts(shared_pipeline, tmp_path)
    path = tmp_path / "evil.npz"
    with open(path, "wb") as f:  # np.save pickles object arrays: the payload would run on an unpickling load
        np.savez(f, header=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8),
                 **{**arrays, "state/av_memory": np.array([Payload()], dtype=object)})
    with pytest.raises(BundleError):
        shared_pipeline.bundle.read_state(path, STATE_FORMAT, STATE_VERSION)
    with pytest.raises(BundleError):
        shared_pipeline.restore(path)
    assert not marker.exists()


# ---- media and calibration ---------------------------------------------------------------------------------

def _media():
    try:
        from mirasol.runtime import media
        import av  # noqa: F401
    except ImportError as missing:
        pytest.skip(f"runtime/media.py or PyAV is not available here: {missing}")
    return media


@pytest.mark.parametrize("content, words", [
    (None, ["does not exist"]),
    (b"", ["is empty"]),
    (os.urandom(4096), ["cannot read media file"]),
    (b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 2000, []),  # an mp4 box header, then nothing decodable
])
def test_corrupt_media_file_is_refused_naming_it(shared_pipeline, tmp_path, content, words) -> None:
    media = _media()
    path = tmp_path / "clip.mp4"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InputError) as error:
        media.load_clip(path, shared_pipeline.config)
    assert str(path) in str(error.value)
    for word in words:
        assert word in str(error.value)


def test_empty_calibration_directory_is_refused(shared_pipeline, tmp_path) -> None:
    try:
        from mirasol.calibration.data import load_clips
    except ImportError as missing:
        pytest.skip(f"calibration/ is not available yet: {missing}")
    (tmp_path / "calib").mkdir()
    with pytest.raises(ExportError, match=f"calibration directory {tmp_path / 'calib'} is empty"):
        load_clips(tmp_path / "calib", shared_pipeline.config)
    (tmp_path / "calib" / "notes.txt").write_text("x")
    with pytest.raises(ExportError, match="found 1 other files"):
        load_clips(tmp_path / "calib", shared_pipeline.config)


# ---------------------------------------------------------------------------------------------------------------
# 3. Security
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../combiner.onnx", "../../etc/passwd", "/etc/passwd", "sub/combiner.onnx",
                                  "..", ".", "", "..\\combiner.onnx", "C:combiner.onnx", "combiner.onnx\x00.txt"])
def test_manifest_file_names_cannot_leave_the_bundle(tiny_bundle, tmp_path, name) -> None:
    bundle = copy_bundle(tiny_bundle, tmp_path)
    shutil.copy(bundle / "combiner.onnx", tmp_path / "combiner.onnx")  # what '../combiner.onnx' would reach
    data = read_manifest(bundle)
    data["graphs"]["combiner"]["file"] = name
    write_manifest(bundle, data)
    with pytest.raises(BundleError, match="is not a plain file name inside the bundle" if name
                       else "graphs.combiner.file: expected a non-empty string, got ''"):
        Bundle.load(bundle)


@pytest.mark.parametrize("field", ["external_data", "engine"])
def test_other_manifest_file_names_cannot_leave_the_bundle(tiny_bundle, tmp_path, field) -> None:
    bundle = copy_bundle(tiny_bundle, tmp_path)
    data = read_manifest(bundle)
    data["graphs"]["combiner"][field] = ["../weights.data"] if field == "external_data" else {"file": "../x.engine"}
    write_manifest(bundle, data)
    with pytest.raises(BundleError, match="'../.*' is not a plain file name inside the bundle"):
        Bundle.load(bundle)


def test_symlinks_pointing_out_of_the_bundle_are_refused(tiny_bundle, tmp_path) -> None:
    bundle = copy_bundle(tiny_bundle, tmp_path)
    outside = tmp_path / "outside.onnx"
    shutil.move(bundle / "combiner.onnx", outside)
    (bundle / "combiner.onnx").symlink_to(outside)  # same bytes, same checksum: only the link is wrong
    with pytest.raises(BundleError, match="'combiner.onnx' is a symlink to .*outside.onnx, outside the bundle"):
        Pipeline.load(bundle)
    # a file the manifest does not name (e.g. external data a graph refers to itself) is checked too
    bundle2 = copy_bundle(tiny_bundle, tmp_path, "b2")
    (bundle2 / "weights.data").symlink_to("/etc/hostname")
    with pytest.raises(BundleError, match="'weights.data' is a symlink to /etc/hostname, outside the bundle"):
        Bundle.load(bundle2)
    bundle3 = copy_bundle(tiny_bundle, tmp_path, "b3")
    (bundle3 / "subdir").symlink_to(tmp_path)  # a link to a directory outside
    with pytest.raises(BundleError, match="'subdir' is a symlink"):
        Bundle.load(bundle3)


def test_manifest_symlink_pointing_out_is_refused(tiny_bundle, tmp_path) -> None:
    bundle = copy_bundle(tiny_bundle, tmp_path)
    shutil.move(bundle / MANIFEST_FILE, tmp_path / "elsewhere.json")
    (bundle / MANIFEST_FILE).symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(BundleError, match="outside the bundle directory"):
        Bundle.load(bundle)


def test_symlinks_inside_the_bundle_are_fine(tiny_bundle, tmp_path) -> None:
    bundle = copy_bundle(tiny_bundle, tmp_path)
    shutil.move(bundle / "combiner.onnx", bundle / "combiner-v1.onnx")
    (bundle / "combiner.onnx").symlink_to("combiner-v1.onnx")
    Bundle.load(bundle)
    linked = tmp_path / "linked"
    linked.symlink_to(bundle)  # the bundle directory itself reached through a link
    Bundle.load(linked)


def test_external_data_checksums_are_verified_when_recorded(tiny_bundle, tmp_path) -> None:
    bundle = copy_bundle(tiny_bundle, tmp_path)
    (bundle / "combiner.onnx.data").write_bytes(b"weights")
    data = read_manifest(bundle)
    data["graphs"]["combiner"]["external_data"] = ["combiner.onnx.data"]
    data["graphs"]["combiner"]["external_sha256"] = {"combiner.onnx.data": sha256_file(bundle / "combiner.onnx.data")}
    write_manifest(bundle, data)
    Bundle.load(bundle)
    (bundle / "combiner.onnx.data").write_bytes(b"weightz")
    with pytest.raises(BundleError, match="combiner.onnx.data: checksum of external data of graph 'combiner'"):
        Bundle.load(bundle)
    Bundle.load(bundle, verify=False)
    data["graphs"]["combiner"]["external_sha256"] = {"other.data": "0" * 64}
    write_manifest(bundle, data)
    with pytest.raises(BundleError, match="checksum for 'other.data', which is not one of its external_data"):
        Bundle.load(bundle, verify=False)


SHIPPED = ("runtime", "export", "calibration")


def _python_files(*folders: str) -> list[Path]:
    return [p for folder in folders for p in sorted((REPO / folder).rglob("*.py"))]


@pytest.mark.parametrize("folder", [*SHIPPED, "model"])
def test_no_code_is_ever_loaded_from_files(folder) -> None:
    """No pickle / marshal / eval anywhere the toolkit reads files; every np.load passes allow_pickle=False."""
    problems = []
    for path in _python_files(folder):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                if any(n and n.split(".")[0] in ("pickle", "cPickle", "dill", "marshal", "shelve", "joblib", "yaml")
                       for n in names):
                    problems.append(f"{where}: imports {names}")
            if isinstance(node, ast.Call):
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                owner = getattr(func.value, "id", "") if isinstance(func, ast.Attribute) else ""
                if isinstance(func, ast.Name) and name in ("eval", "exec", "compile", "__import__"):
                    problems.append(f"{where}: calls {name}()")
                if name == "load" and owner in ("np", "numpy"):
                    flags = {k.arg: k.value for k in node.keywords}
                    flag = flags.get("allow_pickle")
                    if not (isinstance(flag, ast.Constant) and flag.value is False):
                        problems.append(f"{where}: np.load without allow_pickle=False")
                if name == "load" and owner == "torch":
                    problems.append(f"{where}: torch.load (pickle)")
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------------------------------
# 1b. The CLIs: non-zero exit with one clear line; the traceback only with --debug
# ---------------------------------------------------------------------------------------------------------------

def _npz_clip(pipe: Pipeline, path: Path, chunks: int = 2) -> Path:
    parts = [chunk(pipe, i) for i in range(chunks)]
    np.savez(path, video=np.concatenate([v for v, _ in parts]), audio=np.concatenate([a for _, a in parts], axis=1))
    return path


def test_run_cli_missing_bundle_one_line(tmp_path, capsys) -> None:
    from mirasol.runtime.cli import main

    missing = tmp_path / "no-bundle"
    assert main([str(missing), "--chunks", str(tmp_path / "c.npz"), "--question", "q"]) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [f"error: bundle directory {missing} does not exist"]
    with pytest.raises(BundleError, match="does not exist"):  # --debug: the exception itself, with its traceback
        main([str(missing), "--chunks", str(tmp_path / "c.npz"), "--question", "q", "--debug"])


def test_run_cli_subprocess_exit_code_and_single_line(tmp_path) -> None:
    result = subprocess.run([str(VENV_BIN / "mirasol-run"), str(tmp_path / "nope"), "--chunks", "x.npz",
                             "--question", "q"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"error: bundle directory {tmp_path / 'nope'} does not exist"]
    assert "Traceback" not in result.stderr and result.stdout == ""


@pytest.mark.parametrize("args, words", [
    (["--question"], ["--question", "expected one argument"]),
    (["--chunks", "c.npz", "--question", "q", "--max-new-tokens", "many"], ["--max-new-tokens", "invalid int value"]),
    (["--chunks", "c.npz", "--video", "v.mp4", "--question", "q"], ["not allowed with argument"]),
    (["--chunks", "c.npz", "--question", "q", "--backend", "tpu"], ["--backend", "invalid choice: 'tpu'"]),
])
def test_run_cli_bad_argument(tiny_bundle, capsys, args, words) -> None:
    from mirasol.runtime.cli import main

    assert main([str(tiny_bundle), *args]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("mirasol-run: error:")
    for word in words:
        assert word in last


@pytest.mark.parametrize("extra, words", [
    (["--max-new-tokens", "0"], ["max_new_tokens must be an int in [1,", "got 0"]),
    (["--top-p", "1.5"], ["top_p=1.5"]),
    (["--chunks-missing"], ["does not exist"]),
])
def test_run_cli_bad_value_one_line(shared_pipeline, tiny_bundle, tmp_path, capsys, extra, words) -> None:
    from mirasol.runtime.cli import main

    clip = _npz_clip(shared_pipeline, tmp_path / "clip.npz")
    if extra == ["--chunks-missing"]:
        clip, extra = tmp_path / "missing.npz", []
    assert main([str(tiny_bundle), "--chunks", str(clip), "--question", QUESTION, *extra]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    for word in words:
        assert word in lines[0]


def test_run_cli_works(shared_pipeline, tiny_bundle, tmp_path, capsys) -> None:
    from mirasol.runtime.cli import main

    clip = _npz_clip(shared_pipeline, tmp_path / "clip.npz")
    assert main([str(tiny_bundle), "--chunks", str(clip), "--question", QUESTION, "--max-new-tokens", "4",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["chunks"] == 2


@pytest.mark.parametrize("args, words", [
    (["--checkpoint", "/no/such/checkpoint"], ["--checkpoint", "does not exist"]),
    (["--preset", "huge"], ["--preset", "invalid choice: 'huge'"]),
    (["--precision", "int9"], ["--precision", "invalid choice: 'int9'"]),
    (["--preset", "tiny", "--max-batch", "four"], ["--max-batch", "invalid int value: 'four'"]),
])
def test_export_cli_bad_argument(args, words) -> None:
    result = _export_cli(args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for word in words:
        assert word in result.stderr


def test_export_out_is_a_file(tmp_path) -> None:
    from mirasol.runtime.atomic import atomic_directory

    target = tmp_path / "not-a-dir"
    target.write_text("keep me")
    result = _export_cli(["--preset", "tiny", "--no-validate", "--out", str(target)])  # refused before any work
    assert result.exit_code == 1 and result.stderr.splitlines() == [
        f"error: {target} exists and is not a directory; choose another output path"]
    with pytest.raises(OutputError, match=f"{target} exists and is not a directory"):  # the API: an OutputError
        with atomic_directory(target):
            pass
    assert target.read_text() == "keep me"


def test_export_cli_failure_is_one_line_and_traceback_with_debug(tmp_path) -> None:
    (tmp_path / "parent").write_text("a file where the bundle's parent directory should be")
    out = tmp_path / "parent" / "bundle"
    result = _export_cli(["--preset", "tiny", "--no-validate", "--out", str(out)])
    assert result.exit_code == 1, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot create the parent directory of {out}"), lines
    with pytest.raises(OutputError):  # --debug: raised, with its traceback
        _export_cli(["--preset", "tiny", "--no-validate", "--out", str(out), "--debug"])


def test_export_cli_empty_calibration_directory_one_line(tmp_path) -> None:
    try:
        import mirasol.calibration.quantize  # noqa: F401
    except ImportError as missing:
        pytest.skip(f"calibration/quantize.py is not available yet: {missing}")
    (tmp_path / "calib").mkdir()
    result = _export_cli(["--preset", "tiny", "--precision", "int8", "--calibration-data", str(tmp_path / "calib"),
                          "--out", str(tmp_path / "out")])
    assert result.exit_code == 1, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and f"calibration directory {tmp_path / 'calib'} is empty" in lines[0]
    assert not (tmp_path / "out").exists()
