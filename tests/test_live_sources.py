"""Live sources as they fail: the defects an outside check found in `mirasol-run --live`, each with its mechanism.

1. the question for the end of the stream is answered also when the source gave up;
2. a stream without audio is reported;
3. a chunk's decode time covers all of its packets;
4. latency counts the demuxer's buffering (the ArrivalClock estimate) and the wait for a stall;
5. messages say what happened ("no data for 1 s"), not FFmpeg's internals;
6. a dead source gives up in the time the docs say, or reconnects forever;
7. --ask-every refuses NaN, inf and absurd values; a named pipe that stops sending ends at --stall-timeout.
Real media on loopback: `python -m mirasol.runtime.media.sender` sends MPEG-TS at real-time pace.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from mirasol.runtime.errors import InputError
from mirasol.runtime.media import live_sources
from mirasol.runtime.media.arrival import ArrivalClock
from mirasol.runtime.media.live import LiveRun
from mirasol.runtime.media.live_sources import open_source
from mirasol.runtime.pipeline import Pipeline

from .live_tools import SHORT_CHUNK_S, Lines, events, free_udp_port, mirasol_run, sender, write_ts

av = pytest.importorskip("av")
QUESTION = "which colour appeared first?"


def file_answer(bundle: Path, clip: Path, question: str) -> str:
    from mirasol.runtime.media.video_files import load_clip

    pipe = Pipeline.load(bundle)
    return pipe.answer(*load_clip(clip, pipe.config), question)


def test_source_that_gives_up_still_answers_with_stamps_and_plain_words(live_bundles, short_clips) -> None:
    """(1, 4, 5) --reconnect 0: the sender stops, the stall ends the source with an error; the question is
    answered first, stamped with the chunks it rests on; the last chunk's latency shows the stall's wait."""
    port = free_udp_port()
    run = mirasol_run(str(live_bundles["short"]), "--live", f"udp://127.0.0.1:{port}", "--json", "--reconnect", "0",
                      "--stall-timeout", "1", "--question", QUESTION)
    send = sender(short_clips[8], f"udp://127.0.0.1:{port}")
    try:
        lines = Lines(run.stdout).rest(timeout=60)
        assert run.wait(timeout=30) == 1
        err = run.stderr.read()
    finally:
        run.kill()
        send.kill()
    chunks = events(lines, "chunk")
    assert [c["index"] for c in chunks] == list(range(8))
    (answer,) = events(lines, "answer")
    assert answer["answer"] == file_answer(live_bundles["short"], short_clips[8], QUESTION)
    evidence = answer["evidence"]  # the short model reads its last 8 chunks: all of them
    assert (evidence["chunks"], evidence["first_chunk"], evidence["last_chunk"]) == (8, 0, 7)
    assert evidence["media_start_s"] == chunks[0]["media_s"][0] and evidence["media_end_s"] == chunks[-1]["media_s"][1]
    assert evidence["media_end_s"] - evidence["media_start_s"] == pytest.approx(8 * SHORT_CHUNK_S)
    assert evidence["captured_end_unix"] - evidence["captured_start_unix"] == pytest.approx(
        chunks[-1]["capture_s"] - chunks[0]["capture_s"], abs=0.01)
    # past FFmpeg's probe (its first second comes at once), chunks are captured at the pace they were sent
    assert chunks[7]["capture_s"] - chunks[4]["capture_s"] == pytest.approx(3 * SHORT_CHUNK_S, abs=0.25)
    assert evidence["newest_age_ms"] >= chunks[-1]["latency_ms"] - 1
    # the last chunk waited for the stall (1 s) to be flushed: its latency says so
    assert chunks[-1]["latency_ms"] > 700 and chunks[-1]["receive_ms"] > 700
    assert all(c["latency_ms"] == pytest.approx(c["receive_ms"] + c["queue_wait_ms"] + c["push_ms"], abs=1.0)
               for c in chunks)
    summary = events(lines, "summary")[0]
    assert summary["ended"] == f"error: network source udp://127.0.0.1:{port}: no data for 1 s"
    assert err.strip().splitlines()[-1] == f"error: network source udp://127.0.0.1:{port}: no data for 1 s"
    assert "Errno" not in err and "Immediate exit" not in err


def test_video_only_stream_is_reported(live_bundles, short_clips, tmp_path) -> None:
    """(2) No audio track on a live source: a warning (the model hears silence), as for a file."""
    fifo = tmp_path / "video-only.ts"
    os.mkfifo(fifo)
    run = mirasol_run(str(live_bundles["short"]), "--live", str(fifo), "--json")
    send = sender(short_clips[8], str(fifo), video_only=True)
    try:
        lines = Lines(run.stdout).rest(timeout=60)
        assert run.wait(timeout=30) == 0
        assert send.wait(timeout=30) == 0
    finally:
        run.kill()
        send.kill()
    (warning,) = events(lines, "warning")
    assert warning["message"] == f"{fifo} has no audio stream: the model hears silence"
    assert events(lines, "summary")[0]["warnings"] == 1 and len(events(lines, "chunk")) == 8


def test_decode_time_counts_every_packet_of_the_chunk(live_bundles, short_clips, tmp_path, monkeypatch) -> None:
    """(3) Each source frame's conversion is slowed by 20 ms: a chunk of 4 frames took >= 60 ms to decode,
    though the packet that completed it held one frame."""
    slow = 0.02
    convert = live_sources.FrameConverter.__call__

    def slowed(self, frame):
        time.sleep(slow)
        return convert(self, frame)

    monkeypatch.setattr(live_sources.FrameConverter, "__call__", slowed)
    fifo = tmp_path / "live.ts"
    os.mkfifo(fifo)
    pipe = Pipeline.load(live_bundles["short"])
    source = open_source(str(fifo), pipe.config, stall_timeout=2.0)
    send = sender(short_clips[8], str(fifo))
    try:
        chunks = list(source.chunks(lambda event: None, threading.Event()))
    finally:
        send.kill()
    frames = pipe.config["frames_per_chunk"]
    assert len(chunks) == 8 and all(c.decode_s >= (frames - 1) * slow for c in chunks), [c.decode_s for c in chunks]


def test_arrival_clock_sees_through_buffering() -> None:
    """(4) Media sent at real pace (t arrives at 100 + t) but handed over in bursts up to 0.3 s late: the
    estimate is the real arrival; a timestamp that goes back starts afresh; never after `now`."""
    clock = ArrivalClock(window=5.0)
    for i in range(42):  # packets 0.05 s apart, read in bursts of 6 when the burst's last one arrived
        clock.packet(100 + (i // 6) * 0.3 + 0.25 + 0.001, i * 0.05)
    assert clock.arrival(1.5, now=200.0) == pytest.approx(101.5, abs=0.01)
    assert clock.arrival(1.5, now=101.0) == 101.0  # not in the future
    clock.packet(200.0, 0.0)  # the sender restarted: its timestamps begin again
    assert clock.arrival(0.5, now=300.0) == pytest.approx(200.5)


def test_dead_source_gives_up_in_the_stated_time_with_plain_words(live_bundles) -> None:
    """(5, 6) Nothing sends on the UDP port: each open waits the stall timeout (the first open_timeout), then
    backoff 0.5 s, 1 s: given up after ~3.5 s, saying "no data", not FFmpeg's internals."""
    pipe = Pipeline.load(live_bundles["short"])
    port = free_udp_port()
    source = open_source(f"udp://127.0.0.1:{port}", pipe.config, reconnect=2, stall_timeout=0.5, open_timeout=0.5)
    records: list[dict] = []
    start = time.monotonic()
    with pytest.raises(InputError, match=r"no data for 0.5 s; gave up after 2 reconnect attempts"):
        LiveRun(pipe.stream(), source, on_event=records.append).run()
    assert time.monotonic() - start < 6.0  # 3 opens x 0.5 s + backoff 1.5 s (was 3 x 10 s + 1.5 s)
    reconnects = [r for r in records if r["event"] == "reconnect"]
    opening = f"cannot open network source udp://127.0.0.1:{port}: no data for 0.5 s"
    assert [r["error"] for r in reconnects] == [opening] * 2
    assert not any("Errno" in json.dumps(r) or "Immediate exit" in json.dumps(r) for r in records)


