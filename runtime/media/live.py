"""The real-time driver: one source's chunks into a Stream, questions on the way.

    decode thread:  source.chunks() --put--> [bounded queue] --take--> caller's thread: Stream.push
                                                                     questions: Stream.ask between pushes

The decoding, the queue, the drop policy and the telemetry are the source's `Feed` (feed.py, shared with
`mirasol-serve`, which drives many feeds). Questions (`ask`, from any thread, or every `ask_every` seconds)
are answered between two pushes from the state at that moment; decoding goes on meanwhile, and the time an
answer takes counts against the latency of the chunks waiting (which the drop policy then handles). Every
answer carries its evidence (evidence.py): the chunks the answer read, their span on the source's
timeline, their capture times and how old the newest was. A question given for the end of the stream is
answered when it ends, also when the source failed (e.g. gave up reconnecting); then the error is raised.

Telemetry: the feed's records (chunk, drop, reconnect, warning), one per answer, and a summary with
p50/p95/max of latency, receive, decode, queue wait, push and answer times.
"""
from __future__ import annotations

import queue
import time
from collections.abc import Callable
from typing import Any

from ..errors import InputError, MirasolError
from ..pipeline import Stream
from .feed import DROP_POLICIES, LATENCY_BOUND_S, MIN_QUEUE_SIZE, ChunkQueue, Event, Feed, Quantiles, positive_seconds
from .live_sources import Source

__all__ = ["DROP_POLICIES", "LATENCY_BOUND_S", "MIN_QUEUE_SIZE", "ChunkQueue", "Event", "LiveRun", "Quantiles"]
ASK_EVERY_MAX_S = 86400.0  # a day: beyond it --ask-every would never ask in a run anyone watches


