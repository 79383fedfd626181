"""The service's sources: what a client may add, and each source's feed, stream, state and standing questions.

What a client may name: a network URL of the live path's schemes (`rtsp://`, `rtsps://`, `udp://`, `rtp://`,
`srt://`, `tcp://`, `http(s)://`). Paths (files played at their pace, named pipes, V4L2 cameras) read this
machine, so only an operator's `--allow-local-sources` lets them in; FFmpeg's own pseudo-protocols (`file:`,
`concat:`, `pipe:`, ...) are refused always (`source_kind`), and a network source may reach only the protocols
of its scheme (FFmpeg's `protocol_whitelist`: an HLS playlist cannot pull in `file:` segments). FFmpeg options
from a client are limited to `CLIENT_OPTIONS` (transport and buffering); the operator's `--source-option`s
may be any.

A source's state: `connecting` (no chunk yet), `live`, `reconnecting` (after a failure, each attempt
reported), `ended` (the stream ended), `failed` (gave up: the error is kept and reported). An ended or failed
source keeps its stream: questions about what it saw are still answered until it is removed.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

from ..errors import InputError
from ..media.feed import DROP_POLICIES, Feed
from ..media.live_sources import FOREVER, Source, open_source, reconnect_attempts, source_kind
from ..pipeline import Stream
from .fields import RequestError, known, number, text

SOURCE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
CLIENT_OPTIONS = frozenset({"rtsp_transport", "rtsp_flags", "buffer_size", "fifo_size", "overrun_nonfatal",
                            "reorder_queue_size", "max_delay", "video_size", "framerate", "input_format",
                            "pixel_format"})
PROTOCOLS = {"rtsp": "rtsp,rtp,srtp,udp,tcp,tls", "rtsps": "rtsp,rtsps,rtp,srtp,udp,tcp,tls",
             "udp": "udp", "rtp": "rtp,udp", "srt": "srt", "tcp": "tcp",
             "http": "http,https,tcp,tls,crypto", "https": "http,https,tcp,tls,crypto"}
SOURCE_FIELDS = ("id", "url", "policy", "latency_bound", "queue_size", "reconnect", "stall_timeout", "options")


@dataclass(frozen=True)
class SourceDefaults:
    """What a source gets for what its request leaves out (the operator's command line)."""

    latency_bound: float = 2.0
    stall_timeout: float = 5.0
    reconnect: int | None = None  # forever
    options: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SourceSpec:
    """A source as added: validated, with every default filled in."""

    id: str
    url: str
    kind: str
    policy: str | None
    latency_bound: float
    queue_size: int | None
    reconnect: int | None
    stall_timeout: float
    options: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "url": self.url, "kind": self.kind, "policy": self.policy,
                "latency_bound": self.latency_bound, "queue_size": self.queue_size,
                "reconnect": FOREVER if self.reconnect is None else self.reconnect,
                "stall_timeout": self.stall_timeout, "options": self.options}


