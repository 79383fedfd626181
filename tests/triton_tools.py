"""What the Triton tests share: chunks, the same stream run alone, request inputs for tritonclient, and the one server
of the test session (`triton_served` in conftest.py starts it with `start_served`).

The server is the `tritonserver` of the nvidia-pytriton wheel (the `triton` extra), on a loopback address, serving
one repository with two models of the tiny TTM bundle: `mirasol` (the plain model, with a state directory and a
default answer length of 16) and `mirasol_stream` (`--decoupled`: answers streamed token by token). It runs in the
explicit model control mode (both named at start) with metrics on, and is stopped by its PID at the end.
"""
from __future__ import annotations

import json
import shutil
import socket
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mirasol.runtime.pipeline import Pipeline
from mirasol.runtime.triton.repository import ServingOptions, write_repository
from mirasol.runtime.triton.server import LocalServer

QUESTION = "what is the man holding?"
FP32_TOLERANCE = 1e-5  # a stream's chunk batched with others vs alone (batched matrix products round differently)
IDLE_TIMEOUT_S = 2.0
DEFAULT_TOKENS = 16  # the plain model's --max-new-tokens
SAMPLING_INPUTS = {"max_new_tokens": ("MAX_NEW_TOKENS", "INT32"), "temperature": ("TEMPERATURE", "FP32"),
                   "top_k": ("TOP_K", "INT32"), "top_p": ("TOP_P", "FP32"), "seed": ("SEED", "INT64")}


def chunk_source(pipe: Pipeline, seed: int):
    rng = np.random.default_rng(seed)
    video_shape, audio_shape = pipe.chunk_inputs["video"].shape[1:], pipe.chunk_inputs["audio"].shape[1:]
    return lambda: (rng.random(video_shape, dtype=np.float32), rng.standard_normal(audio_shape).astype(np.float32))


def run_alone(pipe: Pipeline, chunks, question: str | None = None, max_new_tokens: int | None = DEFAULT_TOKENS,
              **sampling):
    """Contexts of each chunk and the answer, for one stream pushed alone."""
    stream = pipe.stream()
    contexts = [stream.push(*chunk) for chunk in chunks]
    return contexts, (stream.ask(question, max_new_tokens, **sampling) if question else "")


def assert_close(got: np.ndarray, expected: np.ndarray, what: str) -> None:
    assert got.shape == expected.shape, what
    assert np.abs(got - expected).max() <= FP32_TOLERANCE, what


def triton_inputs(client_module, chunk=None, question: str | None = None, resume: bool = False, **sampling) -> list:
    """The request's inputs (batch axis 1), for tritonclient.http or tritonclient.grpc; `sampling`: max_new_tokens,
    temperature, top_k, top_p, seed."""
    values: list[tuple[str, np.ndarray, str]] = []
    if chunk is not None:
        values += [("VIDEO", chunk[0][None], "FP32"), ("AUDIO", chunk[1][None], "FP32")]
    if question is not None:
        values.append(("QUESTION", np.array([[question.encode()]], dtype=np.object_), "BYTES"))
    if resume:
        values.append(("RESUME", np.array([[True]]), "BOOL"))
    for key, value in sampling.items():
        name, dtype = SAMPLING_INPUTS[key]
        values.append((name, np.array([[value]], dtype={"INT32": np.int32, "INT64": np.int64, "FP32": np.float32}[
            dtype]), dtype))
    inputs = []
    for name, value, dtype in values:
        tensor = client_module.InferInput(name, list(value.shape), dtype)
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    return inputs


def infer(http, client, sequence, model: str = "mirasol", **options):
    """One request; returns (CONTEXT, ANSWER, CHUNKS) or the exception's text."""
    flags = {k: options.pop(k) for k in ("start", "end", "request_id") if k in options}
    try:
        result = client.infer(model, triton_inputs(http, **options), sequence_id=sequence,
                              sequence_start=flags.get("start", False), sequence_end=flags.get("end", False),
                              request_id=flags.get("request_id", ""))
    except Exception as error:  # tritonclient's InferenceServerException
        return str(error)
    return result.as_numpy("CONTEXT")[0], result.as_numpy("ANSWER")[0, 0].decode(), int(result.as_numpy("CHUNKS")[0, 0])


def statistics(client, model: str = "mirasol") -> tuple[int, int]:
    """(inference count, execution count) of the model so far, once settled: Triton counts a call when the model's
    execute returns, which can be after the client has its responses (sent from inside execute); two reads 0.1 s
    apart must agree (within 5 s)."""
    as_json = {"as_json": True} if "grpc" in type(client).__module__ else {}  # gRPC's JSON gives int64 as str

    def read() -> tuple[int, int]:
        stats = client.get_inference_statistics(model, **as_json)["model_stats"][0]
        return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))

    last, deadline = read(), time.monotonic() + 5
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = read()
        if now == last:
            return now
        last = now
    return last


def metrics(server: LocalServer) -> dict[tuple[str, frozenset], float]:
    """The metrics endpoint parsed: (name, labels) -> value, for every sample line of the Prometheus text."""
    with urllib.request.urlopen(server.metrics_url, timeout=10) as reply:
        text = reply.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            head, value = line.rsplit(" ", 1)
            name, _, labels = head.partition("{")
            pairs = [pair.split("=", 1) for pair in labels.rstrip("}").split(",") if pair]
            samples[name, frozenset((k, json.loads(v)) for k, v in pairs)] = float(value)
    return samples


def loopback_alias() -> str:
    """127.0.0.2 where it can be bound (Linux routes all of 127/8 to loopback), so that a server bound to it shows
    that the address option is honoured; else 127.0.0.1."""
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.2", 0))
        return "127.0.0.2"
    except OSError:
        return "127.0.0.1"


@dataclass
class Served:
    server: LocalServer
    pipe: Pipeline
    state_dir: Path
    log: Path
    warmups: int  # requests outside any sequence the models logged while loading (Triton's warm-up)


def start_served(bundle: Path, root: Path) -> Served:
    """The session's server (see the module docstring), started."""
    write_repository(bundle, root / "repo", ServingOptions(
        idle_timeout_s=IDLE_TIMEOUT_S, queue_delay_ms=100, state_dir=str(root / "state"), max_new_tokens=DEFAULT_TOKENS))
    write_repository(bundle, root / "stream-repo", ServingOptions(model_name="mirasol_stream", decoupled=True,
                                                                  queue_delay_ms=100, warmup=2))
    shutil.move(root / "stream-repo" / "mirasol_stream", root / "repo" / "mirasol_stream")
    (root / "repo" / "not_loaded").mkdir()  # a folder the explicit model control mode leaves alone
    server = LocalServer(root / "repo", log_file=root / "server.log", address=loopback_alias(), metrics_port=0,
                         model_control_mode="explicit", load_models=["mirasol", "mirasol_stream"])
    server.start()
    warmups = (root / "server.log").read_text().count("a request outside any sequence")
    return Served(server, Pipeline.load(bundle), root / "state", root / "server.log", warmups)
