"""The Triton Inference Server model (Python backend): one runtime Stream per sequence.

Triton's sequence batcher (the `oldest` strategy) sends each stream's requests in order, tagged with the
sequence's correlation ID and START/END flags, and puts requests of different sequences, at most one of each,
into one `execute` call. `Sequences` serves such a batch: the chunks of all its sequences go through
`Pipeline.push_streams` (stacked where their state has the same shape), the questions are answered one after the
other. It has no Triton in it and is tested alone; `TritonPythonModel` turns Triton requests into it and back.

Two things Triton leaves to the model: a sequence dropped by its idle timeout is not announced (so streams idle
for longer than the timeout are reclaimed here, at the next batch), and a restarted server knows no sequence (so
with a state directory every stream is saved after each chunk, and a START with RESUME continues it).
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..backends import BackendSettings, backend_entry
from ..errors import InputError, MirasolError
from ..files.atomic import make_directories, remove_file
from ..pipeline import Pipeline, Stream, is_state_file

SequenceId = int | str


@dataclass
class Request:
    """What one request asks of its sequence: a chunk to push and/or a question to answer, in that order."""

    sequence: SequenceId
    start: bool = False
    end: bool = False
    resume: bool = False  # with START: continue the stream saved for this sequence in the state directory
    chunk: tuple[np.ndarray, np.ndarray] | None = None  # video [F, 3, H, W], audio log-mel [n_mels, A]
    question: str | None = None
    max_new_tokens: int | None = None


@dataclass
class Reply:
    context: np.ndarray  # the chunk's av_context [m, D]; empty [0, D] when the request had no chunk
    answer: str  # "" when the request had no question
    chunks: int  # chunks the stream has taken so far


class Sequences:
    """The streams of one model instance, by sequence ID: created at START, freed at END or when idle for longer
    than `idle_timeout_s`; with `state_dir`, saved after every chunk (and the file removed at END)."""

    def __init__(self, pipeline: Pipeline, idle_timeout_s: float, state_dir: str | Path | None = None,
                 max_new_tokens: int | None = None, clock: Callable[[], float] = time.monotonic,
                 log: Callable[[str], None] = print) -> None:
        self.pipeline = pipeline
        self.idle_timeout_s = idle_timeout_s
        self.state_dir = Path(state_dir) if state_dir else None
        self.max_new_tokens = max_new_tokens
        self.clock = clock
        self.log = log
        self.streams: dict[SequenceId, Stream] = {}
        self.last_seen: dict[SequenceId, float] = {}
        manifest = pipeline.bundle.manifest
        _, returns = manifest.step_tensor("push", manifest.steps["push"].returns, output=True)  # type: ignore[arg-type]
        shape = [d for d in returns.shape if d != "batch"]
        self.empty_context = np.zeros([0] + [d if isinstance(d, int) else 0 for d in shape[1:]], dtype=returns.dtype)
        if self.state_dir is not None:
            make_directories(self.state_dir, "state directory")

    def serve(self, requests: Sequence[Request]) -> list[Reply | MirasolError]:
        """Serve one batch (at most one request per sequence); each request gets its reply or its own error."""
        now = self.clock()
        self._reclaim(now, {r.sequence for r in requests})
        results: list[Reply | MirasolError | None] = [None] * len(requests)
        contexts: list[np.ndarray] = [self.empty_context] * len(requests)
        for i, request in enumerate(requests):
            try:
                self._open(request)
            except MirasolError as error:
                results[i] = error
        pushing = [i for i, r in enumerate(requests) if results[i] is None and r.chunk is not None]
        for i, outcome in zip(pushing, self._push([requests[i] for i in pushing])):
            if isinstance(outcome, MirasolError):
                results[i] = outcome
            else:
                contexts[i] = outcome
        for i, request in enumerate(requests):
            stream = self.streams.get(request.sequence)
            if results[i] is None and stream is not None:
                results[i] = self._finish(request, stream, contexts[i], pushed=i in pushing)
            if request.end:
                self._close(request.sequence)
            elif stream is not None:
                self.last_seen[request.sequence] = now
        return results  # type: ignore[return-value]

    def _open(self, request: Request) -> None:
        """The request's stream: a new one at START (or the saved one with RESUME), else the live one."""
        sequence = request.sequence
        if request.start:
            self._close(sequence, keep_saved=request.resume)
            if request.resume:
                path = self._state_path(sequence)
                if path is None or not path.is_file():
                    raise InputError(f"sequence {sequence!r}: RESUME, but no saved state "
                                     f"{'(the model has no state_dir)' if path is None else f'at {path}'}")
                self.streams[sequence] = self.pipeline.restore(path)
            else:
                self.streams[sequence] = self.pipeline.stream()
        elif request.resume:
            raise InputError(f"sequence {sequence!r}: RESUME is only read with START")
        elif sequence not in self.streams:
            raise InputError(f"sequence {sequence!r} has no stream here: it was idle for more than "
                             f"{self.idle_timeout_s:g} s and was reclaimed; send START (with RESUME to continue "
                             f"from its saved state)")

    def _push(self, requests: list[Request]) -> list[np.ndarray | MirasolError]:
        """Every chunk in one push_streams call; if that fails, each chunk alone, so each error is its own."""
        streams = [self.streams[r.sequence] for r in requests]
        chunks = [r.chunk for r in requests]
        try:
            return list(self.pipeline.push_streams(streams, chunks))  # type: ignore[arg-type]
        except MirasolError:
            outcomes: list[np.ndarray | MirasolError] = []
            for stream, chunk in zip(streams, chunks):
                try:
                    outcomes.append(stream.push(*chunk))  # type: ignore[misc]
                except MirasolError as error:
                    outcomes.append(error)
            return outcomes

    def _finish(self, request: Request, stream: Stream, context: np.ndarray, pushed: bool) -> Reply | MirasolError:
        """Save the pushed chunk's state, then answer the question."""
        path = self._state_path(request.sequence)
        if pushed and path is not None and not request.end:
            try:
                stream.save(path)
            except MirasolError as bad:
                return MirasolError(f"sequence {request.sequence!r}: the chunk was taken, but saving the stream to "
                                    f"{path} failed: {bad}")
        answer = ""
        if request.question is not None:
            tokens = self.max_new_tokens if request.max_new_tokens is None else request.max_new_tokens
            try:
                answer = stream.ask(request.question, tokens)  # type: ignore[assignment]
            except MirasolError as error:
                return type(error)(f"{error}{' (the chunk of this request was taken)' if pushed else ''}")
        return Reply(context, answer, stream.chunks)

    def _close(self, sequence: SequenceId, keep_saved: bool = False) -> None:
        self.streams.pop(sequence, None)
        self.last_seen.pop(sequence, None)
        path = self._state_path(sequence)
        if path is not None and not keep_saved:
            try:
                remove_file(path, is_state_file, "stream state file")  # only a state file: never a user's file
            except MirasolError as bad:  # the stream has ended all the same; the next save replaces the file
                self.log(f"mirasol: could not remove the saved state of sequence {sequence!r}: {bad}")

    def _reclaim(self, now: float, keep: set[SequenceId]) -> None:
        """Free the streams idle for longer than the timeout (their saved state stays, for RESUME)."""
        for sequence, seen in list(self.last_seen.items()):
            if now - seen > self.idle_timeout_s and sequence not in keep:
                del self.streams[sequence], self.last_seen[sequence]
                self.log(f"mirasol: reclaimed sequence {sequence!r}, idle for {now - seen:.1f} s")

    def _state_path(self, sequence: SequenceId) -> Path | None:
        """Where a sequence's state is saved: `<id>.npz` (a string ID as `s-<hex of its UTF-8>.npz`)."""
        if self.state_dir is None:
            return None
        name = str(sequence) if isinstance(sequence, int) else "s-" + sequence.encode("utf-8").hex()
        return self.state_dir / f"{name}.npz"


