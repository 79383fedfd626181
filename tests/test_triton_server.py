"""The plain model through a real Triton server (the session's, tests/triton_tools.py): each stream's outputs equal the
same stream run alone through `Pipeline`; client mistakes are client errors naming their sequence and request; the
answer length, sampling, batched questions, metrics, launcher options and a restart, end to end."""
from __future__ import annotations

import queue
import socket
import time
import urllib.request

import numpy as np
import pytest

from .triton_tools import (DEFAULT_TOKENS, IDLE_TIMEOUT_S, QUESTION, assert_close, chunk_source, infer, metrics,
                           run_alone, statistics, triton_inputs)

http = pytest.importorskip("tritonclient.http", reason="tritonclient is not installed (the triton extra)")
grpc = pytest.importorskip("tritonclient.grpc", reason="tritonclient is not installed (the triton extra)")


@pytest.fixture
def served(triton_served):
    return triton_served


@pytest.fixture
def client(served):
    client = http.InferenceServerClient(served.server.http_url, concurrency=16)
    yield client
    client.close()  # an open keep-alive connection would hold up the server's stop


def started(client, pipe, sequences, seed: int, chunks: int = 1) -> dict:
    """Start each sequence with `chunks` chunks; returns its chunks."""
    new_chunk = chunk_source(pipe, seed)
    sent = {s: [new_chunk() for _ in range(chunks)] for s in sequences}
    for s in sequences:
        for k, chunk in enumerate(sent[s]):
            assert isinstance(infer(http, client, s, start=k == 0, chunk=chunk), tuple)
    return sent


def test_interleaved_sequences_over_http_equal_each_stream_alone(served, client) -> None:
    """Six sequences, two starting one chunk later; at each step their requests are in flight together."""
    new_chunk = chunk_source(served.pipe, seed=20)
    ids, offsets, steps = [101, 102, 103, 104, 105, 106], [0, 0, 0, 0, 1, 1], 4
    chunks = {s: [new_chunk() for _ in range(steps)] for s in ids}
    expected = {s: run_alone(served.pipe, chunks[s], QUESTION) for s in ids}
    inferences, executions = statistics(client)
    got: dict[int, list] = {s: [] for s in ids}
    for t in range(steps + 1):
        pending = []
        for s, offset in zip(ids, offsets):
            k = t - offset
            if 0 <= k < steps:
                last = k == steps - 1
                pending.append((s, client.async_infer(
                    "mirasol", triton_inputs(http, chunks[s][k], QUESTION if last else None), sequence_id=s,
                    sequence_start=k == 0, sequence_end=last)))
        for s, handle in pending:
            result = handle.get_result()
            got[s].append((result.as_numpy("CONTEXT")[0], result.as_numpy("ANSWER")[0, 0].decode(),
                           int(result.as_numpy("CHUNKS")[0, 0])))
    for s in ids:
        contexts, answer = expected[s]
        assert [chunks for _, _, chunks in got[s]] == [1, 2, 3, 4]
        for k, (context, _, _) in enumerate(got[s]):
            assert_close(context, contexts[k], f"sequence {s} chunk {k}")
        assert got[s][-1][1] == answer and answer
    after_inferences, after_executions = statistics(client)
    assert after_inferences - inferences == len(ids) * steps
    assert after_executions - executions < len(ids) * steps, "requests of several sequences ran in one call"


def test_questions_of_several_sequences_are_batched(served, client) -> None:
    """Questions arriving together run in fewer model calls, each with the answer of its stream asked alone."""
    ids = [111, 112, 113, 114]  # the repository's max batch
    chunks = started(client, served.pipe, ids, seed=26, chunks=2)
    questions = {s: QUESTION if s % 2 else "what colour is the car?" for s in ids}
    expected = {s: run_alone(served.pipe, chunks[s], questions[s])[1] for s in ids}
    before = statistics(client)
    sent = {s: client.async_infer("mirasol", triton_inputs(http, question=questions[s]), sequence_id=s,
                                  sequence_end=True) for s in ids}
    got = {s: handle.get_result().as_numpy("ANSWER")[0, 0].decode() for s, handle in sent.items()}
    after = statistics(client)
    assert got == expected and len(set(got.values())) > 1
    assert after[0] - before[0] == len(ids) and after[1] - before[1] < len(ids), "the questions shared calls"