class LiveRun:
    """Drive one Stream from one Source in real time. `run()` blocks until the source ends or `stop()`.

    policy, latency_bound, queue_size: the source's Feed (feed.py).
    question / ask_every: ask `question` every `ask_every` seconds, or once at the end when ask_every is
    None; `ask()` adds questions any time.
    on_event: called with every record (chunk, drop, answer, reconnect, warning, summary), in the caller's thread.
    generation: ask's options (max_new_tokens, temperature, top_k, top_p, seed).
    """

    def __init__(self, stream: Stream, source: Source, policy: str | None = None,
                 latency_bound: float = LATENCY_BOUND_S, queue_size: int | None = None,
                 ask_every: float | None = None, question: str | None = None,
                 on_event: Callable[[Event], None] | None = None, clock: Callable[[], float] = time.monotonic,
                 **generation: Any) -> None:
        if ask_every is not None:
            positive_seconds("ask_every", ask_every, ASK_EVERY_MAX_S)
            if not question:
                raise InputError("ask_every needs a question")
        self.on_event = on_event or (lambda event: None)
        self.feed = Feed(source, stream, policy=policy, latency_bound=latency_bound, queue_size=queue_size,
                         on_event=self._emit, clock=clock)
        self.stream = stream
        self.source = source
        self.ask_every = ask_every
        self.question = question
        self.clock = clock
        self.generation = generation
        self.questions: queue.SimpleQueue[str] = queue.SimpleQueue()
        self.stop_requested = False
        self.next_ask = 0.0
        self.answer_ms = Quantiles()
        self.answers = 0

    # ---- control (any thread) ----
    def ask(self, question: str) -> None:
        """Answer `question` between the next two pushes (after the first push, if none happened yet)."""
        self.questions.put(question)

    def stop(self) -> None:
        """End the run soon: no more pushes; run() returns the summary."""
        self.stop_requested = True
        self.feed.stop()

    @property
    def decoding(self) -> bool:
        """The decode thread still runs (see Feed.decoding)."""
        return self.feed.decoding

    @property
    def policy(self) -> str:
        return self.feed.policy

    @property
    def queue(self) -> ChunkQueue:
        return self.feed.queue

    @property
    def pushed(self) -> int:
        return self.feed.pushed_count

    @property
    def dropped(self) -> int:
        return self.feed.dropped

    # ---- the caller's thread ----
    def _emit(self, event: Event) -> None:
        self.on_event(event)

    def _answer(self, question: str) -> None:
        start = self.clock()
        event: Event = {"event": "answer", "t_s": round(start - self.feed.start, 3), "question": question,
                        "chunks": self.stream.chunks, "evidence": self.feed.answer_evidence()}
        try:
            event["answer"] = self.stream.ask(question, **self.generation)
            self.answers += 1
            self.answer_ms.add(1000 * (self.clock() - start))
        except MirasolError as error:  # a bad question (or a failing backend) ends that question, not the stream
            event["error"] = str(error)
        event["answer_ms"] = round(1000 * (self.clock() - start), 1)
        self._emit(event)

    def _service(self, final: bool = False) -> None:
        """Report the feed's news; answer the questions due (all of them once `final`)."""
        self.feed.service()
        now = self.clock()
        if not self.stream.chunks and not final:  # questions wait for the first chunk
            return
        if self.ask_every is not None and now >= self.next_ask and not final:
            self.next_ask = now + self.ask_every
            self.questions.put(self.question)  # type: ignore[arg-type]
        while not self.questions.empty() and (final or not self.feed.stopping.is_set()):
            self._answer(self.questions.get())

    def run(self) -> Event:
        """Stream until the source ends, `stop()` or an error; returns (and emits) the summary.

        An error of the source or of a push ends the run: the questions due are answered, the summary is
        emitted, then the error is raised.
        """
        feed = self.feed
        feed.start_decoding()
        self.next_ask = feed.start + (self.ask_every or 0.0)
        ended = "end of source"
        interrupted: KeyboardInterrupt | None = None
        error: BaseException | None = None
        try:
            while not feed.stopping.is_set():
                self._service()
                chunk = feed.take(timeout=0.05)
                if chunk is None:
                    if feed.finished():
                        break
                    continue
                taken = self.clock()
                self.stream.push(chunk.video, chunk.audio)
                feed.pushed(chunk, taken, self.clock())
            if self.stop_requested:
                ended = "stopped"
        except KeyboardInterrupt as stopped:  # no signal handler: Ctrl-C still gets the summary, then goes on
            interrupted, ended = stopped, "interrupted"
        except Exception as failed:
            error = failed
        finally:
            feed.stop()
            if feed.decoder is not None:
                feed.decoder.join(timeout=1.0)  # a source blocked on the network is left to its timeout (daemon)
        error = error or feed.error
        if interrupted is None:  # the source's end, a stop, or a failure: what was asked is answered
            if self.question and self.ask_every is None:
                self.questions.put(self.question)
            self._service(final=True)
        summary = self.summary(ended if error is None else f"error: {error}")
        self._emit(summary)
        if interrupted is not None:
            raise interrupted
        if isinstance(error, MirasolError):
            raise error
        if error is not None:
            raise InputError(f"live source {self.source.name}: {error}") from error
        return summary

    def summary(self, ended: str) -> Event:
        """The run so far: the feed's counts and times (ms), and the answers."""
        return {**self.feed.summary(ended), "answers": self.answers, "answer_ms": self.answer_ms.to_dict()}

    def status_line(self) -> str:
        """One line for a live display: time, chunks, drops, latency, queue depth, answers."""
        feed = self.feed
        latency = "-" if feed.last_latency_ms is None else f"{feed.last_latency_ms:.0f} ms"
        p95 = feed.latency_ms.percentile(95)
        return (f"live {self.clock() - feed.start:7.1f} s | pushed {self.pushed} dropped {self.dropped} | "
                f"latency {latency} (p95 {'-' if p95 is None else f'{p95:.0f} ms'}, bound "
                f"{1000 * feed.latency_bound:.0f} ms) | queue {len(self.queue)}/{self.queue.size} | "
                f"answers {self.answers}" + (f" | reconnects {feed.reconnects}" if feed.reconnects else ""))
