"""Serving many streams with Triton: the repository writer, the model's sequence handling, and a real server.

The server tests start the `tritonserver` of the nvidia-pytriton wheel (the `triton` extra) once for the module,
on 127.0.0.1, and stop it by its PID at the end; each stream's answers through it must equal the same stream
run alone through `Pipeline`.
"""
from __future__ import annotations

import json
import queue
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from mirasol.runtime.errors import InputError, MirasolError, OutputError
from mirasol.runtime.pipeline import Pipeline
from mirasol.runtime.triton.model import Reply, Request, Sequences
from mirasol.runtime.files.ownership import MARKER_FILE as MARKER
from mirasol.runtime.triton.repository import KIND, ServingOptions, write_repository
from mirasol.runtime.triton.server import LocalServer, availability

from .conftest import run_export_cli, snapshot

QUESTION = "what is the man holding?"
FP32_TOLERANCE = 1e-5  # a stream's chunk batched with others vs alone (batched matrix products round differently)
IDLE_TIMEOUT_S = 2.0


def chunk_source(pipe: Pipeline, seed: int):
    rng = np.random.default_rng(seed)
    video_shape, audio_shape = pipe.chunk_inputs["video"].shape[1:], pipe.chunk_inputs["audio"].shape[1:]
    return lambda: (rng.random(video_shape, dtype=np.float32), rng.standard_normal(audio_shape).astype(np.float32))


def run_alone(pipe: Pipeline, chunks, question: str | None = None, max_new_tokens: int = 16):
    """Contexts of each chunk and the answer, for one stream pushed alone."""
    stream = pipe.stream()
    contexts = [stream.push(*chunk) for chunk in chunks]
    return contexts, (stream.ask(question, max_new_tokens) if question else "")


def assert_close(got: np.ndarray, expected: np.ndarray, what: str) -> None:
    assert got.shape == expected.shape, what
    assert np.abs(got - expected).max() <= FP32_TOLERANCE, what


# ---------------------------------------------------------------------------------------------------------------
# The repository writer

def test_repository_layout_and_config(tiny_bundles, tmp_path) -> None:
    out = tmp_path / "repo"
    options = ServingOptions(instances=2, max_batch=3, idle_timeout_s=7.5, queue_delay_ms=1, state_dir="states")
    model = write_repository(tiny_bundles["ttm"], out, options)
    assert model == out / "mirasol"
    assert sorted(p.name for p in out.iterdir()) == ["mirasol"]
    assert sorted(p.name for p in model.iterdir()) == [MARKER, "1", "config.pbtxt"]
    assert sorted(p.name for p in (model / "1").iterdir()) == ["bundle", "model.py"]
    assert "from mirasol.runtime.triton.model import TritonPythonModel" in (model / "1" / "model.py").read_text()
    pipe = Pipeline.load(tiny_bundles["ttm"])
    assert Pipeline.load(model / "1" / "bundle").bundle.fingerprint == pipe.bundle.fingerprint
    config = (model / "config.pbtxt").read_text()
    video = ", ".join(str(d) for d in pipe.chunk_inputs["video"].shape[1:])
    for line in ("max_batch_size: 3", f'{{ name: "VIDEO" data_type: TYPE_FP32 dims: [ {video} ] optional: true }}',
                 "max_sequence_idle_microseconds: 7500000", "max_queue_delay_microseconds: 1000",
                 "preferred_batch_size: [ 3 ]", "instance_group [ { count: 2 kind: KIND_CPU } ]",
                 f'parameters {{ key: "state_dir" value {{ string_value: "{Path("states").absolute()}" }} }}'):
        assert line in config
    marker = json.loads((model / MARKER).read_text())
    assert marker["kind"] == KIND and marker["options"]["max_batch"] == 3
    assert sorted(marker["files"]) == sorted(p.relative_to(model).as_posix() for p in model.rglob("*")
                                             if p.is_file() and p.name != MARKER)


