"""Property-based tests (issue 9): the input checks, the tokenizer and the manifest reader, on random inputs,
either work or raise the toolkit's own error for the case, never anything else."""
from __future__ import annotations

import copy
import json
import os
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mirasol.runtime.backends import get_backend
from mirasol.runtime.bundle.reader import Bundle
from mirasol.runtime.errors import BundleError, InputError, MirasolError
from mirasol.runtime.bundle.manifest import MANIFEST_FILE, Manifest
from mirasol.runtime.pipeline import Pipeline
from mirasol.runtime.bundle.tokenizer import ByteTokenizer

from .conftest import QUESTION, chunk, copy_bundle, read_manifest

RUNTIME_EXAMPLES = int(os.environ.get("MIRASOL_RUNTIME_EXAMPLES", "60"))
SETTINGS = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow,
                                                                     HealthCheck.function_scoped_fixture])

# ---------------------------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------------------------

DTYPES = [np.float32] * 4 + [np.float64, np.float16, np.int64, np.int32, np.uint8, np.bool_, np.complex64]


@st.composite
def arrays_near(draw, valid: tuple[int, ...]) -> Any:
    """Mostly-valid arrays: each axis, the rank, the dtype and the values go wrong now and then."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if draw(st.integers(0, 2)) == 0:  # a third are valid: the runs that pass reach the graphs
        return rng.standard_normal(valid).astype(np.float32)
    if draw(st.integers(0, 30)) == 0:
        return draw(st.sampled_from([None, 3.0, "chunk", [[0.0]], (1, 2)]))
    shape = [d if draw(st.integers(0, 9)) else draw(st.integers(0, 6)) for d in valid]
    rank_change = draw(st.integers(0, 8))
    if rank_change == 0 and shape:
        shape = shape[1:]
    elif rank_change == 1:
        shape = [draw(st.integers(0, 3))] + shape
    dtype = draw(st.sampled_from(DTYPES))
    values = rng.standard_normal(shape)
    if values.size and draw(st.integers(0, 5)) == 0:
        values.flat[draw(st.integers(0, values.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    with np.errstate(invalid="ignore", over="ignore"):
        array = values.astype(dtype)
    if draw(st.integers(0, 10)) == 0:
        array = np.asfortranarray(array) if array.ndim > 1 else array[::-1]
    return array


@st.composite
def chunk_feeds(draw, pipe: Pipeline) -> tuple[Any, Any]:
    batch = draw(st.sampled_from([None, 1, 2, 3]))
    lead = () if batch is None else (batch,)
    video = draw(arrays_near(lead + tuple(pipe.chunk_inputs["video"].shape[1:])))
    audio = draw(arrays_near(lead + tuple(pipe.chunk_inputs["audio"].shape[1:])))
    return video, audio


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_push_either_works_or_raises_input_error(shared_pipeline) -> None:
    pipe = shared_pipeline
    outcomes = {"ok": 0, "InputError": 0}

    @settings(max_examples=100, **SETTINGS)
    @given(chunk_feeds(pipe))
    def check(feeds) -> None:
        stream = pipe.stream()
        try:
            context = stream.push(*feeds)
        except InputError as error:
            assert "push" in str(error)
            assert stream.chunks == 0 and stream.batch is None
            outcomes["InputError"] += 1
            return
        video = feeds[0]
        unbatched = video.ndim == 4
        m, d = pipe.config["latents_per_chunk"], pipe.config["d_model"]
        assert context.shape == ((m, d) if unbatched else (video.shape[0], m, d))
        assert np.isfinite(context).all() and stream.chunks == 1
        outcomes["ok"] += 1

    check()
    assert outcomes["ok"] and outcomes["InputError"], outcomes  # both sides were exercised


def test_ask_either_works_or_raises_input_error(shared_pipeline) -> None:
    stream = shared_pipeline.stream()
    stream.push(*chunk(shared_pipeline, 0))

    @settings(max_examples=60, **SETTINGS)
    @given(st.one_of(st.text(max_size=120), st.just(QUESTION), st.none(), st.integers()),
           st.one_of(st.integers(-3, 100), st.floats(allow_nan=True), st.none(), st.booleans()))
    def check(question, max_new_tokens) -> None:
        try:
            answer = stream.ask(question, max_new_tokens=max_new_tokens)
        except InputError:
            return
        assert isinstance(answer, str)

    check()


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------------

TOKENIZER = ByteTokenizer()


@settings(max_examples=300, **SETTINGS)
@given(st.text())
def test_tokenizer_round_trips_any_text(text: str) -> None:
    ids = TOKENIZER.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert TOKENIZER.decode(ids) == text


@settings(max_examples=300, **SETTINGS)
@given(st.lists(st.one_of(st.integers(), st.integers(0, 300), st.sampled_from([256, 257, 258]))))
def test_tokenizer_decode_never_raises(ids: list[int]) -> None:
    text = TOKENIZER.decode(ids)
    assert isinstance(text, str)
    assert TOKENIZER.decode(np.asarray([i for i in ids if -2**63 <= i < 2**63], dtype=np.int64)) == text


@settings(max_examples=200, **SETTINGS)
@given(st.binary())
def test_tokenizer_decode_of_any_bytes_is_lenient_utf8(data: bytes) -> None:
    assert TOKENIZER.decode(list(data) + [TOKENIZER.EOS]) == data.decode("utf-8", errors="replace")


@settings(max_examples=200, **SETTINGS)
@given(st.text(min_size=1).filter(str.strip))
def test_tokenizer_prompt_frames_the_question(question: str) -> None:
    ids = TOKENIZER.prompt(question)
    assert ids[0] == TOKENIZER.BOS and ids[-1] == ord("\n")
    assert TOKENIZER.decode(ids) == question.strip() + "\n"


# ---------------------------------------------------------------------------------------------------------------
# Manifest reader
# ---------------------------------------------------------------------------------------------------------------

PLAUSIBLE = [None, True, 0, 1, -1, 4, 2**40, 1.5, "", "batch", "combiner", "text_decoder", "video", "audio",
             "zeros", "empty", "append", "stream", "question", "float32", "int64", "../combiner.onnx",
             "/etc/passwd", "0" * 64, [], {}, ["video"], [1, 2], {"min": 1, "opt": 1, "max": 1}]

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
              st.text(max_size=8), st.sampled_from(PLAUSIBLE).map(copy.deepcopy)),  # no shared mutables
    lambda children: st.one_of(st.lists(children, max_size=3),
                               st.dictionaries(st.text(max_size=6), children, max_size=3)),
    max_leaves=6)


@st.composite
def mutated_manifest(draw, base: dict[str, Any]) -> dict[str, Any]:
    """1-3 random edits anywhere in the manifest: delete a key / item, replace a value, add a key / item."""
    data = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        parent, key = None, None
        node: Any = data
        while isinstance(node, (dict, list)) and node and (parent is None or draw(st.integers(0, 4))):
            key = draw(st.sampled_from(sorted(node) if isinstance(node, dict) else list(range(len(node)))))
            parent, node = node, node[key]
        if parent is None:
            return draw(st.one_of(json_values, st.just(data)))
        operation = draw(st.sampled_from(["delete", "replace", "replace", "add"]))
        if operation == "delete":
            del parent[key]
        elif operation == "replace":
            parent[key] = draw(json_values)
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=8))] = draw(json_values)
        else:
            parent.insert(draw(st.integers(0, len(parent))), draw(json_values))
    return data


def _leaves(node: Any, path: tuple = ()) -> list[tuple[tuple, Any]]:
    if isinstance(node, dict):
        return [leaf for key, value in node.items() for leaf in _leaves(value, path + (key,))]
    if isinstance(node, list):
        return [leaf for i, value in enumerate(node) for leaf in _leaves(value, path + (i,))]
    return [(path, node)]


@st.composite
def plausible_manifest(draw, base: dict[str, Any]) -> dict[str, Any]:
    """1-2 edits that keep the manifest's types: an integer (or null) becomes another small integer, a string
    another string of the manifest. Most of these pass the reader and reach the Pipeline."""
    data = copy.deepcopy(base)
    leaves = [leaf for leaf in _leaves(base) if leaf[0][0] not in ("producer", "validation", "quantization")]
    strings = sorted({v for _, v in leaves if isinstance(v, str) and len(v) < 40})
    for _ in range(draw(st.integers(1, 2))):
        path, value = draw(st.sampled_from(leaves))
        new = (draw(st.sampled_from(strings)) if isinstance(value, str)
               else draw(st.integers(0, 12)) if value is None or isinstance(value, int) else draw(json_values))
        node = data
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = new
    return data


def test_manifest_mutations_load_or_raise_bundle_error(tiny_bundle) -> None:
    base = read_manifest(tiny_bundle)
    outcomes = {"loaded": 0, "BundleError": 0}

    @settings(max_examples=300, **SETTINGS)
    @given(st.one_of(mutated_manifest(base), plausible_manifest(base)))
    def check(data) -> None:
        try:
            manifest = Manifest.from_dict(json.loads(json.dumps(data)), "manifest.json")
        except BundleError as error:
            assert str(error).startswith("manifest.json")
            outcomes["BundleError"] += 1
            return
        assert Manifest.from_dict(manifest.to_dict()) == manifest  # what loads also round-trips
        outcomes["loaded"] += 1

    check()
    assert outcomes["loaded"] and outcomes["BundleError"], outcomes


def test_manifest_byte_mutations_load_or_raise_bundle_error(tiny_bundle, tmp_path) -> None:
    bundle = copy_bundle(tiny_bundle, tmp_path)
    text = (tiny_bundle / MANIFEST_FILE).read_bytes()

    @settings(max_examples=150, **SETTINGS)
    @given(st.lists(st.tuples(st.integers(0, len(text)), st.integers(0, 16), st.binary(max_size=8)),
                    min_size=1, max_size=3))
    def check(edits) -> None:
        data = bytearray(text)
        for at, cut, insert in edits:
            data[at:at + cut] = insert
        (bundle / MANIFEST_FILE).write_bytes(bytes(data))
        try:
            Bundle.load(bundle, verify=False)
        except BundleError:
            pass

    check()


def test_manifest_mutations_through_the_whole_runtime(tiny_bundle, tmp_path) -> None:
    """A mutated manifest that the reader accepts either runs (load, push, ask) or fails with a MirasolError."""
    bundle = copy_bundle(tiny_bundle, tmp_path)
    base = read_manifest(tiny_bundle)
    backend = get_backend("onnxruntime")
    video, audio = np.zeros((4, 3, 32, 32), np.float32), np.zeros((32, 100), np.float32)
    outcomes: dict[str, int] = {}

    @settings(max_examples=RUNTIME_EXAMPLES, **SETTINGS)
    @given(st.one_of(mutated_manifest(base), plausible_manifest(base), plausible_manifest(base)))
    def check(data) -> None:
        (bundle / MANIFEST_FILE).write_text(json.dumps(data))
        try:
            pipe = Pipeline(Bundle.load(bundle, verify=False), backend)
            stream = pipe.stream()
            for _ in range(3):
                stream.push(video, audio)
            stream.ask(QUESTION, max_new_tokens=2)
        except MirasolError as error:
            outcomes[type(error).__name__] = outcomes.get(type(error).__name__, 0) + 1
            return
        outcomes["ran"] = outcomes.get("ran", 0) + 1

    check()
    assert outcomes.get("ran") and sum(n for kind, n in outcomes.items() if kind != "ran"), outcomes
