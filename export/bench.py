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

Engines that are compared are timed round-robin (one chunk of each in turn), so a change in machine load
during the run falls on all of them alike; ratios are what to read, absolute times move with the machine.
"""
from __future__ import annotations

import gc
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np

from mirasol.runtime.precision import NAMES as PRECISION_NAMES

REPORT_FORMAT = "mirasol-bench"
REPORT_VERSION = 1
QUESTION = "What is happening in this clip?"
FLAT_POINTS = (1, 8, 32, 128)
SECTIONS = ("export", "streaming", "flatness", "text", "overhead", "memory", "ceiling", "cuda", "targets")
NO_CUDA = "no CUDA here"
EXTRA_NOTES = {"1thread": "1 thread, for information",
               "nospin": "ONNX Runtime spin-waiting off (session.intra_op.allow_spinning=0), for information",
               "spin": "ONNX Runtime spin-waiting on (session.intra_op.allow_spinning=1), for information"}
EXTRA_SUFFIXES = tuple(f"_{k}" for k in EXTRA_NOTES)
Progress = Callable[[str], None]


# ---------------------------------------------------------------------------------------------- statistics
def stats_ms(seconds: Sequence[float]) -> dict[str, Any]:
    """Median, p95, mean, min (milliseconds) and the sample count of a list of durations in seconds."""
    if not seconds:
        return {"n": 0, "median_ms": None, "p95_ms": None, "mean_ms": None, "min_ms": None}
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    return {"n": int(ms.size), "median_ms": float(np.median(ms)), "p95_ms": float(np.percentile(ms, 95)),
            "mean_ms": float(ms.mean()), "min_ms": float(ms.min())}


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return float(numerator) / float(denominator)


def _median(entry: dict[str, Any] | None) -> float | None:
    return None if not entry or entry.get("status", "ok") != "ok" else entry.get("median_ms")


# ---------------------------------------------------------------------------------------------- inputs
def chunk_pool(config: Any, count: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """`count` distinct random chunks: video [F, 3, H, W] in [0, 1], audio log-mel [n_mels, A]."""
    rng = np.random.default_rng(seed)
    return [(rng.random((config.frames_per_chunk, 3, config.image_size, config.image_size), dtype=np.float32),
             rng.standard_normal((config.n_mels, config.audio_frames_per_chunk)).astype(np.float32))
            for _ in range(count)]


# ---------------------------------------------------------------------------------------------- FLOPs
def _encoder_flops(tokens: int, dim: int, layers: int, mlp_ratio: int) -> int:
    """Matmuls of `layers` pre-norm blocks on `tokens` tokens: q/k/v/out projections, QK^T, AV, MLP."""
    projections = 4 * 2 * tokens * dim * dim
    attention = 2 * (2 * tokens * tokens * dim)
    mlp = 2 * (2 * tokens * dim * dim * mlp_ratio)
    return layers * (projections + attention + mlp)


def chunk_step_flops(config: Any) -> dict[str, int]:
    """FLOPs (2*M*N*K per matmul) of one chunk step at steady state (AV cache full), per component."""
    c = config
    e, d, r = c.encoder_dim, c.d_model, c.mlp_ratio
    tv, ta, m = c.video_tokens, c.audio_tokens, c.latents_per_chunk
    video = (2 * tv * (c.tubelet_frames * 3 * c.patch_size ** 2) * e
             + _encoder_flops(tv, e, c.encoder_layers, r) + 2 * tv * e * d)
    audio = (2 * ta * (c.audio_patch_mels * c.audio_patch_frames) * e
             + _encoder_flops(ta, e, c.encoder_layers, r) + 2 * ta * e * d)
    if c.combiner == "ttm":
        mem = c.memory_size
        reads = mem + tv + ta  # memory + video + audio tokens
        writes = mem + m + tv + ta  # memory + latents + inputs
        combiner = (2 * reads * d * d + 2 * reads * d * m + 2 * m * reads * d  # read: TokenLearner
                    + _encoder_flops(m, d, c.combiner_layers, r)  # process
                    + 2 * writes * d * d + 2 * writes * d * mem + 2 * mem * writes * d)  # write: TokenLearner
    else:
        combiner = _encoder_flops(tv + ta + m, d, c.combiner_layers, r)
    keys = c.av_cache_len + m
    av = c.av_layers * (4 * 2 * m * d * d + 2 * (2 * m * keys * d) + 2 * (2 * m * d * d * r))
    return {"video_encoder": video, "audio_encoder": audio, "combiner": combiner, "av_autoregressor": av,
            "total": video + audio + combiner + av}


# ---------------------------------------------------------------------------------------------- engines
class TorchStepper:
    """PyTorch eager streaming: combiner_step + av_step with the carried state, KV cache trimmed to the window."""

    def __init__(self, model: Any, device: str = "cpu") -> None:
        import torch

        self.torch = torch
        self.model = model
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        c = model.config
        self.keep = c.av_cache_len
        self.keep_contexts = c.text_memory_chunks
        self.memory = model.initial_memory(1, self.device)
        self.past = model.av_autoregressor.empty_cache(1, self.device)
        self.index = 0
        self.contexts: list[Any] = []

    def push(self, video: Any, audio: Any) -> Any:
        torch = self.torch
        with torch.inference_mode():
            latents, self.memory = self.model.combiner_step(video[None], audio[None], self.memory)
            index = torch.full((1,), self.index, dtype=torch.long, device=self.device)
            context, past = self.model.av_step(latents, index, self.past)
            self.past = [(k[:, :, k.shape[2] - self.keep:], v[:, :, v.shape[2] - self.keep:]) for k, v in past]
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self.index += 1
        self.contexts = [*self.contexts, context][-self.keep_contexts:]
        return context

    def av_memory(self) -> Any:
        return self.torch.cat(self.contexts, dim=1)


def torch_generate(model: Any, av_memory: Any, prompt: list[int], new_tokens: int, cached: bool = True) -> list[int]:
    """Greedy tokens from the PyTorch text decoder, exactly `new_tokens` of them (EOS does not stop it).

    cached: model.text_step with the self-attention KV cache; else the whole sequence at every token.
    The cross-attention keys/values of the AV memory are computed once in both cases.
    """
    import torch

    device = av_memory.device
    tokens: list[int] = []
    with torch.inference_mode():
        cross = model.text_cross_kv(av_memory)
        empty = model.text_decoder.empty_cache(1, device)
        zero = torch.zeros(1, dtype=torch.long, device=device)
        if cached:
            past, position = empty, zero
            ids = torch.tensor([prompt], device=device)
            for _ in range(new_tokens):
                logits, past = model.text_step(ids, position, cross, past)
                position = position + ids.shape[1]
                tokens.append(int(logits[0, -1].argmax()))
                ids = torch.tensor([[tokens[-1]]], device=device)
        else:
            for _ in range(new_tokens):
                logits, _ = model.text_step(torch.tensor([prompt + tokens], device=device), zero, cross, empty)
                tokens.append(int(logits[0, -1].argmax()))
    return tokens


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


@dataclass
class Engine:
    """One thing to time: `run(i)` does the i-th step. `before`/`after` run around each of its blocks, untimed."""

    run: Callable[[int], Any]
    every: int = 1  # take part in every k-th round only
    block: int | None = None  # calls per block (default: the interleave's)
    before: Callable[[], Any] | None = None
    after: Callable[[], Any] | None = None
    budget: float | None = None  # seconds: once its calls took this long (and `least` were timed), it stops
    least: int = 2


def interleave(engines: dict[str, Engine], rounds: int, block: int = 1, pause: float = 0.01
               ) -> dict[str, list[float]]:
    """Time the engines in turn, a block of calls each, `rounds` times; seconds per call, per engine.

    A change in machine load during the run falls on every engine alike. Blocks (rather than single calls)
    and a short pause before each keep one engine's idle worker threads (ONNX Runtime and OpenMP spin for a
    while after a call) from competing with the next engine: in one process they would, in a deployment not.
    """
    times: dict[str, list[float]] = {name: [] for name in engines}
    for r in range(rounds):
        for name, engine in engines.items():
            if r % engine.every:
                continue
            if engine.budget is not None and len(times[name]) >= engine.least and sum(times[name]) >= engine.budget:
                continue
            if engine.before is not None:
                engine.before()
            time.sleep(pause)
            size = engine.block or block
            for b in range(size):
                step = r * size + b
                start = time.perf_counter()
                engine.run(step)
                times[name].append(time.perf_counter() - start)
            if engine.after is not None:
                engine.after()
    return times


def sampled_every(rounds: int, seconds_per_call: float, budget: float, most: int, least: int = 2) -> int:
    """`every` for an expensive engine: about budget / cost samples (within [least, most]) spread over the rounds."""
    wanted = max(least, min(most, int(budget / max(seconds_per_call, 1e-9))))
    return max(1, rounds // wanted)


# ---------------------------------------------------------------------------------------------- subprocesses
CHILD_PRELUDE = r'''
import json, resource, sys, time
def peak_rss_mb():
    # VmHWM: the peak RSS of this process image. ru_maxrss would also count the parent's RSS at fork time:
    # Linux keeps the larger of the pre-exec and the current high-water mark.
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
'''

RUNTIME_CHILD = CHILD_PRELUDE + r'''
start = time.perf_counter()
import numpy as np
from mirasol.runtime.pipeline import Pipeline
imported = time.perf_counter() - start
args = json.loads(sys.argv[1])
t = time.perf_counter()
pipe = Pipeline.load(args["bundle"], threads=args["threads"])
load = time.perf_counter() - t
c = pipe.config
rng = np.random.default_rng(0)
video = rng.random((c["frames_per_chunk"], 3, c["image_size"], c["image_size"]), dtype=np.float32)
audio = rng.standard_normal(tuple(pipe.chunk_inputs["audio"].shape[1:])).astype(np.float32)
stream = pipe.stream()
t = time.perf_counter()
for _ in range(args["chunks"]):
    stream.push(video, audio)
streamed = time.perf_counter() - t
t = time.perf_counter()
tokens = stream.token_ids(args["question"], args["new_tokens"])[0]
asked = time.perf_counter() - t
print(json.dumps({"peak_rss_mb": peak_rss_mb(),
                  "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "import_s": imported, "load_s": load, "stream_s": streamed, "ask_s": asked,
                  "tokens": len(tokens), "torch_imported": "torch" in sys.modules,
                  "start_to_ready_s": imported + load}))
'''

TORCH_CHILD = CHILD_PRELUDE + r'''
start = time.perf_counter()
import numpy as np
import torch
from mirasol.model import Mirasol, MirasolConfig, build_model
from mirasol.runtime.tokenizer import ByteTokenizer
imported = time.perf_counter() - start
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
t = time.perf_counter()
source = args["source"]
if source.get("checkpoint"):
    model = build_model(checkpoint=source["checkpoint"])
elif source.get("config"):
    torch.manual_seed(source["seed"])
    model = Mirasol(MirasolConfig.from_dict(source["config"])).eval()
else:
    model = build_model(source["preset"], seed=source["seed"])
load = time.perf_counter() - t
c = model.config
rng = np.random.default_rng(0)
video = torch.from_numpy(rng.random((1, c.frames_per_chunk, 3, c.image_size, c.image_size), dtype=np.float32))
audio = torch.from_numpy(rng.standard_normal((1, c.n_mels, c.audio_frames_per_chunk)).astype(np.float32))
memory, past, contexts = model.initial_memory(1), model.av_autoregressor.empty_cache(1), []
t = time.perf_counter()
with torch.inference_mode():
    for i in range(args["chunks"]):
        latents, memory = model.combiner_step(video, audio, memory)
        context, past = model.av_step(latents, torch.full((1,), i), past)
        past = [(k[:, :, k.shape[2] - c.av_cache_len:], v[:, :, v.shape[2] - c.av_cache_len:]) for k, v in past]
        contexts = (contexts + [context])[-c.text_memory_chunks:]
streamed = time.perf_counter() - t
t = time.perf_counter()
tokens = model.generate(torch.stack(contexts, dim=1), ByteTokenizer().prompt(args["question"]), args["new_tokens"])
asked = time.perf_counter() - t
print(json.dumps({"peak_rss_mb": peak_rss_mb(),
                  "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "import_s": imported, "load_s": load, "stream_s": streamed, "ask_s": asked,
                  "tokens": len(tokens), "start_to_ready_s": imported + load}))
'''

GEMM_CHILD = r'''
import json, sys, time
import numpy as np
n, repeats, big = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(0)
a = rng.standard_normal((n, n), dtype=np.float32)
b = rng.standard_normal((n, n), dtype=np.float32)
a @ b
times = []
for _ in range(repeats):
    t = time.perf_counter()
    a @ b
    times.append(time.perf_counter() - t)
# memory bandwidth as a batch-1 layer sees it: matrix-vector products over a matrix larger than the caches
w = rng.standard_normal((big, big), dtype=np.float32)
x = rng.standard_normal(big, dtype=np.float32)
w @ x
gemv = []
for _ in range(repeats):
    t = time.perf_counter()
    w @ x
    gemv.append(time.perf_counter() - t)
print(json.dumps({"n": n, "seconds": times, "gemv_bytes": w.nbytes, "gemv_seconds": gemv}))
'''


def available_cpus() -> int:
    """CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run_child(code: str, args: Sequence[str], env: dict[str, str] | None = None, timeout: float = 300
              ) -> dict[str, Any]:
    """Run a Python snippet in a fresh interpreter; its last stdout line is JSON."""
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    if done.returncode != 0:
        raise RuntimeError(f"child process failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- the run
@dataclass
class _Source:
    """Where the model and the bundles come from."""

    label: str
    model: Any  # the PyTorch model (for bundles of a checkpoint/preset, or a random init of a bundle's config)
    child_source: dict[str, Any]  # how the PyTorch child process rebuilds it
    eos_zeroed: bool
    model_note: str


def _build_source(preset: str, checkpoint: str | Path | None, bundle: str | Path | None, seed: int,
                  suppress_eos: bool) -> _Source:
    import torch

    from mirasol.model import Mirasol, MirasolConfig, build_model
    from mirasol.runtime.manifest import Manifest
    from mirasol.runtime.tokenizer import ByteTokenizer

    if checkpoint is not None:
        model = build_model(checkpoint=checkpoint)
        return _Source(f"checkpoint {checkpoint}", model, {"checkpoint": str(checkpoint)}, False,
                       "the checkpoint's weights")
    if bundle is not None:
        config = Manifest.read(bundle).config
        torch.manual_seed(seed)
        model = Mirasol(MirasolConfig.from_dict(config)).eval()
        return _Source(f"bundle {bundle}", model, {"config": config, "seed": seed}, False,
                       "PyTorch baselines use a random init of the bundle's config (same shapes and FLOPs)")
    model = build_model(preset, seed=seed)
    if suppress_eos:
        # The lm_head is tied to the embedding: a zero EOS row makes the EOS logit exactly 0, below the best
        # of 256+ random logits, so greedy decoding runs the full token count. EOS is never an input, so
        # nothing else changes. Timing does not depend on weights; token counts are still reported as counted.
        with torch.no_grad():
            model.text_decoder.embed.weight[ByteTokenizer.EOS].zero_()
    return _Source(f"preset {preset} (random init, seed {seed})", model, {"preset": preset, "seed": seed},
                   suppress_eos, "random init" + (", EOS logit held at 0" if suppress_eos else ""))


def _export_bundles(source: _Source, bundle: str | Path | None, precisions: Sequence[str], workdir: Path,
                    calibration_data: str, calibration_clips: int, progress: Progress
                    ) -> tuple[dict[str, Path], dict[str, Any]]:
    """Bundles per precision: the given one, and those exported (fp32/fp16) or quantized (int8) here."""
    from mirasol.calibration.quantize import CalibrationOptions
    from mirasol.runtime.manifest import Manifest
    from mirasol.runtime.precision import get_precision

    from .bundle import export_bundle

    paths: dict[str, Path] = {}
    report: dict[str, Any] = {}
    if bundle is not None:
        precision = Manifest.read(bundle).precision
        paths[precision] = Path(bundle)
        report[precision] = {"status": "ok", "source": "given", "path": str(bundle), "seconds": 0.0}
    can_export = bundle is None or not source.child_source.get("config")
    ours: Path | None = None  # an fp32 bundle exported here from source.model
    for precision in sorted(precisions, key=PRECISION_NAMES.index):
        if precision in paths:
            continue
        if not can_export:
            report[precision] = {"status": "not available",
                                 "reason": "only the given bundle (add --checkpoint to export other precisions)"}
            continue
        out = workdir / f"bundle-{precision}"
        start = time.perf_counter()
        try:
            # fp16 and int8 start from the fp32 bundle exported above (its graphs are traced once); the int8
            # accuracy report is not what this tool measures: one held-out clip
            calibration = CalibrationOptions(calibration_data, clips=calibration_clips, held_out=1)
            export_bundle(source.model, out, precision, reference=ours, progress=progress,
                          calibration=calibration if get_precision(precision).needs_calibration else None)
            if precision == "fp32":
                ours = out
        except Exception as failure:  # noqa: BLE001 - a failed precision is reported, the others still run
            report[precision] = {"status": "failed", "reason": f"{type(failure).__name__}: {failure}"[:500]}
            progress(f"export {precision} failed: {failure}")
            continue
        seconds = time.perf_counter() - start
        paths[precision] = out
        report[precision] = {"status": "ok", "source": "exported", "path": str(out), "seconds": seconds}
        progress(f"exported {precision} bundle in {seconds:.1f}s")
    return paths, report


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
    import torch

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
                workdir = Path(export_dir)
                workdir.mkdir(parents=True, exist_ok=True)
            source = _build_source(preset, checkpoint, bundle, seed, suppress_eos)
            config = source.model.config
            chunks = int(chunks or (max(2, config.av_window_chunks + 1) if quick else config.num_chunks))
            flat_chunks = int(flat_chunks or (32 if quick else max(FLAT_POINTS)))
            log(f"model: {source.label}; {threads} threads; exporting {', '.join(precisions)}")
            paths, export_report = _export_bundles(source, bundle, precisions, workdir, calibration_data,
                                                   calibration_clips, log)
            report = _measure(source, paths, export_report, chunks=chunks, repeats=repeats, threads=threads,
                              quick=quick, new_tokens=new_tokens, seed=seed, flat_chunks=flat_chunks,
                              question=question, log=log)
            if export_dir is None:  # the temporary directory goes with this block
                for entry in export_report.values():
                    if entry.get("source") == "exported":
                        entry["path"] = None
    finally:
        torch.set_num_threads(previous_threads)
    report["meta"].update({
        "load_average_start": list(load_start), "load_average_end": list(os.getloadavg()),
        "wall_seconds": time.perf_counter() - begun})
    return report


def _measure(source: _Source, paths: dict[str, Path], export_report: dict[str, Any], *, chunks: int, repeats: int,
             threads: int, quick: bool, new_tokens: int | None, seed: int, flat_chunks: int, question: str,
             log: Progress) -> dict[str, Any]:
    import onnxruntime
    import torch

    from mirasol.runtime.pipeline import Pipeline
    from mirasol.runtime.tokenizer import ByteTokenizer

    model = source.model
    config = model.config
    warmup = config.av_window_chunks + 2  # past the window: the carried state is at its full size
    pool = chunk_pool(config, 8, seed)
    torch_pool = [(torch.from_numpy(v), torch.from_numpy(a)) for v, a in pool]
    prompt = ByteTokenizer().prompt(question)
    room = config.max_text_len - len(prompt)
    new_tokens = int(min(new_tokens or (16 if quick else 64), room))
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
                        "processor": platform.machine()},
            "versions": {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
                         "onnxruntime": onnxruntime.__version__},
            "note": "ratios are measured in one run, the engines timed in turn (blocks of calls, round-robin); "
                    "absolute times depend on the machine's load at the time"},
        "export": export_report,
    }

    # ---- load the pipelines (warm load time: median of a few; the cold load is in the memory section)
    pipes: dict[str, Any] = {}
    load_times: dict[str, Any] = {}
    for precision, path in paths.items():
        try:
            seconds = [timed(lambda: Pipeline.load(path, threads=threads))[0] for _ in range(2 if quick else 3)]
            pipes[precision] = Pipeline.load(path, threads=threads)
            load_times[precision] = stats_ms(seconds)
        except Exception as failure:  # noqa: BLE001
            export_report[precision] = {"status": "failed", "reason": f"load: {type(failure).__name__}: {failure}"}
    primary = "fp32" if "fp32" in pipes else next(iter(pipes), None)
    if primary is None:
        raise RuntimeError(f"no bundle could be made or loaded: {export_report}")
    # for information, beside the same-thread comparisons: the primary runtime on one thread, and with ONNX
    # Runtime's spin-waiting the other way round from the backend's default (on a busy machine spinning
    # threads take the CPU the work needs; on a quiet one they save wake-ups)
    single = threads > 1 and not quick
    extras: dict[str, Any] = {}
    if single:
        extras[f"{primary}_1thread"] = Pipeline.load(paths[primary], threads=1)
        spin, pipe = _flipped_spinning_pipeline(paths[primary], threads)
        extras[f"{primary}_{spin}"] = pipe

    # ---- 1. streaming, steady state
    log(f"streaming: {rounds * block} timed chunks per engine after {warmup} warm-up chunks")
    streams = {p: pipe.stream() for p, pipe in {**pipes, **extras}.items()}
    stepper = TorchStepper(model)
    stepper1 = TorchStepper(model) if single else None
    set_threads = (lambda n: lambda: torch.set_num_threads(n))
    for i in range(warmup):
        for stream in streams.values():
            stream.push(*pool[i % len(pool)])
        stepper.push(*torch_pool[i % len(pool)])
        if stepper1 is not None:
            set_threads(1)()
            stepper1.push(*torch_pool[i % len(pool)])
            set_threads(threads)()
    clip_v = torch.from_numpy(np.stack([pool[i % len(pool)][0] for i in range(chunks)]).reshape(
        1, chunks * config.frames_per_chunk, 3, config.image_size, config.image_size))
    clip_a = torch.from_numpy(np.concatenate([pool[i % len(pool)][1] for i in range(chunks)], axis=1)[None])

    def naive(_: int) -> Any:
        with torch.inference_mode():
            return model.av_autoregressor.forward_clip(model.encode_chunks(clip_v, clip_a))

    naive_cost, _ = timed(lambda: naive(0))  # also the warm-up
    engines: dict[str, Engine] = {}
    for name, stream in streams.items():
        engines[f"runtime_{name}"] = Engine((lambda s: lambda i: s.push(*pool[i % len(pool)]))(stream))
    engines["pytorch_eager_step"] = Engine(lambda i: stepper.push(*torch_pool[i % len(pool)]))
    if stepper1 is not None:
        engines["pytorch_eager_step_1thread"] = Engine(lambda i: stepper1.push(*torch_pool[i % len(pool)]),
                                                       before=set_threads(1), after=set_threads(threads))
    engines["pytorch_naive_rerun"] = Engine(naive, block=1, budget=20.0,
                                            every=sampled_every(rounds, naive_cost, 20.0, most=rounds))
    primary_stream = streams[primary]
    before = {k: dict(v) for k, v in primary_stream.timings.to_dict().items()}
    gc.collect()
    times = interleave(engines, rounds, block)
    after = primary_stream.timings.to_dict()
    streaming: dict[str, Any] = {"unit": "ms per chunk", "engines": {}}
    for name, samples in times.items():
        streaming["engines"][name] = {"status": "ok", **stats_ms(samples)}
        if name.endswith(EXTRA_SUFFIXES):
            streaming["engines"][name]["note"] = EXTRA_NOTES[name.rsplit("_", 1)[1]]
    streaming["engines"]["pytorch_naive_rerun"]["chunks_so_far"] = chunks
    for p in PRECISION_NAMES:
        if p not in pipes:
            streaming["engines"][f"runtime_{p}"] = {"status": export_report.get(p, {}).get("status", "not measured"),
                                                   "reason": export_report.get(p, {}).get("reason", "not requested")}
    base = _median(streaming["engines"][f"runtime_{primary}"])
    streaming["primary"] = f"runtime_{primary}"
    streaming["speedup_vs_primary"] = {
        name: _ratio(_median(entry), base) for name, entry in streaming["engines"].items()
        if name != f"runtime_{primary}" and _median(entry) is not None}
    report["streaming"] = streaming

    # ---- 4. overhead of the primary runtime's push (from the timed pushes above)
    pushes = times[f"runtime_{primary}"]
    wall = float(np.sum(pushes))
    push_graphs = pipes[primary].bundle.manifest.steps["push"].graphs
    graph = sum(after["graph_seconds"].get(g, 0.0) - before["graph_seconds"].get(g, 0.0) for g in push_graphs)
    step = after["step_seconds"].get("push", 0.0) - before["step_seconds"].get("push", 0.0)
    report["overhead"] = {
        "engine": f"runtime_{primary}", "chunks": len(pushes), "wall_seconds": wall,
        "graph_seconds": graph, "step_seconds": step,
        "fraction_outside_run_calls": _ratio(wall - graph, wall),
        "fraction_in_push_checks": _ratio(wall - step, wall),
        "fraction_in_state_update": _ratio(step - graph, wall),
        "per_graph_ms": {g: 1e3 * (after["graph_seconds"].get(g, 0.0) - before["graph_seconds"].get(g, 0.0))
                         / max(1, len(pushes)) for g in push_graphs}}

    # ---- 2. flatness: per-chunk latency along long streams of the primary runtime
    points = [p for p in FLAT_POINTS if p <= flat_chunks]
    flat_streams = 2 if quick else max(3, min(6, repeats // 6))
    log(f"flatness: {flat_streams} streams of {flat_chunks} chunks")
    per_index: dict[int, list[float]] = {p: [] for p in points}
    state_bytes: dict[int, int] = {}
    for s in range(flat_streams):
        stream = pipes[primary].stream()
        for i in range(1, flat_chunks + 1):
            seconds, _ = timed(lambda: stream.push(*pool[(i + s) % len(pool)]))
            if i in per_index:
                per_index[i].append(seconds)
                state_bytes[i] = int(sum(v.nbytes for v in stream.state.values()))
    flat = {"engine": f"runtime_{primary}", "streams": flat_streams, "stream_chunks": flat_chunks,
            "chunks": {str(i): {**stats_ms(per_index[i]), "state_bytes": state_bytes[i]} for i in points}}
    last = max(points)
    flat["compare"] = {"at": last, "against": 8 if 8 in points else None,
                       "ratio": _ratio(_median(flat["chunks"][str(last)]), _median(flat["chunks"].get("8")))}
    report["flatness"] = flat

    # ---- 3. text
    report["text"] = _measure_text(pipes, extras, primary, model, pool, torch_pool, chunks, prompt, question,
                                   new_tokens, threads, quick, log)

    # ---- 5. memory and start-up
    log("memory: runtime-only and PyTorch subprocesses")
    report["memory"] = _measure_memory(paths, primary, source, chunks, new_tokens, threads, question, load_times)

    # ---- 6. ceiling
    log("ceiling: FLOPs and weight bytes per step vs measured GEMM rate and memory bandwidth")
    report["ceiling"] = _measure_ceiling(config, paths, report, primary, threads, quick)

    # ---- 7. CUDA
    report["cuda"] = _measure_cuda(paths, model, pool, torch_pool, rounds, block, warmup, log)

    report["targets"] = targets(report)
    return report


SPIN_KEY = "session.intra_op.allow_spinning"


def _spinning_by_default(threads: int) -> bool:
    """Whether the runtime's ONNX Runtime backend, as loaded by default, lets idle threads spin-wait."""
    from mirasol.runtime.backends.onnxruntime import OnnxRuntimeBackend

    try:
        return OnnxRuntimeBackend(threads=threads).options.get_session_config_entry(SPIN_KEY) != "0"
    except Exception:  # noqa: BLE001 - not set: ONNX Runtime's own default, which spins
        return True


def _flipped_spinning_pipeline(path: Path, threads: int) -> tuple[str, Any]:
    """The bundle on ONNX Runtime with the same threads and spin-waiting the other way round from the default:
    ("nospin", pipeline) where the default spins, ("spin", pipeline) where it does not."""
    from mirasol.runtime.backends.onnxruntime import OnnxRuntimeBackend
    from mirasol.runtime.pipeline import Pipeline

    spin = not _spinning_by_default(threads)
    backend = OnnxRuntimeBackend(threads=threads, spinning=spin)
    return ("spin" if spin else "nospin"), Pipeline.load(path, backend=backend)


def _measure_text(pipes: dict[str, Any], extras: dict[str, Any], primary: str, model: Any, pool: list,
                  torch_pool: list, chunks: int, prompt: list[int], question: str, new_tokens: int, threads: int,
                  quick: bool, log: Progress) -> dict[str, Any]:
    import torch

    streams = {p: pipe.stream() for p, pipe in {**pipes, **extras}.items()}
    single = bool(extras)
    for stream in streams.values():
        for i in range(chunks):
            stream.push(*pool[i % len(pool)])
    stepper = TorchStepper(model)
    for i in range(chunks):
        stepper.push(*torch_pool[i % len(pool)])
    av_memory = stepper.av_memory()
    counted = {p: len(s.token_ids(question, new_tokens)[0]) for p, s in streams.items()}  # also the warm-up
    n = counted[primary] or new_tokens  # an answer of EOS alone: the baselines still generate new_tokens
    set_threads = (lambda k: lambda: torch.set_num_threads(k))
    engines: dict[str, Engine] = {}
    for p, stream in streams.items():
        engines[f"runtime_{p}_cached"] = Engine((lambda s: lambda _: s.token_ids(question, new_tokens))(stream))
    engines["pytorch_eager_cached"] = Engine(lambda _: torch_generate(model, av_memory, prompt, n, cached=True))
    if single:
        engines["pytorch_eager_cached_1thread"] = Engine(
            lambda _: torch_generate(model, av_memory, prompt, n, cached=True),
            before=set_threads(1), after=set_threads(threads))
    engines[f"onnx_{primary}_uncached"] = Engine(lambda _: streams[primary].token_ids(question, n, kv_cache=False))
    engines["pytorch_eager_uncached"] = Engine(lambda _: torch_generate(model, av_memory, prompt, n, cached=False),
                                               budget=30.0, least=1)
    first: dict[str, Engine] = {
        f"runtime_{p}": Engine((lambda s: lambda _: s.token_ids(question, 1))(s)) for p, s in streams.items()}
    first["pytorch_eager"] = Engine(lambda _: torch_generate(model, av_memory, prompt, 1, cached=True))
    # warm-up: every engine once (PyTorch shapes need no planning: a short run is enough)
    cost = {}
    for name, engine in engines.items():
        if name.startswith("pytorch"):
            if engine.before:
                engine.before()
            seconds, _ = timed(lambda: torch_generate(model, av_memory, prompt, min(n, 4),
                                                      cached="uncached" not in name))
            cost[name] = seconds * n / min(n, 4)
            if engine.after:
                engine.after()
        else:
            cost[name], _ = timed(lambda: engine.run(0))
    rounds = 2 if quick else 4
    engines["pytorch_eager_uncached"].every = sampled_every(rounds, cost["pytorch_eager_uncached"], 30.0, rounds,
                                                            least=1)
    log(f"text: {rounds} rounds of {n} new tokens per engine")
    # the runtime's greedy tokens against PyTorch's (same weights, fp32: identical unless near-ties)
    runtime_tokens = streams[primary].token_ids(question, new_tokens)[0]
    torch_tokens = torch_generate(model, av_memory, prompt, n)
    times = interleave(engines, rounds)
    ttft = interleave(first, max(rounds, 3))
    text: dict[str, Any] = {
        "requested_new_tokens": new_tokens, "generated_tokens": counted, "measured_tokens": counted[primary],
        "baseline_tokens": n, "rounds": rounds,
        "note": ("tokens/s = tokens / wall time of the whole answer (question prefill and the cross-attention "
                 "projection included); baselines generate exactly the runtime's counted tokens, ignoring EOS"),
        "tokens_match_pytorch": runtime_tokens == torch_tokens[:len(runtime_tokens)],
        "engines": {}, "time_to_first_token": {name: stats_ms(s) for name, s in ttft.items()}}
    for name, samples in times.items():
        key = name[len("runtime_"):-len("_cached")] if name.startswith("runtime_") else None
        tokens = counted[key] if key else n
        median = float(np.median(samples))
        text["engines"][name] = {"tokens": tokens,
                                 "tokens_per_second": tokens / median if tokens and median > 0 else None,
                                 "tokens_per_second_p95": (tokens / float(np.percentile(samples, 95))
                                                           if tokens else None),
                                 **stats_ms(samples)}
        if name[: -len("_cached")].endswith(EXTRA_SUFFIXES):
            text["engines"][name]["note"] = EXTRA_NOTES[name[: -len("_cached")].rsplit("_", 1)[1]]
    cached = text["engines"][f"runtime_{primary}_cached"]["tokens_per_second"]
    first_ms = text["time_to_first_token"][f"runtime_{primary}"]["median_ms"]
    whole_ms = text["engines"][f"runtime_{primary}_cached"]["median_ms"]
    if n > 1 and whole_ms and first_ms is not None and whole_ms > first_ms:
        text["runtime_decode_tokens_per_second"] = (n - 1) / ((whole_ms - first_ms) / 1e3)
    text["speedup"] = {
        "cached_vs_onnx_uncached": _ratio(cached, text["engines"][f"onnx_{primary}_uncached"]["tokens_per_second"]),
        "cached_vs_pytorch_uncached": _ratio(cached, text["engines"]["pytorch_eager_uncached"]["tokens_per_second"]),
        "cached_vs_pytorch_cached": _ratio(cached, text["engines"]["pytorch_eager_cached"]["tokens_per_second"])}
    text["primary"] = f"runtime_{primary}_cached"
    # overhead of the generation loop: wall vs the text graphs' run calls, on a fresh question
    stream = streams[primary]
    before = {k: dict(v) for k, v in stream.timings.to_dict().items()}
    wall, _ = timed(lambda: stream.token_ids(question, new_tokens))
    after = stream.timings.to_dict()
    graphs = [g for s in ("ask", "generate") for g in pipes[primary].bundle.manifest.steps[s].graphs]
    graph = sum(after["graph_seconds"].get(g, 0.0) - before["graph_seconds"].get(g, 0.0) for g in graphs)
    text["overhead_fraction_outside_run_calls"] = _ratio(wall - graph, wall)
    return text


def _measure_memory(paths: dict[str, Path], primary: str, source: _Source, chunks: int, new_tokens: int,
                    threads: int, question: str, load_times: dict[str, Any]) -> dict[str, Any]:
    args = {"chunks": chunks, "new_tokens": new_tokens, "threads": threads, "question": question,
            "source": source.child_source}
    env = {"OMP_NUM_THREADS": str(threads)}
    memory: dict[str, Any] = {"chunks": chunks, "new_tokens": new_tokens, "warm_load_ms": load_times,
                              "primary": f"runtime_process_{primary}",
                              "note": "peak RSS = VmHWM of a fresh interpreter doing the work, then exiting"}
    children = [(f"runtime_process_{p}", RUNTIME_CHILD, {**args, "bundle": str(path)}) for p, path in paths.items()]
    children.append(("pytorch_process", TORCH_CHILD, args))
    for name, code, child_args in children:
        try:
            memory[name] = {"status": "ok", **run_child(code, [json.dumps(child_args)], env=env)}
        except Exception as failure:  # noqa: BLE001
            memory[name] = {"status": "failed", "reason": str(failure)[:1000]}
    runtime, pytorch = memory[f"runtime_process_{primary}"], memory["pytorch_process"]
    memory["rss_ratio_runtime_vs_pytorch"] = _ratio(runtime.get("peak_rss_mb"), pytorch.get("peak_rss_mb"))
    memory["startup_ratio_runtime_vs_pytorch"] = _ratio(runtime.get("start_to_ready_s"),
                                                        pytorch.get("start_to_ready_s"))
    return memory


def _graph_bytes(path: Path, graphs: Sequence[str]) -> int:
    """Bytes of a bundle's graph files (their weights, mostly), external data included."""
    from mirasol.runtime.manifest import Manifest

    manifest = Manifest.read(path)
    return sum((path / f).stat().st_size for g in graphs
               for f in (manifest.graphs[g].file, *manifest.graphs[g].external_data))


def _measure_ceiling(config: Any, paths: dict[str, Path], report: dict[str, Any], primary: str, threads: int,
                     quick: bool) -> dict[str, Any]:
    """Roofline: a step cannot beat max(FLOPs / GEMM rate, weight bytes / memory bandwidth) on this machine."""
    flops = chunk_step_flops(config)
    n = 512 if quick else 1024
    env = {name: str(threads) for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    ceiling: dict[str, Any] = {"flops_per_chunk": flops, "gemm_size": n, "gemm_threads": threads}
    rates: dict[int, tuple[float, float]] = {}
    for count in sorted({threads, 1}, reverse=True):  # a busy machine can be faster on one thread
        env = {name: str(count) for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
        try:
            measured = run_child(GEMM_CHILD, [str(n), "5" if quick else "15", "2048" if quick else "4096"], env=env)
        except Exception as failure:  # noqa: BLE001
            ceiling.update(status="failed", reason=str(failure)[:500])
            return ceiling
        rates[count] = (2 * n ** 3 / float(np.median(measured["seconds"])),
                        measured["gemv_bytes"] / float(np.median(measured["gemv_seconds"])))
    best = max(rates, key=lambda count: rates[count][0])
    rate, bandwidth = rates[best][0], max(r[1] for r in rates.values())
    ceiling.update(status="ok", gemm_flops_per_second=rate, gemv_bytes_per_second=bandwidth,
                   gemm_threads=best, gemv_matrix_mb=measured["gemv_bytes"] / 2 ** 20,
                   gemm_by_threads={str(k): {"flops_per_second": v[0], "gemv_bytes_per_second": v[1]}
                                    for k, v in rates.items()})
    manifest_steps = {}
    for p, path in paths.items():
        from mirasol.runtime.manifest import Manifest
        steps = Manifest.read(path).steps
        manifest_steps[p] = {"push": _graph_bytes(path, steps["push"].graphs),
                             "token": _graph_bytes(path, steps["generate"].graphs)}
    ceiling["weight_bytes"] = manifest_steps
    ceiling["engines"] = {}
    for name, entry in report["streaming"]["engines"].items():
        median = _median(entry)
        if not median or name == "pytorch_naive_rerun":
            continue
        precision = next((p for p in paths if name.startswith(f"runtime_{p}")), "fp32")
        weights = manifest_steps.get(precision, manifest_steps.get(primary, {})).get("push")
        floor = max(flops["total"] / rate, (weights or 0) / bandwidth)
        achieved = flops["total"] / (median / 1e3)
        ceiling["engines"][name] = {"flops_per_second": achieved, "fraction_of_gemm": achieved / rate,
                                    "floor_ms": floor * 1e3, "fraction_of_floor": floor / (median / 1e3)}
    ceiling["fraction_of_gemm"] = ceiling["engines"].get(f"runtime_{primary}", {}).get("fraction_of_gemm")
    text = report["text"]
    decode = text.get("runtime_decode_tokens_per_second")
    token_bytes = manifest_steps[primary]["token"]
    ceiling["decode"] = {
        "engine": f"runtime_{primary}", "weight_bytes_per_token": token_bytes,
        "bandwidth_bound_tokens_per_second": bandwidth / token_bytes,
        "runtime_decode_tokens_per_second": decode,
        "fraction_of_bound": _ratio(decode, bandwidth / token_bytes)}
    return ceiling


def _measure_cuda(paths: dict[str, Path], model: Any, pool: list, torch_pool: list, rounds: int, block: int,
                  warmup: int, log: Progress) -> dict[str, Any]:
    import onnxruntime
    import torch

    torch_cuda = torch.cuda.is_available()
    ort_cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    cuda: dict[str, Any] = {"torch_cuda": torch_cuda, "onnxruntime_cuda": ort_cuda}
    if not (torch_cuda or ort_cuda):
        cuda.update(available=False, note=NO_CUDA)
        return cuda
    cuda.update(available=True, device=torch.cuda.get_device_name(0) if torch_cuda else "unknown", engines={})
    log("cuda: GPU paths")
    engines: dict[str, Engine] = {}
    if torch_cuda:
        try:
            import copy

            gpu_model = copy.deepcopy(model).to("cuda")
            stepper = TorchStepper(gpu_model, "cuda")
            gpu_pool = [(v.to("cuda"), a.to("cuda")) for v, a in torch_pool]
            for i in range(warmup):
                stepper.push(*gpu_pool[i % len(gpu_pool)])
            engines["pytorch_eager_step_cuda"] = Engine(lambda i: stepper.push(*gpu_pool[i % len(gpu_pool)]))
        except Exception as failure:  # noqa: BLE001
            cuda["engines"]["pytorch_eager_step_cuda"] = {"status": "failed", "reason": str(failure)[:500]}
    if ort_cuda:
        from mirasol.runtime.pipeline import Pipeline

        for precision, path in paths.items():
            name = f"runtime_{precision}_ort_cuda"
            try:
                pipe = Pipeline.load(path, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
                stream = pipe.stream()
                for i in range(warmup):
                    stream.push(*pool[i % len(pool)])
                engines[name] = Engine((lambda s: lambda i: s.push(*pool[i % len(pool)]))(stream))
            except Exception as failure:  # noqa: BLE001
                cuda["engines"][name] = {"status": "failed", "reason": str(failure)[:500]}
    times = interleave(engines, rounds, block)
    for name, samples in times.items():
        cuda["engines"][name] = {"status": "ok", **stats_ms(samples)}
    base = _median(cuda["engines"].get("pytorch_eager_step_cuda"))
    cuda["speedup_vs_pytorch_eager_cuda"] = {
        name: _ratio(base, _median(entry)) for name, entry in cuda["engines"].items()
        if name != "pytorch_eager_step_cuda" and _median(entry) is not None}
    return cuda


# ---------------------------------------------------------------------------------------------- targets
def _target(name: str, value: float | None, op: str, threshold: float, note: str = "") -> dict[str, Any]:
    passed = None if value is None else (value >= threshold if op == ">=" else value <= threshold)
    return {"name": name, "value": value, "op": op, "threshold": threshold, "pass": passed, "note": note}


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The pass/fail lines (targets set for the small preset on 2 CPU cores)."""
    s = report["streaming"]
    engines = s["engines"]
    primary = s["primary"]
    fp32 = _median(engines.get("runtime_fp32"))
    int8 = engines.get("runtime_int8", {})
    flat = report["flatness"]["compare"]
    text = report["text"]
    n = text["measured_tokens"]
    tokens_note = (f"at {n} new tokens" if n == text["requested_new_tokens"]
                   else f"at {n} new tokens (the answer ended at EOS; {text['requested_new_tokens']} requested)")
    memory = report["memory"]
    return [
        _target("runtime fp32 per chunk vs PyTorch eager stepping (x faster)",
                _ratio(_median(engines.get("pytorch_eager_step")), fp32), ">=", 1.5,
                "" if fp32 else "no fp32 bundle"),
        _target("runtime int8 (CPU) per chunk vs runtime fp32 (x faster)", _ratio(fp32, _median(int8)), ">=", 1.5,
                "" if _median(int8) else f"int8 {int8.get('status', 'not measured')}: {int8.get('reason', '')}"),
        _target(f"chunk {flat['at']} vs chunk 8 per-chunk latency (ratio)",
                flat["ratio"] if flat["at"] == 128 else None, "<=", 1.15,
                "" if flat["at"] == 128 else f"stream of {report['flatness']['stream_chunks']} chunks: "
                f"chunk {flat['at']}/8 = {flat['ratio'] if flat['ratio'] is None else round(flat['ratio'], 3)}"),
        _target("cached text tokens/s vs uncached (ONNX, x)", text["speedup"]["cached_vs_onnx_uncached"], ">=", 5.0,
                tokens_note),
        _target("runtime cached text tokens/s vs PyTorch eager cached (x)",
                text["speedup"]["cached_vs_pytorch_cached"], ">=", 1.3, tokens_note),
        _target(f"{primary} overhead outside backend run calls (fraction of stream wall time)",
                report["overhead"]["fraction_outside_run_calls"], "<=", 0.05),
        _target("runtime-only process peak RSS vs PyTorch process (ratio)",
                memory["rss_ratio_runtime_vs_pytorch"], "<=", 0.5),
    ]


# ---------------------------------------------------------------------------------------------- Markdown
def _f(value: Any, digits: int = 2, suffix: str = "") -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
            return "–"
        return f"{value:,.{digits}f}{suffix}" if isinstance(value, float) else f"{value:,}{suffix}"
    return str(value)


def to_markdown(report: dict[str, Any]) -> str:
    meta = report["meta"]
    load = meta.get("load_average_start", [None])[0], meta.get("load_average_end", [None])[0]
    lines = [
        f"# mirasol-bench: {meta['source']}",
        "",
        f"{meta['threads']} threads on {meta['machine']['cpus']} CPUs; 1-min load average {_f(load[0])} at the "
        f"start, {_f(load[1])} at the end; clip of {meta['chunks']} chunks; {meta['repeats']} timed chunks per "
        f"engine after {meta['warmup_chunks']} warm-up chunks; run took {_f(meta.get('wall_seconds'), 0)} s"
        + (" (quick smoke run)" if meta["quick"] else "") + ".",
        f"Model: {meta['model_note']}. {meta['note']}.",
        "",
        "## Targets",
        "",
        "| target | measured | needs | result |",
        "|---|---:|---:|---|",
    ]
    for t in report["targets"]:
        result = "n/a" if t["pass"] is None else ("PASS" if t["pass"] else "FAIL")
        note = f" ({t['note']})" if t["note"] else ""
        lines.append(f"| {t['name']}{note} | {_f(t['value'], 3)} | {t['op']} {t['threshold']} | {result} |")

    lines += ["", "## Export", "", "| precision | status | seconds | detail |", "|---|---|---:|---|"]
    for precision, entry in report["export"].items():
        lines.append(f"| {precision} | {entry['status']} | {_f(entry.get('seconds'), 1)} | "
                     f"{entry.get('reason', entry.get('source', ''))} |")

    s = report["streaming"]
    lines += ["", "## Streaming (per chunk, steady state: carried state at its full size)", "",
              f"| engine | median ms | p95 ms | n | {s['primary']} is x faster |", "|---|---:|---:|---:|---:|"]
    for name, entry in s["engines"].items():
        if entry.get("status", "ok") != "ok":
            lines.append(f"| {name} | {entry['status']} | | | {entry.get('reason', '')} |")
            continue
        label = name + (f" (all {entry['chunks_so_far']} chunks so far)" if "chunks_so_far" in entry else "")
        lines.append(f"| {label} | {_f(entry['median_ms'])} | {_f(entry['p95_ms'])} | {entry['n']} | "
                     f"{_f(s['speedup_vs_primary'].get(name))} |")

    single = {name[: -len("_1thread")]: entry for name, entry in s["engines"].items() if name.endswith("_1thread")}
    if single:
        rt = next((name for name in single if name.startswith("runtime_")), None)
        one = _ratio(_median(single.get("pytorch_eager_step")), _median(single.get(rt))) if rt else None
        lines.append(f"\nat 1 thread each, {rt} is {_f(one)}x faster than pytorch_eager_step.")
        slowdown = _ratio(_median(s["engines"].get(rt)), _median(single.get(rt))) if rt else None
        for spin, words in (("nospin", "off"), ("spin", "on")):
            flipped = _ratio(_median(s["engines"].get(rt)), _median(s["engines"].get(f"{rt}_{spin}"))) if rt else None
            if flipped is not None:
                lines.append(f"with ONNX Runtime's spin-waiting {words}, {rt} is {_f(flipped)}x as fast as loaded by "
                             f"default.")
        if slowdown is not None and slowdown > 1.5:
            lines.append(f"**The CPUs are contended**: {rt} on {meta['threads']} threads is {_f(slowdown)}x slower "
                         f"than on 1. Multi-threaded timings here are dominated by waiting for descheduled "
                         f"threads (other work is running); read the ratios with that in mind, or re-run when "
                         f"the machine is quiet.")

    f = report["flatness"]
    lines += ["", f"## Flatness ({f['engine']}, {f['streams']} streams of {f['stream_chunks']} chunks)", "",
              "| chunk | median ms | p95 ms | carried state KB |", "|---:|---:|---:|---:|"]
    for index, entry in f["chunks"].items():
        lines.append(f"| {index} | {_f(entry['median_ms'])} | {_f(entry['p95_ms'])} | "
                     f"{_f(entry['state_bytes'] / 1024, 1)} |")
    lines.append(f"\nchunk {f['compare']['at']} / chunk {f['compare']['against']}: {_f(f['compare']['ratio'], 3)}")

    t = report["text"]
    lines += ["", f"## Text ({t['measured_tokens']} new tokens, {t['requested_new_tokens']} requested; "
              f"generated per runtime: {t['generated_tokens']})", "",
              "| engine | tokens | tokens/s (median) | median ms | p95 ms |", "|---|---:|---:|---:|---:|"]
    for name, entry in t["engines"].items():
        lines.append(f"| {name} | {entry['tokens']} | {_f(entry['tokens_per_second'], 1)} | "
                     f"{_f(entry['median_ms'])} | {_f(entry['p95_ms'])} |")
    lines += ["", "| time to first token | median ms | p95 ms |", "|---|---:|---:|"]
    for name, entry in t["time_to_first_token"].items():
        lines.append(f"| {name} | {_f(entry['median_ms'])} | {_f(entry['p95_ms'])} |")
    lines += ["", f"cached vs ONNX uncached: {_f(t['speedup']['cached_vs_onnx_uncached'])}x; vs PyTorch uncached: "
              f"{_f(t['speedup']['cached_vs_pytorch_uncached'])}x; vs PyTorch cached: "
              f"{_f(t['speedup']['cached_vs_pytorch_cached'])}x; runtime decode-only rate "
              f"{_f(t.get('runtime_decode_tokens_per_second'), 1)} tokens/s; greedy tokens equal PyTorch's: "
              f"{_f(t['tokens_match_pytorch'])}; generation loop outside run calls: "
              f"{_f(_pct(t['overhead_fraction_outside_run_calls']))}%. {t['note']}."]

    o = report["overhead"]
    lines += ["", f"## Overhead ({o['engine']}, {o['chunks']} pushes)", "",
              f"outside the backend's run calls: {_f(_pct(o['fraction_outside_run_calls']))}% of "
              f"{_f(o['wall_seconds'], 3)} s (input checks {_f(_pct(o['fraction_in_push_checks']))}%, state "
              f"update {_f(_pct(o['fraction_in_state_update']))}%); per graph ms: "
              + ", ".join(f"{g} {_f(ms)}" for g, ms in o["per_graph_ms"].items())]

    m = report["memory"]
    lines += ["", f"## Memory and start-up ({m['chunks']} chunks + {m['new_tokens']} tokens, fresh processes)", "",
              "| process | peak RSS MB | vs PyTorch | import s | load s | stream s | ask s |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    pytorch_rss = m["pytorch_process"].get("peak_rss_mb")
    for name, entry in m.items():
        if not (isinstance(entry, dict) and "status" in entry):
            continue
        if entry["status"] != "ok":
            lines.append(f"| {name} | failed: {entry['reason'][:200]} | | | | | |")
            continue
        lines.append(f"| {name} | {_f(entry['peak_rss_mb'], 0)} | {_f(_ratio(entry['peak_rss_mb'], pytorch_rss), 3)} | "
                     f"{_f(entry['import_s'])} | {_f(entry['load_s'])} | {_f(entry['stream_s'])} | "
                     f"{_f(entry['ask_s'])} |")
        if entry.get("torch_imported"):
            lines.append(f"\n**{name} imported torch**\n")
    lines.append(f"\nstart-up (import + load) {m['primary']} / PyTorch: "
                 f"{_f(m['startup_ratio_runtime_vs_pytorch'], 3)}; "
                 "warm `Pipeline.load` median ms: "
                 + ", ".join(f"{p} {_f(e['median_ms'], 0)}" for p, e in m["warm_load_ms"].items()))

    c = report["ceiling"]
    lines += ["", "## Ceiling", ""]
    total = c["flops_per_chunk"]["total"]
    lines.append(f"one chunk step: {_f(total / 1e9, 3)} GFLOP (" + ", ".join(
        f"{k} {_f(v / 1e9, 3)}" for k, v in c["flops_per_chunk"].items() if k != "total") + ")")
    if c.get("status") == "ok":
        lines[-1] += (f"; fp32 GEMM ({c['gemm_size']}^2, best on {c['gemm_threads']} thread(s)): "
                      f"{_f(c['gemm_flops_per_second'] / 1e9, 1)} GFLOP/s; memory bandwidth (fp32 GEMV over "
                      f"{_f(c['gemv_matrix_mb'], 0)} MB): {_f(c['gemv_bytes_per_second'] / 1e9, 1)} GB/s")
        lines += ["", "| engine | GFLOP/s | fraction of GEMM | floor ms (roofline) | fraction of floor |",
                  "|---|---:|---:|---:|---:|"]
        for name, entry in c["engines"].items():
            lines.append(f"| {name} | {_f(entry['flops_per_second'] / 1e9, 2)} | {_f(entry['fraction_of_gemm'], 3)} | "
                         f"{_f(entry['floor_ms'])} | {_f(entry['fraction_of_floor'], 3)} |")
        d = c["decode"]
        lines.append(f"\ntext decoding, batch 1: {_f(d['weight_bytes_per_token'] / 2 ** 20, 1)} MB of weights per "
                     f"token -> at most {_f(d['bandwidth_bound_tokens_per_second'], 0)} tokens/s at the measured "
                     f"bandwidth; {d['engine']} decodes {_f(d['runtime_decode_tokens_per_second'], 1)} tokens/s "
                     f"({_f(d['fraction_of_bound'], 3)} of that)")
    else:
        lines[-1] += f"; GEMM measurement failed: {c.get('reason')}"

    g = report["cuda"]
    lines += ["", "## CUDA", ""]
    if not g["available"]:
        lines.append(g["note"])
    else:
        lines += [f"device: {g['device']}", "", "| engine | median ms | p95 ms |", "|---|---:|---:|"]
        for name, entry in g["engines"].items():
            if entry.get("status", "ok") != "ok":
                lines.append(f"| {name} | {entry['status']}: {entry.get('reason', '')[:200]} | |")
            else:
                lines.append(f"| {name} | {_f(entry['median_ms'])} | {_f(entry['p95_ms'])} |")
        lines.append("\nx faster than PyTorch eager on the GPU: " + ", ".join(
            f"{k} {_f(v)}" for k, v in g["speedup_vs_pytorch_eager_cuda"].items()))
    return "\n".join(lines) + "\n"


def _pct(fraction: float | None) -> float | None:
    return None if fraction is None else 100.0 * fraction


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    return value


# ---------------------------------------------------------------------------------------------- CLI
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
    report = run_benchmark(
        preset=preset, checkpoint=checkpoint, bundle=bundle, chunks=chunks, repeats=repeats, threads=threads,
        precisions=chosen, quick=quick, new_tokens=new_tokens, seed=seed, flat_chunks=flat_chunks,
        export_dir=export_dir, calibration_data=calibration_data, calibration_clips=calibration_clips,
        progress=None if quiet else (lambda line: click.echo(line, err=True)))
    markdown = to_markdown(report)
    if json_path:
        json_path.write_text(json.dumps(_jsonable(report), indent=2) + "\n")
    if markdown_path:
        markdown_path.write_text(markdown)
    click.echo(markdown)


if __name__ == "__main__":
    main()
