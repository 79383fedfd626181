"""When the media of a network stream arrived, estimated from the packets read (see live_sources.py's notes)."""
from __future__ import annotations

import collections

ARRIVAL_WINDOW_S = 30.0  # the packets whose read delays estimate when media arrives


class ArrivalClock:
    """When media of a stream arrived, from the packets read so far (see the notes of live_sources.py).

    `packet(read, dts)` takes each packet's read time (clock seconds) and decoding timestamp (seconds on the
    source's timeline); `arrival(t, now)` is when media up to time t arrived: t plus the least read delay of
    the packets of the last `window` seconds, never after `now`. A timestamp that goes back by more than a
    second (a wrap, a restarted sender) starts the estimate afresh.
    """

    def __init__(self, window: float = ARRIVAL_WINDOW_S) -> None:
        self.window = window
        self.delays: collections.deque[tuple[float, float]] = collections.deque()  # (read, delay), delays rising
        self.last_dts: float | None = None

    def packet(self, read: float, dts: float) -> None:
        if self.last_dts is not None and dts < self.last_dts - 1.0:
            self.delays.clear()
        self.last_dts = dts
        delay = read - dts
        while self.delays and self.delays[-1][1] >= delay:  # a later packet read sooner: the older cannot be least
            self.delays.pop()
        self.delays.append((read, delay))
        while self.delays[0][0] < read - self.window:
            self.delays.popleft()

    def arrival(self, media_time: float, now: float) -> float:
        if not self.delays:
            return now
        return min(now, media_time + self.delays[0][1])