def test_grpc_stream_of_interleaved_sequences(served) -> None:
    """One gRPC stream carries three sequences' requests interleaved, sent without waiting for the replies."""
    new_chunk = chunk_source(served.pipe, seed=21)
    ids, steps = ["cam-a", "cam-b", "cam-c"], 3
    chunks = {s: [new_chunk() for _ in range(steps)] for s in ids}
    expected = {s: run_alone(served.pipe, chunks[s], QUESTION) for s in ids}
    replies: queue.Queue = queue.Queue()
    client = grpc.InferenceServerClient(served.server.grpc_url)
    client.start_stream(callback=lambda result, error: replies.put((result, error)))
    try:
        for k in range(steps):
            for s in ids:
                last = k == steps - 1
                client.async_stream_infer("mirasol", triton_inputs(grpc, chunks[s][k], QUESTION if last else None),
                                          request_id=f"{s}/{k}", sequence_id=s, sequence_start=k == 0,
                                          sequence_end=last)
        got = {}
        for _ in range(steps * len(ids)):
            result, error = replies.get(timeout=60)
            assert error is None, error
            s, k = result.get_response().id.split("/")
            got[s, int(k)] = (result.as_numpy("CONTEXT")[0], result.as_numpy("ANSWER")[0, 0].decode())
    finally:
        client.stop_stream()
        client.close()
    for s in ids:
        contexts, answer = expected[s]
        for k in range(steps):
            assert_close(got[s, k][0], contexts[k], f"sequence {s} chunk {k}")
        assert got[s, steps - 1][1] == answer


def test_start_end_lifecycle(served, client) -> None:
    new_chunk = chunk_source(served.pipe, seed=22)
    chunks = [new_chunk() for _ in range(3)]
    expected, _ = run_alone(served.pipe, chunks)
    assert infer(http, client, 201, start=True, chunk=chunks[0])[2] == 1
    assert infer(http, client, 201, chunk=chunks[1])[2] == 2
    assert (served.state_dir / "201.npz").is_file()
    context, _, count = infer(http, client, 201, end=True, chunk=chunks[2])
    assert count == 3 and not (served.state_dir / "201.npz").exists()
    assert_close(context, expected[2], "the END request's chunk")
    assert "must specify the START flag" in infer(http, client, 201, chunk=chunks[0])
    context, _, count = infer(http, client, 201, start=True, chunk=chunks[0])
    assert count == 1, "a new START begins a fresh stream"
    assert_close(context, expected[0], "the fresh stream's first chunk")
    infer(http, client, 201, end=True)


def test_idle_sequence_is_reclaimed_and_resumes_from_saved_state(served, client) -> None:
    new_chunk = chunk_source(served.pipe, seed=23)
    chunks = [new_chunk() for _ in range(3)]
    expected, answer = run_alone(served.pipe, chunks, QUESTION)
    infer(http, client, 301, start=True, chunk=chunks[0])
    infer(http, client, 301, chunk=chunks[1])
    time.sleep(IDLE_TIMEOUT_S + 1)
    assert "must specify the START flag" in infer(http, client, 301, chunk=chunks[2]), "Triton dropped it"
    infer(http, client, 302, start=True, end=True)  # the model reclaims idle streams when it next runs
    deadline = time.monotonic() + 10
    while "reclaimed sequence 301" not in served.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "reclaimed sequence 301" in served.log.read_text()
    context, reply, count = infer(http, client, 301, start=True, resume=True, end=True, chunk=chunks[2],
                                  question=QUESTION)
    assert count == 3 and reply == answer
    assert_close(context, expected[2], "the resumed stream's next chunk")
    reclaimed = [v for (name, labels), v in metrics(served.server).items()
                 if name == "mirasol_sequences_reclaimed_total" and ("model", "mirasol") in labels]
    assert reclaimed and reclaimed[0] >= 1


