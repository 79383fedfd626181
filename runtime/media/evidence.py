"""What an answer rests on: the chunks in the window the text decoder reads, with their media and wall-clock times.

A question is answered from the stream's AV memory: the av_context of the last pushed chunks, as many as the
window of the state the push step appends its output to (`memory_chunks`: 8 for the demo model, the config's
`text_memory_chunks`). `Evidence` keeps the stamps of those chunks; `stamp(now)` says which ones an answer
read, their span on the source's presentation timeline, when they were captured (wall clock) and how old the
newest one was when the answer's state was taken. Older chunks reach the answer only through what the state
carries forward (the AV autoregressor's windowed cache, a TTM combiner's memory), which no stamp follows.
"""
from __future__ import annotations

import collections
import math
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import InputError


def memory_chunks(pipeline: Any) -> int | None:
    """How many of the last pushed chunks an answer reads (None: the AV memory has no window, all of them)."""
    manifest = pipeline.bundle.manifest
    push = manifest.steps["push"]
    if push.returns is None:
        return None
    returned = manifest.step_tensor("push", push.returns, output=True)[1]
    for spec in manifest.state:
        if (spec.scope == "stream" and spec.update == "append" and spec.output == push.returns
                and spec.source_graph in push.graphs and spec.window is not None):
            per_chunk = returned.shape[spec.axis]
            if isinstance(per_chunk, int) and per_chunk > 0:
                return math.ceil(spec.window / per_chunk)
    return None


@dataclass(frozen=True)
class ChunkStamp:
    """One pushed chunk: its index in the source, its span on the source's timeline, its capture (wall clock)."""

    index: int
    media_start: float
    media_end: float
    captured_unix: float

    @classmethod
    def from_dict(cls, data: Any) -> "ChunkStamp":
        """A stamp from its JSON form (as `to_dict` writes it); InputError when it is not one."""
        try:
            stamp = cls(int(data["index"]), float(data["media_start"]), float(data["media_end"]),
                        float(data["captured_unix"]))
        except (KeyError, TypeError, ValueError):
            raise InputError(f"a chunk stamp must be {{index, media_start, media_end, captured_unix}}, got "
                             f"{str(data)[:200]}") from None
        if not all(math.isfinite(v) for v in (stamp.media_start, stamp.media_end, stamp.captured_unix)):
            raise InputError("a chunk stamp holds NaN or inf")
        return stamp

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Evidence:
    """The stamps of the last `window` pushed chunks of a stream (all of them up to `limit` when window is None)."""

    def __init__(self, window: int | None, limit: int = 4096) -> None:
        self.window = window
        self.stamps: collections.deque[ChunkStamp] = collections.deque(maxlen=window or limit)

    def add(self, stamp: ChunkStamp) -> None:
        self.stamps.append(stamp)

    def restore(self, stamps: list[ChunkStamp]) -> None:
        """The stamps of a restored state (the last `window` of them are kept)."""
        self.stamps.clear()
        self.stamps.extend(stamps)

    def stamp(self, now_unix: float) -> dict[str, Any]:
        """The answer's evidence now: chunks read (first and last index, how many), media span, capture times,
        the newest chunk's age in ms. Empty before the first chunk."""
        if not self.stamps:
            return {"chunks": 0}
        first, last = self.stamps[0], self.stamps[-1]
        return {"chunks": len(self.stamps), "first_chunk": first.index, "last_chunk": last.index,
                "media_start_s": round(first.media_start, 3), "media_end_s": round(last.media_end, 3),
                "captured_start_unix": round(first.captured_unix, 3), "captured_end_unix": round(last.captured_unix, 3),
                "newest_age_ms": round(1000 * (now_unix - last.captured_unix), 1)}