def test_writer_replaces_only_its_own_model_folder(tiny_bundles, tmp_path) -> None:
    repo = tmp_path / "repo"
    write_repository(tiny_bundles["ttm"], repo, ServingOptions(model_name="first"))
    write_repository(tiny_bundles["ttm"], repo, ServingOptions(model_name="second"))
    (repo / "NOTES.md").write_text("keep me")
    (repo / "other_model" / "1").mkdir(parents=True)
    (repo / "other_model" / "config.pbtxt").write_text('name: "other_model"')
    before = snapshot(repo)
    write_repository(tiny_bundles["ttm"], repo, ServingOptions(model_name="second", instances=3))
    assert sorted(p.name for p in repo.iterdir()) == ["NOTES.md", "first", "other_model", "second"]
    assert {k: v for k, v in snapshot(repo).items() if not k.startswith("second/")} == {
        k: v for k, v in before.items() if not k.startswith("second/")}, "only the model folder was written"
    (repo / "first" / "1" / "my-notes.txt").write_text("mine")
    with pytest.raises(OutputError, match=r"first exists and is a mirasol Triton model that also holds "
                                          r"'1/my-notes.txt', which mirasol did not write"):
        write_repository(tiny_bundles["ttm"], repo, ServingOptions(model_name="first"))
    (repo / "theirs").mkdir()
    (repo / "theirs" / "config.pbtxt").write_text("mine")
    with pytest.raises(OutputError, match="theirs exists and is not a Triton model written by mirasol"):
        write_repository(tiny_bundles["ttm"], repo, ServingOptions(model_name="theirs"))
    with pytest.raises(InputError, match="--max-batch: 99 is outside"):
        write_repository(tiny_bundles["ttm"], repo, ServingOptions(model_name="second", max_batch=99))
    assert (repo / "first" / "1" / "my-notes.txt").read_text() == "mine"
    assert (repo / "theirs" / "config.pbtxt").read_text() == "mine"
    assert sorted(p.name for p in repo.iterdir()) == ["NOTES.md", "first", "other_model", "second", "theirs"]


def test_cli_help_and_errors(tiny_bundles, tmp_path) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "mirasol.runtime.cli.triton", *args],
                              capture_output=True, text=True, timeout=120)

    helped = cli("-h")
    text = " ".join(helped.stdout.split())
    assert helped.returncode == 0 and "--idle-timeout-s" in text and "(a number in (0, 1e+07]) (default: 60.0)" in text
    assert cli(str(tiny_bundles["ttm"])).returncode == 2  # --out missing
    missing = cli(str(tmp_path / "nothing"), "--out", str(tmp_path / "repo"))
    assert missing.returncode == 1 and missing.stderr.startswith("error: ") and "Traceback" not in missing.stderr
    wrote = cli(str(tiny_bundles["ttm"]), "--out", str(tmp_path / "repo"), "--backend", "tensorrt")
    assert wrote.returncode == 0 and "mirasol-build-engines" in wrote.stdout
    assert "kind: KIND_GPU" in (tmp_path / "repo" / "mirasol" / "config.pbtxt").read_text()


