"""mirasol-build-engines BUNDLE: TensorRT engines for a bundle's graphs, built on the device that runs them
(the library: `mirasol.runtime.tensorrt.build`)."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ..bundle.precisions import NAMES
from ..tensorrt.build import TIMING_CACHE_FILE, build_engines, memory_report
from ..tensorrt.env import BUILD_COMMAND
from ..tensorrt.plan import DEFAULT_WORKSPACE_MB, TYPINGS
from .commandline import BATCH, WORKSPACE_MB, bounded, command_parser, keyed, run_command


def _parse_axis_max(pairs: Sequence[tuple[str, int]], max_batch: int | None) -> dict[str, int]:
    result = dict(pairs)
    if max_batch is not None:
        result["batch"] = int(max_batch)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `mirasol-build-engines`; returns the exit status."""
    parser = command_parser(
        BUILD_COMMAND, "Build TensorRT engines for the graphs of BUNDLE on this GPU and record them in its manifest.",
        epilog="Examples:\n"
               "  mirasol-build-engines bundles/demo --max-batch 1\n"
               "  mirasol-build-engines bundles/demo --precision fp16 --max past_text=256 --workspace-mb 512\n"
               "  mirasol-run bundles/demo --backend tensorrt --video clip.mp4 "
               "--question 'which colour appeared first?'",
        quiet=True)
    parser.add_argument("bundle", type=Path, help="bundle directory written by mirasol-export")
    parser.add_argument("--precision", choices=NAMES,
                        help="engine precision (default: the bundle's; fp16 from an fp32 bundle only with --typing "
                             "weak)")
    parser.add_argument("--max-batch", type=BATCH, metavar="N", help="shorthand for --max batch=N")
    parser.add_argument("--max", dest="axis_max", type=keyed("AXIS", bounded(int, 0, 1 << 30)), action="append",
                        default=[], metavar="AXIS=N",
                        help="lower an axis maximum of the optimization profile (repeatable), e.g. --max past_av=256")
    parser.add_argument("--workspace-mb", type=WORKSPACE_MB, default=DEFAULT_WORKSPACE_MB, metavar="MB",
                        help="builder workspace memory pool limit")
    parser.add_argument("--graph", dest="graphs", action="append", metavar="NAME",
                        help="build only this graph (repeatable; default: every graph)")
    parser.add_argument("--typing", choices=TYPINGS, default="auto",
                        help="auto/strong: the network keeps the graph's types (the bundle's precision, its "
                             "measured fp32 layers included); weak (TensorRT 10 only): TensorRT chooses fp16/int8 "
                             "kernels layer by layer, with the rotary-angle layers pinned to fp32 (default: auto)")
    int8 = parser.add_mutually_exclusive_group()
    int8.add_argument("--int8-fp16", dest="int8_fp16", action="store_true", default=True,
                      help="int8 engines with --typing weak: let unquantized layers run in fp16 (the default)")
    int8.add_argument("--int8-fp32", dest="int8_fp16", action="store_false",
                      help="int8 engines with --typing weak: keep unquantized layers in fp32")
    parser.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=False,
                        help="allow TF32 in fp32 engines")
    parser.add_argument("--opt-level", type=bounded(int, 0, 5), metavar="0-5",
                        help="builder optimization level (default: TensorRT's)")
    parser.add_argument("--timing-cache", action=argparse.BooleanOptionalAction, default=True,
                        help=f"load and save BUNDLE/{TIMING_CACHE_FILE}")
    parser.add_argument("--force", action="store_true", help="rebuild engines that are up to date")
    parser.add_argument("--device", type=bounded(int, 0, 1023), default=0, metavar="N",
                        help="CUDA device ordinal to build on (made current before TensorRT starts)")
    parser.add_argument("--verbose", action="store_true", help="TensorRT's verbose log")
    return run_command(parser, _build_command, argv)


def _build_command(args: argparse.Namespace) -> None:
    records = build_engines(
        args.bundle, precision=args.precision, graphs=args.graphs,
        axis_max=_parse_axis_max(args.axis_max, args.max_batch), workspace_mb=args.workspace_mb, typing=args.typing,
        int8_fp16=args.int8_fp16, tf32=args.tf32, optimization_level=args.opt_level, timing_cache=args.timing_cache,
        force=args.force, device=args.device, verbose=args.verbose,
        progress=None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True)))
    for line in memory_report(records):
        print(line)


if __name__ == "__main__":
    sys.exit(main())