def test_reconnect_forever_until_stopped(live_bundles, monkeypatch) -> None:
    """(6) reconnect=None (--reconnect forever): attempts go on past any count until the run is stopped."""
    monkeypatch.setattr(live_sources, "BACKOFF_FIRST_S", 0.01)
    monkeypatch.setattr(live_sources, "BACKOFF_MAX_S", 0.02)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed: connections are refused
    pipe = Pipeline.load(live_bundles["short"])
    source = open_source(f"tcp://127.0.0.1:{port}", pipe.config, reconnect=None, stall_timeout=1.0)
    reconnects: list[dict] = []

    def on_event(event: dict) -> None:
        if event["event"] == "reconnect":
            reconnects.append(event)
            if len(reconnects) == 12:
                run.stop()

    run = LiveRun(pipe.stream(), source, on_event=on_event)
    summary = run.run()
    assert summary["ended"] == "stopped" and summary["reconnects"] >= 12
    assert all(r["of"] == "forever" for r in reconnects) and reconnects[11]["attempt"] == 12
    assert "Connection refused" in reconnects[0]["error"] and "Errno" not in reconnects[0]["error"]


@pytest.mark.parametrize("value", ["nan", "inf", "1e308", "-1", "0"])
def test_ask_every_refuses_what_would_never_ask(live_bundles, capsys, value) -> None:
    """(7) --ask-every NaN / inf / 1e308 used to exit 0 and never answer."""
    from mirasol.runtime.cli.run import main

    code = main([str(live_bundles["short"]), "--live", "udp://127.0.0.1:9", "--ask-every", value, "--question", "q"])
    err = capsys.readouterr().err
    assert code in (1, 2) and "ask" in err.lower() and value in err


