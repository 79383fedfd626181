"""Pipeline.push_streams: several streams' chunks in one run of the push step, each equal to its stream alone."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import pytest

from mirasol.runtime.errors import BackendError, InputError
from mirasol.runtime.pipeline import Pipeline

QUESTION = "what is the man holding?"
FP32_TOLERANCE = 1e-5  # batched matrix products may round differently from batch 1


def chunk_source(pipe: Pipeline, seed: int):
    """Unbatched random chunks: video [F, 3, H, W], audio [n_mels, A]."""
    rng = np.random.default_rng(seed)
    video_shape = pipe.chunk_inputs["video"].shape[1:]
    audio_shape = pipe.chunk_inputs["audio"].shape[1:]
    return lambda: (rng.random(video_shape, dtype=np.float32), rng.standard_normal(audio_shape).astype(np.float32))


def count_rows(pipe: Pipeline, graph: str) -> list[int]:
    """Record the batch size of every run of `graph` (the session the step plans hold)."""
    session = pipe.sessions[graph]
    rows: list[int] = []
    run = session.run

    def counting(feeds, output_names=None):
        rows.append(next(iter(feeds.values())).shape[0])
        return run(feeds, output_names)

    session.run = counting  # type: ignore[method-assign]
    return rows


@pytest.mark.parametrize("combiner", ["transformer", "ttm"])
def test_push_streams_equals_each_stream_alone(tiny_bundles, combiner) -> None:
    """Seven streams started at three different times (so their KV caches differ in length until the window
    is full): each gets, per chunk, the av_context and later the answer of the same stream pushed alone."""
    pipe = Pipeline.load(tiny_bundles[combiner])
    new_chunk = chunk_source(pipe, seed=1)
    steps, offsets = 6, [0, 0, 0, 0, 0, 1, 2]  # five streams start together: more than max_batch (4)
    data = [[new_chunk() for _ in range(steps)] for _ in offsets]
    alone = [pipe.stream() for _ in offsets]
    expected = [[stream.push(*c) for c in chunks] for stream, chunks in zip(alone, data)]

    rows = count_rows(pipe, "combiner")
    streams = [pipe.stream() for _ in offsets]
    got: list[list[np.ndarray]] = [[] for _ in offsets]
    for t in range(steps + max(offsets)):
        active = [i for i, offset in enumerate(offsets) if 0 <= t - offset < steps]
        contexts = pipe.push_streams([streams[i] for i in active], [data[i][t - offsets[i]] for i in active])
        for i, context in zip(active, contexts):
            got[i].append(context)
    assert rows[:2] == [4, 1], "the five streams that start together run as 4 + 1 rows (max_batch 4)"
    assert max(rows) == pipe.max_batch and len(rows) < sum(len(g) for g in got)
    for i in range(len(offsets)):
        assert len(got[i]) == steps and streams[i].chunks == steps
        for t in range(steps):
            assert got[i][t].shape == expected[i][t].shape
            assert np.abs(got[i][t] - expected[i][t]).max() <= FP32_TOLERANCE, f"stream {i} chunk {t}"
    for a, b in zip(alone, streams):
        assert a.ask(QUESTION, max_new_tokens=16) == b.ask(QUESTION, max_new_tokens=16)


def test_push_streams_mixes_batched_streams_and_streams_that_asked(tiny_bundles) -> None:
    """A stream of batch 2 stacks with batch-1 streams; a stream that answered a question keeps streaming."""
    pipe = Pipeline.load(tiny_bundles["ttm"])
    new_chunk = chunk_source(pipe, seed=2)
    pairs = [[new_chunk() for _ in range(2)] for _ in range(3)]  # the batch-2 stream's chunks, per step
    singles = [[new_chunk() for _ in range(3)] for _ in range(2)]
    batched_alone, single_alone = pipe.stream(), [pipe.stream() for _ in range(2)]
    pair_streams, single_streams = pipe.stream(), [pipe.stream() for _ in range(2)]
    for t in range(3):
        pair = tuple(np.stack([p[k] for p in pairs[t]]) for k in range(2))
        expected = [batched_alone.push(*pair)] + [s.push(*c[t]) for s, c in zip(single_alone, singles)]
        got = pipe.push_streams([pair_streams, *single_streams], [pair, *(c[t] for c in singles)])
        for e, g in zip(expected, got):
            assert g.shape == e.shape and np.abs(g - e).max() <= FP32_TOLERANCE
        if t == 1:
            assert single_streams[0].ask(QUESTION, max_new_tokens=8) == single_alone[0].ask(QUESTION, max_new_tokens=8)
    assert pair_streams.batch == 2 and pair_streams.ask(QUESTION, max_new_tokens=8) == batched_alone.ask(
        QUESTION, max_new_tokens=8)


def snapshot(streams) -> list[tuple]:
    return [(s.batch, s.chunks, {k: v.copy() for k, v in s.state.items()}, {k: v.copy() for k, v in s.counters.items()})
            for s in streams]


def assert_unchanged(before: list[tuple], streams) -> None:
    for (batch, chunks, state, counters), stream in zip(before, streams):
        assert (stream.batch, stream.chunks) == (batch, chunks)
        assert state.keys() == stream.state.keys() and counters.keys() == stream.counters.keys()
        assert all(np.array_equal(state[k], stream.state[k]) for k in state)
        assert all(np.array_equal(counters[k], stream.counters[k]) for k in counters)


@contextlib.contextmanager
def second_av_run_fails(pipe: Pipeline) -> Iterator[list[int]]:
    """The AV autoregressor's second run in the block raises BackendError; yields the runs counted."""
    session = pipe.sessions["av_autoregressor"]
    run, calls = session.run, []

    def failing_second_run(feeds, output_names=None):
        calls.append(1)
        if len(calls) == 2:
            raise BackendError("av_autoregressor: injected failure")
        return run(feeds, output_names)

    session.run = failing_second_run  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        session.run = run  # type: ignore[method-assign]


