"""`mirasol-export`: PyTorch model -> validated bundle of ONNX graphs (fp32, fp16, int8)."""
from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

import click

from mirasol.runtime.errors import MirasolError
from mirasol.runtime.output import check_output_dir
from mirasol.runtime.precision import NAMES as PRECISION_NAMES


def default_source() -> tuple[str | None, Path | None]:
    """The built-in default: the shipped demo checkpoint when present, else the tiny preset."""
    from mirasol.model.demo_task import DEMO_CHECKPOINT

    return (None, DEMO_CHECKPOINT) if (DEMO_CHECKPOINT / "config.json").is_file() else ("tiny", None)


def human_bytes(size: float) -> str:
    for unit in ("B", "KB", "MB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.2f} GB"


def run_cli(main_body, debug: bool) -> None:
    """Run a CLI body: MirasolErrors (and OS errors: a full disk, a missing file) exit 1 with one clear line (the
    traceback only with --debug)."""
    try:
        main_body()
    except (MirasolError, OSError, ValueError) as error:
        if debug:
            raise
        click.echo(f"error: {error}", err=True)
        sys.exit(1)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--preset", type=click.Choice(["tiny", "small", "base", "mirasol3b"]),
              help="Model size with a seeded random init. Default: the shipped demo checkpoint.")
