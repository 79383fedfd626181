"""`mirasol-run`: answer questions about a clip or a live source with a bundle (numpy + onnxruntime only)."""
from __future__ import annotations

import argparse
import codecs
import json
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from ..backends import BACKENDS, REGISTRY, BackendSettings, backend_entry
from ..bundle.reader import Bundle
from ..errors import InputError, MirasolError
from ..media.chunks_file import check_chunks_output, load_chunks, save_chunks
from ..media.live import ASK_EVERY_MAX_S, DROP_POLICIES, LATENCY_BOUND_S, MIN_QUEUE_SIZE, LiveRun
from ..media.live_sources import FOREVER
from ..pipeline import Pipeline
from .bundle_info import describe_bundle
from .commandline import (COUNT, EXIT_ERROR, EXIT_INTERRUPTED, SEED, THREADS, UsageError, bounded,
                          command_parser, describe, keyed, or_word, run_command)

STATUS_EVERY_S = 0.25  # refresh of the status line on a terminal
STATUS_LINE_EVERY_S = 5.0  # a status line per this many seconds when stderr is not a terminal

EXAMPLES = """Examples:
  mirasol-run bundles/demo --video clip.mp4 --question 'which colour appeared first?'
  mirasol-run bundles/demo --info                  # what the bundle is: model, precision, graphs, limits
  mirasol-run bundles/demo --video clip.mp4 --save-chunks clip.npz     # decode once, into an .npz
  mirasol-run bundles/demo --chunks clip.npz --question 'what did you hear first?' --json
  mirasol-run bundles/demo --live udp://127.0.0.1:5000 --ask-every 5 --question 'which colour appeared first?'
(with --live: more questions on stdin, one per line; Ctrl-C stops with a summary)"""