def test_bad_input_fails_only_its_request(served, client) -> None:
    new_chunk = chunk_source(served.pipe, seed=24)
    ids = (401, 402, 403)
    chunks = {s: [new_chunk() for _ in range(3)] for s in ids}
    expected = {s: run_alone(served.pipe, chunks[s])[0] for s in ids}
    for s in ids:
        infer(http, client, s, start=True, chunk=chunks[s][0])
    nan = (np.full_like(chunks[402][1][0], np.nan), chunks[402][1][1])
    sent = [client.async_infer("mirasol", triton_inputs(http, chunk), sequence_id=s, request_id=f"r{s}")
            for s, chunk in ((401, chunks[401][1]), (402, nan), (403, chunks[403][1]))]
    outcomes = []
    for handle in sent:
        try:
            outcomes.append(handle.get_result().as_numpy("CONTEXT")[0])
        except Exception as error:
            outcomes.append(error)
    assert outcomes[1].status() == "400" and "NaN" in outcomes[1].message()
    assert outcomes[1].message().startswith("InputError: sequence 402, request 'r402': ")
    assert_close(outcomes[0], expected[401][1], "401 beside the bad request")
    assert_close(outcomes[2], expected[403][1], "403 beside the bad request")
    video_only = http.InferInput("VIDEO", [1, *chunks[402][1][0].shape], "FP32")
    video_only.set_data_from_numpy(chunks[402][1][0][None])
    with pytest.raises(Exception, match=r"\[400\] InputError: sequence 402: VIDEO and AUDIO come together"):
        client.infer("mirasol", [video_only], sequence_id=402)
    assert "unexpected shape" in infer(http, client, 402, chunk=(chunks[402][1][0][:1], chunks[402][1][1]))
    context, _, count = infer(http, client, 402, chunk=chunks[402][1])
    assert count == 2, "the refused requests left the stream as it was"
    assert_close(context, expected[402][1], "402 after its bad requests")
    for s in ids:
        infer(http, client, s, end=True)


def test_client_and_server_errors_have_their_codes(served, client) -> None:
    """A client's mistake: HTTP 400 / gRPC INVALID_ARGUMENT, the whole request refused (its chunk not taken); the
    server's fault (here its state file cannot be written): 500 / INTERNAL."""
    [chunk] = started(client, served.pipe, [501], seed=27)[501]
    second = chunk_source(served.pipe, seed=28)()
    for refused in (infer(http, client, 501, chunk=second, question="x" * 200),
                    infer(http, client, 501, chunk=second, question=QUESTION, temperature=-1.0),
                    infer(http, client, 501, chunk=second, question=QUESTION, max_new_tokens=100),
                    infer(http, client, 502, start=True, resume=True)):
        assert refused.startswith("[400] InputError: sequence 50"), refused
    grpc_client = grpc.InferenceServerClient(served.server.grpc_url)
    try:
        with pytest.raises(Exception) as refused:
            grpc_client.infer("mirasol", triton_inputs(grpc, second, question="x" * 200), sequence_id=501)
        assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
        (served.state_dir / "503.npz").mkdir()  # the state file of sequence 503 cannot be written
        with pytest.raises(Exception) as failed:
            grpc_client.infer("mirasol", triton_inputs(grpc, chunk), sequence_id=503, sequence_start=True)
        assert failed.value.status() == "StatusCode.INTERNAL" and "OutputError: sequence 503" in str(failed.value)
    finally:
        grpc_client.close()
    assert "[500] OutputError: sequence 503: the chunk was taken" in infer(http, client, 503, chunk=chunk)
    context, _, count = infer(http, client, 501, chunk=second, end=True)
    assert count == 2, "no refused request took its chunk"
    assert_close(context, run_alone(served.pipe, [chunk, second])[0][1], "501 after the refused requests")


def test_default_answer_length_is_what_the_question_leaves(served, client) -> None:
    """--max-new-tokens 16, a question leaving 9 tokens: no MAX_NEW_TOKENS (or 0) answers in at most 9 tokens."""
    question = "q" * (served.pipe.max_text_len - 2 - 9)
    chunks = started(client, served.pipe, [601], seed=29)[601]
    _, expected = run_alone(served.pipe, chunks, question, max_new_tokens=None)
    assert infer(http, client, 601, question=question)[1] == expected
    assert infer(http, client, 601, question=question, max_new_tokens=0, end=True)[1] == expected
    assert len(served.pipe.tokenizer.encode(expected)) <= 9 < DEFAULT_TOKENS


def test_sampling_is_reproducible_by_seed(served, client) -> None:
    chunks = started(client, served.pipe, [701, 702], seed=30)
    sampling = {"temperature": 0.9, "top_k": 50, "top_p": 0.95}
    answers = {seed: [infer(http, client, s, question=QUESTION, seed=seed, **sampling)[1] for s in (701, 702)]
               for seed in (1, 2, 1)}
    assert answers[1] == [run_alone(served.pipe, chunks[s], QUESTION, seed=1, **sampling)[1] for s in (701, 702)]
    assert answers[1] != answers[2], "another seed, other answers"
    greedy = run_alone(served.pipe, chunks[701], QUESTION)[1]
    assert infer(http, client, 701, question=QUESTION, end=True)[1] == greedy, "no TEMPERATURE: greedy"
    infer(http, client, 702, end=True)


