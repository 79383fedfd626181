"""Faults (issue 9): an export killed at any point leaves its target as it was; a stream whose backend fails
mid-step keeps its state exactly, so the caller can retry and get what a clean run gives."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest

from mirasol.runtime.files.atomic import recover
from mirasol.runtime.backends import GraphSession
from mirasol.runtime.errors import BackendError
from mirasol.runtime.pipeline import Pipeline

from .conftest import QUESTION, assert_same_stream_state, chunk, copy_bundle, snapshot, stream_snapshot
from .race_harness import paused_command


# ---------------------------------------------------------------------------------------------------------------
# Killed exports
# ---------------------------------------------------------------------------------------------------------------

def _leftovers(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}.mirasol-"))


PAUSED_EXPORT = paused_command("mirasol.export.cli:main")


def _kill_export_at(target: Path, point: str, limit: float = 300) -> float:
    """Run `mirasol-export --preset tiny --no-validate --out target` (another seed: other graphs) and SIGKILL it at
    `point`: a time ("after N s") or a named stage of the export, where its pause hook waits; returns when it was
    killed."""
    stage = None if point.startswith("after ") else point
    process = subprocess.Popen([sys.executable, "-c", PAUSED_EXPORT, stage or "", "--preset", "tiny", "--seed", "7",
                                "--no-validate", "--out", str(target)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    start = time.monotonic()
    try:
        if stage is None:
            seconds = float(point.split()[1])
            try:
                process.wait(seconds)
                pytest.fail(f"the export ended (rc {process.returncode}) before the kill point ({point})")
            except subprocess.TimeoutExpired:
                pass
        else:
            for line in process.stderr:  # the export waits at the stage once it has said so
                if line.decode().strip() == f"paused at {stage}":
                    break
            else:
                pytest.fail(f"the export ended (rc {process.wait()}) without reaching the stage {stage!r}")
        elapsed = time.monotonic() - start
        assert elapsed < limit, f"the kill point ({point}) was reached only after {elapsed:.0f} s"
        process.send_signal(signal.SIGKILL)
        process.wait(30)
        return elapsed
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)
        process.stderr.close()


def _check_killed_export(tiny_bundle: Path, tmp_path: Path, point: str) -> None:
    target = copy_bundle(tiny_bundle, tmp_path, "target")
    before = snapshot(target)
    elapsed = _kill_export_at(target, point)
    assert snapshot(target) == before, f"killed at {point} ({elapsed:.1f} s): the target changed"
    recover(target)  # what the next export to the target does first
    assert _leftovers(target) == [] and snapshot(target) == before
    print(f"export killed at {point}: {elapsed:.1f} s, target unchanged")


@pytest.mark.parametrize("point", ["after 2 s", "temporary directory made"])
def test_killed_export_leaves_target_as_it_was(tiny_bundle, tmp_path, point) -> None:
    _check_killed_export(tiny_bundle, tmp_path, point)


@pytest.mark.slow
@pytest.mark.parametrize("point", ["combiner written", "av_autoregressor written", "text_decoder written",
                                   "written, before the swap"])
def test_killed_export_leaves_target_as_it_was_everywhere(tiny_bundle, tmp_path, point) -> None:
    _check_killed_export(tiny_bundle, tmp_path, point)


# The swap itself, killed at each step (a small subprocess: the writer is atomic_directory with made-up files).
ATOMIC_KILLER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import mirasol.runtime.files.atomic as atomic

    target, point = Path(sys.argv[1]), sys.argv[2]
    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if point.startswith("fallback"):  # a platform without renameat2's exchange: two renames
        real = atomic._renameat2
        atomic._renameat2 = lambda a, b, flags: flags != atomic._RENAME_EXCHANGE and real(a, b, flags)
    stages = {"synced, before the swap": "checked, before the swap",
              "swapped, old copy not yet removed": "swapped, old copy not yet removed",
              "fallback: old moved out, new not in": "old moved aside",
              "fallback: new in, old not yet removed": "swapped, old copy not yet removed"}

    def pause(stage, path):
        if stages.get(point) == stage:
            die()
    atomic.PAUSE_HOOK = pause

    with atomic.atomic_directory(target) as work:
        for i in range(3):
            (work / f"graph{i}.onnx").write_bytes(b"new graph %d" % i * 1000)
            if point == "writing" and i == 1:
                die()
        (work / "manifest.json").write_text("{}")
        if point == "written, before sync":
            die()
    print("finished")
""")

NEW_FILES = {f"graph{i}.onnx": f"new graph {i}".encode() * 1000 for i in range(3)} | {"manifest.json": b"{}"}
ATOMIC_POINTS = {  # point: the target right after the kill ("old", "new" or None: missing until recovered)
    "writing": "old",
    "written, before sync": "old",
    "synced, before the swap": "old",
    "swapped, old copy not yet removed": "new",
    "fallback: old moved out, new not in": None,
    "fallback: new in, old not yet removed": "new",
    "not killed": "new",
}


@pytest.mark.parametrize("point", list(ATOMIC_POINTS))
def test_atomic_swap_killed_at_each_step(tiny_bundle, tmp_path, point) -> None:
    import hashlib

    target = copy_bundle(tiny_bundle, tmp_path, "target")
    old = snapshot(target)
    new = {name: hashlib.sha256(data).hexdigest() for name, data in NEW_FILES.items()}
    result = subprocess.run([sys.executable, "-c", ATOMIC_KILLER, str(target), point], capture_output=True,
                            text=True, timeout=120)
    if point == "not killed":
        assert result.returncode == 0 and "finished" in result.stdout, result.stderr
    else:
        assert result.returncode == -signal.SIGKILL, result.stderr
    expected = ATOMIC_POINTS[point]
    if expected is None:  # only where renameat2 is missing: the next export puts the old target back
        assert not target.exists()
    else:
        assert snapshot(target) == (old if expected == "old" else new)
    recover(target)
    assert snapshot(target) == (old if expected in ("old", None) else new)
    assert _leftovers(target) == [], "the next export removes what the killed one left"