def parse_source(data: dict[str, Any], defaults: SourceDefaults, allow_local: bool, next_id: str) -> SourceSpec:
    """A client's source request as a SourceSpec; RequestError (400/403) naming what is wrong."""
    known(data, SOURCE_FIELDS, "a source")
    source_id = text(data, "id", 64, default=next_id)
    if not SOURCE_ID.fullmatch(source_id or ""):
        raise RequestError(400, f"'id' must be 1-64 letters, digits, '_', '.' or '-' (starting with a letter or "
                                f"digit), got {source_id!r}")
    url = text(data, "url", 2048, required=True)
    assert url is not None
    if any(ord(c) < 32 for c in url):
        raise RequestError(400, "'url' holds control characters")
    try:
        kind = source_kind(url)
    except InputError as error:
        raise RequestError(400, str(error)) from None
    if kind != "network" and not allow_local:
        raise RequestError(403, f"source {url!r} is a {kind} on this machine: the operator allows local sources "
                                f"with --allow-local-sources; a client may add network URLs ("
                                f"{', '.join(s + '://' for s in PROTOCOLS)})")
    policy = data.get("policy")
    if policy is not None and policy not in DROP_POLICIES:
        raise RequestError(400, f"'policy' must be one of {', '.join(DROP_POLICIES)}, got {policy!r}")
    try:
        reconnect = reconnect_attempts(data["reconnect"]) if "reconnect" in data else defaults.reconnect
    except InputError as error:
        raise RequestError(400, str(error)) from None
    options = data.get("options") or {}
    if not isinstance(options, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in options.items()):
        raise RequestError(400, "'options' must be an object of FFmpeg option names to string values")
    refused = sorted(set(options) - CLIENT_OPTIONS)
    if refused:
        raise RequestError(403, f"FFmpeg option(s) {', '.join(map(repr, refused))} are not for clients; allowed: "
                                f"{', '.join(sorted(CLIENT_OPTIONS))} (the operator sets others with "
                                f"--source-option)")
    merged = {**defaults.options, **options}
    if kind == "network":
        merged["protocol_whitelist"] = PROTOCOLS[url.split("://", 1)[0].lower()]
    return SourceSpec(id=source_id, url=url, kind=kind, policy=policy,
                      latency_bound=number(data, "latency_bound", 0.01, 3600.0, defaults.latency_bound),
                      queue_size=number(data, "queue_size", 1, 10_000, None, integer=True),
                      reconnect=reconnect,
                      stall_timeout=number(data, "stall_timeout", 0.1, 3600.0, defaults.stall_timeout),
                      options=merged)


def open_spec(spec: SourceSpec, config: Any) -> Source:
    """The Source a spec names (a local file plays at its own pace)."""
    try:
        return open_source(spec.url, config, realtime=spec.kind == "file", reconnect=spec.reconnect,
                           stall_timeout=spec.stall_timeout,
                           options=spec.options if spec.kind != "file" else None)
    except InputError as error:
        raise RequestError(400, str(error)) from None


class ServedSource:
    """One source of the service: its spec, Feed (decode thread, queue, telemetry, evidence), Stream and state.
    Everything but `state`, `error` and the counters is changed only by the scheduler's thread."""

    def __init__(self, spec: SourceSpec, feed: Feed) -> None:
        self.spec = spec
        self.feed = feed
        self.added_unix = time.time()
        self.state = "connecting"
        self.error: str | None = None
        self.standing: dict[str, Any] = {}  # id -> Standing (standing.py)
        self.last_answer: dict[str, Any] | None = None
        self.last_alert: dict[str, Any] | None = None
        self.standing_count = 0  # standing questions ever registered (their ids)

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def stream(self) -> Stream:
        return self.feed.stream

    def note(self, event: dict[str, Any]) -> str | None:
        """Follow the state from the feed's events; returns the new state when it changed."""
        kind = event["event"]
        new = self.state
        if kind == "chunk":
            new, self.error = "live", None
        elif kind == "reconnect":
            new, self.error = "reconnecting", event["error"]
        if new != self.state:
            self.state = new
            return new
        return None

    def ended(self, error: BaseException | None) -> str:
        self.state = "ended" if error is None else "failed"
        self.error = None if error is None else str(error)
        return self.state

    def status(self) -> dict[str, Any]:
        """What the API and the page show of this source (call in the scheduler's thread)."""
        feed = self.feed
        return {"id": self.id, "url": self.spec.url, "kind": self.spec.kind, "state": self.state, "error": self.error,
                "policy": feed.policy, "latency_bound_ms": round(1000 * feed.latency_bound, 1),
                "received": feed.received, "pushed": feed.pushed_count, "dropped": feed.dropped,
                "dropped_queue_full": feed.dropped_full, "dropped_late": feed.dropped_late,
                "over_bound": feed.over_bound, "queue": [len(feed.queue), feed.queue.size],
                "latency_ms": feed.latency_ms.to_dict(),
                "last_latency_ms": None if feed.last_latency_ms is None else round(feed.last_latency_ms, 1),
                "reconnects": feed.reconnects, "warnings": feed.warnings, "stream_chunks": feed.stream.chunks,
                "standing": [s.describe() for s in self.standing.values()],
                "last_answer": self.last_answer, "last_alert": self.last_alert,
                "reconnect": FOREVER if self.spec.reconnect is None else self.spec.reconnect}
