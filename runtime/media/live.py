"""The real-time driver: a source's chunks through a bounded queue into a Stream, questions on the way.

    decode thread:  source.chunks() --put--> [bounded queue] --get--> caller's thread: Stream.push
                                                                     questions: Stream.ask between pushes

The source decodes in its own thread, so a slow network or decoder never blocks inference and a slow
model never blocks decoding. When the queue is full the declared policy applies:
- `drop-oldest` (default for live sources: stay current): the oldest waiting chunk is dropped to make
  room; a chunk that has waited so long that pushing it would break the latency bound is dropped too
  (only while a fresh chunk can still meet the bound: decode + push estimates within it);
- `block` (default for files: lose nothing): the decode thread waits for room; latency then grows
  when the model is slower than the source (chunks over the bound are counted, none is dropped).
Every dropped chunk is counted, reported and noted on the stream (`Stream.skip`): the carried state
only ever sees the pushed chunks, in order; the gap shows in the telemetry (the chunk indices).

Questions (`ask`, from any thread, or every `ask_every` seconds) are answered between two pushes from
the state at that moment; decoding goes on meanwhile, and the time an answer takes counts against the
latency of the chunks waiting (which the drop policy then handles).

Telemetry: one record per chunk pushed, dropped, answered or reconnected (`on_event`), and a summary
with p50/p95/max of latency, decode, queue wait and push times. Latency is from `captured` (the
chunk's last media arrived) to its av_context, and is decode + queue wait + push: the queue wait is
the rest (in the queue, or in a decode thread blocked by `block`). Percentiles come from log-spaced
buckets 1% wide, so memory stays flat however long the run.
"""
from __future__ import annotations

import collections
import math
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from ..errors import InputError, MirasolError
from ..pipeline import Stream
from .live_sources import Source, TimedChunk
from .spectrogram import config_value

DROP_POLICIES = ("drop-oldest", "block")
LATENCY_BOUND_S = 2.0
MIN_QUEUE_SIZE = 2
_ESTIMATE_WEIGHT = 0.3  # weight of the newest sample in the running decode / push time estimates

Event = dict[str, Any]


class Quantiles:
    """Count, max and approximate percentiles of positive values in bounded memory (1%-wide log buckets)."""

    _RATIO = math.log(1.01)
    _FLOOR = 1e-3  # values at or below this share bucket 0

    def __init__(self) -> None:
        self.buckets: dict[int, int] = collections.defaultdict(int)
        self.count = 0
        self.max = 0.0

    def add(self, value: float) -> None:
        bucket = max(0, math.ceil(math.log(max(value, self._FLOOR) / self._FLOOR) / self._RATIO))
        self.buckets[bucket] += 1
        self.count += 1
        self.max = max(self.max, value)

    def percentile(self, q: float) -> float | None:
        """The q-th percentile (0-100), at most 1% above the true value; None when empty."""
        if not self.count:
            return None
        rank = max(1, math.ceil(q / 100 * self.count))
        seen = 0
        for bucket in sorted(self.buckets):
            seen += self.buckets[bucket]
            if seen >= rank:
                return min(self._FLOOR * math.exp(bucket * self._RATIO), self.max)
        return self.max

    def to_dict(self) -> dict[str, float | None]:
        return {"p50": _round(self.percentile(50)), "p95": _round(self.percentile(95)),
                "max": _round(self.max if self.count else None)}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