def test_stale_temporary_directory_is_removed_and_only_ours(tmp_path) -> None:
    """A leftover no live writer holds (whatever PID wrote it) is removed; a user's folder of a similar name is not
    (our temporaries are our exact prefix and 32 random hex digits)."""
    from mirasol.runtime.files.atomic import atomic_directory

    target = tmp_path / "bundle"
    stale = tmp_path / f".bundle.mirasol-tmp-{'ab12' * 8}"
    stale.mkdir()
    (stale / "half.onnx").write_bytes(b"half")
    users = [tmp_path / name for name in (".bundle.tmp-thesis", f".bundle.mirasol-tmp-{os.getpid()}-abc123",
                                          ".bundle.mirasol-tmp-notes")]
    for folder in users:
        folder.mkdir()
        (folder / "thesis.tex").write_text("years of work")
    with atomic_directory(target) as work:
        (work / "manifest.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["bundle", *(u.name for u in users)])
    assert all((u / "thesis.tex").read_text() == "years of work" for u in users)


def test_new_bundle_keeps_the_targets_permissions(tmp_path) -> None:
    from mirasol.runtime.files.atomic import atomic_directory

    target = tmp_path / "bundle"
    with atomic_directory(target) as work:
        (work / "manifest.json").write_text('{"format": "mirasol-bundle", "n": 1}')
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700
    target.chmod(0o750)
    with atomic_directory(target) as work:
        (work / "manifest.json").write_text('{"format": "mirasol-bundle", "n": 2}')
    assert target.stat().st_mode & 0o777 == 0o750 and '"n": 2' in (target / "manifest.json").read_text()


# ---------------------------------------------------------------------------------------------------------------
# A backend failing in the middle of a step
# ---------------------------------------------------------------------------------------------------------------

class FailingSession(GraphSession):
    """Wraps a session; while `armed`, its run raises `error` (after `after` successful calls)."""

    def __init__(self, inner: GraphSession) -> None:
        self.inner = inner
        self.name = inner.name
        self.inputs = inner.inputs
        self.outputs = inner.outputs
        self.armed = False
        self.after = 0
        self.error: BaseException = BackendError(f"injected failure in graph {inner.name!r}")
        self.calls = 0

    def run(self, feeds: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None
            ) -> dict[str, np.ndarray]:
        if self.armed:
            if self.after <= 0:
                raise self.error
            self.after -= 1
        self.calls += 1
        return self.inner.run(feeds, output_names)

    def close(self) -> None:
        self.inner.close()


def inject(pipe: Pipeline, step: str, index: int) -> FailingSession:
    plan = pipe._plans[step]
    session, feeds = plan.graphs[index]
    wrapper = FailingSession(session)
    plan.graphs[index] = (wrapper, feeds)
    return wrapper


@pytest.fixture(scope="module")
def _fault_pipeline(tiny_bundle) -> Pipeline:
    return Pipeline.load(tiny_bundle)


@pytest.fixture
def own_pipeline(_fault_pipeline) -> Pipeline:
    """A Pipeline apart from the shared one (the fault injection must not reach other tests' streams), its
    step plans put back after each test."""
    saved = {name: list(plan.graphs) for name, plan in _fault_pipeline._plans.items()}
    yield _fault_pipeline
    for name, graphs in saved.items():
        _fault_pipeline._plans[name].graphs[:] = graphs


def _reference(pipe: Pipeline, chunks: int, question: str = QUESTION, tokens: int = 12):
    stream = pipe.stream()
    contexts = [stream.push(*chunk(pipe, i)) for i in range(chunks)]
    return contexts, stream.token_ids(question, tokens)


@pytest.mark.parametrize("index", [1, 0], ids=["2nd graph (av_autoregressor)", "1st graph (combiner)"])
@pytest.mark.parametrize("error", [BackendError("injected"), MemoryError("injected"), KeyboardInterrupt()],
                         ids=["BackendError", "MemoryError", "KeyboardInterrupt"])
def test_failed_push_leaves_state_exactly_and_retry_matches(shared_pipeline, own_pipeline, index, error) -> None:
    contexts, answer = _reference(shared_pipeline, 6)
    failing = inject(own_pipeline, "push", index)
    failing.error = error
    stream = own_pipeline.stream()
    for i in range(3):  # past tiny's AV window (2 chunks of KV cache): the window has trimmed the state
        stream.push(*chunk(own_pipeline, i))
    before = stream_snapshot(stream)
    timings = dict(stream.timings.graph_calls)
    failing.armed = True
    with pytest.raises(type(error)):
        stream.push(*chunk(own_pipeline, 3))
    assert_same_stream_state(before, stream_snapshot(stream))
    if index == 1:
        assert stream.timings.graph_calls["combiner"] == timings["combiner"] + 1  # the 1st graph did run
    failing.armed = False
    for i in range(3, 6):  # the retry, then on as if nothing happened
        assert np.array_equal(stream.push(*chunk(own_pipeline, i)), contexts[i]), f"chunk {i}"
    assert stream.token_ids(QUESTION, 12) == answer


def test_failed_first_push_can_be_retried(shared_pipeline, own_pipeline) -> None:
    contexts, answer = _reference(shared_pipeline, 2)
    failing = inject(own_pipeline, "push", 1)
    stream = own_pipeline.stream()
    failing.armed = True
    with pytest.raises(BackendError, match="injected failure in graph 'av_autoregressor'"):
        stream.push(*chunk(own_pipeline, 0))
    assert stream.chunks == 0
    failing.armed = False
    assert np.array_equal(stream.push(*chunk(own_pipeline, 0)), contexts[0])
    assert np.array_equal(stream.push(*chunk(own_pipeline, 1)), contexts[1])
    assert stream.token_ids(QUESTION, 12) == answer


@pytest.mark.parametrize("step, after", [("ask", 0), ("generate", 0), ("generate", 5)],
                         ids=["cross-kv", "first token", "sixth token"])
def test_failed_answer_leaves_stream_state_and_retry_matches(shared_pipeline, own_pipeline, step, after) -> None:
    contexts, answer = _reference(shared_pipeline, 4)
    failing = inject(own_pipeline, step, 0)
    stream = own_pipeline.stream()
    for i in range(4):
        stream.push(*chunk(own_pipeline, i))
    before = stream_snapshot(stream)
    failing.armed, failing.after = True, after
    with pytest.raises(BackendError, match="injected"):
        stream.token_ids(QUESTION, 12)
    after_failure = stream_snapshot(stream)
    stream_scope = {s.name for s in own_pipeline.bundle.manifest.state if s.scope == "stream"}
    counters = {c.name for c in own_pipeline.bundle.manifest.counters if c.scope == "stream"}
    after_failure["state"] = {k: v for k, v in after_failure["state"].items() if k in stream_scope}
    after_failure["counters"] = {k: v for k, v in after_failure["counters"].items() if k in counters}
    before["state"] = {k: v for k, v in before["state"].items() if k in stream_scope}
    before["counters"] = {k: v for k, v in before["counters"].items() if k in counters}
    assert_same_stream_state(before, after_failure)
    failing.armed = False
    assert stream.token_ids(QUESTION, 12) == answer
    assert np.array_equal(stream.push(*chunk(own_pipeline, 9)), _after(shared_pipeline, 4, 9))


def _after(pipe: Pipeline, chunks: int, seed: int) -> np.ndarray:
    stream = pipe.stream()
    for i in range(chunks):
        stream.push(*chunk(pipe, i))
    return stream.push(*chunk(pipe, seed))
