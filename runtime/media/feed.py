"""One live source's decoding, queue, drop policy and telemetry: what every source of a real-time driver has.

    decode thread:  source.chunks() --put--> [bounded queue] --take--> the pushing thread (LiveRun, or
                                                                       the service's scheduler for many feeds)

The source decodes in its own thread, so a slow network or decoder never blocks inference and a slow
model never blocks decoding. When the queue is full the declared policy applies:
- `drop-oldest` (default for live sources: stay current): the oldest waiting chunk is dropped to make
  room; a chunk that has waited so long that pushing it would break the latency bound is dropped too,
  while a fresh chunk can still meet the bound (receive + push estimates within it), unless it came
  late (its receive alone broke the bound) with nothing behind it: dropping that one keeps nothing
  current;
- `block` (default for files: lose nothing): the decode thread waits for room; latency then grows
  when the model is slower than the source (chunks over the bound are counted, none is dropped).
Every dropped chunk is counted, reported and noted on the stream (`Stream.skip`): the carried state
only ever sees the pushed chunks, in order; the gap shows in the telemetry (the chunk indices).

Telemetry: one record per chunk pushed or dropped and per source event (reconnect, warning), through
`on_event`; `summary()` gives p50/p95/max of latency and its parts. Latency runs from `captured` (the
chunk's last media arrived) to its av_context and is receive + queue wait + push: receive is until the
chunk was decoded and offered to the queue (the demuxer's buffering, the decoding after its last media
arrived), queue wait until the pusher took it (in the queue, or in a decode thread blocked by `block`),
push the step itself. `decode` is the decoding work of the chunk's packets, wherever it fell. Percentiles
come from log-spaced buckets 1% wide, so memory stays flat however long the run.
"""
from __future__ import annotations

import collections
import math
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from ..errors import InputError
from ..pipeline import Stream
from .evidence import ChunkStamp, Evidence, memory_chunks
from .live_sources import Source, TimedChunk
from .spectrogram import config_value

DROP_POLICIES = ("drop-oldest", "block")
LATENCY_BOUND_S = 2.0
MIN_QUEUE_SIZE = 2
_ESTIMATE_WEIGHT = 0.3  # weight of the newest sample in the running receive / push time estimates

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


