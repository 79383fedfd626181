"""Serving many streams with Triton, without a server: the repository writer and its command line, and `Sequences`
(the model's stream table). The real server's tests are in test_triton_server.py and test_triton_streaming.py.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mirasol.runtime.errors import BackendError, InputError, MirasolError, OutputError
from mirasol.runtime.files.ownership import MARKER_FILE as MARKER
from mirasol.runtime.pipeline import Pipeline
from mirasol.runtime.triton.repository import KIND, ServingOptions, write_repository
from mirasol.runtime.triton.sequences import Counters, Reply, Request, Sequences

from .conftest import run_export_cli, snapshot
from .triton_tools import QUESTION, assert_close, chunk_source, run_alone


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


def parsed_config(model: Path):
    """config.pbtxt parsed as Triton's ModelConfig (the protobuf tritonclient ships): field names and enums checked."""
    from google.protobuf import text_format
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="the triton extra")

    return text_format.Parse((model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def test_config_decoupled_gpus_warmup_and_sampling_inputs(tiny_bundles, tmp_path) -> None:
    plain = parsed_config(write_repository(tiny_bundles["ttm"], tmp_path / "plain"))
    assert not plain.model_transaction_policy.decoupled and [o.name for o in plain.output] == [
        "CONTEXT", "ANSWER", "CHUNKS"]
    assert {i.name: i.optional for i in plain.input} == dict.fromkeys(
        ["VIDEO", "AUDIO", "QUESTION", "MAX_NEW_TOKENS", "RESUME", "TEMPERATURE", "TOP_K", "TOP_P", "SEED"], True)
    [warmup] = plain.model_warmup
    assert warmup.count == 1 and warmup.batch_size == 1 and sorted(warmup.inputs) == ["AUDIO", "VIDEO"]
    assert all(value.zero_data for value in warmup.inputs.values())

    options = ServingOptions(backend="tensorrt", decoupled=True, gpus=(0, 2), instances=2, warmup=0)
    gpu = parsed_config(write_repository(tiny_bundles["ttm"], tmp_path / "gpu", options))
    assert gpu.model_transaction_policy.decoupled and "PIECE" in [o.name for o in gpu.output]
    [group] = gpu.instance_group
    assert group.kind == group.KIND_GPU and list(group.gpus) == [0, 2] and group.count == 2
    assert not gpu.model_warmup
    for bad, message in ((ServingOptions(gpus=(0,)), "--gpus: the onnxruntime backend computes on the CPU"),
                         (ServingOptions(backend="tensorrt", gpus=(1, 1)), "different integers"),
                         (ServingOptions(warmup=-1), "--warmup >= 0")):
        with pytest.raises(InputError, match=message):
            write_repository(tiny_bundles["ttm"], tmp_path / "refused", bad)
    assert not (tmp_path / "refused").exists()


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
    wrote = cli(str(tiny_bundles["ttm"]), "--out", str(tmp_path / "repo"), "--backend", "tensorrt", "--gpus", "1,0",
                "--decoupled", "--warmup", "3")
    assert wrote.returncode == 0 and "mirasol-build-engines" in wrote.stdout
    config = parsed_config(tmp_path / "repo" / "mirasol")
    assert list(config.instance_group[0].gpus) == [1, 0] and config.model_transaction_policy.decoupled
    assert config.model_warmup[0].count == 3
    bad = cli(str(tiny_bundles["ttm"]), "--out", str(tmp_path / "other"), "--gpus", "first")
    assert bad.returncode == 2 and "expected GPU indices separated by commas" in bad.stderr


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
    assert [p.name for p in (tmp_path / "state").iterdir()] == [f"s-{hashlib.sha256(b'cam-2').hexdigest()}.npz"]


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
    assert sequences.streams[3].chunks == 1, "a request whose question is refused takes none of its chunk"
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
    assert (tmp_path / "7.npz").is_dir(), "what is in the state file's place is not ours to remove"
    assert isinstance(replies[0], OutputError) and "the chunk was taken, but saving the stream" in str(replies[0])
    assert isinstance(replies[1], Reply) and (tmp_path / "8.npz").is_file()
    assert sequences.streams[7].chunks == 1


class Recorded(Counters):
    def __init__(self) -> None:
        self.seen: dict[str, list] = {}

    def __getattribute__(self, name: str):
        if name in ("chunks", "answered", "reclaimed", "failed", "streams"):
            return lambda *args, **kwargs: self.seen.setdefault(name, []).append(args or tuple(kwargs.values()))
        return super().__getattribute__(name)


def test_sequences_check_the_whole_request_before_any_step(tiny_bundles) -> None:
    """A request whose question, answer length or sampling is refused takes none of its chunk (nor its START)."""
    pipe = Pipeline.load(tiny_bundles["ttm"])
    new_chunk = chunk_source(pipe, seed=13)
    chunks = [new_chunk() for _ in range(2)]
    expected, answer = run_alone(pipe, chunks, QUESTION)
    counters = Recorded()
    sequences = Sequences(pipe, idle_timeout_s=60, max_new_tokens=16, counters=counters)
    [first] = sequences.serve([Request(1, start=True, chunk=chunks[0])])
    refused = sequences.serve([Request(1, "long", chunk=chunks[1], question="x" * 200),
                               Request(2, "empty", start=True, question=QUESTION)])
    refused += sequences.serve([Request(1, "tokens", chunk=chunks[1], question=QUESTION, max_new_tokens=-3)])
    refused += sequences.serve([Request(1, "sampling", chunk=chunks[1], question=QUESTION, temperature=-1.0)])
    refused += sequences.serve([Request(1, "seed", start=True, chunk=chunks[1], question=QUESTION, seed=-1)])
    assert [type(r) for r in refused] == [InputError] * 5
    assert [str(r).split(":")[0] for r in refused] == ["sequence 1, request 'long'", "sequence 2, request 'empty'",
                                                      "sequence 1, request 'tokens'", "sequence 1, request 'sampling'",
                                                      "sequence 1, request 'seed'"]
    assert "push at least one chunk" in str(refused[1]) and "max_new_tokens" in str(refused[2])
    assert sequences.streams[1].chunks == 1, "no refused request took its chunk, nor restarted the stream"
    [served] = sequences.serve([Request(1, chunk=chunks[1], question=QUESTION)])
    assert_close(served.context, expected[1], "the chunk after the refused requests")
    assert served.answer == answer
    assert counters.seen["failed"] == [(True,)] * 5 and counters.seen["chunks"][-1] == (1,)
    assert counters.seen["streams"][-1] == (2,) and len(counters.seen["answered"]) == 1


def test_sequences_default_answer_length_is_what_the_question_leaves(tiny_bundles) -> None:
    pipe = Pipeline.load(tiny_bundles["ttm"])
    question = "q" * (pipe.max_text_len - 2 - 9)  # with BOS and the newline: 9 tokens left for the answer
    stream = pipe.stream()
    chunk = chunk_source(pipe, seed=14)()
    stream.push(*chunk)
    expected = stream.token_ids(question)[0]
    for configured in (None, 16):  # the bundle's default (32), a server's --max-new-tokens
        sequences = Sequences(pipe, idle_timeout_s=60, max_new_tokens=configured)
        for tokens in (None, 0):  # MAX_NEW_TOKENS absent, or 0
            [reply] = sequences.serve([Request(5, start=True, end=True, chunk=chunk, question=question,
                                               max_new_tokens=tokens)])
            assert isinstance(reply, Reply) and reply.answer == pipe.tokenizer.decode(expected), (configured, tokens)
    assert len(expected) <= 9
    [too_long] = sequences.serve([Request(5, start=True, chunk=chunk, question=question, max_new_tokens=10)])
    assert isinstance(too_long, InputError) and "must be an int in [1, 9]" in str(too_long)


def test_sequences_batch_questions_across_sequences(tiny_bundles, monkeypatch) -> None:
    """Questions in one batch are generated together (fewer text decoder runs) with the answers of each alone, and
    each answer's text comes through on_text in order."""
    pipe = Pipeline.load(tiny_bundles["ttm"])
    new_chunk = chunk_source(pipe, seed=15)
    ids = [1, 2, 3, 4, 5, 6]
    chunks = {s: [new_chunk() for _ in range(2 + (s > 4))] for s in ids}  # two lengths of AV memory
    questions = {s: QUESTION if s % 2 else "what colour is the hat?" for s in ids}  # two prompt lengths
    sampling = {s: {"temperature": 0.8, "top_k": 40, "seed": s} if s > 3 else {} for s in ids}
    expected = {s: run_alone(pipe, chunks[s], questions[s], **sampling[s])[1] for s in ids}
    sequences = Sequences(pipe, idle_timeout_s=60, max_new_tokens=16)
    sequences.serve([Request(s, start=True, chunk=chunks[s][0]) for s in ids])
    sequences.serve([Request(s, chunk=chunks[s][1]) for s in ids])
    runs = []
    decoder = pipe.sessions["text_decoder"]
    monkeypatch.setattr(decoder, "run", lambda *a, run=decoder.run, **k: runs.append(1) or run(*a, **k))
    texts: dict[int, str] = {}
    replies = sequences.serve([Request(s, chunk=chunks[s][2] if s > 4 else None, question=questions[s],
                                       **sampling[s]) for s in ids],
                              on_text=lambda i, text: texts.__setitem__(ids[i], texts.get(ids[i], "") + text))
    assert {s: r.answer for s, r in zip(ids, replies)} == expected
    assert texts == {s: a for s, a in expected.items() if a}
    tokens = sum(len(pipe.tokenizer.encode(a)) for a in expected.values())  # at most one run per token alone
    assert len(runs) < tokens, "questions of several sequences shared text decoder runs"


def test_sequences_a_long_or_odd_id_fails_nothing_else(tiny_bundles, tmp_path) -> None:
    """Issue 25 case 12: string IDs of any length or characters get bounded, safe state file names; and an
    unexpected failure of one request (here a state save raising a non-Mirasol error) is that request's alone."""
    pipe = Pipeline.load(tiny_bundles["ttm"])
    new_chunk = chunk_source(pipe, seed=16)
    odd = ["x" * 5000, "../../escape", "cam/1\\0", "\udcff"]
    sequences = Sequences(pipe, idle_timeout_s=60, state_dir=tmp_path / "state")
    replies = sequences.serve([Request(s, start=True, chunk=new_chunk()) for s in [*odd, 9]])
    assert all(isinstance(r, Reply) and r.chunks == 1 for r in replies), replies
    names = [p.name for p in (tmp_path / "state").iterdir()]
    assert len(names) == 5 and all(len(n) <= 72 for n in names) and sorted(tmp_path.iterdir()) == [tmp_path / "state"]
    [resumed] = Sequences(pipe, 60, state_dir=tmp_path / "state").serve([Request(odd[0], start=True, resume=True)])
    assert resumed.chunks == 1

    broken = sequences.streams[9]
    broken.save = lambda path: 1 / 0  # a defect in one request's path
    logged: list[str] = []
    sequences.log = logged.append
    replies = sequences.serve([Request(s, chunk=new_chunk()) for s in [odd[1], 9, odd[2]]])
    assert isinstance(replies[1], BackendError) and "internal error: ZeroDivisionError" in str(replies[1])
    assert "sequence 9" in str(replies[1]) and "ZeroDivisionError" in logged[0]
    assert [r.chunks for r in (replies[0], replies[2])] == [2, 2]


def test_sequences_serve_a_one_off_request_on_a_stream_of_its_own(tiny_bundles, tmp_path) -> None:
    """Correlation ID 0 (Triton's model warm-up): a fresh stream that ends with the request, nothing saved."""
    pipe = Pipeline.load(tiny_bundles["ttm"])
    chunk = chunk_source(pipe, seed=17)()
    sequences = Sequences(pipe, idle_timeout_s=60, state_dir=tmp_path)
    for _ in range(2):
        [reply] = sequences.serve([Request(0, chunk=(np.zeros_like(chunk[0]), np.zeros_like(chunk[1])))])
        assert isinstance(reply, Reply) and reply.chunks == 1
    assert sequences.streams == {} and list(tmp_path.iterdir()) == []
    [failed] = sequences.serve([Request(0, question=QUESTION)])
    assert isinstance(failed, MirasolError) and "push at least one chunk" in str(failed)


def test_launcher_command_line(tmp_path) -> None:
    """The launcher's options as tritonserver flags, and its refusals (the real server runs them in
    test_triton_server.py: another loopback address, metrics, the explicit control mode, a log file)."""
    from mirasol.runtime.triton.server import LocalServer

    server = LocalServer(tmp_path, address="0.0.0.0", metrics_port=9102, model_control_mode="explicit",
                         load_models=["a", "b"], log_verbose=1)
    command, _ = server.command(tmp_path / "backends")
    flags = " ".join(command)
    for flag in ("--http-address 0.0.0.0", "--grpc-address 0.0.0.0", "--metrics-address 0.0.0.0",
                 "--metrics-port 9102", "--allow-metrics true", "--model-control-mode explicit", "--load-model=a",
                 "--load-model=b", "--log-verbose 1"):
        assert flag in flags
    assert server.http_url.startswith("127.0.0.1:") and server.metrics_url == "http://127.0.0.1:9102/metrics"
    assert "--allow-metrics false" in " ".join(LocalServer(tmp_path).command(tmp_path)[0])

    def launcher(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "mirasol.runtime.triton.server", str(tmp_path), *args],
                              capture_output=True, text=True, timeout=60)

    assert "--model-control-mode" in launcher("-h").stdout
    for args, message in ((["--load-model", "a"], "--load-model needs --model-control-mode explicit"),
                          (["--http-port", "70000"], "expected an integer in [0, 65535]"),
                          (["--model-control-mode", "sometimes"], "invalid choice")):
        done = launcher(*args)
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr
