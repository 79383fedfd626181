"""`mirasol-export`: PyTorch model -> validated bundle of ONNX graphs (fp32, fp16, int8).

Only the standard library and the runtime are imported here: PyTorch and the ONNX toolchain load when the command
runs, so that in a runtime-only install it names the extra that brings them.
"""
from __future__ import annotations

import argparse
import resource
import time
from collections.abc import Sequence
from pathlib import Path

from mirasol.runtime.bundle.precisions import NAMES as PRECISION_NAMES
from mirasol.runtime.bundle.precisions import get_precision
from mirasol.runtime.cli.bundle_info import format_graph_sizes
from mirasol.runtime.cli.commandline import (BATCH, COUNT, SEED, WORKSPACE_MB, UsageError, bounded, command_parser,
                                             existing_dir, run_command)
from mirasol.runtime.errors import ExportError
from mirasol.runtime.files.ownership import check_output_dir

from . import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET

PRESETS = ("tiny", "small", "base", "mirasol3b")


def default_source() -> tuple[str | None, Path | None]:
    """The built-in default: the shipped demo checkpoint when present, else the tiny preset."""
    from mirasol.model.demo_task import DEMO_CHECKPOINT

    return (None, DEMO_CHECKPOINT) if (DEMO_CHECKPOINT / "config.json").is_file() else ("tiny", None)


def main(argv: Sequence[str] | None = None) -> int:
    parser = command_parser(
        "mirasol-export",
        "Export Mirasol as a bundle: combiner, AV autoregressor and text decoder graphs (plus the text decoder's "
        "cross-attention projection), their state wiring and a manifest, validated against PyTorch. Without "
        "--preset or --checkpoint: the shipped demo model, the one that answers the demo task's questions.",
        epilog="Examples:\n"
               "  mirasol-export --precision fp32 --out bundles/demo     # the shipped demo model (the quick start)\n"
               "  mirasol-export --precision fp16                        # the same, fp16 -> bundles/demo-fp16\n"
               "  mirasol-export --preset small --out bundles/small      # random init: answers mean nothing\n"
               "  mirasol-export --preset mirasol3b --params-only        # parameter count per component",
        quiet=True)
    parser.add_argument("--preset", choices=PRESETS,
                        help="model size with a seeded random init (default: the shipped demo checkpoint)")
    parser.add_argument("--checkpoint", type=existing_dir, metavar="DIR",
                        help="a checkpoint directory (config.json + model.safetensors) instead of a preset")
    parser.add_argument("--seed", type=SEED, default=0, help="seed of the random init (with --preset)")
    parser.add_argument("--combiner", choices=["transformer", "ttm"],
                        help="with --preset: this combiner instead of the preset's (tiny: transformer, the others: "
                             "ttm)")
    parser.add_argument("--precision", choices=PRECISION_NAMES, default="fp32",
                        help="fp16: fp16 weights and compute, fp32 kept where measurement demands; int8: calibrated "
                             "Q/DQ; int4: weight-only int4 blocks (no calibration)")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help="bundle directory to write (replaced atomically; an existing one must be a bundle or "
                             "empty) (default: bundles/<model>-<precision>)")
    parser.add_argument("--opset", type=bounded(int, MIN_OPSET, MAX_OPSET), default=DEFAULT_OPSET,
                        help="ONNX opset (what the exporter writes and TensorRT 10 parses)")
    parser.add_argument("--validate", action=argparse.BooleanOptionalAction, default=True,
                        help="check every graph against PyTorch at several sizes of each dynamic axis")
    parser.add_argument("--max-batch", type=BATCH, default=4, metavar="N",
                        help="largest batch the graphs' profiles allow")
    parser.add_argument("--fp16-io", action="store_true", help="with fp16: graph inputs/outputs in fp16 too "
                                                                "(default: fp32)")
    parser.add_argument("--calibration-data", metavar="SOURCE",
                        help="int8 and --kv-cache int8: a directory of media files or .npz chunk files (mirasol-run "
                             "--save-chunks), or 'synthetic'; int4: where its accuracy report's held-out clips come "
                             "from (default synthetic)")
    parser.add_argument("--calibration-clips", type=COUNT, default=16, metavar="N",
                        help="int8, --kv-cache int8: clips to calibrate on")
    parser.add_argument("--int8-target", choices=["cpu", "cpu-dynamic", "tensorrt"],
                        help="int8: the runtime the quantization is made for: cpu / cpu-dynamic = ONNX Runtime on "
                             "the CPU; tensorrt = symmetric Q/DQ, the only int8 TensorRT builds (mirasol-build-engines "
                             "and the onnxruntime-tensorrt backend refuse the others) (default: tensorrt with "
                             "--engine, else cpu)")
    parser.add_argument("--calibration-method", choices=["minmax", "entropy", "percentile"], default="minmax",
                        help="int8: how activation ranges are chosen from the recorded activations")
    parser.add_argument("--kv-cache", choices=["float", "int8"], default="float",
                        help="how the AV autoregressor's KV cache is carried between chunks: float (as the graph "
                             "computes) or int8 (half of fp16's bytes; fixed per-(head, channel) scales calibrated on "
                             "--calibration-data, dequantized in the graph)")
    parser.add_argument("--reference-bundle", type=existing_dir, metavar="DIR",
                        help="fp16/int8: an fp32 bundle of this model to start from instead of exporting one "
                             "(checked against the model)")
    parser.add_argument("--engine", action="store_true",
                        help="also build TensorRT engines for this GPU (needs TensorRT; or later: "
                             "mirasol-build-engines)")
    parser.add_argument("--workspace-mb", type=WORKSPACE_MB, default=1024, metavar="MB",
                        help="--engine: TensorRT workspace limit")
    parser.add_argument("--triton", dest="triton_dir", type=Path, metavar="DIR",
                        help="also write a Triton model repository serving the bundle here (defaults of "
                             "mirasol-triton)")
    parser.add_argument("--params-only", action="store_true",
                        help="print the parameter count per component and exit")
    return run_command(parser, _export, argv)