def test_reconnect_option(live_bundles, capsys) -> None:
    from mirasol.runtime.cli.run import main

    assert main([str(live_bundles["short"]), "--live", "udp://127.0.0.1:9", "--reconnect", "-1"]) == 2
    err = capsys.readouterr().err
    assert "argument --reconnect: expected an integer in [0, 1000000], or 'forever', got '-1'" in err
    assert live_sources.reconnect_attempts("forever") is None and live_sources.reconnect_attempts("3") == 3


def test_named_pipe_that_stops_sending_ends_at_the_stall_timeout(live_bundles, short_clips, tmp_path) -> None:
    """(7, 1) A writer sends half a stream into the pipe and then holds it open without writing: the run ends
    --stall-timeout after the last data (it used to hang), answers its question, and names what happened."""
    data = write_ts(short_clips[12], tmp_path / "stream.ts")
    fifo = tmp_path / "live.ts"
    os.mkfifo(fifo)
    run = mirasol_run(str(live_bundles["short"]), "--live", str(fifo), "--json", "--stall-timeout", "1",
                      "--question", QUESTION)
    writer = os.open(fifo, os.O_WRONLY)  # waits for the reader to open the pipe
    try:
        payload = data.read_bytes()
        os.write(writer, payload[: len(payload) // 2])
        stalled = time.monotonic()
        lines = Lines(run.stdout).rest(timeout=30)
        assert run.wait(timeout=10) == 1
        assert time.monotonic() - stalled < 8
    finally:
        os.close(writer)
        run.kill()
    (answer,) = events(lines, "answer")
    assert events(lines, "chunk") and "answer" in answer and "error" not in answer
    assert events(lines, "summary")[0]["ended"] == f"error: pipe source {fifo}: no data for 1 s"
