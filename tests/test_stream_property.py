"""Property (issue 13): random sequences of push / ask / ask_iter (finished, suspended or abandoned) / save /
restore on several streams of one Pipeline, run concurrently with every call on its own thread, never hang,
raise only MirasolErrors, leave every saved file restorable, and give each stream exactly what the same sequence
gives run alone.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mirasol.runtime.errors import MirasolError
from mirasol.runtime.pipeline import Pipeline

from .conftest import QUESTION, chunk, finishes_within

EXAMPLES = int(os.environ.get("MIRASOL_STREAM_EXAMPLES", "40"))
CALL_TIMEOUT = 60  # seconds one call may take before it counts as a hang
QUESTIONS = (QUESTION, "and then?")

OPS = st.one_of(
    st.tuples(st.just("push"), st.integers(0, 5)),
    st.tuples(st.just("ask"), st.sampled_from(QUESTIONS), st.integers(1, 6)),
    st.tuples(st.just("iter"), st.sampled_from(QUESTIONS), st.integers(1, 6), st.integers(0, 3),
              st.sampled_from(["finish", "suspend", "abandon"])),
    st.tuples(st.just("resume")),
    st.tuples(st.just("save")),
    st.tuples(st.just("save_shared")),
    st.tuples(st.just("restore")),
)
PROGRAMS = st.lists(st.lists(OPS, min_size=1, max_size=8), min_size=1, max_size=3)


def _digest(stream) -> str:
    """The stream's saved state (what a state file holds), as one hash."""
    h = hashlib.sha256(repr((stream.batch, stream.chunks)).encode())
    for table in (stream.state, stream.counters):
        for name in sorted(table):
            h.update(name.encode() + table[name].tobytes())
    return h.hexdigest()


@dataclass
class _Run:
    """One program on one stream: its outcomes, and what it saved."""

    pipe: Pipeline
    own: Path
    shared: Path
    stream: Any = None
    suspended: deque = field(default_factory=deque)
    outcomes: list = field(default_factory=list)
    own_digest: str | None = None
    shared_digests: set[str] = field(default_factory=set)

    def call(self, op: tuple) -> Any:
        kind = op[0]
        if kind == "push":
            return self.stream.push(*chunk(self.pipe, op[1])).tobytes()
        if kind == "ask":
            return self.stream.ask(op[1], max_new_tokens=op[2])
        if kind == "iter":
            answer = self.stream.ask_iter(op[1], max_new_tokens=op[2])
            pieces = [piece for piece, _ in zip(answer, range(op[3]))]
            if op[4] == "finish":
                pieces.extend(answer)
            elif op[4] == "suspend":
                self.suspended.append(answer)
            del answer  # "abandon": dropped half-way
            return "".join(pieces)
        if kind == "resume":
            return "".join(self.suspended.popleft()) if self.suspended else None
        if kind == "save":
            self.stream.save(self.own)
            self.own_digest = _digest(self.stream)
            return self.stream.chunks
        if kind == "save_shared":
            digest = _digest(self.stream)
            self.shared_digests.add(digest)  # before the save: a reader may see it as soon as it is renamed
            self.stream.save(self.shared)
            return self.stream.chunks
        self.stream = self.pipe.restore(self.own)
        return self.stream.chunks

    def play(self, program: list[tuple]) -> None:
        self.stream = self.pipe.stream()
        for op in program:
            self.outcomes.append((op[0], _outcome(lambda: self.call(op))))


def _outcome(call: Callable[[], Any]) -> Any:
    """The call's result, or the name of the MirasolError it raised (any other exception fails the test); the
    call runs on a thread of its own (a new one each time) and must finish within CALL_TIMEOUT."""
    def named() -> Any:
        try:
            return call()
        except MirasolError as error:
            return type(error).__name__

    return finishes_within(CALL_TIMEOUT, named)


@settings(max_examples=EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(programs=PROGRAMS)
def test_streams_on_threads_match_each_alone(shared_pipeline, programs) -> None:
    with tempfile.TemporaryDirectory(prefix="mirasol-property-") as folder:
        alone = [_Run(shared_pipeline, Path(folder, f"alone-{i}.npz"), Path(folder, "alone-shared.npz"))
                 for i in range(len(programs))]
        for run, program in zip(alone, programs):
            run.play(program)

        together = [_Run(shared_pipeline, Path(folder, f"{i}.npz"), Path(folder, "shared.npz"))
                    for i in range(len(programs))]
        failures: list[BaseException] = []
        drivers = [threading.Thread(target=_capture(run.play, program, failures), daemon=True)
                   for run, program in zip(together, programs)]
        for driver in drivers:
            driver.start()
        for driver in drivers:
            driver.join(CALL_TIMEOUT * 10)
            assert not driver.is_alive(), "a stream's sequence hung"
        if failures:
            raise failures[0]

        for run, reference in zip(together, alone):
            assert run.outcomes == reference.outcomes
            if run.own_digest is not None:  # its own file: restorable, and its last save
                assert _digest(shared_pipeline.restore(run.own)) == run.own_digest
        saved_shared = set().union(*(run.shared_digests for run in together))
        if saved_shared:  # the shared file: restorable, one complete save of one of the streams
            assert _digest(shared_pipeline.restore(together[0].shared)) in saved_shared
        assert not [name for name in os.listdir(folder) if ".tmp" in name]


def _capture(play: Callable[[list[tuple]], None], program: list[tuple],
             failures: list[BaseException]) -> Callable[[], None]:
    """A thread target playing `program`; a failure goes to `failures`."""
    def target() -> None:
        try:
            play(program)
        except BaseException as error:  # noqa: BLE001 - re-raised by the test thread
            failures.append(error)
    return target