def test_push_streams_changes_no_stream_when_any_run_fails(tiny_bundles) -> None:
    pipe = Pipeline.load(tiny_bundles["ttm"])
    new_chunk = chunk_source(pipe, seed=3)
    streams = [pipe.stream() for _ in range(6)]
    for stream in streams[:3]:
        stream.push(*new_chunk())  # two groups: three streams with one chunk, three fresh ones
    before = snapshot(streams)

    bad = [new_chunk() for _ in streams]
    bad[4] = (np.full_like(bad[4][0], np.nan), bad[4][1])
    with pytest.raises(InputError, match="NaN"):
        pipe.push_streams(streams, bad)
    assert_unchanged(before, streams)

    with second_av_run_fails(pipe) as calls, pytest.raises(BackendError, match="injected"):
        pipe.push_streams(streams, [new_chunk() for _ in streams])
    assert len(calls) == 2, "the first group ran, the second failed"
    assert_unchanged(before, streams)
    assert len(pipe.push_streams(streams, [new_chunk() for _ in streams])) == 6
    assert [s.chunks for s in streams] == [2, 2, 2, 1, 1, 1]


def test_push_streams_refuses_what_it_cannot_serve(tiny_bundles) -> None:
    pipe, other = Pipeline.load(tiny_bundles["ttm"]), Pipeline.load(tiny_bundles["ttm"])
    new_chunk = chunk_source(pipe, seed=4)
    stream = pipe.stream()
    with pytest.raises(InputError, match="appears twice"):
        pipe.push_streams([stream, stream], [new_chunk(), new_chunk()])
    with pytest.raises(InputError, match="this Pipeline"):
        pipe.push_streams([stream, other.stream()], [new_chunk(), new_chunk()])
    with pytest.raises(InputError, match="2 streams but 1 chunks"):
        pipe.push_streams([stream, pipe.stream()], [new_chunk()])
    assert stream.chunks == 0 and pipe.push_streams([], []) == []


def count_concatenations(pipe: Pipeline) -> list[int]:
    """Record how many arrays each `backend.concatenate` call joins (stacking streams or appending to a tensor)."""
    joined: list[int] = []
    concatenate = pipe.backend.concatenate

    def counting(values, axis):
        joined.append(len(values))
        return concatenate(values, axis)

    pipe.backend.concatenate = counting  # type: ignore[method-assign]
    return joined


