"""`mirasol-bench`: how fast the runtime is, every figure a ratio against a baseline measured in the same run.

One process run measures, for a preset (random init), a checkpoint or a bundle:

1. streaming: per-chunk latency of the runtime (ONNX Runtime, per precision) against PyTorch eager stepping
   the same model with the same carried state, and against re-running the whole clip so far per chunk;
2. flatness: per-chunk latency at chunk 1, 8, 32 and 128 of one long stream (bounded state = flat);
3. text: tokens/s of `ask` with the KV cache against PyTorch eager with a cache and against re-running the
   decoder on the whole sequence at every token (ONNX and PyTorch); time to first token;
4. overhead: the share of the stream's wall time spent outside the backend's run calls;
5. memory and start-up: peak RSS of a process that only runs the runtime against a PyTorch process doing
   the same work (both subprocesses); `Pipeline.load` time;
6. the ceiling: FLOPs of one chunk step (from the config) per second, against this machine's fp32 GEMM rate;
7. CUDA paths, where CUDA is present (else the report says "no CUDA here").
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from mirasol.runtime.bundle.precisions import NAMES as PRECISION_NAMES
from mirasol.runtime.cli.commandline import COUNT, SEED, THREADS, UsageError, command_parser, existing_dir, run_command

from .report_files import MARKDOWN_MARK, check_report_paths, write_reports

PRESETS = ("tiny", "small", "base", "mirasol3b")


def main(argv: Sequence[str] | None = None) -> int:
    parser = command_parser(
        "mirasol-bench",
        "Benchmark the runtime against PyTorch on this machine; every figure is a ratio against a baseline measured "
        "in the same run. Progress goes to stderr, the Markdown report to stdout.",
        epilog="Examples:\n"
               "  mirasol-bench --quick                          # smoke run, under a minute\n"
               "  mirasol-bench --preset small --json bench.json --markdown bench.md   # the reference CPU benchmark\n"
               "  mirasol-bench --bundle bundles/demo --precisions fp32",
        quiet=True)
    count = COUNT
    parser.add_argument("--preset", choices=PRESETS,
                        help="model size with a seeded random init (default: small; tiny with --quick)")
    parser.add_argument("--checkpoint", type=existing_dir, metavar="DIR",
                        help="a checkpoint directory instead of a preset")
    parser.add_argument("--bundle", type=existing_dir, metavar="DIR",
                        help="benchmark this bundle (no export of its precision); PyTorch baselines use --checkpoint "
                             "if given, else a random init of the bundle's config")
    parser.add_argument("--chunks", type=count, metavar="N", help="clip length in chunks (default: the config's clip)")
    parser.add_argument("--repeats", type=count, metavar="N",
                        help="timed chunk steps per engine (default 30; 5 with --quick)")
    parser.add_argument("--threads", type=THREADS, metavar="N",
                        help="intra-op threads for ONNX Runtime and PyTorch (default: all CPUs)")
    parser.add_argument("--precisions", metavar="LIST",
                        help="comma-separated runtime precisions: fp32,fp16,int8,int4 (default: all; fp32 with --quick)")
    parser.add_argument("--new-tokens", type=count, metavar="N",
                        help="new tokens per answer (default 64; 16 with --quick)")
    parser.add_argument("--seed", type=SEED, default=0, help="seed of the random init and inputs")
    parser.add_argument("--flat-chunks", type=count, metavar="N",
                        help="length of the flatness streams (default 128; 32 with --quick)")
    parser.add_argument("--calibration-data", default="synthetic", metavar="SOURCE", help="int8 calibration data")
    parser.add_argument("--calibration-clips", type=count, metavar="N",
                        help="int8 calibration clips (default 8; 2 with --quick)")
    parser.add_argument("--export-dir", type=Path, metavar="DIR",
                        help="keep the exported bundles here (default: a temporary directory)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: tiny preset, fp32, few chunks and repeats (< 60 s)")
    parser.add_argument("--json", dest="json_path", type=Path, metavar="FILE", help="write the JSON report")
    parser.add_argument("--markdown", dest="markdown_path", type=Path, metavar="FILE",
                        help="write the Markdown report (it is printed to stdout in any case)")
    return run_command(parser, _bench, argv)


def _bench(args: argparse.Namespace) -> None:
    if args.preset and args.checkpoint:
        raise UsageError("give --preset or --checkpoint, not both")
    if args.preset and args.bundle:
        raise UsageError("give --preset or --bundle, not both")
    chosen = tuple(p.strip() for p in args.precisions.split(",") if p.strip()) if args.precisions else None
    if chosen and set(chosen) - set(PRECISION_NAMES):
        raise UsageError(f"--precisions: choose from {','.join(PRECISION_NAMES)}")
    if args.json_path and args.markdown_path and args.json_path.absolute() == args.markdown_path.absolute():
        raise UsageError("--json and --markdown name the same file")
    check_report_paths(args.json_path, args.markdown_path)  # before any work: minutes of it must not end refused
    from .markdown import to_markdown
    from .run import jsonable, run_benchmark  # torch and the exporter load when a run starts (--help stays fast)

    report = run_benchmark(
        preset=args.preset, checkpoint=args.checkpoint, bundle=args.bundle, chunks=args.chunks, repeats=args.repeats,
        threads=args.threads, precisions=chosen, quick=args.quick, new_tokens=args.new_tokens, seed=args.seed,
        flat_chunks=args.flat_chunks, export_dir=args.export_dir, calibration_data=args.calibration_data,
        calibration_clips=args.calibration_clips,
        progress=None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True)))
    markdown = to_markdown(report) + MARKDOWN_MARK + "\n"
    write_reports(args.json_path, json.dumps(jsonable(report), indent=2) + "\n", args.markdown_path, markdown)
    print(markdown)


if __name__ == "__main__":
    sys.exit(main())