def load_pipeline(bundle: str | Path, backend: str, threads: int = 0, device: int = 0) -> Pipeline:
    """The bundle with the serving backend (a registry name), given `threads` intra-op threads (0: the library's
    default) and GPU `device`, as far as they apply to it."""
    options = backend_entry(backend).options(BackendSettings(threads=threads or None, device=device))
    return Pipeline.load(bundle, backend=backend, **options)


class TritonPythonModel:
    """Triton's entry point; the repository's model.py imports it (see runtime/triton/repository.py)."""

    def initialize(self, args: dict[str, str]) -> None:
        import triton_python_backend_utils as pb_utils  # exists only inside Triton's Python backend

        self.pb = pb_utils
        params = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
        bundle = Path(args["model_repository"]) / args["model_version"] / params["bundle"]
        device = int(args["model_instance_device_id"])  # the instance's GPU (KIND_GPU: the tensorrt backend)
        self.sequences = Sequences(load_pipeline(bundle, params["backend"], int(params["threads"]), device),
                                   idle_timeout_s=float(params["idle_timeout_s"]), state_dir=params["state_dir"],
                                   max_new_tokens=int(params["max_new_tokens"]) or None,
                                   log=pb_utils.Logger.log_info)

    def execute(self, requests: list[Any]) -> list[Any]:
        replies: list[Reply | MirasolError | None] = [None] * len(requests)
        parsed: list[tuple[int, Request]] = []
        for i, request in enumerate(requests):
            try:
                parsed.append((i, self._request(request)))
            except MirasolError as error:
                replies[i] = error
        for (i, _), reply in zip(parsed, self.sequences.serve([r for _, r in parsed])):
            replies[i] = reply
        return [self._response(reply) for reply in replies]  # type: ignore[arg-type]

    def finalize(self) -> None:
        """Triton unloads the model: close the graph sessions (saved streams stay in the state directory)."""
        self.sequences.pipeline.close()

    def _input(self, request: Any, name: str) -> np.ndarray | None:
        """The request's value of input `name` without its batch axis (Triton's sequence batcher sends batch 1)."""
        tensor = self.pb.get_input_tensor_by_name(request, name)
        return None if tensor is None else tensor.as_numpy()[0]

    def _request(self, request: Any) -> Request:
        video, audio = self._input(request, "VIDEO"), self._input(request, "AUDIO")
        if (video is None) != (audio is None):
            raise InputError("VIDEO and AUDIO come together (one chunk), or neither")
        question = self._input(request, "QUESTION")
        if question is not None:
            try:
                question = bytes(question[0]).decode("utf-8")
            except UnicodeDecodeError as bad:
                raise InputError(f"QUESTION is not UTF-8 text: {bad}") from None
        max_new_tokens = self._input(request, "MAX_NEW_TOKENS")
        resume = self._input(request, "RESUME")
        return Request(request.correlation_id(), start=bool(self._input(request, "START")[0]),
                       end=bool(self._input(request, "END")[0]), resume=resume is not None and bool(resume[0]),
                       chunk=None if video is None else (video, audio), question=question,
                       max_new_tokens=None if max_new_tokens is None else int(max_new_tokens[0]))

    def _response(self, reply: Reply | MirasolError) -> Any:
        pb = self.pb
        if isinstance(reply, MirasolError):
            return pb.InferenceResponse(error=pb.TritonError(f"{type(reply).__name__}: {reply}"))
        return pb.InferenceResponse([
            pb.Tensor("CONTEXT", reply.context[None]),
            pb.Tensor("ANSWER", np.array([[reply.answer.encode("utf-8")]], dtype=np.object_)),
            pb.Tensor("CHUNKS", np.array([[reply.chunks]], dtype=np.int64))])