def test_streams_pushed_together_again_stay_stacked(tiny_bundles) -> None:
    """The same four streams pushed together step after step: after the first call their state the push graphs
    read stays stacked (nothing is joined but each stream's own AV memory append, which is never stacked), and each
    step gives exactly what restacking the streams at every call gives, and what each stream alone gives."""
    kept, restacked = Pipeline.load(tiny_bundles["ttm"]), Pipeline.load(tiny_bundles["ttm"])
    new_chunk = chunk_source(kept, seed=5)
    data = [[new_chunk() for _ in range(4)] for _ in range(5)]  # past tiny's window of 2 chunks
    plan = kept._plans["push"]
    appended = [u for u in plan.updates if u.append]
    assert appended and not {u.spec.name for u in appended} & plan.reads, "the AV memory is not read by the push"
    joined = count_concatenations(kept)
    streams, others, alone = ([p.stream() for _ in range(4)] for p in (kept, restacked, restacked))
    for t, chunks in enumerate(data):
        joined.clear()
        got = kept.push_streams(streams, chunks)
        assert sorted(joined) == [2] * 4 * len(appended) + ([4] * len(plan.reads) if t == 0 else []), \
            "stacked once, then only each stream's own appends"
        again = restacked.push_streams(others, chunks)
        others[t % 4].state  # reading a stream's state takes its rows out: the next call restacks all four
        for g, a, s, c in zip(got, again, alone, chunks):
            assert np.array_equal(g, a)
            assert np.abs(g - s.push(*c)).max() <= FP32_TOLERANCE
    for s, o, a in zip(streams, others, alone):
        assert s.chunks == o.chunks == a.chunks == 5
        assert s.state.keys() == a.state.keys() and all(np.array_equal(s.state[k], o.state[k]) for k in s.state)
        assert s.ask(QUESTION, max_new_tokens=8) == a.ask(QUESTION, max_new_tokens=8)


def test_a_stacked_stream_used_alone_leaves_its_group_and_the_others_are_untouched(tiny_bundles) -> None:
    """Streams stacked together, then one pushed alone, asked, or pushed in another order or company: every stream
    still gets what it gets alone (stream isolation)."""
    pipe = Pipeline.load(tiny_bundles["ttm"])
    new_chunk = chunk_source(pipe, seed=6)
    data = [[new_chunk() for _ in range(5)] for _ in range(6)]
    streams, alone = [pipe.stream() for _ in range(4)], [pipe.stream() for _ in range(4)]

    def expect(i: int, t: int) -> np.ndarray:
        return alone[i].push(*data[t][i])

    for t in range(2):
        for i, got in enumerate(pipe.push_streams(streams, data[t][:4])):
            assert np.abs(got - expect(i, t)).max() <= FP32_TOLERANCE
    assert np.abs(streams[1].push(*data[2][1]) - expect(1, 2)).max() <= FP32_TOLERANCE  # alone, out of the group
    assert streams[1]._rows is None and all(streams[i]._rows is not None for i in (0, 2, 3))
    for i, got in zip((0, 2, 3), pipe.push_streams([streams[i] for i in (0, 2, 3)], [data[2][i] for i in (0, 2, 3)])):
        assert np.abs(got - expect(i, 2)).max() <= FP32_TOLERANCE
    assert streams[2].ask(QUESTION, max_new_tokens=8) == alone[2].ask(QUESTION, max_new_tokens=8)
    order = [3, 1, 0, 2]  # another order, all four again
    for t in (3, 4):
        for i, got in zip(order, pipe.push_streams([streams[i] for i in order], [data[t][i] for i in order])):
            assert np.abs(got - expect(i, t)).max() <= FP32_TOLERANCE
    for s, a in zip(streams, alone):
        assert s.chunks == a.chunks == 5 and s.ask(QUESTION, max_new_tokens=8) == a.ask(QUESTION, max_new_tokens=8)


def test_a_failed_call_leaves_stacked_streams_as_they_were(tiny_bundles) -> None:
    """Streams stacked by earlier calls, then a call that fails in its second run: each stream's state is what it
    was (compared with twins pushed the same way), and the next call goes on as if the failure never happened."""
    pipe = Pipeline.load(tiny_bundles["ttm"])
    new_chunk = chunk_source(pipe, seed=7)
    data = [[new_chunk() for _ in range(6)] for _ in range(4)]
    streams, twins = [pipe.stream() for _ in range(6)], [pipe.stream() for _ in range(6)]
    for t in range(2):
        pipe.push_streams(streams, data[t])
        pipe.push_streams(twins, data[t])
    with second_av_run_fails(pipe), pytest.raises(BackendError, match="injected"):
        pipe.push_streams(streams, data[2])
    assert all(s._rows is not None for s in streams), "the stacked groups survive a failed call"
    for got, expected in zip(pipe.push_streams(streams, data[2]), pipe.push_streams(twins, data[2])):
        assert np.array_equal(got, expected)
    assert_unchanged(snapshot(twins), streams)