def test_export_cli_writes_the_repository(tmp_path) -> None:
    users = tmp_path / "users"
    (users / "mirasol").mkdir(parents=True)
    (users / "mirasol" / "notes.txt").write_text("keep me")
    args = ["--preset", "tiny", "--no-validate", "--out", str(tmp_path / "bundle"), "--triton"]
    refused = run_export_cli([*args, str(users)])
    assert refused.exit_code == 1 and "is not a Triton model written by mirasol" in refused.stderr
    assert not (tmp_path / "bundle").exists(), "refused before exporting"
    result = run_export_cli([*args, str(tmp_path / "repo")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "repo" / "mirasol" / MARKER).is_file() and "wrote Triton model repository" in result.output
    assert (tmp_path / "repo" / "mirasol" / "1" / "bundle" / "manifest.json").is_file()


# ---------------------------------------------------------------------------------------------------------------
# Sequences: the model's stream table, without Triton

class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_sequences_lifecycle_reclaim_and_resume(tiny_bundles, tmp_path) -> None:
    pipe = Pipeline.load(tiny_bundles["ttm"])
    new_chunk = chunk_source(pipe, seed=10)
    chunks = [new_chunk() for _ in range(3)]
    expected, answer = run_alone(pipe, chunks, QUESTION)
    clock, logged = Clock(), []
    sequences = Sequences(pipe, idle_timeout_s=5, state_dir=tmp_path / "state", max_new_tokens=16, clock=clock,
                          log=logged.append)

    first = sequences.serve([Request(1, start=True, chunk=chunks[0]), Request("cam-2", start=True)])
    assert isinstance(first[0], Reply) and first[0].chunks == 1
    assert_close(first[0].context, expected[0], "chunk 0")
    assert first[1].chunks == 0 and first[1].context.shape[0] == 0 and first[1].answer == ""
    assert (tmp_path / "state" / "1.npz").is_file()

    clock.now = 6  # sequence 1 was seen at 0: idle for longer than 5 s
    [kept] = sequences.serve([Request("cam-2", chunk=chunks[0])])
    assert isinstance(kept, Reply) and 1 not in sequences.streams and "reclaimed sequence 1" in logged[0]
    [lost] = sequences.serve([Request(1, chunk=chunks[1])])
    assert isinstance(lost, InputError) and "reclaimed" in str(lost)

    [resumed] = sequences.serve([Request(1, start=True, resume=True, chunk=chunks[1])])
    assert resumed.chunks == 2
    assert_close(resumed.context, expected[1], "chunk 1 after resuming")
    [ended] = sequences.serve([Request(1, end=True, chunk=chunks[2], question=QUESTION)])
    assert ended.answer == answer and ended.chunks == 3
    assert 1 not in sequences.streams and not (tmp_path / "state" / "1.npz").exists()
    [nothing] = sequences.serve([Request(1, start=True, resume=True)])
    assert isinstance(nothing, InputError) and "no saved state" in str(nothing)
    assert (tmp_path / "state" / f"s-{'cam-2'.encode().hex()}.npz").is_file()


def test_sequences_bad_input_fails_only_its_request(tiny_bundles) -> None:
    pipe = Pipeline.load(tiny_bundles["ttm"])
    new_chunk = chunk_source(pipe, seed=11)
    chunks = {s: [new_chunk() for _ in range(2)] for s in (1, 2, 3)}
    expected = {s: run_alone(pipe, c)[0] for s, c in chunks.items()}
    sequences = Sequences(pipe, idle_timeout_s=60)
    sequences.serve([Request(s, start=True, chunk=c[0]) for s, c in chunks.items()])
    nan = (np.full_like(chunks[2][1][0], np.nan), chunks[2][1][1])
    replies = sequences.serve([Request(1, chunk=chunks[1][1]), Request(2, chunk=nan),
                               Request(3, chunk=chunks[3][1], question=QUESTION, max_new_tokens=10_000)])
    assert_close(replies[0].context, expected[1][1], "the good sequence's chunk")
    assert isinstance(replies[1], InputError) and "NaN" in str(replies[1])
    assert isinstance(replies[2], InputError) and "max_new_tokens" in str(replies[2])
    assert "the chunk of this request was taken" in str(replies[2]) and sequences.streams[3].chunks == 2
    assert sequences.streams[2].chunks == 1
    [retried] = sequences.serve([Request(2, chunk=chunks[2][1])])
    assert_close(retried.context, expected[2][1], "the bad sequence's state was left as it was")


def test_sequences_unsaved_state_is_that_requests_error(tiny_bundles, tmp_path) -> None:
    pipe = Pipeline.load(tiny_bundles["ttm"])
    new_chunk = chunk_source(pipe, seed=12)
    (tmp_path / "7.npz").mkdir()  # the state file of sequence 7 cannot be written
    logged: list[str] = []
    sequences = Sequences(pipe, idle_timeout_s=60, state_dir=tmp_path, log=logged.append)
    replies = sequences.serve([Request(7, start=True, chunk=new_chunk()), Request(8, start=True, chunk=new_chunk())])
    assert "could not remove the saved state of sequence 7" in logged[0]
    assert isinstance(replies[0], MirasolError) and "the chunk was taken, but saving the stream" in str(replies[0])
    assert isinstance(replies[1], Reply) and (tmp_path / "8.npz").is_file()
    assert sequences.streams[7].chunks == 1


# ---------------------------------------------------------------------------------------------------------------
# A real server

AVAILABLE, WHY = availability()
needs_server = pytest.mark.skipif(not AVAILABLE, reason=f"the Triton server cannot run here: {WHY}")


@dataclass
class Served:
    server: LocalServer
    pipe: Pipeline
    state_dir: Path
    log: Path


@pytest.fixture(scope="module")
def served(tiny_bundles, tmp_path_factory) -> Served:
    root = tmp_path_factory.mktemp("triton")
    options = ServingOptions(idle_timeout_s=IDLE_TIMEOUT_S, queue_delay_ms=100, state_dir=str(root / "state"),
                             max_new_tokens=16)
    write_repository(tiny_bundles["ttm"], root / "repo", options)
    server = LocalServer(root / "repo", log_file=root / "server.log")
    try:
        server.start()
        yield Served(server, Pipeline.load(tiny_bundles["ttm"]), root / "state", root / "server.log")
    finally:
        server.stop()


def triton_inputs(client_module, chunk=None, question: str | None = None, resume: bool = False,
                  max_new_tokens: int | None = None) -> list:
    """The request's inputs (batch axis 1), for tritonclient.http or tritonclient.grpc."""
    values: list[tuple[str, np.ndarray, str]] = []
    if chunk is not None:
        values += [("VIDEO", chunk[0][None], "FP32"), ("AUDIO", chunk[1][None], "FP32")]
    if question is not None:
        values.append(("QUESTION", np.array([[question.encode()]], dtype=np.object_), "BYTES"))
    if resume:
        values.append(("RESUME", np.array([[True]]), "BOOL"))
    if max_new_tokens is not None:
        values.append(("MAX_NEW_TOKENS", np.array([[max_new_tokens]], dtype=np.int32), "INT32"))
    inputs = []
    for name, value, dtype in values:
        tensor = client_module.InferInput(name, list(value.shape), dtype)
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    return inputs


@pytest.fixture
def http_client(served):
    http = pytest.importorskip("tritonclient.http", reason="tritonclient is not installed (the triton extra)")
    client = http.InferenceServerClient(served.server.http_url, concurrency=16)
    yield http, client
    client.close()  # an open keep-alive connection would hold up the server's stop


def infer(http, client, sequence, **options):
    """One request; returns (CONTEXT, ANSWER, CHUNKS) or the exception's text."""
    flags = {k: options.pop(k) for k in ("start", "end") if k in options}
    try:
        result = client.infer("mirasol", triton_inputs(http, **options), sequence_id=sequence,
                              sequence_start=flags.get("start", False), sequence_end=flags.get("end", False))
    except Exception as error:  # tritonclient's InferenceServerException
        return str(error)
    return result.as_numpy("CONTEXT")[0], result.as_numpy("ANSWER")[0, 0].decode(), int(result.as_numpy("CHUNKS")[0, 0])


def statistics(client) -> tuple[int, int]:
    stats = client.get_inference_statistics("mirasol")["model_stats"][0]
    return stats["inference_count"], stats["execution_count"]


@needs_server
def test_interleaved_sequences_over_http_equal_each_stream_alone(served, http_client) -> None:
    """Six sequences, two starting one chunk later; at each step their requests are in flight together."""
    http, client = http_client
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


@needs_server
def test_grpc_stream_of_interleaved_sequences(served) -> None:
    """One gRPC stream carries three sequences' requests interleaved, sent without waiting for the replies."""
    grpc = pytest.importorskip("tritonclient.grpc", reason="tritonclient is not installed (the triton extra)")
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


@needs_server
def test_start_end_lifecycle(served, http_client) -> None:
    http, client = http_client
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


@needs_server
def test_idle_sequence_is_reclaimed_and_resumes_from_saved_state(served, http_client) -> None:
    http, client = http_client
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


@needs_server
def test_bad_input_fails_only_its_request(served, http_client) -> None:
    http, client = http_client
    new_chunk = chunk_source(served.pipe, seed=24)
    ids = (401, 402, 403)
    chunks = {s: [new_chunk() for _ in range(3)] for s in ids}
    expected = {s: run_alone(served.pipe, chunks[s])[0] for s in ids}
    for s in ids:
        infer(http, client, s, start=True, chunk=chunks[s][0])
    nan = (np.full_like(chunks[402][1][0], np.nan), chunks[402][1][1])
    sent = [client.async_infer("mirasol", triton_inputs(http, chunk), sequence_id=s)
            for s, chunk in ((401, chunks[401][1]), (402, nan), (403, chunks[403][1]))]
    outcomes = []
    for handle in sent:
        try:
            outcomes.append(handle.get_result().as_numpy("CONTEXT")[0])
        except Exception as error:
            outcomes.append(str(error))
    assert "InputError" in outcomes[1] and "NaN" in outcomes[1]
    assert_close(outcomes[0], expected[401][1], "401 beside the bad request")
    assert_close(outcomes[2], expected[403][1], "403 beside the bad request")
    video_only = http.InferInput("VIDEO", [1, *chunks[402][1][0].shape], "FP32")
    video_only.set_data_from_numpy(chunks[402][1][0][None])
    try:
        client.infer("mirasol", [video_only], sequence_id=402)
        raise AssertionError("a chunk without audio was taken")
    except Exception as error:
        assert "VIDEO and AUDIO come together" in str(error)
    assert "unexpected shape" in infer(http, client, 402, chunk=(chunks[402][1][0][:1], chunks[402][1][1]))
    context, _, count = infer(http, client, 402, chunk=chunks[402][1])
    assert count == 2, "the refused requests left the stream as it was"
    assert_close(context, expected[402][1], "402 after its bad requests")
    for s in ids:
        infer(http, client, s, end=True)


@needs_server
def test_restarted_server_resumes_saved_streams(served) -> None:
    http = pytest.importorskip("tritonclient.http", reason="tritonclient is not installed (the triton extra)")
    new_chunk = chunk_source(served.pipe, seed=25)
    chunks = [new_chunk() for _ in range(3)]
    expected, answer = run_alone(served.pipe, chunks, QUESTION)
    client = http.InferenceServerClient(served.server.http_url)
    infer(http, client, 501, start=True, chunk=chunks[0])
    infer(http, client, 501, chunk=chunks[1])
    client.close()
    served.server.stop()
    served.server.start()
    client = http.InferenceServerClient(served.server.http_url)
    try:
        assert "must specify the START flag" in infer(http, client, 501, chunk=chunks[2])
        context, reply, count = infer(http, client, 501, start=True, resume=True, end=True, chunk=chunks[2],
                                      question=QUESTION)
        assert count == 3 and reply == answer
        assert_close(context, expected[2], "the chunk after the restart")
        assert "no saved state" in infer(http, client, 502, start=True, resume=True)
    finally:
        client.close()


@needs_server
def test_load_figure_modes_do_the_same_work(served) -> None:
    """The modes of `python -m mirasol.runtime.triton.load` push the same chunks and get the same contexts."""
    pytest.importorskip("tritonclient.grpc", reason="tritonclient is not installed (the triton extra)")
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
