"""Standing questions: a question asked again every k chunks of a source, an alert when its answer says so.

Rules (`on`):
- `change`: the answer differs from the previous one (the first answer sets the baseline, no alert);
- `match`: the answer matches `pattern` (a regular expression, case-insensitive, searched in the stripped
  answer) and the previous one did not (alerts on the way in, not at every asking);
- `every`: every answer (a running caption).
An alert carries the answer, the previous one and the evidence of the chunks it rests on; it goes to the
event subscribers and, when the operator gave `--webhook URL` and the standing question did not opt out,
is POSTed there as JSON (`Webhook`: its own thread, a bounded queue, a timeout, a retry; never blocks
inference). A standing question is asked right after the chunk that makes its count (so its evidence ends
at that chunk); one still being answered when the next is due is not asked twice (the skip is counted).
Its cost per chunk is the time its answers took over the chunks pushed while it stood.
"""
from __future__ import annotations

import json
import queue
import re
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from .fields import RequestError, flag, known, number, text

RULES = ("change", "match", "every")
STANDING_FIELDS = ("question", "every", "on", "pattern", "webhook", "max_new_tokens")


@dataclass
class Standing:
    """One standing question of a source and what it has seen."""

    id: str
    question: str
    every: int
    on: str
    pattern: re.Pattern[str] | None
    webhook: bool
    max_new_tokens: int | None
    chunks: int = 0  # chunks pushed since it was registered
    asked: int = 0
    skipped: int = 0  # due while the previous asking was still being answered
    alerts: int = 0
    answer_seconds: float = 0.0
    in_flight: bool = False
    last_answer: str | None = None
    last_matched: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)  # the last few alerts

    def due(self) -> bool:
        """Count a pushed chunk; whether the question is to be asked now."""
        self.chunks += 1
        if self.chunks % self.every:
            return False
        if self.in_flight:
            self.skipped += 1
            return False
        return True

    def fires(self, answer: str) -> bool:
        """Record an answer; whether it makes an alert under the rule."""
        previous, self.last_answer = self.last_answer, answer
        if self.on == "every":
            return True
        if self.on == "change":
            return previous is not None and answer != previous
        matched = bool(self.pattern.search(answer.strip())) if self.pattern else False
        was, self.last_matched = self.last_matched, matched
        return matched and not was

    def describe(self) -> dict[str, Any]:
        cost = 1000 * self.answer_seconds / self.chunks if self.chunks else None
        return {"id": self.id, "question": self.question, "every": self.every, "on": self.on,
                "pattern": self.pattern.pattern if self.pattern else None, "webhook": self.webhook,
                "max_new_tokens": self.max_new_tokens, "chunks": self.chunks, "asked": self.asked,
                "skipped": self.skipped, "alerts": self.alerts, "last_answer": self.last_answer,
                "answer_ms_total": round(1000 * self.answer_seconds, 1),
                "cost_ms_per_chunk": None if cost is None else round(cost, 3)}


def parse_standing(data: dict[str, Any], standing_id: str, max_chars: int, max_new_tokens: int | None,
                   has_webhook: bool) -> Standing:
    """A client's standing question as a Standing; RequestError naming what is wrong."""
    known(data, STANDING_FIELDS, "a standing question")
    question = text(data, "question", max_chars, required=True)
    on = data.get("on", "change")
    if on not in RULES:
        raise RequestError(400, f"'on' must be one of {', '.join(RULES)}, got {on!r}")
    pattern_text = text(data, "pattern", 200)
    if (on == "match") != (pattern_text is not None):
        raise RequestError(400, "'pattern' goes with \"on\": \"match\" (and it needs one)")
    try:
        pattern = re.compile(pattern_text, re.IGNORECASE) if pattern_text is not None else None
    except re.error as error:
        raise RequestError(400, f"'pattern' is not a regular expression: {error}") from None
    webhook = flag(data, "webhook", has_webhook)
    if webhook and not has_webhook:
        raise RequestError(400, "'webhook': the server has no webhook (the operator sets one with --webhook URL)")
    return Standing(id=standing_id, question=question or "", every=number(data, "every", 1, 1_000_000, 1, integer=True),
                    on=on, pattern=pattern, webhook=webhook,
                    max_new_tokens=number(data, "max_new_tokens", 1, 4096, max_new_tokens, integer=True))


class Webhook:
    """POSTs events as JSON to one URL from a thread of its own: a bounded queue (the oldest waiting event is
    dropped when full), `timeout` seconds a try, one retry after a second; results counted in `counts`."""

    def __init__(self, url: str, timeout: float = 5.0, size: int = 256) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"--webhook must be an http:// or https:// URL, got {url!r}")
        self.url = url
        self.timeout = timeout
        self.events: queue.Queue[dict[str, Any] | None] = queue.Queue(size)
        self.counts = {"delivered": 0, "failed": 0, "dropped": 0}
        self.last_error: str | None = None
        self.thread = threading.Thread(target=self._deliver, name="webhook", daemon=True)
        self.thread.start()

    def post(self, event: dict[str, Any]) -> None:
        while True:
            try:
                self.events.put_nowait(event)
                return
            except queue.Full:
                try:
                    self.events.get_nowait()
                    self.counts["dropped"] += 1
                except queue.Empty:
                    pass

    def close(self) -> None:
        self.post(None)  # type: ignore[arg-type]
        self.thread.join(timeout=2 * self.timeout)

    def _deliver(self) -> None:
        while (event := self.events.get()) is not None:
            body = json.dumps(event).encode()
            for attempt in range(2):
                request = urllib.request.Request(self.url, data=body, method="POST", headers={
                    "Content-Type": "application/json", "User-Agent": "mirasol-serve"})
                try:
                    with urllib.request.urlopen(request, timeout=self.timeout) as reply:
                        reply.read(1024)
                    self.counts["delivered"] += 1
                    break
                except (urllib.error.URLError, OSError, ValueError) as error:
                    self.last_error = str(error)
                    if attempt == 0:
                        time.sleep(1.0)
            else:
                self.counts["failed"] += 1