def _parser() -> argparse.ArgumentParser:
    parser = command_parser(
        "mirasol-run",
        "Stream a clip or a live source through a Mirasol bundle chunk by chunk and answer questions about it, "
        "or describe a bundle (--info).",
        epilog=EXAMPLES, quiet=True)
    parser.add_argument("bundle", type=Path, help="bundle directory written by mirasol-export")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--video", type=Path, metavar="FILE",
                        help="a video file (mp4, mkv, webm, avi); needs the media extra")
    source.add_argument("--chunks", type=Path, metavar="NPZ",
                        help="an .npz of decoded chunks: 'video' [N*F, 3, H, W] float32 in [0, 1] and 'audio' "
                             "log-mel [n_mels, N*A] (written by --save-chunks)")
    source.add_argument("--live", metavar="SOURCE",
                        help="stream SOURCE in real time: rtsp://, udp://, rtp://, srt://, tcp://, http(s):// (HLS), "
                             "a V4L2 camera /dev/videoN, a named pipe, or a file (see --realtime); questions are "
                             "read from stdin, one per line, and answered while it streams; needs the media extra")
    source.add_argument("--info", action="store_true",
                        help="describe the bundle: model, precision, chunk shape, the longest question and answer, "
                             "graphs and their sizes, TensorRT engines, validation errors")
    parser.add_argument("--question", help="the question to answer (required with --chunks, and with --video unless "
                                           "--save-chunks; with --live: asked when the stream ends, or every "
                                           "--ask-every seconds)")
    parser.add_argument("--save-chunks", type=Path, metavar="NPZ",
                        help="with --video: also write the decoded chunks to this .npz, for --chunks (replaces only "
                             "a chunks file mirasol wrote)")
    parser.add_argument("--max-new-tokens", type=COUNT, metavar="N",
                        help="most answer tokens (bytes) (default: the bundle's, 32 unless exported otherwise, or "
                             "what the question leaves of the context); --info says how many the context leaves")
    parser.add_argument("--temperature", type=bounded(float, 0, 1e3), default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=bounded(int, 0, 1 << 20), default=0, metavar="K",
                        help="sample from the K likeliest tokens (0: all)")
    parser.add_argument("--top-p", type=bounded(float, 0, 1, open_low=True), default=1.0, metavar="P",
                        help="sample from the smallest set of tokens holding probability P (1: all)")
    parser.add_argument("--seed", type=SEED, help="seed of the sampling (default: fresh each run; greedy answers "
                                                 "need none)")
    parser.add_argument("--backend", choices=BACKENDS, default="onnxruntime",
                        help="; ".join(f"{e.name}: {e.help}" for e in REGISTRY.values()))
    parser.add_argument("--provider", action="append", metavar="NAME",
                        help="onnxruntime execution provider (repeatable, in order; default: CPUExecutionProvider)")
    parser.add_argument("--threads", type=THREADS, metavar="N",
                        help="onnxruntime intra-op threads (default: ONNX Runtime's choice, one per core)")
    parser.add_argument("--graph-threads", type=keyed("GRAPH", THREADS), action="append", metavar="GRAPH=N",
                        help="onnxruntime intra-op threads of one graph (repeatable), e.g. text_decoder=1: "
                             "mirasol-bench's text section says whether decoding is faster on one thread")
    parser.add_argument("--no-verify", action="store_true", help="skip the graph checksums (faster start)")
    parser.add_argument("--json", action="store_true",
                        help="print the answer, tokens and timings as JSON; with --live, one JSON object per line "
                             "for every chunk, drop, answer (with its evidence: the chunks it rests on, their "
                             "media and capture times), reconnect and warning, then the summary")
    live = parser.add_argument_group("live sources (with --live)")
    live.add_argument("--realtime", action="store_true",
                      help="play a file at its own pace, as a camera would deliver it (default: as fast as it "
                           "decodes)")
    live.add_argument("--ask-every", type=bounded(float, 0.01, ASK_EVERY_MAX_S), metavar="SECONDS",
                      help="ask --question every SECONDS while streaming (default: once, when the stream ends)")
    live.add_argument("--drop-policy", choices=DROP_POLICIES,
                      help="when the queue is full: drop-oldest drops the oldest chunk and chunks too late for "
                           "--latency-bound (stay current); block makes decoding wait (lose nothing) (default: "
                           "drop-oldest for network streams, pipes and cameras, block for files)")
    live.add_argument("--latency-bound", type=bounded(float, 0.01, 3600.0), default=LATENCY_BOUND_S,
                      metavar="SECONDS",
                      help="latency from a chunk's capture to its av_context that drop-oldest keeps to; "
                           "chunks over it are counted")
    live.add_argument("--queue-size", type=bounded(int, 1, 100_000), metavar="CHUNKS",
                      help=f"chunks decoded ahead of the model (default: as many as fit in --latency-bound, at "
                           f"least {MIN_QUEUE_SIZE}: 2 for 1 s chunks and the default bound)")
    live.add_argument("--reconnect", type=or_word(bounded(int, 0, 1_000_000), FOREVER), default=5,
                      metavar="ATTEMPTS",
                      help=f"reconnect attempts in a row (backoff 0.5 s doubling to 8 s, then each open waits up to "
                           f"--stall-timeout) before a network source or camera gives up (0: at the first failure), "
                           f"or '{FOREVER}'")
    live.add_argument("--stall-timeout", type=bounded(float, 0.1, 3600.0), default=5.0, metavar="SECONDS",
                      help="seconds without data that end a connection (then reconnect); a named pipe that sends "
                           "nothing for this long ends")
    live.add_argument("--source-option", action="append", default=[], metavar="KEY=VALUE",
                      help="an FFmpeg option of the source, e.g. rtsp_transport=tcp or video_size=640x480 "
                           "(repeatable)")
    return parser


def _decoded(args: argparse.Namespace, config: dict) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The chunks of --video, decoded one at a time as they are pushed (memory bounded whatever the file's
    length); with --save-chunks (checked before any work by _check_arguments), also kept and written to that file
    once decoding ends."""
    from ..media.video_files import iter_chunks

    if args.save_chunks is None:
        yield from iter_chunks(args.video, config)
        return
    kept = []
    for chunk in iter_chunks(args.video, config):
        kept.append(chunk)
        yield chunk
    video, audio = np.concatenate([v for v, _ in kept]), np.concatenate([a for _, a in kept], axis=1)
    save_chunks(args.save_chunks, video, audio, source=str(args.video))
    print(f"wrote {args.save_chunks}: {len(kept)} chunks (video {list(video.shape)}, audio {list(audio.shape)}); "
          f"stream it with --chunks {args.save_chunks}", file=sys.stderr)


def _generation(args: argparse.Namespace) -> dict[str, Any]:
    return {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k,
            "top_p": args.top_p, "seed": args.seed}


def _answer_clip(args: argparse.Namespace, pipe: Pipeline, load_seconds: float) -> int:
    start = time.perf_counter()
    chunks = iter(pipe.split_clip(*load_chunks(args.chunks)) if args.video is None else _decoded(args, pipe.config))
    decode_seconds, stream_seconds = time.perf_counter() - start, 0.0
    stream = pipe.stream()
    while True:  # decode a chunk, push it: one chunk in memory at a time
        start = time.perf_counter()
        chunk = next(chunks, None)
        decode_seconds += time.perf_counter() - start
        if chunk is None:
            break
        start = time.perf_counter()
        stream.push(*chunk)
        stream_seconds += time.perf_counter() - start
    start = time.perf_counter()
    generation = _generation(args)
    tokens = stream.token_ids(args.question, generation.pop("max_new_tokens"), **generation)[0]
    answer_seconds = time.perf_counter() - start
    answer = pipe.tokenizer.decode(tokens)
    if args.json:
        print(json.dumps({
            "answer": answer, "tokens": tokens, "chunks": stream.chunks,
            "timings": {"load_s": load_seconds, "decode_s": decode_seconds, "stream_s": stream_seconds,
                        "answer_s": answer_seconds, **stream.timings.to_dict()}}, indent=2))
    else:
        print(answer)
        if not answer.strip():
            warnings.warn(f"the answer is blank ({len(tokens)} tokens of whitespace or none): a bundle of a "
                          f"random-init preset answers nothing meaningful; the demo model (mirasol-export's default) "
                          f"or a trained checkpoint does", stacklevel=1)
    return 0


# ---------------------------------------------------------------- live
def _read_questions(run: LiveRun, fd: int) -> None:
    """Questions from stdin, one per line, until EOF. Reads the descriptor itself: a daemon thread blocked
    in sys.stdin's buffered reader would hold its lock at interpreter exit."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pending = ""
    while True:
        try:
            data = os.read(fd, 4096)
        except OSError:
            return
        pending += decoder.decode(data, final=not data)
        *lines, pending = pending.split("\n")
        if not data:
            lines.append(pending)
        for line in lines:
            if line.strip():
                run.ask(line.strip())
        if not data:
            return