def positive_seconds(name: str, value: Any, high: float | None = None) -> float:
    """`value` as a finite number of seconds > 0 (and <= high); InputError naming `name` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0 \
            or (high is not None and value > high):
        span = f"in (0, {high:g}]" if high is not None else "> 0"
        raise InputError(f"{name} must be a finite number of seconds {span}, got {value!r}")
    return float(value)


class ChunkQueue:
    """The bounded queue between the decode thread and the pushes, with the drop policy for a full queue."""

    def __init__(self, size: int, policy: str, on_put: Callable[[], None] | None = None) -> None:
        if policy not in DROP_POLICIES:
            raise InputError(f"drop policy must be one of {DROP_POLICIES}, got {policy!r}")
        if size < 1:
            raise InputError(f"queue size must be at least 1, got {size}")
        self.size = size
        self.policy = policy
        self.on_put = on_put  # told after every put (a scheduler waiting for any of several queues)
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
        if self.on_put is not None:
            self.on_put()

    def get(self, timeout: float) -> TimedChunk | None:
        """The oldest chunk; None if none came within `timeout` or the queue is closed and empty."""
        with self.cond:
            if not self.chunks and not self.closed and timeout > 0:
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
        if self.on_put is not None:
            self.on_put()

    def finished(self) -> bool:
        with self.cond:
            return self.closed and not self.chunks

    def __len__(self) -> int:
        with self.cond:
            return len(self.chunks)


class Feed:
    """One Source into one Stream: its decode thread, bounded queue, drop policy, telemetry and evidence stamps.

    The pushing thread calls `service()` (reports the decode thread's news and the chunks dropped for room),
    `take()` (the next chunk to push; late ones are dropped) and, after pushing it, `pushed()`.
    policy: "drop-oldest" or "block" (None: drop-oldest for a live source, block for a file).
    latency_bound: seconds from capture to av_context that drop-oldest keeps to (reported under block).
    queue_size: chunks decoded ahead (None: the chunks that fit in latency_bound, at least 2).
    on_event: called with every record (chunk, drop, reconnect, warning), in the pushing thread.
    wake: called from the decode thread after each chunk it queues and when it ends.
    """

    def __init__(self, source: Source, stream: Stream, policy: str | None = None,
                 latency_bound: float = LATENCY_BOUND_S, queue_size: int | None = None,
                 on_event: Callable[[Event], None] | None = None, clock: Callable[[], float] = time.monotonic,
                 wake: Callable[[], None] | None = None) -> None:
        self.latency_bound = positive_seconds("the latency bound", latency_bound)
        self.source = source
        self.stream = stream
        self.policy = policy or ("drop-oldest" if source.live else "block")
        if queue_size is None:  # the chunks that fit in the bound: older ones could not be pushed in time
            config = stream.pipeline.config
            chunk_seconds = config_value(config, "frames_per_chunk") / config_value(config, "fps")
            queue_size = max(MIN_QUEUE_SIZE, math.ceil(latency_bound / chunk_seconds - 1e-9))
        self.queue = ChunkQueue(queue_size, self.policy, on_put=wake)
        self.on_event = on_event or (lambda event: None)
        self.clock = clock
        self.wall_offset = time.time() - clock()  # clock time -> wall clock (unix seconds)
        self.evidence = Evidence(memory_chunks(stream.pipeline))
        self.notes: queue.SimpleQueue[Event] = queue.SimpleQueue()  # events from the decode thread
        self.stopping = threading.Event()  # the decode thread ends
        self.error: BaseException | None = None  # what ended the decode thread, if not the source's end
        self.start = 0.0
        self.decoder: threading.Thread | None = None
        self.latency_ms, self.decode_ms, self.receive_ms, self.wait_ms, self.push_ms = (
            Quantiles(), Quantiles(), Quantiles(), Quantiles(), Quantiles())
        self.received = self.pushed_count = self.over_bound = 0
        self.dropped_full = self.dropped_late = self.dropped_failed = 0
        self.reconnects = self.warnings = 0
        self.last_latency_ms: float | None = None
        self.receive_estimate = self.push_estimate = 0.0

    # ---- control ----
    def start_decoding(self) -> None:
        self.start = self.clock()
        self.decoder = threading.Thread(target=self._decode, name=f"decode {self.source.name}", daemon=True)
        self.decoder.start()

    def stop(self) -> None:
        """The decode thread ends soon (a source blocked in FFmpeg ends at its timeout)."""
        self.stopping.set()

    @property
    def decoding(self) -> bool:
        """The decode thread still runs. After a stop, a source blocked in FFmpeg (opening or reading a stream
        that sends nothing) ends at its timeout: let it end before the interpreter exits, or leave with os._exit
        (as mirasol-run does): FFmpeg's callbacks into a finalizing interpreter crash the process."""
        return self.decoder is not None and self.decoder.is_alive()

    @property
    def dropped(self) -> int:
        return self.dropped_full + self.dropped_late + self.dropped_failed

    def finished(self) -> bool:
        """The source has ended (or failed: `error`) and every chunk it gave was pushed or dropped."""
        return self.queue.finished()

    def _decode(self) -> None:
        try:
            for chunk in self.source.chunks(self.notes.put, self.stopping):
                self.received += 1
                chunk.ready = self.clock()
                self.queue.put(chunk, self.stopping)
                if self.stopping.is_set():
                    break
        except BaseException as error:  # handed to the pushing thread, which raises or reports it
            self.error = error
        finally:
            self.queue.close()

    # ---- the pushing thread ----
    def _seconds(self, clock_time: float) -> float:
        return round(clock_time - self.start, 3)

    def wall(self, clock_time: float) -> float:
        """A time of the feed's clock on the wall clock (unix seconds)."""
        return clock_time + self.wall_offset

    def service(self) -> None:
        """Report the decode thread's news (reconnects, warnings) and the chunks dropped for room."""
        while not self.notes.empty():
            note = self.notes.get()
            self.reconnects += note.get("event") == "reconnect"
            self.warnings += note.get("event") == "warning"
            self.on_event(note)
        now = self.clock()
        for chunk in self.queue.take_dropped():
            self.drop(chunk, "queue full", now)

    def take(self, timeout: float = 0.0) -> TimedChunk | None:
        """The next chunk to push (waiting up to `timeout` for one); a chunk too late to push is dropped."""
        while True:
            chunk = self.queue.get(timeout)
            if chunk is None:
                return None
            now = self.clock()
            if not self._late(chunk, now):
                return chunk
            self.drop(chunk, "late", now)
            timeout = 0.0

    def drop(self, chunk: TimedChunk, reason: str, now: float) -> None:
        """Count and report a chunk not pushed: "queue full", "late", or why its push failed."""
        if reason == "queue full":
            self.dropped_full += 1
        elif reason == "late":
            self.dropped_late += 1
        else:
            self.dropped_failed += 1
        self.stream.skip()
        self.on_event({"event": "drop", "index": chunk.index, "reason": reason,
                       "capture_s": self._seconds(chunk.captured), "media_s": _span(chunk),
                       "age_ms": round(1000 * (now - chunk.captured), 1), "dropped": self.dropped})

    def _late(self, chunk: TimedChunk, now: float) -> bool:
        """drop-oldest: pushing this chunk now would break the bound and a fresh chunk would not, and dropping it
        helps: it waited here (it was ready in time) or a newer chunk waits behind it. A chunk that came late
        with nothing behind it (the last one before a stall, held by the demuxer) is pushed, over the bound."""
        if self.policy != "drop-oldest" or not self.pushed_count:
            return False
        fresh = self.receive_estimate + self.push_estimate
        if now - chunk.captured + self.push_estimate <= self.latency_bound or fresh > self.latency_bound:
            return False
        return len(self.queue) > 0 or chunk.ready - chunk.captured + self.push_estimate <= self.latency_bound

    def pushed(self, chunk: TimedChunk, taken: float, done: float) -> None:
        """Record a chunk pushed between clock times `taken` and `done`."""
        latency, push = done - chunk.captured, done - taken
        receive = max(chunk.ready - chunk.captured, 0.0)
        wait = latency - receive - push  # in the queue, or behind a blocked decode thread
        self.pushed_count += 1
        self.over_bound += latency > self.latency_bound
        for quantiles, seconds in ((self.decode_ms, chunk.decode_s), (self.receive_ms, receive),
                                   (self.wait_ms, wait), (self.push_ms, push), (self.latency_ms, latency)):
            quantiles.add(1000 * seconds)
        w = 1.0 if self.pushed_count == 1 else _ESTIMATE_WEIGHT
        self.receive_estimate = (1 - w) * self.receive_estimate + w * receive
        self.push_estimate = (1 - w) * self.push_estimate + w * push
        self.last_latency_ms = 1000 * latency
        self.evidence.add(ChunkStamp(chunk.index, chunk.media_start, chunk.media_end, self.wall(chunk.captured)))
        self.on_event({"event": "chunk", "index": chunk.index, "capture_s": self._seconds(chunk.captured),
                       "media_s": _span(chunk), "decode_ms": round(1000 * chunk.decode_s, 2),
                       "receive_ms": round(1000 * receive, 2), "queue_wait_ms": round(1000 * wait, 2),
                       "push_ms": round(1000 * push, 2), "latency_ms": round(1000 * latency, 2),
                       "queue_depth": len(self.queue), "dropped": self.dropped})

    def answer_evidence(self) -> dict[str, Any]:
        """The evidence of an answer from the stream's state now (see evidence.py)."""
        return self.evidence.stamp(self.wall(self.clock()))

    def summary(self, ended: str) -> Event:
        """The feed so far: counts and p50/p95/max of latency and its parts (ms)."""
        left = len(self.queue)
        return {
            "event": "summary", "source": self.source.name, "policy": self.policy, "ended": ended,
            "seconds": round(self.clock() - self.start, 2), "latency_bound_ms": round(1000 * self.latency_bound, 1),
            "queue_size": self.queue.size, "chunks": self.pushed_count + self.dropped + left,
            "pushed": self.pushed_count, "dropped": self.dropped, "dropped_queue_full": self.dropped_full,
            "dropped_late": self.dropped_late, "dropped_failed": self.dropped_failed, "left_in_queue": left,
            "over_bound": self.over_bound,
            "latency_ms": self.latency_ms.to_dict(), "receive_ms": self.receive_ms.to_dict(),
            "decode_ms": self.decode_ms.to_dict(), "queue_wait_ms": self.wait_ms.to_dict(),
            "push_ms": self.push_ms.to_dict(), "reconnects": self.reconnects, "warnings": self.warnings}


def _span(chunk: TimedChunk) -> list[float]:
    return [round(chunk.media_start, 3), round(chunk.media_end, 3)]
