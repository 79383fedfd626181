"""The streams of one Triton model instance, by sequence (correlation) ID, served a batch of requests at a time.

Triton's sequence batcher (the `oldest` strategy) sends each sequence's requests in order, tagged with its correlation
ID and START/END flags, and puts requests of different sequences, at most one of each, into one `execute` call.
`Sequences.serve` takes such a batch: every request is checked whole first (its question, answer length and
sampling, its stream), so that a request refused leaves its stream as it was; then the chunks of all its sequences
go through `Pipeline.push_streams` and the questions through `generate_streams`, each stacked across sequences where
their shapes allow. It has no Triton in it and is tested alone; `model.py` turns Triton requests into it and back.

Two things Triton leaves to the model: a sequence dropped by its idle timeout is not announced (so streams idle for
longer than the timeout are reclaimed here, at the next batch), and a restarted server knows no sequence (so with a
state directory every stream is saved after each chunk, and a START with RESUME continues it).
"""
from __future__ import annotations

import hashlib
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..batched_questions import Asked, generate_streams
from ..errors import BackendError, InputError, MirasolError, OutputError
from ..files.atomic import make_directories, remove_file
from ..pipeline import Pipeline, Stream, is_state_file
from ..questions import TextPieces, checked_question
from ..sampling import Sampler

SequenceId = int | str
ONE_OFF = 0  # the correlation ID of a request outside any sequence (Triton's model warm-up sends it)


@dataclass
class Request:
    """What one request asks of its sequence: a chunk to push and/or a question to answer, in that order."""

    sequence: SequenceId
    request_id: str = ""
    start: bool = False
    end: bool = False
    resume: bool = False  # with START: continue the stream saved for this sequence in the state directory
    chunk: tuple[np.ndarray, np.ndarray] | None = None  # video [F, 3, H, W], audio log-mel [n_mels, A]
    question: str | None = None
    max_new_tokens: int | None = None  # None or 0: the default, or what the question leaves where that is less
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class Reply:
    context: np.ndarray  # the chunk's av_context [m, D]; empty [0, D] when the request had no chunk
    answer: str  # "" when the request had no question
    chunks: int  # chunks the stream has taken so far


class Counters:
    """What `Sequences` reports as it serves (Triton's custom metrics, in `metrics.py`); this one keeps nothing."""

    def chunks(self, count: int) -> None:
        """`count` chunks were pushed."""

    def answered(self, seconds: float, tokens: int) -> None:
        """A question was answered, `seconds` after its batch came in, in `tokens` tokens."""

    def reclaimed(self) -> None:
        """A stream idle for longer than the timeout was freed."""

    def failed(self, client: bool) -> None:
        """A request got an error: the client's (an InputError) or the server's."""

    def streams(self, live: int) -> None:
        """`live` streams are held now."""


def tagged(error: MirasolError, sequence: SequenceId, request_id: str) -> MirasolError:
    """`error` with the sequence and request it belongs to at the front of its message (same class)."""
    where = f"sequence {sequence!r}" + (f", request {request_id!r}" if request_id else "")
    return type(error)(f"{where}: {error}")