class _LiveOutput:
    """Prints a live run: JSON lines (--json) or answers on stdout; the status line and summary on stderr."""

    def __init__(self, as_json: bool, out: TextIO, err: TextIO, status: bool = True) -> None:
        self.as_json = as_json
        self.status = status  # the status line (--quiet: none)
        self.out = out
        self.err = err
        self.tty = err.isatty()
        self.run: LiveRun | None = None
        self.shown = False  # a status line is on the terminal
        self.last_status = 0.0

    def _clear(self) -> None:
        if self.shown:
            self.err.write("\r\x1b[K")
            self.err.flush()
            self.shown = False

    def _status(self) -> None:
        now = time.monotonic()
        every = STATUS_EVERY_S if self.tty else STATUS_LINE_EVERY_S
        if not self.status or self.run is None or now - self.last_status < every:
            return
        self.last_status = now
        if self.tty:
            self.err.write("\r\x1b[K" + self.run.status_line())
            self.shown = True
        else:
            self.err.write(self.run.status_line() + "\n")
        self.err.flush()

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if self.as_json:
            self._clear()
            print(json.dumps(event), file=self.out, flush=True)
        elif kind == "answer":
            self._clear()
            if "error" in event:
                print(f"error: {event['question']!r}: {event['error']}", file=self.err, flush=True)
            else:
                print(f"[{event['t_s']:.1f} s, {_evidence_text(event['evidence'])}] {event['question']} -> "
                      f"{event['answer']}", file=self.out, flush=True)
        elif kind == "reconnect":
            self._clear()
            print(f"reconnecting to {event['source']} in {event['delay_s']:g} s (attempt {event['attempt']} of "
                  f"{event['of']}): {event['error']}", file=self.err, flush=True)
        elif kind == "warning":
            self._clear()
            print(f"warning: {event['message']}", file=self.err, flush=True)
        if kind == "summary":
            self._clear()
            self.err.write(_summary_text(event))
            self.err.flush()
        else:
            self._status()


def _evidence_text(evidence: dict[str, Any]) -> str:
    """An answer's evidence in a few words: chunks, media span, the newest chunk's age."""
    if not evidence.get("chunks"):
        return "no chunks"
    return (f"chunks {evidence['first_chunk']}-{evidence['last_chunk']}, media {evidence['media_start_s']:.1f}-"
            f"{evidence['media_end_s']:.1f} s, newest {evidence['newest_age_ms']:.0f} ms old")


def _summary_text(s: dict[str, Any]) -> str:
    def ms(name: str) -> str:
        q = s[name]
        return "-" if q["p50"] is None else f"p50 {q['p50']:.1f} / p95 {q['p95']:.1f} / max {q['max']:.1f} ms"

    return (f"summary: {s['source']} ({s['policy']}), {s['seconds']:.1f} s, ended: {s['ended']}\n"
            f"  chunks {s['chunks']}: pushed {s['pushed']}, dropped {s['dropped']} (queue full "
            f"{s['dropped_queue_full']}, late {s['dropped_late']}), left in queue {s['left_in_queue']}\n"
            f"  latency    {ms('latency_ms')} (bound {s['latency_bound_ms']:.0f} ms, {s['over_bound']} over)\n"
            f"  receive    {ms('receive_ms')}\n  queue wait {ms('queue_wait_ms')}\n  push       {ms('push_ms')}\n"
            f"  decode     {ms('decode_ms')} (work, part of receive)\n"
            f"  answers {s['answers']} ({ms('answer_ms')}), reconnects {s['reconnects']}, warnings {s['warnings']}\n")