def _export(args: argparse.Namespace) -> None:
    if args.preset and args.checkpoint:
        raise UsageError("give --preset or --checkpoint, not both")
    if args.combiner and not args.preset:
        raise UsageError("--combiner changes a --preset; a checkpoint's combiner is in its config")
    if get_precision(args.precision).needs_calibration and args.calibration_data is None and not args.params_only:
        raise UsageError(f"--precision {args.precision} needs --calibration-data (media dir, .npz dir or 'synthetic')")
    if args.kv_cache == "int8" and args.calibration_data is None and not args.params_only:
        raise UsageError("--kv-cache int8 needs --calibration-data for its scales (media dir, .npz dir or 'synthetic')")
    if args.int8_target is None:
        args.int8_target = "tensorrt" if args.engine else "cpu"
    elif args.engine and args.precision == "int8" and args.int8_target != "tensorrt":
        raise UsageError(f"--engine builds TensorRT engines, which cannot be built from --int8-target "
                         f"{args.int8_target} (uint8 activations with zero points): use --int8-target tensorrt")
    import torch
    from mirasol.calibration.quantize import CalibrationOptions
    from mirasol.model import build_model, count_parameters
    from mirasol.runtime.bundle.reports import format_validation

    from .bundle import export_bundle

    def say(line: str) -> None:
        print(line, flush=True)

    progress = (lambda line: None) if args.quiet else say
    preset, checkpoint = (args.preset, args.checkpoint) if args.preset or args.checkpoint else default_source()
    name = preset or Path(checkpoint).name  # type: ignore[arg-type]
    out = args.out or Path("bundles") / f"{name}-{args.precision}"
    if not args.params_only:
        check_output_dir(out, "bundle")  # before any work: an --out holding anything not ours is refused
    start = time.perf_counter()
    if args.params_only:
        from mirasol.model import Mirasol, get_preset
        with torch.device("meta"):
            model = Mirasol(get_preset(preset, args.combiner)) if preset else build_model(checkpoint=checkpoint)
    else:
        progress(f"building model {name} ({'checkpoint ' + str(checkpoint) if checkpoint else f'seed {args.seed}'})")
        model = build_model(preset or "tiny", seed=args.seed, checkpoint=checkpoint, combiner=args.combiner)
    counts = count_parameters(model)
    say("parameters: " + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in counts.items()))
    if args.params_only:
        return
    if args.triton_dir is not None:
        from mirasol.runtime.triton.repository import check_repository
        check_repository(args.triton_dir)  # before the export, not after it
    calibration = None
    if args.calibration_data is not None:
        calibration = CalibrationOptions(args.calibration_data, clips=args.calibration_clips,
                                         target=args.int8_target, method=args.calibration_method)
    manifest = export_bundle(model, out, precision=args.precision, opset=args.opset, validate=args.validate,
                             max_batch=args.max_batch, reference=args.reference_bundle, fp16_io=args.fp16_io,
                             calibration=calibration, kv=args.kv_cache, release_model=True, progress=progress)
    say("\n" + format_graph_sizes(out, manifest))
    if manifest.validation:
        say("\n" + format_validation(manifest.validation))
    from mirasol.runtime.tensorrt.plan import int8_problem
    if int8_problem(manifest, out) is None:  # every bundle TensorRT may build: fp32, fp16, int8 for TensorRT
        from mirasol.export.tensorrt.readiness import check_bundle
        readiness = check_bundle(out)
        say("\nTensorRT readiness: " + ("ok" if readiness.ok and not readiness.warnings else "\n" + readiness.format()))
        if args.engine:
            if not readiness.ok:
                raise ExportError(f"the TensorRT readiness check found errors in {out} (above): no engines built")
            from mirasol.runtime.tensorrt.build import build_engines
            build_engines(out, axis_max={"batch": args.max_batch}, workspace_mb=args.workspace_mb, progress=progress)
    else:
        say(f"\nTensorRT readiness: not checked, this bundle is not for TensorRT (--int8-target {args.int8_target} is "
            f"for ONNX Runtime on the CPU; for TensorRT export with --int8-target tensorrt)")
    if args.triton_dir is not None:
        from mirasol.runtime.triton.repository import write_repository
        served = write_repository(out, args.triton_dir)
        say(f"\nwrote Triton model repository {args.triton_dir} (model {served.name!r}; see mirasol-triton -h)")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    say(f"\nwrote {out} ({args.precision}) in {time.perf_counter() - start:.1f}s, peak memory {peak:.0f} MB "
        f"(mirasol-run {out} --info describes it)")
