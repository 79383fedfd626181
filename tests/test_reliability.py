"""Reliability and security (issue 9): one error hierarchy, bad inputs refused with names, bundles that cannot
run code or reach outside their directory, CLIs that fail with one clear line.

The shared tiny bundle is exported once per session (`tiny_bundle`, in conftest.py); tests that change a bundle
change a copy.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mirasol.runtime.bundle.reader import Bundle
from mirasol.runtime.errors import BackendError, BundleError, ExportError, InputError, MirasolError, OutputError
from mirasol.runtime.bundle.manifest import MANIFEST_FILE, MAX_MANIFEST_BYTES
from mirasol.runtime.pipeline import Pipeline

from .conftest import (QUESTION, assert_same_stream_state, chunk, copy_bundle, read_manifest,
                       stream_snapshot, write_manifest)

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
    (("config", "max_text_len"), "config.max_text_len is missing (the runtime reads"),
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
    (("counters", 0, "length_of"), ["cross_key_0", 1],
     "counter position: length_of names 'cross_key_0', which step 'generate' does not take from the caller"),
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


# ---- media and calibration ---------------------------------------------------------------------------------

def _media():
    try:
        from mirasol.runtime.media import video_files as media
        import av  # noqa: F401
    except ImportError as missing:
        pytest.skip(f"runtime/media/video_files.py or PyAV is not available here: {missing}")
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