def _source_options(pairs: list[str]) -> dict[str, str]:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InputError(f"--source-option wants KEY=VALUE, got {pair!r}")
        options[key] = value
    return options


def _stream_live(args: argparse.Namespace, pipe: Pipeline) -> int:
    """Run --live. Ctrl-C or SIGTERM is the normal end of a live run: it stops streaming, answers what was
    asked, prints the summary and exits 0; a second Ctrl-C aborts at once (exit 130). An error of the
    source (e.g. reconnects used up) prints the summary, then the error line, and exits 1."""
    from ..media.live_sources import open_source

    source = open_source(args.live, pipe.config, realtime=args.realtime, reconnect=args.reconnect,
                         stall_timeout=args.stall_timeout, options=_source_options(args.source_option))
    output = _LiveOutput(args.json, sys.stdout, sys.stderr, status=not args.quiet)
    run = LiveRun(pipe.stream(), source, policy=args.drop_policy, latency_bound=args.latency_bound,
                  queue_size=args.queue_size, ask_every=args.ask_every, question=args.question,
                  on_event=output, **_generation(args))
    output.run = run
    try:
        stdin = sys.stdin.fileno()
    except (AttributeError, OSError, ValueError):  # no usable stdin (e.g. under a test runner)
        stdin = None
    if stdin is not None:
        threading.Thread(target=_read_questions, args=(run, stdin), name="questions", daemon=True).start()
    handled = {signal.SIGINT: None, signal.SIGTERM: None}
    in_main_thread = threading.current_thread() is threading.main_thread()

    def stop(signum: int, frame: Any) -> None:
        run.stop()
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C raises KeyboardInterrupt

    if in_main_thread:
        for signum in handled:
            handled[signum] = signal.signal(signum, stop)
    try:
        run.run()
        code = 0
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("error: interrupted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    except MirasolError as error:  # the summary is out; then the error line
        if args.debug:
            raise
        print(f"error: {describe(error)}", file=sys.stderr)
        code = EXIT_ERROR
    finally:
        if in_main_thread:
            for signum, previous in handled.items():
                signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
    if run.decoding:  # the source is still blocked in FFmpeg (e.g. opening a stream that sends nothing): its
        sys.stdout.flush()  # callbacks into a finalizing interpreter would crash it, so leave at once
        sys.stderr.flush()
        os._exit(code)
    return code


def main(argv: list[str] | None = None) -> int:
    return run_command(_parser(), _run, argv)


def _check_arguments(args: argparse.Namespace) -> None:
    if args.save_chunks is not None and args.video is None:
        raise UsageError("--save-chunks goes with --video")
    if args.save_chunks is not None:
        check_chunks_output(args.save_chunks)  # before the clip is decoded
    if args.live is None:
        answers = args.chunks is not None or (args.video is not None and args.save_chunks is None)
        if answers and args.question is None:
            raise UsageError("--question is required with --chunks, and with --video unless --save-chunks")
        if args.realtime or args.ask_every is not None:
            raise UsageError("--realtime and --ask-every go with --live")
    elif args.ask_every is not None and args.question is None:
        raise UsageError("--ask-every needs --question")



def _run(args: argparse.Namespace) -> int:
    _check_arguments(args)
    if args.info or (args.video is not None and args.question is None):  # describe, or decode into --save-chunks
        bundle = Bundle.load(args.bundle, verify=not args.no_verify)
        if args.info:
            print(describe_bundle(bundle, args.bundle))
        else:
            for _ in _decoded(args, bundle.config):
                pass
        return 0
    settings = BackendSettings(threads=args.threads, graph_threads=dict(args.graph_threads or []),
                               providers=args.provider)
    options = backend_entry(args.backend).options(settings)
    start = time.perf_counter()
    pipe = Pipeline.load(args.bundle, backend=args.backend, verify=not args.no_verify, **options)
    load_seconds = time.perf_counter() - start
    if args.live is not None:
        return _stream_live(args, pipe)
    return _answer_clip(args, pipe, load_seconds)


if __name__ == "__main__":
    sys.exit(main())
