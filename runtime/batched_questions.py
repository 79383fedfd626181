"""Questions of several streams answered together: the manifest's ask and generate steps run once for all the streams
that can share them, stacked on the batch axis, the way `Pipeline.push_streams` stacks their chunks.

Batch rows never mix in the graphs, so each stream gets the tokens it would get asked alone (up to the float
rounding of batched products), and each stream's own `Sampler` draws its tokens from its own rows: a seed gives the
same sampled answer batched or alone. Stacked rows must have the same lengths: the same prompt length (the text
decoder's cache grows by the prompt, and the graphs have no padding mask) and the same stream state shapes the ask
step reads (the AV memory, shorter while a stream has fewer chunks than its window). Questions that differ run in
further groups, which take turns token by token, so none waits for another group's whole answer.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import InputError, MirasolError
from .pipeline import Pipeline, Stream
from .questions import Question, checked_question
from .sampling import Sampler
from .step_plan import Carried

# What generate_streams yields for one question: the tokens of its stream's rows at one position (None for a row
# that has ended), None once its answer is complete, or the error that ended it.
Event = list[int | None] | None | MirasolError


@dataclass
class Asked:
    """One stream's question in a batch: the stream, the question checked for it, the sampler of its tokens."""

    stream: Stream
    question: Question
    sampler: Sampler


@dataclass
class _Member:
    index: int  # into the asked list
    begin: int  # its rows in the stack
    end: int
    sampler: Sampler
    left: int  # tokens it may still generate
    alive: np.ndarray = field(default_factory=lambda: np.ones(0, dtype=bool))


@dataclass
class _Stack:
    """Questions generated together: their rows stacked, the runner stream that runs their steps."""

    runner: Stream
    stream: Carried  # the stacked stream-scope state the steps read
    question: Carried
    members: list[_Member]
    ids: np.ndarray  # the next input_ids [rows, T]

    @property
    def rows(self) -> int:
        return self.members[-1].end


def generate_streams(pipeline: Pipeline, asked: Sequence[Asked]) -> Iterator[tuple[int, Event]]:
    """Generate the answers of `asked` together; yields (index into `asked`, event) as tokens come (see `Event`).

    Each stream's state is read once, under its lock, when the questions start (a chunk pushed meanwhile is not in
    the answer, as with `Stream.ask`). A question on a stream without chunks gets its InputError; a group whose
    step fails gets that error for each of its questions, and the other groups go on.
    """
    if len({id(a.stream) for a in asked}) != len(asked):
        raise InputError("ask_streams: a stream appears twice; ask its questions in separate calls")
    if any(a.stream.pipeline is not pipeline for a in asked):
        raise InputError("ask_streams: every stream must come from this Pipeline")
    stacks = yield from _start(pipeline, asked)
    eos = pipeline.tokenizer.EOS
    while stacks:
        for stack in list(stacks):
            try:
                logits = stack.runner._run("generate", {"input_ids": stack.ids}, stack.rows, stack.stream,
                                           stack.question)[:, -1]  # type: ignore[index]
            except MirasolError as error:
                stacks.remove(stack)
                for member in stack.members:
                    if member.left:
                        yield member.index, error
                continue
            ids = np.full(stack.rows, pipeline.tokenizer.PAD, dtype=np.int64)  # rows whose answer is complete
            for member in stack.members:
                if not member.left:
                    continue
                tokens = member.sampler(logits[member.begin:member.end])
                ended = tokens == eos
                row_tokens = [int(t) if a and not e else None for t, a, e in zip(tokens, member.alive, ended)]
                member.alive &= ~ended
                member.left -= 1
                ids[member.begin:member.end] = tokens
                if member.alive.any():
                    yield member.index, row_tokens
                else:
                    member.left = 0
                if not member.left:
                    yield member.index, None
            stack.ids = ids[:, None]
            if not any(member.left for member in stack.members):
                stacks.remove(stack)


