"""Live sources in real time (runtime/media/live.py, live_sources.py, mirasol-run --live), with real media.

Sources on loopback only: a helper process (`python -m mirasol.runtime.media.sender`) remuxes a demo mp4
into MPEG-TS at real-time pace to a UDP port or a named pipe. The slowed-backend tests play a clip at its real pace
through a bundle whose combiner sleeps, so inference is slower than real time.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from mirasol.model.demo_task import DEMO_CHECKPOINT, TEST_SEED, DemoTask
from mirasol.model import get_preset
from mirasol.runtime.errors import InputError
from mirasol.runtime.media.live import ChunkQueue, LiveRun, Quantiles
from mirasol.runtime.pipeline import Pipeline
from mirasol.runtime.media.live_sources import FileSource, Source, StreamSource, TimedChunk, open_source

from .live_tools import SHORT, SHORT_CHUNK_S, Lines, SlowBackend, events, free_udp_port, mirasol_run, sender

pytest.importorskip("av")


# ---------------------------------------------------------------- fixtures: bundles and clips, built once
@pytest.fixture(scope="module")
def bundles(live_bundles) -> dict[str, Path]:
    return live_bundles


@pytest.fixture(scope="module")
def demo_clip(tmp_path_factory):
    """A held-out demo clip (4 chunks of 1 s) as mp4, with its questions and answers."""
    task = DemoTask(json.loads((DEMO_CHECKPOINT / "config.json").read_text()))
    clip = task.clip(TEST_SEED, 7)
    return task.write(clip, tmp_path_factory.mktemp("live-clips") / "demo.mp4"), clip.questions


# ---------------------------------------------------------------- helpers
def file_answers(bundle: Path, clip: Path, questions: list[str]) -> list[str]:
    from mirasol.runtime.media.video_files import load_clip

    pipe = Pipeline.load(bundle)
    stream = pipe.stream()
    for video, audio in pipe.split_clip(*load_clip(clip, pipe.config)):
        stream.push(video, audio)
    return [stream.ask(q) for q in questions]


def slowed(bundle: Path, clip: Path, delay: float, **options) -> tuple[LiveRun, list[dict]]:
    """A clip at real pace through the bundle with its combiner slowed by `delay` seconds a call."""
    pipe = Pipeline.load(bundle, backend=SlowBackend("onnxruntime", {"combiner": delay}))
    records: list[dict] = []
    run = LiveRun(pipe.stream(), FileSource(str(clip), pipe.config, realtime=True), on_event=records.append,
                  **options)
    run.run()
    return run, records


# ---------------------------------------------------------------- network source on loopback, through the CLI
def test_udp_live_answers_equal_the_file_answers(bundles, demo_clip) -> None:
    """MPEG-TS over UDP at real pace -> mirasol-run --live; questions on stdin after the 4 chunks; Ctrl-C."""
    clip, qas = demo_clip
    port = free_udp_port()
    run = mirasol_run(str(bundles["demo"]), "--live", f"udp://127.0.0.1:{port}", "--json", "--stall-timeout", "1",
                      "--max-new-tokens", "12")
    send = sender(clip, f"udp://127.0.0.1:{port}")
    try:
        out = Lines(run.stdout)
        out.until(lambda line: json.loads(line).get("index") == 3, timeout=60)  # the last of the 4 chunks
        questions = [qa.question for qa in qas]
        run.stdin.write("".join(q + "\n" for q in questions))
        run.stdin.flush()
        for _ in questions:
            out.until(lambda line: json.loads(line)["event"] == "answer", timeout=30)
        run.send_signal(signal.SIGINT)
        rest = out.rest(timeout=30)
        assert run.wait(timeout=30) == 0, run.stderr.read()
    finally:
        run.kill()
        send.kill()
    assert send.wait() in (0, -signal.SIGKILL)
    records = [json.loads(line) for line in out.seen]
    chunks = [r for r in records if r["event"] == "chunk"]
    assert [c["index"] for c in chunks] == [0, 1, 2, 3]
    assert all(c["latency_ms"] > 0 and c["latency_ms"] == pytest.approx(
        c["receive_ms"] + c["queue_wait_ms"] + c["push_ms"], abs=1.0) for c in chunks), chunks
    answers = [r for r in records if r["event"] == "answer"]
    assert [a["question"] for a in answers] == questions and all(a["chunks"] == 4 for a in answers)
    live = [a["answer"] for a in answers]
    assert live == file_answers(bundles["demo"], clip, questions)
    assert sum(a == qa.answer for a, qa in zip(live, qas)) >= 0.9 * len(qas)  # and the model is right
    # the sender stopped: no data for --stall-timeout flushed the last chunk, and a reconnect was reported
    reconnects = [r for r in records if r["event"] == "reconnect"]
    assert reconnects and "no data" in reconnects[0]["error"] and reconnects[0]["attempt"] == 1
    summary = json.loads(rest[-1])
    assert summary["event"] == "summary" and summary["ended"] == "stopped"
    assert (summary["pushed"], summary["dropped"], summary["answers"]) == (4, 0, len(questions))
    assert summary["policy"] == "drop-oldest" and summary["latency_ms"]["max"] < 2000


def test_named_pipe_source_and_the_question_at_the_end(bundles, short_clips, tmp_path) -> None:
    """A named pipe (MPEG-TS at real pace): the writer closing it ends the stream; --question is asked then."""
    fifo = tmp_path / "live.ts"
    os.mkfifo(fifo)
    question = "which colour appeared first?"
    run = mirasol_run(str(bundles["short"]), "--live", str(fifo), "--question", question, "--json")
    send = sender(short_clips[8], str(fifo))
    try:
        lines = Lines(run.stdout).rest(timeout=60)
        assert run.wait(timeout=30) == 0
        assert send.wait(timeout=30) == 0
    finally:
        run.kill()
        send.kill()
    assert [c["index"] for c in events(lines, "chunk")] == list(range(8))
    (answer,) = events(lines, "answer")
    assert answer["chunks"] == 8 and answer["answer"] == file_answers(bundles["short"], short_clips[8], [question])[0]
    assert events(lines, "summary")[0]["ended"] == "end of source"


def test_sigint_stops_cleanly_with_the_summary(bundles, short_clips) -> None:
    """Ctrl-C mid-stream: pushes stop, the summary is printed (stderr), exit 0, within a second or so."""
    run = mirasol_run(str(bundles["short"]), "--live", str(short_clips[12]), "--realtime")
    try:
        err = Lines(run.stderr)
        err.until(lambda line: "pushed 1 " in line or "pushed 2 " in line, timeout=60)
        signalled = time.monotonic()
        run.send_signal(signal.SIGINT)
        lines = err.rest(timeout=30)
        assert run.wait(timeout=30) == 0
        assert time.monotonic() - signalled < 5
    finally:
        run.kill()
    text = "\n".join(lines)
    assert "ended: stopped" in text and "Traceback" not in text
    pushed = int(text.split("pushed ")[-1].split(",")[0])
    assert 1 <= pushed < 12  # stopped mid-stream
    assert "latency    p50" in text and "(block)" in text  # a file: block by default


# ---------------------------------------------------------------- inference slower than real time
@pytest.mark.parametrize("queue_size, reason", [(2, "queue full"), (8, "late")])
def test_slowed_backend_drop_oldest_keeps_latency_under_the_bound(bundles, short_clips, queue_size, reason) -> None:
    """Pushes take 0.5 s, chunks come every 0.25 s: drop-oldest drops (counted, noted on the stream) and
    every pushed chunk's latency stays under the bound; the stream sees the pushed chunks in order."""
    bound = 1.5
    run, records = slowed(bundles["short"], short_clips[12], 0.5, policy="drop-oldest", latency_bound=bound,
                          queue_size=queue_size)
    summary = records[-1]
    chunks = [r for r in records if r["event"] == "chunk"]
    drops = [r for r in records if r["event"] == "drop"]
    assert summary["ended"] == "end of source" and summary["chunks"] == 12
    assert summary["pushed"] + summary["dropped"] == 12 and summary["dropped"] == len(drops) > 0
    assert any(d["reason"] == reason for d in drops)
    assert summary["over_bound"] == 0 and max(c["latency_ms"] for c in chunks) < 1000 * bound
    assert summary["latency_ms"]["max"] < 1000 * bound
    indices = [c["index"] for c in chunks]
    assert indices == sorted(indices) and sorted(indices + [d["index"] for d in drops]) == list(range(12))
    assert (run.stream.chunks, run.stream.dropped_chunks) == (summary["pushed"], summary["dropped"])


