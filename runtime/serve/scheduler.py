"""The inference thread: one Pipeline for every source, chunks pushed in fair batches, answers token by token.

Each round:
1. the API's commands (add or remove a source, restore a state, take a snapshot, change standing
   questions, read the status) run in order, between two pushes;
2. every source's feed reports its news (reconnects, warnings, chunks dropped for room) and offers its
   oldest chunk (a chunk already too late is dropped by its source's policy): one chunk per source a round,
   taken in turn from a rotating start, so a bursty source waits for the others and a slow one costs them
   only its own chunk;
3. the round's chunks are pushed in one `Pipeline.push_streams` call (streams whose state has the same
   shape run as one batch, at most the bundle's max batch a run) or, with `batch=False`, one `push` each
   (the baseline the load figure compares with); a batch that fails is pushed again one stream at a
   time, so a bad chunk fails only its own source;
4. the standing questions due after these chunks are queued;
5. every question being answered advances by one piece of text (`Stream.ask_iter`), so answers and
   pushes interleave: a long answer delays the next chunks by a token, not by the whole answer.
A question's evidence is taken when its turn comes (the state its answer reads). A source whose decode
thread ended is reported `ended` or `failed` once its queue is empty; its stream stays for questions.
"""
from __future__ import annotations

import collections
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from ..errors import MirasolError
from ..media.live_sources import TimedChunk
from ..pipeline import Pipeline
from .metrics import Metrics
from .sources import ServedSource
from .standing import Standing, Webhook

Event = dict[str, Any]
STATUS_EVERY_S = 1.0
log = logging.getLogger("mirasol.serve")


class Question:
    """A question about one source, answered by the scheduler; `future` gets the answer record."""

    def __init__(self, source: ServedSource, text: str, generation: dict[str, Any], kind: str = "question",
                 standing: Standing | None = None, on_token: Callable[[str], None] | None = None) -> None:
        self.source = source
        self.text = text
        self.generation = generation
        self.kind = kind
        self.standing = standing
        self.on_token = on_token
        self.future: concurrent.futures.Future[Event] = concurrent.futures.Future()
        self.asked_unix = time.time()
        self.asked = time.monotonic()
        self.pieces: Iterator[str] | None = None
        self.text_so_far: list[str] = []
        self.evidence: Event | None = None
        self.seconds = 0.0  # inference time spent on it

    def record(self, answer: str | None = None, error: str | None = None) -> Event:
        record: Event = {"source": self.source.id, "kind": self.kind, "question": self.text,
                         "asked_unix": round(self.asked_unix, 3), "evidence": self.evidence,
                         "answer_ms": round(1000 * self.seconds, 1),
                         "elapsed_ms": round(1000 * (time.monotonic() - self.asked), 1)}
        if self.standing is not None:
            record["standing"] = self.standing.id
        if error is None:
            record["answer"] = answer
        else:
            record["error"] = error
        return record