def _start(pipeline: Pipeline, asked: Sequence[Asked]) -> Iterator[tuple[int, Event]]:
    """Read each stream's state, group the questions that can be stacked, run their ask step; returns the stacks
    (and yields the error of each question that cannot start)."""
    plan = pipeline._plans["ask"]
    feeds = [feed for _, graph_feeds in plan.graphs for feed in graph_feeds if feed.scope == "stream"]
    state_names = sorted({feed.key for feed in feeds if feed.kind == "state"})
    counter_names = sorted({feed.key for feed in feeds if feed.kind == "counter"})
    graphs = pipeline.bundle.graphs
    axes = {n: graphs[pipeline._state[n].graph].input(pipeline._state[n].input).shape.index("batch")
            for n in state_names}
    read: dict[int, tuple[Carried, int]] = {}
    with contextlib.ExitStack() as held:
        for stream in sorted({id(a.stream): a.stream for a in asked}.values(), key=id):  # one order for all callers
            held.enter_context(stream._lock)
        for i, a in enumerate(asked):
            if a.stream.chunks == 0:
                continue
            carried = a.stream._carried
            read[i] = (Carried({n: carried.state[n] for n in state_names},
                               {n: carried.counters[n] for n in counter_names}), a.stream.batch or 1)
    for i in range(len(asked)):
        if i not in read:
            yield i, InputError("ask: push at least one chunk before asking")
    groups: dict[tuple, list[int]] = {}
    for i, (carried, _) in read.items():
        shapes = tuple(v.shape[:axes[n]] + v.shape[axes[n] + 1:] for n, v in carried.state.items())
        groups.setdefault((shapes, len(asked[i].question.prompt)), []).append(i)
    stacks = []
    for members in groups.values():
        for part in pipeline._parts(members, [read[i][1] for i in members]):
            try:
                stacks.append(_stack(pipeline, [(i, asked[i], *read[i]) for i in part], axes))
            except MirasolError as error:
                for i in part:
                    yield i, error
    return stacks


def _stack(pipeline: Pipeline, part: list[tuple[int, Asked, Carried, int]], axes: dict[str, int]) -> _Stack:
    """The questions of `part` stacked, their ask step run."""
    backend = pipeline.backend
    members, ids, begin = [], [], 0
    for i, a, _, rows in part:
        members.append(_Member(i, begin, begin + rows, a.sampler, a.question.max_new_tokens,
                               np.ones(rows, dtype=bool)))
        ids.append(np.tile(np.asarray(a.question.prompt, dtype=np.int64), (rows, 1)))
        begin += rows
    carried = [c for _, _, c, _ in part]
    stream = Carried({n: backend.concatenate([c.state[n] for c in carried], axis) for n, axis in axes.items()},
                     {n: np.concatenate([c.counters[n] for c in carried]) for n in carried[0].counters})
    runner = pipeline.stream()  # runs the stacked steps; its own state stays unused
    question = runner._fresh("question", begin)
    runner._run("ask", {}, begin, stream, question)
    return _Stack(runner, stream, question, members, np.concatenate(ids))


def ask_streams(pipeline: Pipeline, streams: Sequence[Stream], questions: Sequence[str],
                max_new_tokens: int | None = None, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                seed: int | None = None) -> list[str | list[str]]:
    """Each stream's answer to its question, as `stream.ask(question, ...)` gives it (a str for batch 1, else one
    per row), with the steps stacked across streams where their lengths allow. Every question is checked before
    any step runs; each stream gets a sampler of its own with these parameters (a seed: the answer asked alone)."""
    if len(streams) != len(questions):
        raise InputError(f"ask_streams: {len(streams)} streams but {len(questions)} questions")
    checked = [checked_question(pipeline.tokenizer, pipeline.max_text_len, pipeline.default_max_new_tokens, q,
                                max_new_tokens) for q in questions]
    asked = [Asked(s, q, Sampler(temperature, top_k, top_p, seed)) for s, q in zip(streams, checked)]
    rows: list[list[list[int]]] = [[[] for _ in range(s.batch or 1)] for s in streams]
    for i, event in generate_streams(pipeline, asked):
        if isinstance(event, MirasolError):
            raise event
        for row, token in enumerate(event or []):
            if token is not None:
                rows[i][row].append(token)
    answers = [[pipeline.tokenizer.decode(ids) for ids in stream_rows] for stream_rows in rows]
    return [a[0] if len(a) == 1 else a for a in answers]