@click.option("--checkpoint", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A checkpoint directory (config.json + model.safetensors) instead of a preset.")
@click.option("--seed", default=0, show_default=True, help="Seed of the random init (with --preset).")
@click.option("--precision", type=click.Choice(PRECISION_NAMES), default="fp32", show_default=True,
              help="fp16: fp16 weights and compute, fp32 kept where measurement demands; int8: calibrated Q/DQ.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Bundle directory to write (replaced atomically; an existing one must be a bundle or empty). "
                   "Default: bundles/<model>-<precision>.")
@click.option("--opset", default=18, show_default=True, help="ONNX opset.")
@click.option("--validate/--no-validate", default=True, show_default=True,
              help="Check every graph against PyTorch at several sizes of each dynamic axis.")
@click.option("--max-batch", default=4, show_default=True, help="Largest batch the graphs' profiles allow.")
@click.option("--fp16-io", is_flag=True, help="With fp16: graph inputs/outputs in fp16 too (default fp32).")
@click.option("--calibration-data", type=str,
              help="int8: a directory of media files or .npz chunk files, or 'synthetic'.")
@click.option("--calibration-clips", default=16, show_default=True, help="int8: clips to calibrate on.")
@click.option("--int8-flavour", type=click.Choice(["cpu", "cpu-dynamic", "tensorrt"]), default="cpu", show_default=True,
              help="int8: cpu = ONNX Runtime on x86 (measured fastest here); tensorrt = symmetric Q/DQ for TensorRT.")
@click.option("--calibration-method", type=click.Choice(["minmax", "entropy", "percentile"]), default="minmax",
              show_default=True, help="int8: how activation ranges are chosen from the recorded activations.")
@click.option("--reference-bundle", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="fp16/int8: an fp32 bundle of this model to start from instead of exporting one (checked "
                   "against the model).")
@click.option("--engine", is_flag=True,
              help="Also build TensorRT engines for this GPU (needs TensorRT; or later: mirasol-build-engines).")
@click.option("--workspace-mb", default=1024, show_default=True, help="--engine: TensorRT workspace limit.")
@click.option("--triton", "triton_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Also write a Triton model repository serving the bundle here (defaults of mirasol-triton).")
@click.option("--params-only", is_flag=True, help="Print the parameter count per component and exit.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def main(preset: str | None, checkpoint: Path | None, seed: int, precision: str, out: Path | None, opset: int,
         validate: bool, max_batch: int, fp16_io: bool, calibration_data: str | None, calibration_clips: int,
         int8_flavour: str, calibration_method: str, reference_bundle: Path | None,
         engine: bool, workspace_mb: int, triton_dir: Path | None, params_only: bool, debug: bool) -> None:
    """Export Mirasol as a bundle: combiner, AV autoregressor and text decoder graphs (plus the text
    decoder's cross-attention projection), their state wiring and a manifest, validated against PyTorch.

    \b
    Examples:
      mirasol-export --precision fp16                 # the shipped demo model, fp16
      mirasol-export --preset small --out bundles/s   # random-init small preset, fp32
      mirasol-export --preset mirasol3b --params-only # parameter count per component
    """
    def body() -> None:
        import torch

        from mirasol.model import build_model, count_parameters

        from mirasol.calibration.quantize import CalibrationOptions
        from mirasol.runtime.reports import format_validation

        from .bundle import export_bundle

        nonlocal preset, checkpoint, out
        if preset and checkpoint:
            raise click.UsageError("give --preset or --checkpoint, not both")
        if not preset and not checkpoint:
            preset, checkpoint = default_source()
        name = preset or Path(checkpoint).name  # type: ignore[arg-type]
        out = out or Path("bundles") / f"{name}-{precision}"
        if not params_only:
            check_output_dir(out, "bundle")  # before any work: an --out holding anything not ours is refused
        start = time.perf_counter()
        if params_only:
            from mirasol.model import Mirasol, get_preset
            with torch.device("meta"):
                model = Mirasol(get_preset(preset)) if preset else build_model(checkpoint=checkpoint)
        else:
            click.echo(f"building model {name} ({'checkpoint ' + str(checkpoint) if checkpoint else f'seed {seed}'})")
            model = build_model(preset or "tiny", seed=seed, checkpoint=checkpoint)
        counts = count_parameters(model)
        click.echo("parameters: " + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in counts.items()))
        if params_only:
            return
        if triton_dir is not None:
            from mirasol.runtime.triton_repo import KIND
            check_output_dir(triton_dir, KIND)  # before the export, not after it
        calibration = None
        if precision == "int8":
            if calibration_data is None:
                raise click.UsageError("--precision int8 needs --calibration-data (media dir, .npz dir or 'synthetic')")
            calibration = CalibrationOptions(calibration_data, clips=calibration_clips, flavour=int8_flavour,
                                             method=calibration_method)
        manifest = export_bundle(model, out, precision=precision, opset=opset, validate=validate,
                                 max_batch=max_batch, reference=reference_bundle, fp16_io=fp16_io,
                                 calibration=calibration, progress=click.echo)
        click.echo("")
        total = 0
        for graph in manifest.graphs.values():
            size = sum((out / f).stat().st_size for f in (graph.file, *graph.external_data))
            total += size
            click.echo(f"  {graph.file:<24} {human_bytes(size):>10}")
        click.echo(f"  {'total':<24} {human_bytes(total):>10}")
        if manifest.validation:
            click.echo("\n" + format_validation(manifest.validation))
        if precision != "int8" or int8_flavour == "tensorrt":
            from mirasol.export.tensorrt_readiness import check_bundle
            readiness = check_bundle(out)
            click.echo("\nTensorRT readiness: " + ("ok" if readiness.ok and not readiness.warnings
                                                      else "\n" + readiness.format()))
            if engine:
                from mirasol.runtime.tensorrt_build import build_engines
                build_engines(out, precision=None if precision == "int8" else precision,
                              axis_max={"batch": max_batch}, workspace_mb=workspace_mb, progress=click.echo)
        else:
            click.echo("\nTensorRT readiness: skipped (the int8 cpu flavours are for ONNX Runtime; "
                       "use --int8-flavour tensorrt)")
        if triton_dir is not None:
            from mirasol.runtime.triton_repo import write_repository
            model = write_repository(out, triton_dir)
            click.echo(f"\nwrote Triton model repository {triton_dir} (model {model.name!r}; see mirasol-triton -h)")
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        click.echo(f"\nwrote {out} ({precision}) in {time.perf_counter() - start:.1f}s, peak memory {peak:.0f} MB")

    run_cli(body, debug)
