"""The decoupled model through a real Triton server (the session's, tests/triton_tools.py): answers streamed token by
token in order, questions of several sequences generated together; and the client examples of docs/triton.md run as
written against it, errors included."""
from __future__ import annotations

import queue
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mirasol.runtime.files.ownership import MARKER_FILE

from .conftest import marked_block
from .live_tools import write_demo_clip
from .triton_tools import DEFAULT_TOKENS, QUESTION, assert_close, chunk_source, run_alone, statistics, triton_inputs

grpc = pytest.importorskip("tritonclient.grpc", reason="tritonclient is not installed (the triton extra)")
DOCS = Path(__file__).resolve().parents[1] / "docs" / "triton.md"
STREAM_MODEL = "mirasol_stream"


@pytest.fixture
def served(triton_served):
    return triton_served


def collect(replies: queue.Queue, requests: int) -> tuple[list, dict]:
    """Responses in the order they came, as (request ID, PIECE text or None, final result or None, error text or
    None), until every request's final one; and each request's final result."""
    order, finals = [], {}
    while len(finals) < requests:
        result, error = replies.get(timeout=60)
        if error is not None:
            request = error.message().split("request '")[1].split("'")[0]
            order.append((request, None, None, error.message()))
            finals[request] = error
            continue
        response = result.get_response()
        piece = result.as_numpy("PIECE")
        final = response.parameters["triton_final_response"].bool_param
        order.append((response.id, None if piece is None else piece[0, 0].decode(), result if final else None, None))
        if final:
            finals[response.id] = result
    return order, finals


def test_tokens_stream_in_order_with_each_answer_as_alone(served) -> None:
    """Three sequences on one gRPC stream; a bad chunk in the middle is its own request's final (error) response;
    each answer's pieces come before its final response and add up to its ANSWER, the answer of the stream alone."""
    new_chunk = chunk_source(served.pipe, seed=40)
    ids = ["s-1", "s-2", "s-3"]
    chunks = {s: [new_chunk() for _ in range(2)] for s in ids}
    questions = {"s-1": QUESTION, "s-2": "what colour is the car?", "s-3": QUESTION}
    expected = {s: run_alone(served.pipe, chunks[s], questions[s], max_new_tokens=None) for s in ids}
    client = grpc.InferenceServerClient(served.server.grpc_url)
    replies: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: replies.put((result, error)))
    try:
        def send(s: str, request: str, **options) -> None:
            flags = {k: options.pop(k) for k in ("sequence_start", "sequence_end") if k in options}
            client.async_stream_infer(STREAM_MODEL, triton_inputs(grpc, **options), sequence_id=s,
                                      request_id=request, enable_empty_final_response=True, **flags)

        for s in ids:
            send(s, f"{s}/0", chunk=chunks[s][0], sequence_start=True)
        send("s-2", "bad", chunk=(np.full_like(chunks["s-2"][1][0], np.inf), chunks["s-2"][1][1]))
        _, finals = collect(replies, len(ids) + 1)
        before = statistics(client, STREAM_MODEL)
        for s in ids:
            send(s, f"{s}/q", chunk=chunks[s][1], question=questions[s], sequence_end=True)
        order, answered = collect(replies, len(ids))
        finals.update(answered)
        after = statistics(client, STREAM_MODEL)
    finally:
        client.stop_stream()
        client.close()
    assert finals["bad"].message().startswith("InputError: sequence 's-2', request 'bad': push: ")
    for s in ids:
        contexts, answer = expected[s]
        assert_close(finals[f"{s}/0"].as_numpy("CONTEXT")[0], contexts[0], f"{s} chunk 0")
        final = finals[f"{s}/q"]
        assert_close(final.as_numpy("CONTEXT")[0], contexts[1], f"{s} chunk 1")
        assert final.as_numpy("ANSWER")[0, 0].decode() == answer and int(final.as_numpy("CHUNKS")[0, 0]) == 2
        mine = [(piece, result) for request, piece, result, _ in order if request == f"{s}/q"]
        assert [result is not None for _, result in mine] == [False] * (len(mine) - 1) + [True], "pieces, then final"
        assert "".join(piece for piece, _ in mine[:-1]) == answer and len(mine) > 2
    assert after[0] - before[0] == len(ids) and after[1] - before[1] < len(ids), "the questions shared model calls"
    if after[1] - before[1] == 1:  # one call for the three: their pieces came as they were generated, interleaved
        requests = [request for request, piece, _, _ in order if piece is not None]
        assert requests[:3] != [requests[0]] * 3, requests[:6]


