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

import json
from pathlib import Path

import click

from mirasol.runtime.precision import NAMES as PRECISION_NAMES

from .markdown import to_markdown


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--preset", type=click.Choice(["tiny", "small", "base", "mirasol3b"]),
              help="Model size with a seeded random init. Default: small (tiny with --quick).")
@click.option("--checkpoint", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A checkpoint directory instead of a preset.")
@click.option("--bundle", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Benchmark this bundle (no export of its precision). PyTorch baselines use --checkpoint "
                   "if given, else a random init of the bundle's config.")
@click.option("--chunks", type=int, help="Clip length in chunks (default: the config's clip).")
@click.option("--repeats", type=int, help="Timed chunk steps per engine (default 30; 5 with --quick).")
@click.option("--threads", type=int, help="Intra-op threads for ONNX Runtime and PyTorch (default: all CPUs).")
@click.option("--precisions", default=None,
              help="Comma-separated runtime precisions: fp32,fp16,int8 (default all; fp32 with --quick).")
@click.option("--new-tokens", type=int, help="New tokens per answer (default 64; 16 with --quick).")
@click.option("--seed", default=0, show_default=True, help="Seed of the random init and inputs.")
@click.option("--flat-chunks", type=int, help="Length of the flatness streams (default 128; 32 with --quick).")
@click.option("--calibration-data", default="synthetic", show_default=True, help="int8 calibration data.")
@click.option("--calibration-clips", type=int, help="int8 calibration clips (default 8; 2 with --quick).")
@click.option("--export-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Keep the exported bundles here (default: a temporary directory).")
@click.option("--quick", is_flag=True, help="Smoke run: tiny preset, fp32, few chunks and repeats (< 60 s).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Write the JSON report.")
@click.option("--markdown", "markdown_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the Markdown report (it is printed to stdout in any case).")
@click.option("--quiet", is_flag=True, help="No progress lines on stderr.")
def main(preset: str | None, checkpoint: Path | None, bundle: Path | None, chunks: int | None,
         repeats: int | None, threads: int | None, precisions: str | None, new_tokens: int | None, seed: int,
         flat_chunks: int | None, calibration_data: str, calibration_clips: int | None,
         export_dir: Path | None, quick: bool, json_path: Path | None, markdown_path: Path | None,
         quiet: bool) -> None:
    """Benchmark the runtime against PyTorch on this machine; every figure is a ratio against a baseline
    measured in the same run.

    \b
    Examples:
      mirasol-bench --quick                          # smoke run, under a minute
      mirasol-bench --preset small --json out.json   # the reference CPU benchmark
      mirasol-bench --bundle bundles/demo-fp32 --precisions fp32
    """
    if preset and checkpoint:
        raise click.UsageError("give --preset or --checkpoint, not both")
    if preset and bundle:
        raise click.UsageError("give --preset or --bundle, not both")
    chosen = tuple(p.strip() for p in precisions.split(",") if p.strip()) if precisions else None
    if chosen and set(chosen) - set(PRECISION_NAMES):
        raise click.UsageError(f"--precisions: choose from {','.join(PRECISION_NAMES)}")
    from .run import jsonable, run_benchmark  # torch and the exporter load when a run starts (--help stays fast)

    report = run_benchmark(
        preset=preset, checkpoint=checkpoint, bundle=bundle, chunks=chunks, repeats=repeats, threads=threads,
        precisions=chosen, quick=quick, new_tokens=new_tokens, seed=seed, flat_chunks=flat_chunks,
        export_dir=export_dir, calibration_data=calibration_data, calibration_clips=calibration_clips,
        progress=None if quiet else (lambda line: click.echo(line, err=True)))
    markdown = to_markdown(report)
    if json_path:
        json_path.write_text(json.dumps(jsonable(report), indent=2) + "\n")
    if markdown_path:
        markdown_path.write_text(markdown)
    click.echo(markdown)


if __name__ == "__main__":
    main()