class Scheduler:
    """The one thread that runs the model (see the module notes). `publish` takes every event for subscribers."""

    def __init__(self, pipeline: Pipeline, publish: Callable[[Event], None], metrics: Metrics, batch: bool = True,
                 webhook: Webhook | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.pipeline = pipeline
        self.publish = publish
        self.metrics = metrics
        self.batch = batch
        self.webhook = webhook
        self.clock = clock
        self.sources: dict[str, ServedSource] = {}
        self.questions: collections.deque[Question] = collections.deque()
        self.commands: queue.SimpleQueue[tuple[Callable[..., Any], tuple, concurrent.futures.Future]] = \
            queue.SimpleQueue()
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.turn = 0
        self.rounds = 0
        self.faults = 0  # rounds that failed on an error of ours
        self.last_round = clock()
        self.next_status = 0.0
        self.thread = threading.Thread(target=self._loop, name="inference", daemon=True)

    # ---- from other threads ----
    def start(self) -> None:
        self.thread.start()

    def call(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        """Run `fn(*args)` in the inference thread between two rounds; its result or exception in the future."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        if self.stopping.is_set():
            future.set_exception(RuntimeError("the service is stopping"))
            return future
        self.commands.put((fn, args, future))
        self.wake.set()
        return future

    def close(self) -> None:
        """Stop the thread and every feed (their decode threads end at their sources' timeouts)."""
        self.stopping.set()
        self.wake.set()
        if self.thread.is_alive():
            self.thread.join(timeout=10)
        for source in self.sources.values():
            source.feed.stop()
        while not self.commands.empty():
            self.commands.get()[2].set_exception(RuntimeError("the service stopped"))
        for question in self.questions:
            if not question.future.done():
                question.future.set_exception(RuntimeError("the service stopped"))

    @property
    def decoding(self) -> bool:
        return any(source.feed.decoding for source in self.sources.values())

    # ---- the inference thread ----
    def _loop(self) -> None:
        while not self.stopping.is_set():
            self.wake.clear()
            self.last_round = self.clock()
            self.rounds += 1
            try:
                busy = self._round()
            except Exception as error:  # a fault of ours must not end every source's service: logged, counted
                self.faults += 1
                log.exception("inference round failed")
                self.publish({"event": "warning", "message": f"inference round failed: {type(error).__name__}: "
                                                             f"{error}"})
                busy = False
            if not busy:
                self.wake.wait(0.05)

    def _round(self) -> bool:
        """One round (see the module notes); whether it did any work."""
        self._run_commands()
        picked = self._collect()
        if picked:
            self._push(picked)
        advanced = self._advance()
        self._check_ended()
        if self.clock() >= self.next_status:
            self.next_status = self.clock() + STATUS_EVERY_S
            self.publish(self.status_event())
        return bool(picked) or advanced

    def _run_commands(self) -> None:
        while not self.commands.empty():
            fn, args, future = self.commands.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as error:  # handed to the caller
                future.set_exception(error)

    def _collect(self) -> list[tuple[ServedSource, TimedChunk]]:
        """One chunk from each source that has one, starting from a rotating source."""
        ids = list(self.sources)
        if not ids:
            return []
        start = self.turn % len(ids)
        self.turn += 1
        picked = []
        for source_id in ids[start:] + ids[:start]:
            source = self.sources[source_id]
            source.feed.service()
            chunk = source.feed.take()
            if chunk is not None:
                picked.append((source, chunk))
        return picked

    def _push(self, picked: list[tuple[ServedSource, TimedChunk]]) -> None:
        groups = [picked] if self.batch and len(picked) > 1 else [[item] for item in picked]
        for group in groups:
            if not self._push_group(group) and len(group) > 1:  # find the bad chunk: each stream on its own
                for item in group:
                    self._push_group([item])
        for source, _ in picked:
            for standing in source.standing.values():
                if standing.due():
                    standing.in_flight = True
                    generation = {"max_new_tokens": standing.max_new_tokens}
                    self.questions.append(Question(source, standing.question, generation, "standing", standing))

    def _push_group(self, group: list[tuple[ServedSource, TimedChunk]]) -> bool:
        """Push one chunk into each stream of `group` in one call; False when the call failed (a chunk of a group
        of one is then dropped, reported with the reason)."""
        taken = self.clock()
        try:
            if len(group) == 1:
                source, chunk = group[0]
                source.stream.push(chunk.video, chunk.audio)
            else:
                self.pipeline.push_streams([s.stream for s, _ in group], [(c.video, c.audio) for _, c in group])
        except MirasolError as error:
            if len(group) == 1:
                source, chunk = group[0]
                source.feed.drop(chunk, f"push failed: {error}", self.clock())
            return False
        done = self.clock()
        self.metrics.push.observe(done - taken)
        self.metrics.batch.observe(len(group))
        self.metrics.backend.labels("push").inc(done - taken)
        for source, chunk in group:
            source.feed.pushed(chunk, taken, done)
        return True

    def _advance(self) -> bool:
        """One piece of text for every question being answered; whether any work was done."""
        if not self.questions:
            return False
        for question in list(self.questions):
            if question.future.cancelled():
                self._finish(question)
                continue
            start = self.clock()
            try:
                if question.pieces is None:  # its turn: the evidence is the state it reads
                    question.evidence = question.source.feed.answer_evidence()
                    question.pieces = question.source.stream.ask_iter(question.text, **question.generation)
                piece = next(question.pieces)
            except StopIteration:
                question.seconds += self.clock() - start
                self._finish(question, "".join(question.text_so_far))
                continue
            except MirasolError as error:
                question.seconds += self.clock() - start
                self._finish(question, error=str(error))
                continue
            question.seconds += self.clock() - start
            question.text_so_far.append(piece)
            if question.on_token is not None:
                question.on_token(piece)
        return True

    def _finish(self, question: Question, answer: str | None = None, error: str | None = None) -> None:
        self.questions.remove(question)
        self.metrics.backend.labels("answer").inc(question.seconds)
        self.metrics.questions.labels(question.kind, "error" if error else "answered").inc()
        if question.future.cancelled():
            return
        record = question.record(answer, error)
        if error is None:
            self.metrics.answer.labels(question.kind).observe(question.seconds)
            question.source.last_answer = record
        standing = question.standing
        if standing is not None:
            standing.in_flight = False
            standing.asked += 1
            standing.answer_seconds += question.seconds
            if error is None and standing.fires(answer or ""):
                self._alert(question, standing, record)
        question.future.set_result(record)
        self.publish({"event": "answer", **record})

    def _alert(self, question: Question, standing: Standing, record: Event) -> None:
        standing.alerts += 1
        previous = standing.history[-1]["answer"] if standing.history else None
        alert = {"event": "alert", "source": question.source.id, "standing": standing.id, "rule": standing.on,
                 "question": standing.question, "answer": record["answer"], "previous": previous,
                 "evidence": record["evidence"], "answer_ms": record["answer_ms"], "time_unix": round(time.time(), 3)}
        standing.history = (standing.history + [alert])[-8:]
        question.source.last_alert = alert
        self.publish(alert)
        if self.webhook is not None and standing.webhook:
            self.webhook.post(alert)

    def _check_ended(self) -> None:
        for source in self.sources.values():
            if source.state not in ("ended", "failed") and source.feed.finished():
                source.feed.service()
                state = source.ended(source.feed.error)
                self.publish({"event": "source", "source": source.id, "state": state, "error": source.error})

    # ---- commands (run in the inference thread through `call`) ----
    def feed_event(self, source: ServedSource, event: Event) -> None:
        """A feed's record: metrics, the source's state, subscribers (called in the inference thread)."""
        event = {**event, "source": source.id}
        if event["event"] == "chunk":
            self.metrics.latency.labels(source.id).observe(event["latency_ms"] / 1000)
        changed = source.note(event)
        self.publish(event)
        if changed is not None:
            self.publish({"event": "source", "source": source.id, "state": changed, "error": source.error})

    def add(self, source: ServedSource) -> Event:
        self.sources[source.id] = source
        source.feed.start_decoding()
        self.publish({"event": "source", "source": source.id, "state": source.state, "url": source.spec.url})
        return source.status()

    def remove(self, source_id: str) -> Event:
        source = self.sources.pop(source_id)
        source.feed.stop()
        self.metrics.forget(source_id)
        self.publish({"event": "source", "source": source_id, "state": "removed"})
        return source.feed.summary("removed")

    def status_event(self) -> Event:
        return {"event": "status", "time_unix": round(time.time(), 3), "sources": [s.status() for s in
                                                                                 self.sources.values()],
                "questions_active": len(self.questions), "batch": self.batch}
