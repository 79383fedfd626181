"""Events to subscribers (SSE and WebSocket clients): published from any thread, delivered in the server's loop.

Each subscriber has a bounded queue: a subscriber that reads too slowly loses its oldest events (counted, and
told with a `lost` event), never slowing inference or the other subscribers. A subscription filters by
source ids and event kinds; `chunk` events (one per chunk of every source) go only to subscribers that ask
for them by kind.
"""
from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

Event = dict[str, Any]
KINDS = ("source", "status", "answer", "alert", "drop", "reconnect", "warning", "chunk", "lost")
DEFAULT_KINDS = frozenset(KINDS) - {"chunk"}


class Subscription:
    def __init__(self, hub: "EventHub", sources: frozenset[str] | None, kinds: frozenset[str], size: int) -> None:
        self.hub = hub
        self.sources = sources
        self.kinds = kinds
        self.queue: asyncio.Queue[Event] = asyncio.Queue(size)
        self.lost = 0  # events lost since the last `lost` notice
        self.pending: Event | None = None  # the event that follows a `lost` notice

    def wants(self, event: Event) -> bool:
        if event["event"] not in self.kinds:
            return False
        source = event.get("source")
        return self.sources is None or source is None or source in self.sources

    def offer(self, event: Event) -> None:
        if self.queue.full():
            self.queue.get_nowait()
            self.lost += 1
            self.hub.lost += 1
        self.queue.put_nowait(event)

    async def next(self) -> Event:
        if self.pending is not None:
            event, self.pending = self.pending, None
            return event
        event = await self.queue.get()
        if self.lost:
            lost, self.lost, self.pending = self.lost, 0, event
            return {"event": "lost", "count": lost}
        return event

    def close(self) -> None:
        self.hub.subscribers.discard(self)


class EventHub:
    """Publish from any thread; subscribe in the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue_size: int = 256, max_subscribers: int = 64) -> None:
        self.loop = loop
        self.queue_size = queue_size
        self.max_subscribers = max_subscribers
        self.subscribers: set[Subscription] = set()
        self.published = 0
        self.lost = 0

    def publish(self, event: Event) -> None:
        """Hand `event` to every subscriber that wants it (safe from any thread)."""
        try:
            self.loop.call_soon_threadsafe(self._deliver, event)
        except RuntimeError:  # the loop has closed: the server is going away
            pass

    def _deliver(self, event: Event) -> None:
        self.published += 1
        for subscriber in list(self.subscribers):
            if subscriber.wants(event):
                subscriber.offer(event)

    def subscribe(self, sources: Iterable[str] | None = None, kinds: Iterable[str] | None = None) -> Subscription:
        """A new subscription (in the loop's thread); ValueError for an unknown kind or too many subscribers."""
        chosen = frozenset(kinds) if kinds is not None else DEFAULT_KINDS
        unknown = sorted(chosen - set(KINDS))
        if unknown:
            raise ValueError(f"unknown event kind(s) {', '.join(unknown)}; known: {', '.join(KINDS)}")
        if len(self.subscribers) >= self.max_subscribers:
            raise OverflowError(f"{len(self.subscribers)} subscribers already (the most is {self.max_subscribers})")
        subscription = Subscription(self, frozenset(sources) if sources is not None else None, chosen,
                                    self.queue_size)
        self.subscribers.add(subscription)
        return subscription
