"""`mirasol-run`: answer a question about a clip with a bundle (numpy + onnxruntime only)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from .bundle import BoundedNpz
from .errors import InputError, MirasolError
from .pipeline import Pipeline


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mirasol-run",
        description="Stream a clip through a Mirasol bundle chunk by chunk and answer a question about it.",
        epilog="Example: mirasol-run bundles/demo-fp32 --video clip.mp4 --question 'which colour appeared first?'")
    parser.add_argument("bundle", type=Path, help="bundle directory written by mirasol-export")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--video", type=Path, help="a video file (mp4, mkv, webm, avi); needs the media extra")
    source.add_argument("--chunks", type=Path,
                        help=".npz with 'video' [N*F, 3, H, W] float32 in [0, 1] and 'audio' log-mel [n_mels, N*A]")
    parser.add_argument("--question", required=True, help="the question to answer")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--backend", choices=["onnxruntime", "tensorrt"], default="onnxruntime")
    parser.add_argument("--provider", action="append",
                        help="onnxruntime execution provider (repeatable, in order); default CPUExecutionProvider")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads")
    parser.add_argument("--no-verify", action="store_true", help="skip the graph checksums (faster start)")
    parser.add_argument("--json", action="store_true", help="print the answer, tokens and timings as JSON")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def _chunks(args: argparse.Namespace, config: dict) -> tuple[np.ndarray, np.ndarray]:
    if args.video is not None:
        from .media import load_clip
        return load_clip(args.video, config)
    with BoundedNpz(args.chunks, f"chunks file {args.chunks}", max_bytes=8 << 30, error=InputError) as npz:
        return (npz.read("video", np.float32, ((1, 1 << 24), (3, 3), (1, 1 << 14), (1, 1 << 14))),
                npz.read("audio", np.float32, ((1, 1 << 12), (1, 1 << 28))))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        options = {}
        if args.backend == "onnxruntime":
            options = {"providers": args.provider, "threads": args.threads}
        start = time.perf_counter()
        pipe = Pipeline.load(args.bundle, backend=args.backend, verify=not args.no_verify, **options)
        load_seconds = time.perf_counter() - start
        start = time.perf_counter()
        video, audio = _chunks(args, pipe.config)
        decode_seconds = time.perf_counter() - start
        stream = pipe.stream()
        start = time.perf_counter()
        for chunk_video, chunk_audio in pipe.split_clip(video, audio):
            stream.push(chunk_video, chunk_audio)
        stream_seconds = time.perf_counter() - start
        start = time.perf_counter()
        tokens = stream.token_ids(args.question, args.max_new_tokens, temperature=args.temperature,
                                  top_k=args.top_k, top_p=args.top_p, seed=args.seed)[0]
        answer_seconds = time.perf_counter() - start
        answer = pipe.tokenizer.decode(tokens)
    except MirasolError as error:
        if args.debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({
            "answer": answer, "tokens": tokens, "chunks": stream.chunks,
            "timings": {"load_s": load_seconds, "decode_s": decode_seconds, "stream_s": stream_seconds,
                        "answer_s": answer_seconds, **stream.timings.to_dict()}}, indent=2))
    else:
        print(answer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
