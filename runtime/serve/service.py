"""The service behind the HTTP API: sources, questions, standing questions, snapshots, metrics, on one Pipeline.

Requests are checked here (fields.py, sources.py, standing.py) in the server's threads; what touches a stream
or a feed runs in the inference thread (`Scheduler.call`), between two pushes. Every refusal is a
`RequestError` with the status that says whose fault it is: 400 a wrong value, 403 something only the
operator may allow, 404 an unknown source or standing question, 409 a conflict with the state (a taken id,
a question before the first chunk), 413 too large, 429 a limit reached, 503 the service cannot answer now.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import BundleError, InputError
from ..media.evidence import ChunkStamp
from ..media.feed import Feed
from ..pipeline import Pipeline
from .fields import GENERATION_FIELDS, RequestError, generation, known, text
from .hub import EventHub
from .metrics import Metrics
from .scheduler import Question, Scheduler
from .sources import ServedSource, SourceDefaults, open_spec, parse_source
from .standing import Webhook, parse_standing

STAMPS_HEADER = "X-Mirasol-Stamps"
MAX_STAMPS = 256  # stamps carried with a snapshot (the evidence window is far smaller for real bundles)


@dataclass(frozen=True)
class Limits:
    """What one client request may ask of the service (the operator's command line)."""

    max_sources: int = 32
    max_question_chars: int = 1000
    max_request_bytes: int = 64 * 1024
    max_state_bytes: int = 1 << 30
    max_questions: int = 64  # being answered or waiting, all sources together
    max_standing: int = 8  # per source
    max_subscribers: int = 64
    answer_timeout_s: float = 300.0


class Service:
    """One Pipeline, its inference thread, the sources and the subscribers (`attach` starts it in a loop)."""

    def __init__(self, pipeline: Pipeline, limits: Limits = Limits(), defaults: SourceDefaults = SourceDefaults(),
                 allow_local: bool = False, batch: bool = True, webhook: str | None = None,
                 max_new_tokens: int | None = None) -> None:
        self.pipeline = pipeline
        self.limits = limits
        self.defaults = defaults
        self.allow_local = allow_local
        self.max_new_tokens = max_new_tokens
        self.webhook = Webhook(webhook) if webhook else None
        self.hub: EventHub | None = None
        self.metrics = Metrics(self._metrics_snapshot)
        self.scheduler = Scheduler(pipeline, self._publish, self.metrics, batch=batch, webhook=self.webhook)
        self.numbers = itertools.count(1)

    # ---- life ----
    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start serving in `loop` (the server's): the event hub and the inference thread."""
        self.hub = EventHub(loop, max_subscribers=self.limits.max_subscribers)
        self.scheduler.start()

    def close(self) -> None:
        self.scheduler.close()
        if self.webhook is not None:
            self.webhook.close()

    @property
    def decoding(self) -> bool:
        """A source's decode thread still runs (blocked in FFmpeg until its timeout)."""
        return self.scheduler.decoding

    def health(self) -> tuple[bool, str]:
        """Whether the inference thread is alive and going round (a round stuck for 30 s is a wedged model)."""
        if not self.scheduler.thread.is_alive():
            return False, "the inference thread is not running"
        stuck = time.monotonic() - self.scheduler.last_round
        if stuck > 30:
            return False, f"the inference thread has been in one round for {stuck:.0f} s"
        return True, "ok"

    def _publish(self, event: dict[str, Any]) -> None:
        if self.hub is not None:
            self.hub.publish(event)

    async def _run(self, fn: Callable[..., Any], *args: Any, timeout: float = 60.0) -> Any:
        """`fn(*args)` in the inference thread; its RequestError reaches the caller."""
        future = self.scheduler.call(fn, *args)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout)
        except asyncio.TimeoutError:
            future.cancel()
            raise RequestError(503, f"the inference thread did not get to the request in {timeout:g} s") from None
        except RuntimeError as error:  # stopping
            raise RequestError(503, str(error)) from None

    def _source(self, source_id: str) -> ServedSource:
        source = self.scheduler.sources.get(source_id)
        if source is None:
            raise RequestError(404, f"no source {source_id!r}; GET /sources lists them")
        return source

    # ---- sources ----
    async def add_source(self, data: dict[str, Any], trusted: bool = False) -> dict[str, Any]:
        """Add a source (`trusted`: the operator's own, which may be a local path)."""
        spec = parse_source(data, self.defaults, self.allow_local or trusted, f"source-{next(self.numbers)}")
        opened = await asyncio.to_thread(open_spec, spec, self.pipeline.config)
        return await self._run(self._add, spec, opened)

    def _add(self, spec: Any, opened: Any) -> dict[str, Any]:
        if spec.id in self.scheduler.sources:
            raise RequestError(409, f"a source {spec.id!r} exists already (DELETE /sources/{spec.id} first)")
        if len(self.scheduler.sources) >= self.limits.max_sources:
            raise RequestError(429, f"{len(self.scheduler.sources)} sources already: the most is "
                                    f"{self.limits.max_sources} (--max-sources)")
        holder: list[ServedSource] = []
        try:
            feed = Feed(opened, self.pipeline.stream(), policy=spec.policy, latency_bound=spec.latency_bound,
                        queue_size=spec.queue_size, on_event=lambda event: self.scheduler.feed_event(holder[0], event),
                        wake=self.scheduler.wake.set)
        except InputError as error:
            raise RequestError(400, str(error)) from None
        holder.append(ServedSource(spec, feed))
        status = self.scheduler.add(holder[0])
        return {**status, "source": spec.to_dict()}

    async def remove_source(self, source_id: str) -> dict[str, Any]:
        return await self._run(lambda: (self._source(source_id), self.scheduler.remove(source_id))[1])

    async def sources(self) -> list[dict[str, Any]]:
        return await self._run(lambda: [s.status() for s in self.scheduler.sources.values()])

    async def source(self, source_id: str) -> dict[str, Any]:
        return await self._run(lambda: {**self._source(source_id).status(),
                                        "source": self._source(source_id).spec.to_dict()})

    # ---- questions ----
    async def ask(self, source_id: str, data: dict[str, Any], extra: tuple[str, ...] = (),
                  on_token: Callable[[str], None] | None = None) -> Question:
        """Queue a question (checked now); its answer record comes in `question.future`."""
        known(data, ("question", *GENERATION_FIELDS, *extra), "a question")
        question = text(data, "question", self.limits.max_question_chars, required=True)
        options = generation(data, self.max_new_tokens)
        return await self._run(self._ask, source_id, question, options, on_token)

    def _ask(self, source_id: str, question: str, options: dict[str, Any],
             on_token: Callable[[str], None] | None) -> Question:
        source = self._source(source_id)
        if source.stream.chunks == 0:
            raise RequestError(409, f"source {source_id!r} has pushed no chunk yet (state: {source.state})")
        if len(self.scheduler.questions) >= self.limits.max_questions:
            raise RequestError(429, f"{len(self.scheduler.questions)} questions are waiting or being answered: the "
                                    f"most is {self.limits.max_questions}; ask again soon")
        asked = Question(source, question, options, on_token=on_token)
        self.scheduler.questions.append(asked)
        return asked

    async def answer(self, question: Question) -> dict[str, Any]:
        """The whole answer record of a queued question (503 when it takes longer than the answer timeout)."""
        try:
            return await asyncio.wait_for(asyncio.wrap_future(question.future), self.limits.answer_timeout_s)
        except asyncio.TimeoutError:
            question.future.cancel()
            raise RequestError(503, f"no answer in {self.limits.answer_timeout_s:g} s: the service is overloaded") \
                from None

    # ---- standing questions ----
    async def add_standing(self, source_id: str, data: dict[str, Any]) -> dict[str, Any]:
        return await self._run(self._add_standing, source_id, data)

    def _add_standing(self, source_id: str, data: dict[str, Any]) -> dict[str, Any]:
        source = self._source(source_id)
        if len(source.standing) >= self.limits.max_standing:
            raise RequestError(429, f"source {source_id!r} has {len(source.standing)} standing questions: the most "
                                    f"is {self.limits.max_standing}")
        source.standing_count += 1
        standing = parse_standing(data, f"standing-{source.standing_count}", self.limits.max_question_chars,
                                  self.max_new_tokens, self.webhook is not None)
        source.standing[standing.id] = standing
        return standing.describe()

    async def standing(self, source_id: str) -> list[dict[str, Any]]:
        return await self._run(lambda: [s.describe() for s in self._source(source_id).standing.values()])

    async def remove_standing(self, source_id: str, standing_id: str) -> dict[str, Any]:
        def remove() -> dict[str, Any]:
            source = self._source(source_id)
            if standing_id not in source.standing:
                raise RequestError(404, f"source {source_id!r} has no standing question {standing_id!r}")
            return source.standing.pop(standing_id).describe()
        return await self._run(remove)

    # ---- snapshot and restore ----
    async def snapshot(self, source_id: str) -> tuple[bytes, str]:
        """The stream's state file (.npz bytes) and the stamps of its evidence window (JSON)."""
        return await self._run(self._snapshot, source_id, timeout=600.0)

    def _snapshot(self, source_id: str) -> tuple[bytes, str]:
        source = self._source(source_id)
        with tempfile.TemporaryDirectory(prefix="mirasol-serve-") as folder:
            data = source.stream.save(Path(folder) / "state.npz").read_bytes()
        stamps = [s.to_dict() for s in list(source.feed.evidence.stamps)[-MAX_STAMPS:]]
        return data, json.dumps(stamps, separators=(",", ":"))

    async def restore(self, source_id: str, body: bytes, stamps_header: str | None) -> dict[str, Any]:
        """Replace the source's stream with the state in `body` (written by a snapshot of the same bundle)."""
        stamps = _stamps(stamps_header)
        stream = await asyncio.to_thread(self._read_state, body)
        return await self._run(self._swap, source_id, stream, stamps)

    def _read_state(self, body: bytes) -> Any:
        with tempfile.TemporaryDirectory(prefix="mirasol-serve-") as folder:
            path = Path(folder) / "state.npz"
            path.write_bytes(body)
            try:
                stream = self.pipeline.restore(path)
            except (BundleError, InputError) as error:
                raise RequestError(400, f"the body is not a state of this bundle's stream: {error}") from None
        if stream.batch not in (None, 1):
            raise RequestError(400, f"the state is of a batch of {stream.batch} streams; a source has one")
        return stream

    def _swap(self, source_id: str, stream: Any, stamps: list[ChunkStamp]) -> dict[str, Any]:
        source = self._source(source_id)
        source.feed.stream = stream
        source.feed.evidence.restore(stamps)
        return {"source": source_id, "restored_chunks": stream.chunks, "stamps": len(stamps)}

    # ---- metrics ----
    def _metrics_snapshot(self) -> dict[str, Any]:
        """The per-source figures for /metrics (called in a server thread, read in the inference thread)."""
        status = self.scheduler.call(self.scheduler.status_event).result(timeout=30)
        hub = self.hub
        return {"sources": status["sources"], "questions_active": status["questions_active"],
                "events_lost": hub.lost if hub else 0, "subscribers": len(hub.subscribers) if hub else 0,
                "webhook": dict(self.webhook.counts) if self.webhook else {}}


def _stamps(header: str | None) -> list[ChunkStamp]:
    if not header:
        return []
    try:
        data = json.loads(header)
    except json.JSONDecodeError:
        raise RequestError(400, f"{STAMPS_HEADER} must be the JSON a snapshot sent") from None
    if not isinstance(data, list) or len(data) > MAX_STAMPS:
        raise RequestError(400, f"{STAMPS_HEADER} must be a list of at most {MAX_STAMPS} chunk stamps")
    try:
        return [ChunkStamp.from_dict(item) for item in data]
    except InputError as error:
        raise RequestError(400, f"{STAMPS_HEADER}: {error}") from None