def test_slowed_backend_block_drops_nothing(bundles, short_clips) -> None:
    """The same slow model with block: every chunk is pushed in order; latency grows instead."""
    run, records = slowed(bundles["short"], short_clips[8], 0.35, policy="block", latency_bound=0.5)
    summary = records[-1]
    chunks = [r for r in records if r["event"] == "chunk"]
    assert [c["index"] for c in chunks] == list(range(8))
    assert (summary["pushed"], summary["dropped"], run.stream.dropped_chunks, run.stream.chunks) == (8, 0, 0, 8)
    assert chunks[-1]["latency_ms"] > chunks[0]["latency_ms"] + 500  # the backlog: 8 x (0.35 - 0.25) s
    assert summary["over_bound"] > 0


def test_questions_while_streaming_are_answered_between_pushes(bundles, short_clips) -> None:
    """--ask-every: answers come from the state of that moment (chunk counts rise) while chunks keep coming."""
    pipe = Pipeline.load(bundles["short"])
    records: list[dict] = []
    run = LiveRun(pipe.stream(), FileSource(str(short_clips[8]), pipe.config, realtime=True), ask_every=0.5,
                  question="which colour appeared first?", on_event=records.append, max_new_tokens=4)
    run.ask("what shape was the red one?")
    summary = run.run()
    answers = [r for r in records if r["event"] == "answer"]
    assert answers[0]["question"] == "what shape was the red one?" and answers[0]["chunks"] == 1
    counts = [a["chunks"] for a in answers[1:]]
    assert len(counts) >= 3 and counts == sorted(counts) and counts[0] < 8
    assert summary["answers"] == len(answers) and summary["pushed"] == 8
    assert summary["queue_size"] == 8  # by default, the chunks that fit in the 2 s bound


# ---------------------------------------------------------------- long runs, simulated time
class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class SyntheticSource(Source):
    """`count` chunks of fixed arrays, one per chunk duration of the fake clock, produced at once."""

    def __init__(self, clock: FakeClock, count: int) -> None:
        self.name, self.live, self.clock, self.count = "synthetic", True, clock, count
        rng = np.random.default_rng(0)
        self.video = rng.random((SHORT.frames_per_chunk, 3, SHORT.image_size, SHORT.image_size), dtype=np.float32)
        self.audio = rng.standard_normal((SHORT.n_mels, SHORT.audio_frames_per_chunk)).astype(np.float32)

    def chunks(self, report, stop):
        for index in range(self.count):
            self.clock.now += SHORT_CHUNK_S
            yield TimedChunk(index, self.video, self.audio, captured=self.clock.now, decode_s=0.0)


def test_memory_is_flat_over_a_long_run(bundles) -> None:
    """2,000 chunks (8 min of simulated stream): traced memory at the end is what it was at chunk 200."""
    pipe = Pipeline.load(bundles["short"])
    clock = FakeClock()
    traced: dict[int, int] = {}

    def on_event(event: dict) -> None:
        if event["event"] == "chunk" and event["index"] in (200, 1999):
            traced[event["index"]] = tracemalloc.get_traced_memory()[0]

    run = LiveRun(pipe.stream(), SyntheticSource(clock, 2000), policy="block", on_event=on_event, clock=clock)
    tracemalloc.start()
    try:
        summary = run.run()
    finally:
        tracemalloc.stop()
    assert summary["pushed"] == 2000 and run.stream.chunks == 2000
    assert traced[1999] - traced[200] < 64 * 1024, traced


# ---------------------------------------------------------------- parts
def test_quantiles_match_numpy_within_one_percent() -> None:
    values = np.random.default_rng(0).lognormal(3.0, 1.0, 5000)
    q = Quantiles()
    for value in values:
        q.add(float(value))
    for p in (50, 95):
        exact = np.percentile(values, p, method="inverted_cdf")
        assert exact <= q.percentile(p) <= exact * 1.0101
    assert q.max == values.max() and q.count == 5000 and len(q.buckets) < 1000


def test_chunk_queue_drop_oldest_and_block() -> None:
    stop = threading.Event()
    chunk = [TimedChunk(i, np.zeros(1), np.zeros(1), captured=0.0, decode_s=0.0) for i in range(4)]
    q = ChunkQueue(2, "drop-oldest")
    for c in chunk:
        q.put(c, stop)
    assert [c.index for c in q.take_dropped()] == [0, 1] and [q.get(0).index, q.get(0).index] == [2, 3]
    blocking = ChunkQueue(1, "block")
    blocking.put(chunk[0], stop)
    waiter = threading.Thread(target=blocking.put, args=(chunk[1], stop))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive() and len(blocking) == 1  # waits for room
    assert blocking.get(0).index == 0
    waiter.join(2)
    assert not waiter.is_alive() and blocking.get(0).index == 1 and blocking.take_dropped() == []
    with pytest.raises(InputError, match="drop policy"):
        ChunkQueue(2, "drop-newest")


def test_network_source_reconnects_with_backoff_then_gives_up(bundles) -> None:
    """Nothing listens on the TCP port: two reported attempts (0.5 s, 1 s), then an error naming the source."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    pipe = Pipeline.load(bundles["short"])
    source = open_source(f"tcp://127.0.0.1:{port}", pipe.config, reconnect=2, stall_timeout=1.0)
    assert isinstance(source, StreamSource) and source.live
    records: list[dict] = []
    run = LiveRun(pipe.stream(), source, on_event=records.append)
    with pytest.raises(InputError, match=rf"tcp://127.0.0.1:{port}.*gave up after 2 reconnect attempts"):
        run.run()
    reconnects = [r for r in records if r["event"] == "reconnect"]
    assert [(r["attempt"], r["delay_s"]) for r in reconnects] == [(1, 0.5), (2, 1.0)]
    assert records[-1]["event"] == "summary" and records[-1]["ended"].startswith("error: ")
    assert records[-1]["reconnects"] == 2


def test_open_source_refuses_what_it_cannot_play(bundles, short_clips, tmp_path) -> None:
    config = get_preset("tiny").to_dict()
    with pytest.raises(InputError, match="unsupported scheme ftp://"):
        open_source("ftp://127.0.0.1/x.ts", config)
    with pytest.raises(InputError, match="--realtime paces a file"):
        open_source("udp://127.0.0.1:5000", config, realtime=True)
    with pytest.raises(InputError, match="does not exist"):
        open_source(str(tmp_path / "missing.mp4"), config)
    with pytest.raises(InputError, match="camera /dev/video99 does not exist"):
        open_source("/dev/video99", config)
    assert not open_source(str(short_clips[8]), config).live


def test_cli_live_arguments(bundles, capsys) -> None:
    from mirasol.runtime.cli.run import main

    for args, words in ((["--ask-every", "2"], "--ask-every needs --question"),
                        (["--drop-policy", "newest"], "invalid choice: 'newest'")):
        assert main([str(bundles["short"]), "--live", "udp://127.0.0.1:5000", *args]) == 2
        assert words in capsys.readouterr().err
    assert main([str(bundles["short"]), "--video", "clip.mp4", "--realtime", "--question", "q"]) == 2
    assert "--realtime and --ask-every go with --live" in capsys.readouterr().err
    assert main([str(bundles["short"]), "--live", "rtmp://127.0.0.1/x"]) == 1
    assert capsys.readouterr().err.startswith("error: live source rtmp://127.0.0.1/x: unsupported scheme")
