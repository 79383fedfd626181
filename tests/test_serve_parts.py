"""The service's parts in-process: fair rounds of the scheduler with real feeds and a real bundle, standing rules,
the event hub, request checks (no server process, no network)."""
from __future__ import annotations

import asyncio
import os
import time

import numpy as np
import pytest

pytest.importorskip("starlette")

from mirasol.runtime.media.feed import Feed  # noqa: E402
from mirasol.runtime.media.live_sources import Source, TimedChunk  # noqa: E402
from mirasol.runtime.pipeline import Pipeline  # noqa: E402
from mirasol.runtime.serve.fields import RequestError, parse_json  # noqa: E402
from mirasol.runtime.serve.hub import EventHub  # noqa: E402
from mirasol.runtime.serve.metrics import Metrics  # noqa: E402
from mirasol.runtime.serve.scheduler import Scheduler  # noqa: E402
from mirasol.runtime.serve.sources import ServedSource, SourceDefaults, parse_source  # noqa: E402
from mirasol.runtime.serve.standing import parse_standing  # noqa: E402


class Burst(Source):
    """`count` chunks at once (a source that delivers a backlog), captured now."""

    def __init__(self, name: str, pipe: Pipeline, count: int) -> None:
        self.name, self.live, self.count = name, True, count
        rng = np.random.default_rng(len(name))
        self.video = rng.random(pipe.chunk_inputs["video"].shape[1:], dtype=np.float32)
        self.audio = rng.standard_normal(pipe.chunk_inputs["audio"].shape[1:]).astype(np.float32)

    def chunks(self, report, stop):
        for index in range(self.count):
            yield TimedChunk(index, self.video, self.audio, captured=time.monotonic(), decode_s=0.0)


def test_each_round_takes_one_chunk_per_source(live_bundles) -> None:
    """A source with a backlog of 6 and two with 1 chunk: round 1 pushes one of each (one push_streams call), the
    backlog then drains one chunk a round; every stream gets exactly its own chunks."""
    pipe = Pipeline.load(live_bundles["short"])
    empty = {"sources": [], "events_lost": 0, "subscribers": 0, "questions_active": 0, "webhook": {}}
    scheduler = Scheduler(pipe, lambda event: None, Metrics(lambda: empty), batch=True)
    counts = {"burst": 6, "a": 1, "b": 1}
    for name, count in counts.items():
        holder: list[ServedSource] = []
        feed = Feed(Burst(name, pipe, count), pipe.stream(), policy="block", queue_size=8,
                    on_event=lambda event, h=holder: scheduler.feed_event(h[0], event))
        spec = parse_source({"id": name, "url": "udp://127.0.0.1:9"}, SourceDefaults(), False, name)
        holder.append(ServedSource(spec, feed))
        scheduler.sources[name] = holder[0]
        feed.start_decoding()
    for source in scheduler.sources.values():  # every backlog queued
        while source.feed.decoding:
            time.sleep(0.01)
    rounds = []
    while any(len(s.feed.queue) for s in scheduler.sources.values()):
        picked = scheduler._collect()
        scheduler._push(picked)
        rounds.append(sorted(source.id for source, _ in picked))
    assert rounds == [["a", "b", "burst"]] + [["burst"]] * 5
    assert {name: scheduler.sources[name].stream.chunks for name in counts} == counts
    registry = scheduler.metrics.registry
    assert (registry.get_sample_value("mirasol_push_batch_size_sum"),
            registry.get_sample_value("mirasol_push_batch_size_count")) == (8, 6)  # 8 chunks in 6 push calls


def test_standing_rules() -> None:
    change = parse_standing({"question": "q", "on": "change"}, "s", 100, 8, False)
    assert [change.fires(a) for a in ("red", "red", "blue", "blue", "red")] == [False, False, True, False, True]
    match = parse_standing({"question": "q", "on": "match", "pattern": "^yes"}, "s", 100, 8, False)
    assert [match.fires(a) for a in ("no", "Yes!", "yes", "no", " yes")] == [False, True, False, False, True]
    every = parse_standing({"question": "q", "on": "every", "every": 3}, "s", 100, 8, False)
    assert [every.due() for _ in range(7)] == [False, False, True, False, False, True, False]
    every.in_flight = True
    assert [every.due() for _ in range(3)] == [False, False, False] and every.skipped == 1
    with pytest.raises(RequestError, match="regular expression"):
        parse_standing({"question": "q", "on": "match", "pattern": "("}, "s", 100, 8, False)


def test_hub_bounds_a_slow_subscriber_and_says_what_it_lost() -> None:
    async def scenario() -> list[dict]:
        hub = EventHub(asyncio.get_running_loop(), queue_size=4, max_subscribers=1)
        slow = hub.subscribe(kinds=["answer"])
        with pytest.raises(OverflowError):
            hub.subscribe()
        for i in range(10):
            hub.publish({"event": "answer", "i": i})
            hub.publish({"event": "chunk", "i": i})  # not asked for
        await asyncio.sleep(0.05)
        return [await slow.next() for _ in range(5)]

    got = asyncio.run(scenario())
    assert got[0] == {"event": "lost", "count": 6} and [e["i"] for e in got[1:]] == [6, 7, 8, 9]


def test_requests_are_checked_at_the_door(tmp_path) -> None:
    with pytest.raises(RequestError, match="Infinity"):
        parse_json(b'{"latency_bound": Infinity}')
    defaults = SourceDefaults(options={"rtsp_transport": "tcp"})
    spec = parse_source({"url": "rtsp://10.0.0.7/stream", "options": {"buffer_size": "1000000"}}, defaults, False, "x")
    assert spec.options == {"rtsp_transport": "tcp", "buffer_size": "1000000",
                            "protocol_whitelist": "rtsp,rtp,srtp,udp,tcp,tls"}
    for url in (str(tmp_path), "/dev/video0", "concat:a.mp4|b.mp4"):
        with pytest.raises(RequestError) as refused:
            parse_source({"url": url}, defaults, False, "x")
        assert refused.value.status == 403
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    assert parse_source({"url": str(fifo)}, defaults, True, "x").kind == "pipe"
