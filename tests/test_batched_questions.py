"""Questions of several streams answered together (`runtime/batched_questions.py`): each stream's answer is the one it
gets asked alone, greedy or sampled with a seed, whatever mix of lengths and batch sizes; the text decoder runs fewer
times; mistakes are refused before any step."""
from __future__ import annotations

import numpy as np
import pytest

from mirasol.runtime.batched_questions import ask_streams
from mirasol.runtime.errors import InputError
from mirasol.runtime.pipeline import Pipeline

from .triton_tools import QUESTION, chunk_source


@pytest.fixture(scope="module")
def pipe(tiny_bundles) -> Pipeline:
    return Pipeline.load(tiny_bundles["ttm"])


def counted(pipe: Pipeline, graph: str, monkeypatch) -> list:
    """A list that gets an item per run of `graph`."""
    runs: list = []
    session = pipe.sessions[graph]
    monkeypatch.setattr(session, "run", lambda *a, run=session.run, **k: runs.append(1) or run(*a, **k))
    return runs


def streams_with(pipe: Pipeline, chunk_counts: list[int], seed: int = 0) -> list:
    new_chunk = chunk_source(pipe, seed)
    streams = []
    for count in chunk_counts:
        stream = pipe.stream()
        for _ in range(count):
            stream.push(*new_chunk())
        streams.append(stream)
    return streams


def test_answers_equal_each_stream_asked_alone(pipe, monkeypatch) -> None:
    """More streams than the bundle's max batch, three AV memory lengths, three prompt lengths: stacked where they
    can be, and every answer is the one asked alone (greedy, and sampled with a seed)."""
    streams = streams_with(pipe, [2, 2, 2, 2, 2, 2, 3, 3, 9])  # the memory window is 8 chunks: 9 is a full one
    assert len(streams) > pipe.max_batch
    questions = [QUESTION, "what colour is the hat?", "where?", QUESTION, "what colour is the car?", QUESTION,
                 QUESTION, "where?", QUESTION]
    for sampling in ({}, {"temperature": 0.9, "top_k": 50, "top_p": 0.95, "seed": 3}):
        alone_runs = counted(pipe, "text_decoder", monkeypatch)
        alone = [s.ask(q, 12, **sampling) for s, q in zip(streams, questions)]
        alone_count = len(alone_runs)
        batched_runs = counted(pipe, "text_decoder", monkeypatch)
        assert ask_streams(pipe, streams, questions, 12, **sampling) == alone
        assert len(set(alone)) > 3, "answers that differ between streams (else equality proves little)"
        # stacks: (2 chunks: prompt lengths 26, 25, 8), (3 chunks: 26, 8), (9 chunks: 26); 12 tokens at most each
        assert len(batched_runs) <= 6 * 12 < alone_count, (len(batched_runs), alone_count)


def test_a_stream_of_several_rows(pipe) -> None:
    new_chunk = chunk_source(pipe, seed=1)
    wide = pipe.stream()
    for _ in range(2):
        rows = [new_chunk() for _ in range(2)]
        wide.push(np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows]))
    [narrow] = streams_with(pipe, [2], seed=2)
    expected = [wide.ask(QUESTION, 10), narrow.ask(QUESTION, 10)]
    assert isinstance(expected[0], list) and len(expected[0]) == 2
    assert ask_streams(pipe, [wide, narrow], [QUESTION, QUESTION], 10) == expected


def test_mistakes_are_refused_before_any_step(pipe, monkeypatch) -> None:
    streams = streams_with(pipe, [1, 1])
    runs = counted(pipe, "text_cross_kv", monkeypatch)
    for questions, message in (([QUESTION, "x" * 500], "the question is 502 tokens"), ([QUESTION, ""], "empty"),
                               ([QUESTION], "2 streams but 1 questions")):
        with pytest.raises(InputError, match=message):
            ask_streams(pipe, streams, questions)
    with pytest.raises(InputError, match="a stream appears twice"):
        ask_streams(pipe, [streams[0], streams[0]], [QUESTION, QUESTION])
    with pytest.raises(InputError, match="max_new_tokens must be an int"):
        ask_streams(pipe, streams, [QUESTION, QUESTION], max_new_tokens=0)
    with pytest.raises(InputError, match="sampling"):
        ask_streams(pipe, streams, [QUESTION, QUESTION], temperature=float("nan"))
    assert runs == []
    with pytest.raises(InputError, match="push at least one chunk before asking"):
        ask_streams(pipe, [streams[0], pipe.stream()], [QUESTION, QUESTION])
