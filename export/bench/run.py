"""The run: settle the settings, build the model source, export and load the bundles, then measure the sections
in order into one report (a dict; `jsonable` makes it strict JSON).

Engines that are compared are timed round-robin (one block of each in turn), so a change in machine load during
the run falls on all of them alike; ratios are what to read, absolute times move with the machine.
"""
from __future__ import annotations

import math
import os
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import torch

from mirasol.runtime.backends.onnxruntime import OnnxRuntimeBackend
from mirasol.runtime.files.atomic import prepare_output_dir
from mirasol.runtime.pipeline import Pipeline
from mirasol.runtime.bundle.precisions import NAMES as PRECISION_NAMES
from mirasol.runtime.bundle.tokenizer import ByteTokenizer

from .ceiling import ceiling
from .context import Run, chunk_pool
from .costs import costs
from .cuda import cuda
from .floors import floors
from .report_files import REPORT_FORMAT
from .memory import memory
from .source import Progress, Source, build_source, export_bundles
from .stats import stats_ms, timed
from .streaming import FLAT_POINTS, flatness, overhead, streaming
from .targets import targets
from .text import text

REPORT_VERSION = 1
QUESTION = "What is happening in this clip?"
SPIN_KEY = "session.intra_op.allow_spinning"
# the measured sections in the order they run (a later one may read an earlier one's entry in run.report)
MEASURES: dict[str, Callable[[Run], Any]] = {
    "streaming": streaming, "overhead": overhead, "flatness": flatness, "text": text, "memory": memory,
    "ceiling": ceiling, "floors": floors, "costs": costs, "cuda": cuda, "targets": targets}
SECTIONS = ("export", *MEASURES)


def available_cpus() -> int:
    """CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# vector extensions int8 and int4 kernels use, as /proc/cpuinfo names them -> how the report names them
VECTOR_EXTENSIONS = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_vnni": "AVX512-VNNI", "avx_vnni": "AVX-VNNI",
                     "avx512_bf16": "AVX512-BF16", "amx_tile": "AMX", "amx_int8": "AMX-INT8", "amx_bf16": "AMX-BF16",
                     "asimddp": "NEON dot product", "i8mm": "Armv8 I8MM", "sve": "SVE"}


def cpu_description() -> dict[str, Any]:
    """The CPU model and the vector extensions it has (of VECTOR_EXTENSIONS; int8 and int4 gains depend on them),
    from /proc/cpuinfo where there is one."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {"cpu_model": platform.processor() or None, "vector_extensions": None}
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", fields.get("Features", "")).split())
    model = fields.get("model name") or fields.get("Model") or fields.get("CPU part")
    return {"cpu_model": model, "vector_extensions": [name for flag, name in VECTOR_EXTENSIONS.items() if flag in flags]}


def run_benchmark(preset: str | None = None, checkpoint: str | Path | None = None, bundle: str | Path | None = None,
                  chunks: int | None = None, repeats: int | None = None, threads: int | None = None,
                  precisions: Sequence[str] | None = None, quick: bool = False, new_tokens: int | None = None,
                  seed: int = 0, flat_chunks: int | None = None, export_dir: str | Path | None = None,
                  calibration_data: str = "synthetic", calibration_clips: int | None = None,
                  suppress_eos: bool = True, question: str = QUESTION, progress: Progress | None = None
                  ) -> dict[str, Any]:
    """Run every section of the benchmark in this process (plus its measuring subprocesses); the report.

    preset / checkpoint / bundle: the model (a bundle alone: PyTorch baselines use a random init of its config).
    chunks: the clip length (chunks pushed before asking; the naive baseline re-runs this many).
    repeats: timed chunk steps per engine. quick: tiny preset, fp32, few chunks and repeats (a smoke run).
    """
    begun = time.perf_counter()
    say = progress or (lambda _: None)

    def log(message: str) -> None:
        say(f"[{time.perf_counter() - begun:6.1f}s] {message}")

    if sum(x is not None for x in (preset, checkpoint)) > 1:
        raise ValueError("give a preset or a checkpoint, not both")
    preset = preset or ("tiny" if quick else "small")
    threads = int(threads or available_cpus())
    precisions = tuple(precisions or (("fp32",) if quick else PRECISION_NAMES))
    unknown = sorted(set(precisions) - set(PRECISION_NAMES))
    if unknown:
        raise ValueError(f"unknown precisions {unknown}; choose from {PRECISION_NAMES}")
    repeats = int(repeats or (5 if quick else 30))
    calibration_clips = int(calibration_clips or (2 if quick else 8))
    load_start = os.getloadavg()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with ExitStack() as stack:
            if export_dir is None:
                workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mirasol-bench-")))
            else:
                workdir = prepare_output_dir(export_dir, "benchmark export directory")
            source = build_source(preset, checkpoint, bundle, seed, suppress_eos)
            config = source.model.config
            chunks = int(chunks or (max(2, config.av_window_chunks + 1) if quick else config.num_chunks))
            flat_chunks = int(flat_chunks or (32 if quick else max(FLAT_POINTS)))
            log(f"model: {source.label}; {threads} threads; exporting {', '.join(precisions)}")
            paths, export_report = export_bundles(source, bundle, precisions, workdir, calibration_data,
                                                  calibration_clips, log)
            run = _start(source, paths, export_report, chunks=chunks, repeats=repeats, threads=threads,
                         quick=quick, new_tokens=new_tokens, seed=seed, flat_chunks=flat_chunks,
                         question=question, log=log)
            for name, measure in MEASURES.items():
                run.report[name] = measure(run)
            if export_dir is None:  # the temporary directory goes with this block
                for entry in export_report.values():
                    if entry.get("source") == "exported":
                        entry["path"] = None
    finally:
        torch.set_num_threads(previous_threads)
    run.report["meta"].update({
        "load_average_start": list(load_start), "load_average_end": list(os.getloadavg()),
        "wall_seconds": time.perf_counter() - begun})
    return run.report