class Sequences:
    """The streams of one model instance, by sequence ID: created at START, freed at END or when idle for longer
    than `idle_timeout_s`; with `state_dir`, saved after every chunk (and the file removed at END).
    `max_new_tokens`: the answer length of a request that gives none (None: the bundle's default), or what its
    question leaves of the text decoder's context where that is less."""

    def __init__(self, pipeline: Pipeline, idle_timeout_s: float, state_dir: str | Path | None = None,
                 max_new_tokens: int | None = None, clock: Callable[[], float] = time.monotonic,
                 log: Callable[[str], None] = print, counters: Counters | None = None) -> None:
        self.pipeline = pipeline
        self.idle_timeout_s = idle_timeout_s
        self.state_dir = Path(state_dir) if state_dir else None
        self.max_new_tokens = max_new_tokens or pipeline.default_max_new_tokens
        self.clock = clock
        self.log = log
        self.counters = counters or Counters()
        self.streams: dict[SequenceId, Stream] = {}
        self.last_seen: dict[SequenceId, float] = {}
        manifest = pipeline.bundle.manifest
        _, returns = manifest.step_tensor("push", manifest.steps["push"].returns, output=True)  # type: ignore[arg-type]
        shape = [d for d in returns.shape if d != "batch"]
        self.empty_context = np.zeros([0] + [d if isinstance(d, int) else 0 for d in shape[1:]], dtype=returns.dtype)
        if self.state_dir is not None:
            make_directories(self.state_dir, "state directory")

    def serve(self, requests: Sequence[Request], on_text: Callable[[int, str], None] | None = None
              ) -> list[Reply | MirasolError]:
        """Serve one batch (at most one request per sequence); each request gets its reply or its own error, whose
        message starts with its sequence and request ID. `on_text(i, text)`: the answer of request i as it comes."""
        start = self.clock()
        self._reclaim(start, {r.sequence for r in requests})
        requests = [self._one_off(r) if r.sequence == ONE_OFF else r for r in requests]
        results: list[Reply | MirasolError | None] = [None] * len(requests)
        contexts = [self.empty_context] * len(requests)
        asked: dict[int, Asked] = {}
        for i, request in enumerate(requests):
            results[i] = self._attempt(request, lambda: self._check(request, asked, i))
        pushing = [i for i, r in enumerate(requests) if results[i] is None and r.chunk is not None]
        pushed = 0
        for i, outcome in zip(pushing, self._push([requests[i] for i in pushing])):
            if isinstance(outcome, MirasolError):
                results[i] = outcome
            else:
                contexts[i], pushed = outcome, pushed + 1
                results[i] = self._attempt(requests[i], lambda: self._save(requests[i]))
        self.counters.chunks(pushed)
        answers = self._answer({i: a for i, a in asked.items() if results[i] is None}, start, on_text)
        for i, request in enumerate(requests):
            if results[i] is None and isinstance(answers.get(i), MirasolError):
                taken = " (the chunk of this request was taken)" if i in pushing else ""
                results[i] = type(answers[i])(f"{answers[i]}{taken}")  # type: ignore[call-arg]
            elif results[i] is None:
                stream = self.streams[request.sequence]
                results[i] = Reply(contexts[i], answers.get(i, ""), stream.chunks)  # type: ignore[arg-type]
            if request.end:
                self._close(request.sequence)
            elif request.sequence in self.streams:
                self.last_seen[request.sequence] = start
        replies = [tagged(r, q.sequence, q.request_id) if isinstance(r, MirasolError) else r
                   for q, r in zip(requests, results)]
        for reply in replies:
            if isinstance(reply, MirasolError):
                self.counters.failed(client=isinstance(reply, InputError))
        self.counters.streams(len(self.streams))
        return replies  # type: ignore[return-value]

    def _one_off(self, request: Request) -> Request:
        """A request outside any sequence: served on a stream of its own that ends with it (nothing saved)."""
        self.log("mirasol: a request outside any sequence (correlation ID 0, as in Triton's model warm-up) is "
                 "served on a stream of its own")
        return replace(request, start=True, end=True, resume=False)

    def _attempt(self, request: Request, step: Callable[[], None]) -> MirasolError | None:
        """Run one request's part of a step: its error, never another request's (an unexpected one is logged)."""
        try:
            step()
        except MirasolError as error:
            return error
        except OSError as error:
            return OutputError(f"{error.strerror or error} ({error.filename or 'the state directory'})")
        except Exception as error:  # a defect: this request fails, the batch goes on
            self.log(f"mirasol: unexpected error in sequence {request.sequence!r}: {traceback.format_exc()}")
            return BackendError(f"internal error: {type(error).__name__}: {error}")
        return None

    def _check(self, request: Request, asked: dict[int, Asked], i: int) -> None:
        """The request checked whole (its question, answer length and sampling), then its stream opened."""
        if request.question is None:
            self._open(request)
            return
        p = self.pipeline
        question = checked_question(p.tokenizer, p.max_text_len, self.max_new_tokens, request.question,
                                    request.max_new_tokens or None)
        sampler = Sampler(request.temperature, request.top_k, request.top_p, request.seed)
        self._open(request)
        stream = self.streams[request.sequence]
        if request.chunk is None and stream.chunks == 0:
            raise InputError("ask: push at least one chunk before asking")
        asked[i] = Asked(stream, question, sampler)

    def _open(self, request: Request) -> None:
        """The request's stream: a new one at START (or the saved one with RESUME), else the live one."""
        sequence = request.sequence
        if request.start:
            self._close(sequence, keep_saved=request.resume)
            if request.resume:
                path = self._state_path(sequence)
                if path is None or not path.is_file():
                    raise InputError(f"RESUME, but no saved state "
                                     f"{'(the model has no state_dir)' if path is None else f'at {path}'}")
                self.streams[sequence] = self.pipeline.restore(path)
            else:
                self.streams[sequence] = self.pipeline.stream()
        elif request.resume:
            raise InputError("RESUME is only read with START")
        elif sequence not in self.streams:
            raise InputError(f"no stream here: it was idle for more than {self.idle_timeout_s:g} s and was "
                             f"reclaimed; send START (with RESUME to continue from its saved state)")

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

    def _save(self, request: Request) -> None:
        """Save the stream after its chunk (not at END, which deletes the file)."""
        path = self._state_path(request.sequence)
        if path is not None and not request.end:
            try:
                self.streams[request.sequence].save(path)
            except (MirasolError, OSError) as bad:
                raise OutputError(f"the chunk was taken, but saving the stream to {path} failed: {bad}") from None

    def _answer(self, asked: dict[int, Asked], start: float, on_text: Callable[[int, str], None] | None
                ) -> dict[int, str | MirasolError]:
        """Every question of the batch, generated together; each answer's text goes to `on_text` as it comes."""
        order = list(asked)
        rows: dict[int, list[int]] = {i: [] for i in order}
        pieces = {i: TextPieces() for i in order}
        answers: dict[int, str | MirasolError] = {}
        try:
            for k, event in generate_streams(self.pipeline, [asked[i] for i in order]):
                i = order[k]
                if isinstance(event, MirasolError):
                    answers[i] = event
                    continue
                text = ""
                for token in event or []:  # a Triton sequence's stream has batch 1
                    rows[i] += [] if token is None else [token]
                    text += pieces[i].add(token)
                if event is None:
                    answers[i] = self.pipeline.tokenizer.decode(rows[i])
                    text += pieces[i].end()
                    self.counters.answered(self.clock() - start, len(rows[i]))
                if text and on_text is not None:
                    on_text(i, text)
        except Exception as error:  # a defect or a failed send: the questions not answered yet fail with it
            self.log(f"mirasol: unexpected error while answering: {traceback.format_exc()}")
            failure = error if isinstance(error, MirasolError) else BackendError(
                f"internal error: {type(error).__name__}: {error}")
            answers.update({i: failure for i in order if i not in answers})
        return answers

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
                self.counters.reclaimed()
                self.log(f"mirasol: reclaimed sequence {sequence!r}, idle for {now - seen:.1f} s")

    def _state_path(self, sequence: SequenceId) -> Path | None:
        """Where a sequence's state is saved: `<id>.npz` for an integer ID (Triton's are 64-bit), `s-<sha256 of its
        UTF-8>.npz` for a string ID (any length, any characters: a bounded, safe file name)."""
        if self.state_dir is None:
            return None
        if isinstance(sequence, int):
            return self.state_dir / f"{sequence}.npz"
        return self.state_dir / f"s-{hashlib.sha256(sequence.encode('utf-8', 'surrogatepass')).hexdigest()}.npz"
