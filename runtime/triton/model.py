"""The Triton Inference Server model (Python backend): Triton requests into `Sequences` (one runtime Stream per
sequence, `sequences.py`) and its replies back.

A request's error says whose it is: an `InputError` (a bad chunk, a question too long, RESUME without saved state)
is the client's: HTTP 400 / gRPC INVALID_ARGUMENT, as Triton's own input checks; anything else is the server's
(500 / INTERNAL). Its message starts with the error class, the sequence (correlation ID) and the request ID, since a
gRPC stream's error carries no status and no ID of its own. A decoupled model (`--decoupled`) sends the answer's text
as it is generated (`streaming.py`).
"""
from __future__ import annotations

import json
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from ..backends import BackendSettings, backend_entry
from ..errors import BackendError, InputError, MirasolError
from ..pipeline import Pipeline
from .sequences import Reply, Request, Sequences, tagged


def load_pipeline(bundle: str | Path, backend: str, threads: int = 0, device: int = 0) -> Pipeline:
    """The bundle with the serving backend (a registry name), given `threads` intra-op threads (0: the library's
    default) and GPU `device`, as far as they apply to it."""
    options = backend_entry(backend).options(BackendSettings(threads=threads or None, device=device))
    return Pipeline.load(bundle, backend=backend, **options)


class TritonPythonModel:
    """Triton's entry point; the repository's model.py imports it (see runtime/triton/repository.py)."""

    def initialize(self, args: dict[str, str]) -> None:
        import triton_python_backend_utils as pb_utils  # exists only inside Triton's Python backend

        from .metrics import TritonCounters

        self.pb = pb_utils
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config["parameters"].items()}
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        bundle = Path(args["model_repository"]) / args["model_version"] / params["bundle"]
        device = int(args["model_instance_device_id"])  # the instance's GPU (KIND_GPU: a GPU backend)
        log = pb_utils.Logger.log_info
        try:
            self.counters: TritonCounters | None = TritonCounters(pb_utils, {
                "model": args["model_name"], "version": args["model_version"],
                "instance": args["model_instance_name"]})
        except Exception as error:  # metrics off (--allow-metrics false) or a backend without custom metrics
            log(f"mirasol: the model's own metrics are off: {error}")
            self.counters = None
        self.sequences = Sequences(load_pipeline(bundle, params["backend"], int(params["threads"]), device),
                                   idle_timeout_s=float(params["idle_timeout_s"]), state_dir=params["state_dir"],
                                   max_new_tokens=int(params["max_new_tokens"]) or None, log=log,
                                   counters=self.counters)

    def execute(self, requests: list[Any]) -> list[Any] | None:
        if self.decoupled:
            from .streaming import execute_decoupled

            execute_decoupled(self, requests)
            return None
        return [self.response(reply) for reply in self.serve(requests)]

    def finalize(self) -> None:
        """Triton unloads the model: close the graph sessions (saved streams stay in the state directory)."""
        self.sequences.pipeline.close()
        if self.counters is not None:
            self.counters.close()

    def serve(self, requests: list[Any], on_text: Any = None) -> list[Reply | MirasolError]:
        """Each Triton request's reply or error; `on_text(i, text)` gets request i's answer as it is generated."""
        replies: list[Reply | MirasolError | None] = [None] * len(requests)
        parsed: list[tuple[int, Request]] = []
        for i, request in enumerate(requests):
            try:
                parsed.append((i, self.request(request)))
            except MirasolError as error:
                replies[i] = tagged(error, request.correlation_id(), request.request_id())
        try:
            served = self.sequences.serve([r for _, r in parsed],
                                          None if on_text is None else lambda k, text: on_text(parsed[k][0], text))
        except Exception as error:  # a defect outside any one request: every request of the batch says so
            self.pb.Logger.log_error(f"mirasol: {traceback.format_exc()}")
            failed = BackendError(f"internal error: {type(error).__name__}: {error}")
            served = [tagged(failed, r.sequence, r.request_id) for _, r in parsed]
        for (i, _), reply in zip(parsed, served):
            replies[i] = reply
        return replies  # type: ignore[return-value]

    def request(self, request: Any) -> Request:
        """A Triton request as a `Request` (absent control inputs: false, as in Triton's warm-up requests)."""
        def value(name: str) -> Any:
            tensor = self.pb.get_input_tensor_by_name(request, name)
            return None if tensor is None else tensor.as_numpy()[0]  # without the batch axis (the batch is 1)

        def scalar(name: str, default: Any) -> Any:
            found = value(name)
            return default if found is None else found[0].item()

        video, audio = value("VIDEO"), value("AUDIO")
        if (video is None) != (audio is None):
            raise InputError("VIDEO and AUDIO come together (one chunk), or neither")
        question = value("QUESTION")
        if question is not None:
            try:
                question = bytes(question[0]).decode("utf-8")
            except UnicodeDecodeError as bad:
                raise InputError(f"QUESTION is not UTF-8 text: {bad}") from None
        sequence = request.correlation_id()
        return Request(sequence, request.request_id(), start=bool(scalar("START", 0)), end=bool(scalar("END", 0)),
                       resume=bool(scalar("RESUME", False)), chunk=None if video is None else (video, audio),
                       question=question, max_new_tokens=scalar("MAX_NEW_TOKENS", None),
                       temperature=scalar("TEMPERATURE", 0.0), top_k=scalar("TOP_K", 0), top_p=scalar("TOP_P", 1.0),
                       seed=scalar("SEED", None))

    def response(self, reply: Reply | MirasolError) -> Any:
        """The InferenceResponse of a reply (CONTEXT, ANSWER, CHUNKS) or of an error."""
        pb = self.pb
        if isinstance(reply, MirasolError):
            return pb.InferenceResponse(error=self.error(reply))
        return pb.InferenceResponse([
            pb.Tensor("CONTEXT", reply.context[None]),
            pb.Tensor("ANSWER", np.array([[reply.answer.encode("utf-8")]], dtype=np.object_)),
            pb.Tensor("CHUNKS", np.array([[reply.chunks]], dtype=np.int64))])

    def error(self, error: MirasolError) -> Any:
        """A TritonError whose code says whose mistake it is (InputError: the client's)."""
        kind = self.pb.TritonError
        return kind(f"{type(error).__name__}: {error}", kind.INVALID_ARG if isinstance(error, InputError) else
                    kind.INTERNAL)