def _start(source: Source, paths: dict[str, Path], export_report: dict[str, Any], *, chunks: int, repeats: int,
           threads: int, quick: bool, new_tokens: int | None, seed: int, flat_chunks: int, question: str,
           log: Progress) -> Run:
    """The run context: inputs, settings, loaded pipelines, and the report's head (format, meta, export)."""
    config = source.model.config
    warmup = config.av_window_chunks + 2  # past the window: the carried state is at its full size
    pool = chunk_pool(config, 8, seed)
    prompt = ByteTokenizer().prompt(question)
    new_tokens = int(min(new_tokens or (16 if quick else 64), config.max_text_len - len(prompt)))
    block = 1 if quick else 5
    rounds = max(1, math.ceil(repeats / block))
    report: dict[str, Any] = {
        "format": REPORT_FORMAT, "version": REPORT_VERSION,
        "meta": {
            "source": source.label, "model_note": source.model_note, "preset": config.preset,
            "spinning_by_default": _spinning_by_default(threads),
            "config": config.to_dict(), "threads": threads, "chunks": chunks, "repeats": rounds * block,
            "block": block, "warmup_chunks": warmup, "quick": quick, "new_tokens": new_tokens,
            "question": question, "prompt_tokens": len(prompt), "eos_logit_zeroed": source.eos_zeroed,
            "machine": {"cpus": os.cpu_count(), "available_cpus": available_cpus(), "platform": platform.platform(),
                        "processor": platform.machine(), **cpu_description()},
            "versions": {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
                         "onnxruntime": onnxruntime.__version__},
            "note": "ratios are measured in one run, the engines timed in turn (blocks of calls, round-robin); "
                    "absolute times depend on the machine's load at the time"},
        "export": export_report,
    }
    pipes, load_times = _load_pipelines(paths, threads, quick, export_report)
    primary = "fp32" if "fp32" in pipes else next(iter(pipes), None)
    if primary is None:
        raise RuntimeError(f"no bundle could be made or loaded: {export_report}")
    # for information, beside the same-thread comparisons: the primary runtime on one thread, and with ONNX
    # Runtime's spin-waiting the other way round from the backend's default (on a busy machine spinning
    # threads take the CPU the work needs; on a quiet one they save wake-ups)
    extras: dict[str, Pipeline] = {}
    if threads > 1 and not quick:
        extras[f"{primary}_1thread"] = Pipeline.load(paths[primary], threads=1)
        spin, pipe = _flipped_spinning_pipeline(paths[primary], threads)
        extras[f"{primary}_{spin}"] = pipe
    return Run(source=source, paths=paths, pipes=pipes, extras=extras, primary=primary, load_times=load_times,
               pool=pool, torch_pool=[(torch.from_numpy(v), torch.from_numpy(a)) for v, a in pool],
               question=question, prompt=prompt, new_tokens=new_tokens, chunks=chunks, rounds=rounds, block=block,
               warmup=warmup, repeats=repeats, flat_chunks=flat_chunks, threads=threads, quick=quick, log=log,
               report=report)


def _load_pipelines(paths: dict[str, Path], threads: int, quick: bool, export_report: dict[str, Any]
                    ) -> tuple[dict[str, Pipeline], dict[str, Any]]:
    """A pipeline per bundle, and its warm load time (median of a few; the cold load is in the memory section).
    A bundle that does not load is marked failed in the export report."""
    pipes: dict[str, Pipeline] = {}
    load_times: dict[str, Any] = {}
    for precision, path in paths.items():
        try:
            seconds = [timed(lambda: Pipeline.load(path, threads=threads))[0] for _ in range(2 if quick else 3)]
            pipes[precision] = Pipeline.load(path, threads=threads)
            load_times[precision] = stats_ms(seconds)
        except Exception as failure:  # noqa: BLE001 - reported; the other bundles still run
            export_report[precision] = {"status": "failed", "reason": f"load: {type(failure).__name__}: {failure}"}
    return pipes, load_times


def _spinning_by_default(threads: int) -> bool:
    """Whether the runtime's ONNX Runtime backend, as loaded by default, lets idle threads spin-wait."""
    try:
        return OnnxRuntimeBackend(threads=threads).options.get_session_config_entry(SPIN_KEY) != "0"
    except Exception:  # noqa: BLE001 - not set: ONNX Runtime's own default, which spins
        return True


def _flipped_spinning_pipeline(path: Path, threads: int) -> tuple[str, Pipeline]:
    """The bundle on ONNX Runtime with the same threads and spin-waiting the other way round from the default:
    ("nospin", pipeline) where the default spins, ("spin", pipeline) where it does not."""
    spin = not _spinning_by_default(threads)
    return ("spin" if spin else "nospin"), Pipeline.load(path, backend=OnnxRuntimeBackend(threads=threads,
                                                                                          spinning=spin))


def jsonable(value: Any) -> Any:
    """The report as strict JSON values: string keys, lists, Python numbers, None for NaN and infinities."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    return value
