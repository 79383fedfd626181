"""Measure the carried AV KV cache's precision over long streams: fp32 state, fp16 state, int8 state.

    python -m mirasol.export.bench.kv_state FP32_BUNDLE KV8_BUNDLE [--chunks 1000] [--at 10,100,1000]

KV8_BUNDLE is FP32_BUNDLE's model exported with `--kv-cache int8`. The same chunks (held-out synthetic clips, one
after another, so the scene changes every clip) stream through three streams:
- fp32: FP32_BUNDLE as it is (the reference);
- fp16 state: FP32_BUNDLE with its AV KV window rounded to float16 after every chunk (what a graph carrying fp16 state
  carries, with everything else equal);
- int8 state: KV8_BUNDLE.
Per chunk, each stream's av_context error against fp32 (relative: ||got - fp32|| / ||fp32||); the table gives it at
the chunks asked for (the median of the 9 chunks around each, since single chunks vary), the worst over the whole
stream, and the carried window's bytes. At the end all three answer the same questions (greedy): identical answers
to fp16 state's and to fp32's. Bounded means: no larger at chunk 1,000 than at chunk 10.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mirasol.calibration.data import load_clips
from mirasol.calibration.kv_cache import int8_states, kv_states
from mirasol.runtime.bundle.manifest import Manifest
from mirasol.runtime.cli.commandline import COUNT, SEED, UsageError, command_parser, existing_dir, run_command
from mirasol.runtime.pipeline import Pipeline

QUESTIONS = 3  # of the last clip's, asked at the end


def measure(fp32_bundle: Path, kv8_bundle: Path, chunks: int = 1000, at: Sequence[int] = (10, 100, 1000),
            seed: int = 101, max_new_tokens: int = 16) -> dict[str, Any]:
    manifest = Manifest.read(kv8_bundle)
    if not int8_states(manifest):
        raise SystemExit(f"error: {kv8_bundle} carries no int8 KV cache (export it with --kv-cache int8)")
    states = [s.name for s in kv_states(Manifest.read(fp32_bundle))]
    with Pipeline.load(fp32_bundle, threads=1) as fp32, Pipeline.load(kv8_bundle, threads=1) as kv8:
        per_clip = max(1, int(fp32.config["num_frames"]) // int(fp32.config["frames_per_chunk"]))
        clips = load_clips("synthetic", fp32.config, clips=1, held_out=-(-chunks // per_clip), seed=seed).held_out
        reference, half, int8 = fp32.stream(), fp32.stream(), kv8.stream()
        errors: dict[str, list[float]] = {"fp16 state": [], "int8 state": []}
        pushed = 0
        for clip in clips:
            video, audio = clip.load()
            for chunk_video, chunk_audio in fp32.split_clip(video, audio):
                if pushed == chunks:
                    break
                want = reference.push(chunk_video, chunk_audio)
                got_half = half.push(chunk_video, chunk_audio)
                for name in states:  # fp16 state: the window rounded as a float16 graph would carry it
                    half.state[name] = half.state[name].astype(np.float16).astype(np.float32)
                got_int8 = int8.push(chunk_video, chunk_audio)
                norm = float(np.linalg.norm(want)) or 1.0
                errors["fp16 state"].append(float(np.linalg.norm(got_half - want)) / norm)
                errors["int8 state"].append(float(np.linalg.norm(got_int8 - want)) / norm)
                pushed += 1
        answers = []
        for question in clips[-1].questions[:QUESTIONS]:
            tokens = {name: stream.token_ids(question, max_new_tokens)[0]
                      for name, stream in (("fp32", reference), ("fp16 state", half), ("int8 state", int8))}
            answers.append({"question": question, **{k: fp32.tokenizer.decode(v) for k, v in tokens.items()},
                            "int8_equals_fp16": tokens["int8 state"] == tokens["fp16 state"],
                            "int8_equals_fp32": tokens["int8 state"] == tokens["fp32"]})
        window_bytes = {"fp32": sum(reference.state[n].nbytes for n in states),
                        "fp16 state": sum(reference.state[n].nbytes for n in states) // 2,
                        "int8 state": sum(int8.state[n].nbytes for n in states)}
    at = [a for a in at if a <= pushed]
    return {"fp32_bundle": str(fp32_bundle), "kv8_bundle": str(kv8_bundle), "chunks": pushed,
            "chunks_per_clip": per_clip, "window_chunks": int(manifest.config["av_window_chunks"]),
            "error_at": {name: {str(a): _around(e, a) for a in at} for name, e in errors.items()},
            "max_error": {name: max(e[1:], default=0.0) for name, e in errors.items()},
            "window_bytes_per_stream": window_bytes, "answers": answers,
            "note": "relative av_context error against the fp32 stream, median of the 9 chunks around each point"}


def _around(errors: list[float], chunk: int) -> float:
    """The median error of the chunks around `chunk` (1-based), within the stream."""
    low, high = max(1, chunk - 4), min(len(errors), chunk + 4)
    return float(np.median(errors[low - 1:high]))


def to_markdown(result: dict[str, Any]) -> str:
    points = list(next(iter(result["error_at"].values())))
    lines = [f"AV KV cache precision over {result['chunks']} chunks (clips of {result['chunks_per_clip']} chunks, "
             f"window {result['window_chunks']} chunks); {result['note']}:", "",
             "| state | " + " | ".join(f"chunk {p}" for p in points) + " | worst chunk | window bytes per stream |",
             "|---|" + "---:|" * (len(points) + 2)]
    for name, at in result["error_at"].items():
        lines.append(f"| {name} | " + " | ".join(f"{at[p]:.2e}" for p in points)
                     + f" | {result['max_error'][name]:.2e} | {result['window_bytes_per_stream'][name]:,} |")
    same16 = sum(a["int8_equals_fp16"] for a in result["answers"])
    same32 = sum(a["int8_equals_fp32"] for a in result["answers"])
    lines.append(f"\nanswers at the end: int8 state equals fp16 state in {same16}/{len(result['answers'])}, fp32 in "
                 f"{same32}/{len(result['answers'])}; fp32 window {result['window_bytes_per_stream']['fp32']:,} bytes")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("python -m mirasol.export.bench.kv_state", __doc__.splitlines()[0])
    parser.add_argument("fp32_bundle", type=existing_dir, help="an fp32 bundle")
    parser.add_argument("kv8_bundle", type=existing_dir, help="the same model exported with --kv-cache int8")
    parser.add_argument("--chunks", type=COUNT, default=1000, metavar="N", help="chunks streamed")
    parser.add_argument("--at", default="10,100,1000", help="chunks to report the error at")
    parser.add_argument("--seed", type=SEED, default=101,
                        help="seed of the held-out synthetic clips (0: the seed mirasol-export calibrates with)")
    return run_command(parser, _measure, argv)


def _measure(args: argparse.Namespace) -> None:
    try:
        at = [int(a) for a in args.at.split(",")]
    except ValueError:
        raise UsageError(f"--at: expected chunk numbers separated by commas, got {args.at!r}") from None
    if not at or min(at) < 1 or max(at) > args.chunks:
        raise UsageError(f"--at: chunk numbers must be in [1, --chunks={args.chunks}], got {args.at!r}")
    print(to_markdown(measure(args.fp32_bundle, args.kv8_bundle, args.chunks, at, args.seed)))


if __name__ == "__main__":
    sys.exit(main())