def test_metrics_launcher_options_and_warmup(served, client) -> None:
    started(client, served.pipe, [801], seed=31)
    infer(http, client, 801, question=QUESTION, end=True)
    samples = metrics(served.server)

    def value(name: str, **labels: str) -> float:
        found = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls]
        assert found, f"{name} {labels} not on {served.server.metrics_url}"
        return sum(found)

    assert value("mirasol_chunks_total", model="mirasol") >= 1 and value("mirasol_answers_total", model="mirasol") >= 1
    assert value("mirasol_answer_seconds_count", model="mirasol") == value("mirasol_answers_total", model="mirasol")
    assert value("mirasol_answer_tokens_total", model="mirasol") >= 1
    assert value("mirasol_request_failures_total", model="mirasol", reason="client") >= 0
    assert value("mirasol_streams", model="mirasol", instance="mirasol_0_0") >= 0
    assert value("nv_inference_count", model="mirasol") >= 2  # Triton's own figures beside ours
    assert served.warmups == 3, "--warmup: 1 chunk for mirasol, 2 for mirasol_stream, at load"
    index = {m["name"]: m.get("state") for m in client.get_model_repository_index()}
    assert index == {"mirasol": "READY", "mirasol_stream": "READY", "not_loaded": None}, "explicit control mode"
    if served.server.address != "127.0.0.1":  # bound to the loopback alias only
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", served.server.http_port), timeout=2).close()
        urllib.request.urlopen(f"http://{served.server.http_url}/v2/health/live", timeout=5).close()


def test_restarted_server_resumes_saved_streams(served) -> None:
    """Sequences resume after a restart with the outputs of an unbroken stream: an integer ID, and a string ID of
    Triton's longest (128 characters; its file name was once 262 characters, over the file system's limit)."""
    new_chunk = chunk_source(served.pipe, seed=25)
    ids = [901, "camera/" + "x" * 121]
    chunks = {s: [new_chunk() for _ in range(3)] for s in ids}
    expected = {s: run_alone(served.pipe, chunks[s], QUESTION) for s in ids}
    client = http.InferenceServerClient(served.server.http_url)
    for s in ids:
        infer(http, client, s, start=True, chunk=chunks[s][0])
        infer(http, client, s, chunk=chunks[s][1])
    client.close()
    served.server.stop()
    served.server.start()
    client = http.InferenceServerClient(served.server.http_url)
    try:
        for s in ids:
            assert "must specify the START flag" in infer(http, client, s, chunk=chunks[s][2])
            context, reply, count = infer(http, client, s, start=True, resume=True, end=True, chunk=chunks[s][2],
                                          question=QUESTION)
            assert count == 3 and reply == expected[s][1]
            assert_close(context, expected[s][0][2], f"sequence {s}: the chunk after the restart")
        assert "no saved state" in infer(http, client, 902, start=True, resume=True)
    finally:
        client.close()


def test_load_figure_modes_do_the_same_work(served) -> None:
    """The modes of `python -m mirasol.runtime.triton.load` push the same chunks and get the same contexts."""
    from mirasol.runtime.triton import load as triton_load

    data = triton_load.make_chunks(served.pipe, streams=3, chunks=3, seed=1)
    reference: list[list[np.ndarray]] = [[] for _ in data]
    served_contexts: list[list[np.ndarray]] = [[] for _ in data]
    figures = [triton_load.measure("threads", 9, lambda: triton_load.threaded(served.pipe, data, reference)),
               triton_load.measure("one by one", 9, lambda: triton_load.one_by_one(served.pipe, data)),
               triton_load.measure("batched", 9, lambda: triton_load.batched(served.pipe, data)),
               triton_load.measure("server", 9, lambda: triton_load.through_server(
                   served.server, data, "grpc", "mirasol", served_contexts), served.server.process.pid)]
    for figure in figures:
        assert figure["chunks_per_s"] > 0 and figure["cpu_ms_per_chunk"] > 0 and figure["p95_ms"] >= figure["p50_ms"]
    for s in range(3):
        expected, _ = run_alone(served.pipe, data[s])
        for k in range(3):
            assert_close(reference[s][k], expected[k], f"in-process stream {s} chunk {k}")
            assert_close(served_contexts[s][k], expected[k], f"served stream {s} chunk {k}")
    assert "| mode | chunks/s |" in triton_load.format_table(figures)