class ChunkQueue:
    """The bounded queue between the decode thread and the pushes, with the drop policy for a full queue."""

    def __init__(self, size: int, policy: str) -> None:
        if policy not in DROP_POLICIES:
            raise InputError(f"drop policy must be one of {DROP_POLICIES}, got {policy!r}")
        if size < 1:
            raise InputError(f"queue size must be at least 1, got {size}")
        self.size = size
        self.policy = policy
        self.chunks: collections.deque[TimedChunk] = collections.deque()
        self.dropped: list[TimedChunk] = []  # dropped for room, not yet reported by the consumer
        self.closed = False
        self.cond = threading.Condition()

    def put(self, chunk: TimedChunk, stop: threading.Event) -> None:
        with self.cond:
            if self.policy == "block":
                while len(self.chunks) >= self.size and not stop.is_set():
                    self.cond.wait(0.1)
            elif len(self.chunks) >= self.size:
                self.dropped.append(self.chunks.popleft())
            self.chunks.append(chunk)
            self.cond.notify_all()

    def get(self, timeout: float) -> TimedChunk | None:
        """The oldest chunk; None if none came within `timeout` or the queue is closed and empty."""
        with self.cond:
            if not self.chunks and not self.closed:
                self.cond.wait(timeout)
            if not self.chunks:
                return None
            chunk = self.chunks.popleft()
            self.cond.notify_all()
            return chunk

    def take_dropped(self) -> list[TimedChunk]:
        with self.cond:
            dropped, self.dropped = self.dropped, []
            return dropped

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def finished(self) -> bool:
        with self.cond:
            return self.closed and not self.chunks

    def __len__(self) -> int:
        with self.cond:
            return len(self.chunks)