def test_a_decoupled_model_is_refused_over_http(served) -> None:
    http = pytest.importorskip("tritonclient.http", reason="tritonclient is not installed (the triton extra)")
    client = http.InferenceServerClient(served.server.http_url)
    try:
        with pytest.raises(Exception, match="doesn't support models with decoupled transaction policy"):
            client.infer(STREAM_MODEL, triton_inputs(http, chunk_source(served.pipe, 41)()), sequence_id=1,
                         sequence_start=True, sequence_end=True)
    finally:
        client.close()


# ---------------------------------------------------------------------------------------------------------------
# docs/triton.md's examples, as written (the server's address and model put in their `URL, MODEL = ...` line)

POISON = '''
import numpy as np, tritonclient.grpc, tritonclient.http
def _poisoned(original, seen={"VIDEO": 0}):
    def set_data_from_numpy(self, value, *args, **kwargs):
        if self.name() == "VIDEO":
            seen["VIDEO"] += 1
            if seen["VIDEO"] == 2:  # the second chunk's video: NaN, a client's mistake
                value = np.full_like(value, np.nan)
        return original(self, value, *args, **kwargs)
    return set_data_from_numpy
for _module in (tritonclient.grpc, tritonclient.http):
    _module.InferInput.set_data_from_numpy = _poisoned(_module.InferInput.set_data_from_numpy)
'''


@pytest.fixture(scope="module")
def example_dir(triton_served, tmp_path_factory) -> Path:
    """A folder as the examples expect it: bundles/demo (the served bundle) and a 3-chunk clip.mp4."""
    work = tmp_path_factory.mktemp("examples")
    shutil.copytree(triton_served.pipe.bundle.path, work / "bundles" / "demo")
    write_demo_clip(work / "clip.mp4", 3, triton_served.pipe.config)
    return work


def run_example(name: str, url: str, model: str, cwd: Path) -> str:
    block = marked_block(DOCS, name)
    lines = [line for line in block.splitlines() if line.startswith("URL, MODEL = ")]
    assert len(lines) == 1, f"the {name} example sets its server in one `URL, MODEL = ...` line"
    script = POISON + block.replace(lines[0], f"URL, MODEL = {url!r}, {model!r}")
    done = subprocess.run([sys.executable, "-c", script], cwd=cwd, capture_output=True, timeout=120,
                          encoding="utf-8")
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.parametrize("name, model, refused", [
    ("triton-http", "mirasol", "refused: 400 InputError: sequence 42: push: input 'video'"),
    ("triton-grpc", "mirasol", "refused: InputError: sequence 'cam-7', request 'chunk 1': push: input 'video'"),
    ("triton-tokens", STREAM_MODEL, "refused: InputError: sequence 'cam-7', request 'chunk 1': push: input 'video'")])
def test_docs_examples_run_as_written(served, example_dir, name, model, refused) -> None:
    from mirasol.runtime.media.video_files import iter_chunks

    chunks = list(iter_chunks(example_dir / "clip.mp4", served.pipe.config))
    assert len(chunks) == 3
    tokens = DEFAULT_TOKENS if model == "mirasol" else None
    contexts, answer = run_alone(served.pipe, [chunks[0], chunks[2]], "which colour appeared first?",
                                 max_new_tokens=tokens)
    url = served.server.http_url if name == "triton-http" else served.server.grpc_url
    out = run_example(name, url, model, example_dir)
    assert refused in out and "contains NaN or inf" in out, out
    assert answer and out.endswith(answer + "\n"), (out, answer)
    if name == "triton-http":
        assert out.startswith(f"1 {contexts[0].shape}\n") and f"\n2 {contexts[1].shape}\n" in out


def test_docs_name_the_files_written() -> None:
    text = DOCS.read_text()
    assert MARKER_FILE in text and ".mirasol-triton.json" not in text