class LiveRun:
    """Drive one Stream from one Source in real time. `run()` blocks until the source ends or `stop()`.

    policy: "drop-oldest" or "block" (None: drop-oldest for a live source, block for a file).
    latency_bound: seconds from capture to av_context that drop-oldest keeps to (reported under block).
    queue_size: chunks decoded ahead (None: the chunks that fit in latency_bound, at least 2).
    question / ask_every: ask `question` every `ask_every` seconds, or once at the end when ask_every is
    None; `ask()` adds questions any time.
    on_event: called with every record (chunk, drop, answer, reconnect, summary), in the caller's thread.
    generation: ask's options (max_new_tokens, temperature, top_k, top_p, seed).
    """

    def __init__(self, stream: Stream, source: Source, policy: str | None = None,
                 latency_bound: float = LATENCY_BOUND_S, queue_size: int | None = None,
                 ask_every: float | None = None, question: str | None = None,
                 on_event: Callable[[Event], None] | None = None, clock: Callable[[], float] = time.monotonic,
                 **generation: Any) -> None:
        if latency_bound <= 0:
            raise InputError(f"latency bound must be positive, got {latency_bound} s")
        if ask_every is not None and (ask_every <= 0 or not question):
            raise InputError("ask_every needs a positive number of seconds and a question")
        self.stream = stream
        self.source = source
        self.policy = policy or ("drop-oldest" if source.live else "block")
        if queue_size is None:  # the chunks that fit in the bound: older ones could not be pushed in time
            config = stream.pipeline.config
            chunk_seconds = config_value(config, "frames_per_chunk") / config_value(config, "fps")
            queue_size = max(MIN_QUEUE_SIZE, math.ceil(latency_bound / chunk_seconds - 1e-9))
        self.queue = ChunkQueue(queue_size, self.policy)
        self.latency_bound = latency_bound
        self.ask_every = ask_every
        self.question = question
        self.on_event = on_event or (lambda event: None)
        self.clock = clock
        self.generation = generation
        self.questions: queue.SimpleQueue[str] = queue.SimpleQueue()
        self.notes: queue.SimpleQueue[Event] = queue.SimpleQueue()  # events from the decode thread
        self.stopping = threading.Event()  # set by stop() and at the end of run(): the decode thread ends
        self.stop_requested = False
        self.error: BaseException | None = None
        self.start = self.next_ask = 0.0
        self.decoder: threading.Thread | None = None
        self.latency_ms, self.decode_ms, self.wait_ms, self.push_ms, self.answer_ms = (
            Quantiles(), Quantiles(), Quantiles(), Quantiles(), Quantiles())
        self.pushed = self.dropped_full = self.dropped_late = self.over_bound = 0
        self.answers = self.reconnects = 0
        self.last_latency_ms: float | None = None
        self.decode_estimate = self.push_estimate = 0.0

    # ---- control (any thread) ----
    def ask(self, question: str) -> None:
        """Answer `question` between the next two pushes (after the first push, if none happened yet)."""
        self.questions.put(question)

    def stop(self) -> None:
        """End the run soon: no more pushes; run() returns the summary."""
        self.stop_requested = True
        self.stopping.set()

    @property
    def decoding(self) -> bool:
        """The decode thread still runs: after run() returns, a source blocked in FFmpeg (opening or
        reading a stream that sends nothing) ends at its timeout. Let it end before the interpreter
        exits, or leave with os._exit (as mirasol-run does): FFmpeg's callbacks into a finalizing
        interpreter crash the process."""
        return self.decoder is not None and self.decoder.is_alive()

    @property
    def dropped(self) -> int:
        return self.dropped_full + self.dropped_late

    # ---- the decode thread ----
    def _decode(self) -> None:
        try:
            for chunk in self.source.chunks(self.notes.put, self.stopping):
                self.queue.put(chunk, self.stopping)
                if self.stopping.is_set():
                    break
        except BaseException as error:  # handed to run()'s thread, which raises or reports it
            self.error = error
        finally:
            self.queue.close()

    # ---- the caller's thread ----
    def _emit(self, event: Event) -> None:
        self.on_event(event)

    def _seconds(self, clock_time: float) -> float:
        return round(clock_time - self.start, 3)

    def _drop(self, chunk: TimedChunk, reason: str, now: float) -> None:
        if reason == "queue full":
            self.dropped_full += 1
        else:
            self.dropped_late += 1
        self.stream.skip()
        self._emit({"event": "drop", "index": chunk.index, "reason": reason, "capture_s": self._seconds(chunk.captured),
                    "age_ms": round(1000 * (now - chunk.captured), 1), "dropped": self.dropped})

    def _late(self, chunk: TimedChunk, now: float) -> bool:
        """drop-oldest: pushing this chunk now would break the bound, and a fresh chunk would not."""
        if self.policy != "drop-oldest" or not self.pushed:
            return False
        fresh = self.decode_estimate + self.push_estimate
        return now - chunk.captured + self.push_estimate > self.latency_bound and fresh <= self.latency_bound

    def _push(self, chunk: TimedChunk) -> None:
        taken = self.clock()
        self.stream.push(chunk.video, chunk.audio)
        done = self.clock()
        latency, decode, push = done - chunk.captured, chunk.decode_s, done - taken
        wait = latency - decode - push  # in the queue, or behind a blocked decode thread
        self.pushed += 1
        self.over_bound += latency > self.latency_bound
        for quantiles, seconds in ((self.decode_ms, decode), (self.wait_ms, wait), (self.push_ms, push),
                                   (self.latency_ms, latency)):
            quantiles.add(1000 * seconds)
        w = _ESTIMATE_WEIGHT
        self.decode_estimate = decode if self.pushed == 1 else (1 - w) * self.decode_estimate + w * decode
        self.push_estimate = push if self.pushed == 1 else (1 - w) * self.push_estimate + w * push
        self.last_latency_ms = 1000 * latency
        self._emit({"event": "chunk", "index": chunk.index, "capture_s": self._seconds(chunk.captured),
                    "decode_ms": round(1000 * decode, 2), "queue_wait_ms": round(1000 * wait, 2),
                    "push_ms": round(1000 * push, 2), "latency_ms": round(1000 * latency, 2),
                    "queue_depth": len(self.queue), "dropped": self.dropped})

    def _answer(self, question: str) -> None:
        start = self.clock()
        event: Event = {"event": "answer", "t_s": self._seconds(start), "question": question,
                        "chunks": self.stream.chunks}
        try:
            event["answer"] = self.stream.ask(question, **self.generation)
            self.answers += 1
            self.answer_ms.add(1000 * (self.clock() - start))
        except InputError as error:  # a bad question ends that question, not the stream
            event["error"] = str(error)
        event["answer_ms"] = round(1000 * (self.clock() - start), 1)
        self._emit(event)

    def _service(self, final: bool = False) -> None:
        """Report the decode thread's news; answer the questions due (all of them once `final`)."""
        while not self.notes.empty():
            note = self.notes.get()
            self.reconnects += note.get("event") == "reconnect"
            self._emit(note)
        now = self.clock()
        for chunk in self.queue.take_dropped():
            self._drop(chunk, "queue full", now)
        if not self.stream.chunks and not final:  # questions wait for the first chunk
            return
        if self.ask_every is not None and now >= self.next_ask and not final:
            self.next_ask = now + self.ask_every
            self.questions.put(self.question)  # type: ignore[arg-type]
        while not self.questions.empty() and (final or not self.stopping.is_set()):
            self._answer(self.questions.get())

    def run(self) -> Event:
        """Stream until the source ends, `stop()` or an error; returns (and emits) the summary.

        An error of the source or of a push ends the run: the summary is emitted, then it is raised.
        """
        self.start = self.clock()
        self.next_ask = self.start + (self.ask_every or 0.0)
        self.decoder = decoder = threading.Thread(target=self._decode, name=f"decode {self.source.name}",
                                                  daemon=True)
        decoder.start()
        ended = "end of source"
        interrupted: KeyboardInterrupt | None = None
        try:
            while not self.stopping.is_set():
                self._service()
                chunk = self.queue.get(timeout=0.05)
                if chunk is None:
                    if self.queue.finished():
                        break
                    continue
                now = self.clock()
                if self._late(chunk, now):
                    self._drop(chunk, "late", now)
                else:
                    self._push(chunk)
            if self.stop_requested:
                ended = "stopped"
        except KeyboardInterrupt as error:  # no signal handler: Ctrl-C still gets the summary, then goes on
            interrupted, ended = error, "interrupted"
        except Exception as error:
            self.error = error
        finally:
            self.stopping.set()
            decoder.join(timeout=1.0)  # a source blocked on the network is left to its timeout (daemon)
        if self.error is None and interrupted is None:
            if self.question and self.ask_every is None:
                self.questions.put(self.question)
            self._service(final=True)
        summary = self.summary(ended if self.error is None else f"error: {self.error}", len(self.queue))
        self._emit(summary)
        if interrupted is not None:
            raise interrupted
        if isinstance(self.error, MirasolError):
            raise self.error
        if self.error is not None:
            raise InputError(f"live source {self.source.name}: {self.error}") from self.error
        return summary

    def summary(self, ended: str, left_in_queue: int = 0) -> Event:
        """The run so far: counts and p50/p95/max of latency, decode, queue wait, push and answer times (ms)."""
        return {
            "event": "summary", "source": self.source.name, "policy": self.policy, "ended": ended,
            "seconds": round(self.clock() - self.start, 2), "latency_bound_ms": round(1000 * self.latency_bound, 1),
            "queue_size": self.queue.size,
            "chunks": self.pushed + self.dropped + left_in_queue, "pushed": self.pushed, "dropped": self.dropped,
            "dropped_queue_full": self.dropped_full, "dropped_late": self.dropped_late,
            "left_in_queue": left_in_queue, "over_bound": self.over_bound,
            "latency_ms": self.latency_ms.to_dict(), "decode_ms": self.decode_ms.to_dict(),
            "queue_wait_ms": self.wait_ms.to_dict(), "push_ms": self.push_ms.to_dict(),
            "answers": self.answers, "answer_ms": self.answer_ms.to_dict(), "reconnects": self.reconnects}

    def status_line(self) -> str:
        """One line for a live display: time, chunks, drops, latency, queue depth, answers."""
        latency = "-" if self.last_latency_ms is None else f"{self.last_latency_ms:.0f} ms"
        p95 = self.latency_ms.percentile(95)
        return (f"live {self.clock() - self.start:7.1f} s | pushed {self.pushed} dropped {self.dropped} | "
                f"latency {latency} (p95 {'-' if p95 is None else f'{p95:.0f} ms'}, bound "
                f"{1000 * self.latency_bound:.0f} ms) | queue {len(self.queue)}/{self.queue.size} | "
                f"answers {self.answers}" + (f" | reconnects {self.reconnects}" if self.reconnects else ""))
