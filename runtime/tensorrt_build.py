"""Build TensorRT engines for a bundle, on the device that will run them.

Runs where only numpy and TensorRT (10 or newer) are installed: no torch, no onnx, no cuda-python. For each
graph of the bundle it parses the ONNX file, makes one optimization profile from the manifest's axes, builds a
serialized engine `<graph>.<precision>.engine` into the bundle and records it in the manifest (GraphEntry.engine).

    mirasol-build-engines bundle/ --max-batch 1 --workspace-mb 1024

Python API: `build_engines(bundle_dir, ...)`; everything below the "TensorRT" line imports tensorrt lazily, so the
planning helpers (profiles, typing choice, manifest update) import and test anywhere.

Documentation followed (TensorRT 10 Python API):
- build phase, parser, profiles, serialization, runtime: "Python API Documentation",
  https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/python-api-docs.html
- Builder / NetworkDefinitionCreationFlag (EXPLICIT_BATCH is ignored in TensorRT 10; STRONGLY_TYPED):
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/Builder.html
- IBuilderConfig (set_flag / clear_flag, set_memory_pool_limit(MemoryPoolType.WORKSPACE, bytes),
  add_optimization_profile, create_timing_cache / set_timing_cache / get_timing_cache, progress_monitor,
  builder_optimization_level):
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/BuilderConfig.html
- IProgressMonitor (phase_start / step_complete / phase_finish; must be thread-safe; returning False from
  step_complete cancels the build):
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/ProgressMonitor.html
  and the sample NVIDIA/TensorRT samples/python/simple_progress_monitor/simple_progress_monitor.py
- ITimingCache (serialize; a cache is shared across builder configs):
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/TimingCache.html
- Explicit quantization (Q/DQ networks; symmetric quantization; TensorRT 11 removes the precision flags and
  is always strongly typed):
  https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/quantized-types-explicit-quantization.html
  and https://docs.nvidia.com/deeplearning/tensorrt/11.0.0/api/migration/tensorrt-10x-to-11x-c-api.html
"""
from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import json
import os
import shlex
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .backends.base import TensorInfo
from .errors import BackendError, BundleError, MirasolError
from .bundle import sha256_file
from .manifest import MANIFEST_FILE, AxisRange, GraphEntry, Manifest, check_file_name
from .precision import NAMES, get_precision

BUILD_COMMAND = "mirasol-build-engines"
TIMING_CACHE_FILE = "timing.cache"
ENGINE_SUFFIX = ".engine"
TYPINGS = ("auto", "strong", "weak")
ENGINE_RECORD_VERSION = 1
DEFAULT_WORKSPACE_MB = 1024

Progress = Callable[[str], None]


# ----------------------------------------------------------------------------------------------------------------
# Planning: pure functions, no TensorRT needed.
# ----------------------------------------------------------------------------------------------------------------

def engine_file_name(graph: str, precision: str) -> str:
    """`<graph>.<precision>.engine`, a plain file name inside the bundle."""
    name = f"{graph}.{precision}{ENGINE_SUFFIX}"
    check_file_name(name, f"the engine of graph {graph!r}")
    return name


def rebuild_command(bundle_dir: str | os.PathLike[str], precision: str | None = None,
                    args: Sequence[str] | None = None) -> str:
    """The exact shell command that (re)builds the engines of a bundle on this machine.

    `args`: the options an engine was built with (its record's "build_args"); else just `--precision`.
    """
    if args is None:
        args = ["--precision", precision] if precision else []
    return " ".join([BUILD_COMMAND, shlex.quote(str(bundle_dir)), *(shlex.quote(str(a)) for a in args)])


def build_args(precision: str, axis_max: Mapping[str, int] | None = None, *, typing: str = "auto",
               workspace_mb: int | None = None, int8_fp16: bool = True, tf32: bool = False,
               optimization_level: int | None = None) -> list[str]:
    """The command-line options that reproduce a build (recorded per engine as "build_args")."""
    args = ["--precision", precision]
    for axis, value in sorted((axis_max or {}).items()):
        args += ["--max", f"{axis}={int(value)}"]
    if typing != "auto":
        args += ["--typing", typing]
    if workspace_mb is not None and workspace_mb != DEFAULT_WORKSPACE_MB:
        args += ["--workspace-mb", str(int(workspace_mb))]
    if not int8_fp16:
        args.append("--int8-fp32")
    if tf32:
        args.append("--tf32")
    if optimization_level is not None:
        args += ["--opt-level", str(int(optimization_level))]
    return args


def profile_axes(entry: GraphEntry, axis_max: Mapping[str, int] | None = None) -> dict[str, AxisRange]:
    """The min/opt/max of every axis the graph's inputs use, after the user's maxima.

    `axis_max` maps an axis name to a smaller maximum (e.g. {"batch": 1}). It may only lower the manifest's
    maximum: the manifest's range is what the export validated and what the runtime bounds inputs by, so a larger
    profile would never be used. opt is clamped down to the new maximum.
    """
    used = _input_axes(entry)
    result: dict[str, AxisRange] = {}
    for axis in used:
        rng = entry.axes.get(axis)
        if rng is None:
            raise BundleError(f"graph {entry.name!r}: axis {axis!r} (used by its inputs) has no range in the manifest, "
                              f"so no optimization profile can bound it; re-export the bundle")
        if not (0 <= rng.min <= rng.opt <= rng.max):
            raise BundleError(f"graph {entry.name!r}: axis {axis!r} range min={rng.min} opt={rng.opt} max={rng.max} "
                              f"is not 0 <= min <= opt <= max")
        result[axis] = rng
    for axis, new_max in (axis_max or {}).items():
        if axis not in result:
            continue  # an override for an axis another graph uses
        rng = result[axis]
        new_max = int(new_max)
        if new_max > rng.max:
            raise BundleError(f"--max {axis}={new_max} is above the bundle's maximum {rng.max} for axis {axis!r} "
                              f"(graph {entry.name!r}); the runtime never feeds more, so only lower maxima are allowed")
        if new_max < rng.min:
            raise BundleError(f"--max {axis}={new_max} is below the axis minimum {rng.min} (graph {entry.name!r})")
        result[axis] = AxisRange(rng.min, min(rng.opt, new_max), new_max)
    return result


def check_axis_overrides(manifest: Manifest, axis_max: Mapping[str, int] | None,
                         graphs: Sequence[str] | None = None) -> None:
    """Every overridden axis must be an axis some selected graph's inputs use (catches typos)."""
    if not axis_max:
        return
    known: set[str] = set()
    for name in graphs or manifest.graphs:
        known.update(_input_axes(manifest.graphs[name]))
    unknown = sorted(set(axis_max) - known)
    if unknown:
        raise BundleError(f"unknown axis {', '.join(map(repr, unknown))} in --max; the graphs' inputs use the axes "
                          f"{', '.join(sorted(known)) or '(none)'}")
    for axis, value in axis_max.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise BundleError(f"--max {axis}={value!r}: the maximum must be a non-negative integer")


def input_shapes(entry: GraphEntry, axes: Mapping[str, AxisRange]) -> dict[str, dict[str, list[int]]]:
    """min/opt/max shape of every input: each symbolic dimension replaced by its axis range."""
    shapes: dict[str, dict[str, list[int]]] = {}
    for tensor in entry.inputs:
        shapes[tensor.name] = {
            which: [_dim(tensor, d, axes, which, entry.name) for d in tensor.shape] for which in ("min", "opt", "max")}
    return shapes


@dataclasses.dataclass(frozen=True)
class BuildPlan:
    """How one graph is built: network typing and the builder flags to set / clear."""

    precision: str
    strongly_typed: bool
    set_flags: tuple[str, ...]
    clear_flags: tuple[str, ...]


def plan_build(precision: str, bundle_precision: str, *, typing: str = "auto", has_precision_flags: bool = True,
               int8_fp16: bool = True, tf32: bool = False) -> BuildPlan:
    """Choose a strongly/weakly typed network and the builder flags for a precision (`runtime/precision.py` says,
    per precision, which bundles it builds from, where `auto` types strongly and which flags weak typing needs).

    - A strongly typed network keeps the graph's types, so it needs a bundle of the engine's precision (an fp16
      bundle's fp32-kept layers stay fp32; an int8 bundle's Q/DQ decide int8). TensorRT 11 has no precision flags
      (`has_precision_flags=False`) and is always strongly typed.
    - Weakly typed: fp32 sets no flag; fp16 from an fp32 bundle sets FP16 (TensorRT chooses fp16 kernels); int8
      (Q/DQ graphs, explicit quantization, no calibrator) sets INT8, plus FP16 for the unquantized layers when
      `int8_fp16`.
    - TF32 is cleared unless `tf32` (TF32 rounds matmul inputs to 10-bit mantissas and would break the fp32
      tolerance).
    """
    try:
        entry = get_precision(precision)
    except MirasolError as unknown:
        raise BundleError(str(unknown)) from None
    if typing not in TYPINGS:
        raise BundleError(f"typing {typing!r} is not one of {TYPINGS}")
    if bundle_precision not in entry.engine_sources:
        raise BundleError(f"cannot build {precision} engines from a {bundle_precision} bundle (allowed from: "
                          f"{', '.join(entry.engine_sources)}); export the bundle with --precision {precision}")
    if typing == "weak" and not has_precision_flags:
        raise BundleError("this TensorRT has no precision builder flags (TensorRT 11+ is always strongly typed); "
                          "use --typing strong or auto")
    if typing == "auto":
        typing = "strong" if not has_precision_flags or bundle_precision in entry.auto_strong_sources else "weak"
    clear = () if tf32 else ("TF32",)
    if typing == "strong":
        if bundle_precision != precision:
            raise BundleError(f"a strongly typed network keeps the graph's types, and this bundle's graphs are "
                              f"{bundle_precision}: export an {precision} bundle, or use --typing weak to let TensorRT "
                              f"choose {precision} kernels")
        return BuildPlan(precision, True, (), clear)
    flags = entry.weak_flags + (("FP16",) if entry.weak_fp16_fallback and int8_fp16 else ())
    return BuildPlan(precision, False, flags, clear)


def write_manifest_atomic(manifest: Manifest, bundle_dir: str | os.PathLike[str]) -> Path:
    """Write manifest.json through a temporary file in the bundle and os.replace, so readers never see half."""
    path = Path(bundle_dir) / MANIFEST_FILE
    _write_atomic(path, json.dumps(manifest.to_dict(), indent=2).encode("utf-8"))
    return path


def record_engine(bundle_dir: str | os.PathLike[str], graph: str, record: Mapping[str, Any]) -> Manifest:
    """Set GraphEntry.engine of one graph (re-reading the manifest first) and rewrite the manifest atomically."""
    manifest = Manifest.read(bundle_dir)
    if graph not in manifest.graphs:
        raise BundleError(f"{Path(bundle_dir) / MANIFEST_FILE}: no graph {graph!r}")
    manifest.graphs[graph] = dataclasses.replace(manifest.graphs[graph], engine=dict(record))
    write_manifest_atomic(manifest, bundle_dir)
    return manifest


def engine_mismatch(record: Mapping[str, Any], gpu: Mapping[str, str], trt_version: str) -> str | None:
    """Why an engine record does not fit this machine (None when it fits): TensorRT version, GPU, compute capability.

    TensorRT engines are specific to the TensorRT version and the GPU they were built on (the default hardware
    compatibility level), so any difference means rebuilding.
    """
    problems = []
    if str(record.get("tensorrt")) != trt_version:
        problems.append(f"it was built with TensorRT {record.get('tensorrt')}, this is TensorRT {trt_version}")
    if str(record.get("compute_capability")) != gpu.get("compute_capability"):
        problems.append(f"it was built for compute capability {record.get('compute_capability')}, "
                        f"this GPU has {gpu.get('compute_capability')}")
    if str(record.get("gpu")) != gpu.get("name"):
        problems.append(f"it was built on GPU {record.get('gpu')!r}, this GPU is {gpu.get('name')!r}")
    return "; ".join(problems) or None


def _input_axes(entry: GraphEntry) -> list[str]:
    axes: list[str] = []
    for tensor in entry.inputs:
        for d in tensor.shape:
            if isinstance(d, str) and d not in axes:
                axes.append(d)
    return axes


def _dim(tensor: TensorInfo, d: int | str, axes: Mapping[str, AxisRange], which: str, graph: str) -> int:
    if isinstance(d, bool):
        raise BundleError(f"graph {graph!r}: input {tensor.name!r} has a malformed dimension {d!r}")
    if isinstance(d, int):
        if d < 0:
            raise BundleError(f"graph {graph!r}: input {tensor.name!r} has an unnamed dynamic dimension ({d}); "
                              f"every dynamic dimension needs an axis name with a range in the manifest")
        return d
    if d not in axes:
        raise BundleError(f"graph {graph!r}: input {tensor.name!r} uses axis {d!r}, which has no range")
    return int(getattr(axes[d], which))


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# ----------------------------------------------------------------------------------------------------------------
# The GPU, through the CUDA driver API with ctypes (no cuda-python needed to build).
# ----------------------------------------------------------------------------------------------------------------

_CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75  # cuda.h CUdevice_attribute
_CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR = 76
_gpu_cache: dict[int, dict[str, str]] = {}


def gpu_info(device: int = 0) -> dict[str, str]:
    """{"name", "compute_capability"} of a CUDA device (ordinal as the CUDA runtime counts, CUDA_VISIBLE_DEVICES
    applied), read with the driver API (cuInit, cuDeviceGet, cuDeviceGetName, cuDeviceGetAttribute)."""
    if device in _gpu_cache:
        return dict(_gpu_cache[device])
    lib = None
    for candidate in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(candidate)
            break
        except OSError:
            continue
    if lib is None:
        raise BackendError("the CUDA driver library (libcuda.so.1) cannot be loaded: no NVIDIA driver on this machine")

    def call(result: int, what: str) -> None:
        if result != 0:
            raise BackendError(f"CUDA driver call {what} failed with CUresult {result}")

    call(lib.cuInit(0), "cuInit")
    handle = ctypes.c_int()
    call(lib.cuDeviceGet(ctypes.byref(handle), int(device)), f"cuDeviceGet({device})")
    name = ctypes.create_string_buffer(256)
    call(lib.cuDeviceGetName(name, ctypes.c_int(256), handle), "cuDeviceGetName")
    major, minor = ctypes.c_int(), ctypes.c_int()
    call(lib.cuDeviceGetAttribute(ctypes.byref(major), _CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, handle),
         "cuDeviceGetAttribute(major)")
    call(lib.cuDeviceGetAttribute(ctypes.byref(minor), _CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, handle),
         "cuDeviceGetAttribute(minor)")
    info = {"name": name.value.decode("utf-8", errors="replace").strip(),
            "compute_capability": f"{major.value}.{minor.value}"}
    _gpu_cache[device] = info
    return dict(info)


# ----------------------------------------------------------------------------------------------------------------
# TensorRT (imported lazily).
# ----------------------------------------------------------------------------------------------------------------

_logger_lock = threading.Lock()
_loggers: dict[bool, Any] = {}


def import_tensorrt() -> Any:
    """`import tensorrt`, with a message that says what to install; requires TensorRT 10 or newer."""
    try:
        import tensorrt as trt  # noqa: PLC0415
    except ImportError as missing:
        raise BackendError(
            f"TensorRT is not installed ({missing}). On Jetson it ships with JetPack (python3-libnvinfer); make the "
            f"virtual environment with --system-site-packages. Elsewhere: pip install 'mirasol-edge[tensorrt]'"
        ) from None
    major = int(str(trt.__version__).split(".")[0])
    if major < 10:
        raise BackendError(f"TensorRT {trt.__version__} is too old: mirasol-edge uses the TensorRT 10 API "
                           f"(JetPack 6.1 or newer ships TensorRT 10.3)")
    return trt


def trt_logger(verbose: bool = False) -> Any:
    """One trt.Logger per verbosity for the process (builders and runtimes share it; it outlives them)."""
    trt = import_tensorrt()
    with _logger_lock:
        if verbose not in _loggers:
            _loggers[verbose] = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
        return _loggers[verbose]


def _make_progress_monitor(trt: Any, graph: str, report: Progress) -> Any | None:
    """A trt.IProgressMonitor that reports phases (two levels deep) and every 10% of their steps."""
    if not hasattr(trt, "IProgressMonitor"):
        return None

    class _Monitor(trt.IProgressMonitor):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._lock = threading.Lock()
            self._phases: dict[str, tuple[int, int, int]] = {}  # name -> (depth, steps, last reported decile)
            self.cancelled = False

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            try:
                with self._lock:
                    depth = 0 if parent_phase is None else self._phases.get(parent_phase, (0, 0, 0))[0] + 1
                    self._phases[phase_name] = (depth, max(int(num_steps), 1), -1)
                if depth <= 1:
                    report(f"[{graph}] {'  ' * depth}{phase_name} ({num_steps} steps)")
            except KeyboardInterrupt:
                self.cancelled = True  # cancel from step_complete, as the sample does

        def step_complete(self, phase_name: str, step: int) -> bool:
            try:
                line = None
                with self._lock:
                    depth, steps, last = self._phases.get(phase_name, (9, 1, -1))
                    decile = (int(step) + 1) * 10 // steps
                    if depth <= 1 and decile > last and decile < 10:
                        self._phases[phase_name] = (depth, steps, decile)
                        line = f"[{graph}] {'  ' * depth}{phase_name}: {int(step) + 1}/{steps}"
                if line:
                    report(line)
                return not self.cancelled
            except KeyboardInterrupt:
                self.cancelled = True
                return False

        def phase_finish(self, phase_name: str) -> None:
            try:
                with self._lock:
                    self._phases.pop(phase_name, None)
            except KeyboardInterrupt:
                self.cancelled = True

    return _Monitor()


def build_engines(
    bundle_dir: str | os.PathLike[str],
    *,
    precision: str | None = None,
    graphs: Sequence[str] | None = None,
    axis_max: Mapping[str, int] | None = None,
    workspace_mb: int | None = DEFAULT_WORKSPACE_MB,
    typing: str = "auto",
    int8_fp16: bool = True,
    tf32: bool = False,
    optimization_level: int | None = None,
    timing_cache: bool = True,
    force: bool = False,
    device: int = 0,
    verbose: bool = False,
    progress: Progress | None = None,
) -> dict[str, dict[str, Any]]:
    """Build one TensorRT engine per graph of the bundle and record each in manifest.json.

    precision: "fp32" / "fp16" / "int8"; default the bundle's (fp16 engines can also be built from an fp32 bundle).
    graphs: the graphs to build (default all). axis_max: axis name -> smaller maximum for the optimization profile
    (e.g. {"batch": 1}). workspace_mb: builder workspace pool limit (None: TensorRT's default, the device memory).
    typing: "auto" / "strong" / "weak" network typing (see plan_build). timing_cache: load and save the bundle's
    `timing.cache`. force: rebuild engines that are already up to date. progress: called with one line of text at
    a time (None: silent).
    Returns {graph: engine record}; the record is also written to the manifest after each graph.
    """
    report: Progress = progress or (lambda line: None)
    bundle = Path(bundle_dir)
    manifest = Manifest.read(bundle)
    precision = precision or manifest.precision
    selected = list(graphs) if graphs else list(manifest.graphs)
    for name in selected:
        if name not in manifest.graphs:
            raise BundleError(f"bundle {bundle} has no graph {name!r} (it has {', '.join(manifest.graphs)})")
    check_axis_overrides(manifest, axis_max, selected)
    if workspace_mb is not None and workspace_mb <= 0:
        raise BundleError(f"--workspace-mb must be positive, got {workspace_mb}")

    trt = import_tensorrt()
    has_flags = hasattr(trt.BuilderFlag, "FP16") and hasattr(trt.BuilderFlag, "INT8")
    plan = plan_build(precision, manifest.precision, typing=typing, has_precision_flags=has_flags,
                      int8_fp16=int8_fp16, tf32=tf32)
    gpu = gpu_info(device)
    logger = trt_logger(verbose)
    builder = trt.Builder(logger)
    cache_path = bundle / TIMING_CACHE_FILE
    shared_cache = None  # one ITimingCache shared by every graph's config, saved after each build
    results: dict[str, dict[str, Any]] = {}
    args = build_args(precision, axis_max, typing=typing, workspace_mb=workspace_mb, int8_fp16=int8_fp16, tf32=tf32,
                      optimization_level=optimization_level)
    report(f"building {precision} engines for {len(selected)} graph(s) on {gpu['name']} "
           f"(compute capability {gpu['compute_capability']}), TensorRT {trt.__version__}")

    for name in selected:
        entry = manifest.graphs[name]
        axes = profile_axes(entry, axis_max)
        shapes = input_shapes(entry, axes)
        onnx_path = bundle / entry.file
        if not onnx_path.is_file():
            raise BundleError(f"graph {name!r}: {onnx_path} is missing")
        onnx_sha = sha256_file(onnx_path)
        if onnx_sha != entry.sha256:
            raise BundleError(f"graph {name!r}: {onnx_path} does not match the manifest's sha256 (the file changed "
                              f"since export); re-export the bundle")
        engine_name = engine_file_name(name, precision)
        engine_path = bundle / engine_name
        wanted = {"precision": precision, "onnx_sha256": onnx_sha, "tensorrt": str(trt.__version__),
                  "gpu": gpu["name"], "compute_capability": gpu["compute_capability"],
                  "profile": {a: r.to_dict() for a, r in axes.items()}, "strongly_typed": plan.strongly_typed,
                  "flags": list(plan.set_flags)}
        old = entry.engine or {}
        if (not force and engine_path.is_file() and old.get("file") == engine_name
                and all(old.get(k) == v for k, v in wanted.items()) and old.get("sha256") == sha256_file(engine_path)):
            report(f"[{name}] {engine_name} is up to date (use --force to rebuild)")
            results[name] = dict(old)
            continue

        report(f"[{name}] parsing {entry.file}")
        network = builder.create_network(
            1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if plan.strongly_typed else 0)
        parser = trt.OnnxParser(network, logger)
        # parse_from_file (not parse(bytes)) so external-data files next to the graph are found.
        if not parser.parse_from_file(str(onnx_path)):
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise BackendError(f"graph {name!r}: TensorRT's ONNX parser rejected {onnx_path}:\n  " + "\n  ".join(errors)
                               + "\n(run the readiness check: it names unsupported operators and dtypes)")
        _check_network_io(network, entry)

        config = builder.create_builder_config()
        if workspace_mb is not None:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
        for flag in plan.set_flags:
            config.set_flag(getattr(trt.BuilderFlag, flag))
        for flag in plan.clear_flags:
            if hasattr(trt.BuilderFlag, flag):
                config.clear_flag(getattr(trt.BuilderFlag, flag))
        if optimization_level is not None:
            config.builder_optimization_level = int(optimization_level)
        profile = builder.create_optimization_profile()
        for tensor_name, shape in shapes.items():
            profile.set_shape(tensor_name, shape["min"], shape["opt"], shape["max"])
        config.add_optimization_profile(profile)
        if timing_cache:
            if shared_cache is None:
                data = cache_path.read_bytes() if cache_path.is_file() else b""
                try:
                    shared_cache = config.create_timing_cache(data)
                except Exception as bad:  # noqa: BLE001 - a corrupt cache file only costs build time
                    report(f"timing cache {cache_path} is unreadable ({bad}); starting a new one")
                    shared_cache = None
                if shared_cache is None:
                    data, shared_cache = b"", config.create_timing_cache(b"")
                if data:
                    report(f"reusing timing cache {cache_path} ({len(data)} bytes)")
            if config.set_timing_cache(shared_cache, ignore_mismatch=False) is False:
                report(f"timing cache {cache_path} was made by another TensorRT or GPU; starting a new one")
                shared_cache = config.create_timing_cache(b"")
                config.set_timing_cache(shared_cache, ignore_mismatch=False)
        monitor = _make_progress_monitor(trt, name, report)
        if monitor is not None:
            config.progress_monitor = monitor  # kept alive by `monitor` until the build returns

        report(f"[{name}] building {engine_name} (typing {'strong' if plan.strongly_typed else 'weak'}, "
               f"flags {'+'.join(plan.set_flags) or 'none'}, profile "
               + ", ".join(f"{a}={r.min}..{r.opt}..{r.max}" for a, r in axes.items()) + ")")
        started = time.monotonic()
        serialized = builder.build_serialized_network(network, config)
        seconds = time.monotonic() - started
        if monitor is not None and monitor.cancelled:
            raise KeyboardInterrupt
        if serialized is None:
            raise BackendError(f"graph {name!r}: TensorRT could not build the engine (see the TensorRT log above; "
                               f"a larger --workspace-mb or smaller --max values may help)")
        data = bytes(memoryview(serialized))
        _write_atomic(engine_path, data)
        if timing_cache and shared_cache is not None:
            _write_atomic(cache_path, bytes(memoryview(shared_cache.serialize())))
        record = {
            "format": ENGINE_RECORD_VERSION, "file": engine_name, "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data), **wanted, "input_shapes": shapes,
            "workspace_mb": workspace_mb, "build_seconds": round(seconds, 3),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "build_args": args}
        manifest = record_engine(bundle, name, record)
        results[name] = record
        report(f"[{name}] wrote {engine_name} ({len(data) / 1e6:.1f} MB) in {seconds:.1f} s")
        del parser, network, config
    return results


def _check_network_io(network: Any, entry: GraphEntry) -> None:
    """The parsed network's inputs/outputs are the manifest's, and no input is a shape tensor."""
    inputs = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
    outputs = {network.get_output(i).name for i in range(network.num_outputs)}
    expected_in = {t.name for t in entry.inputs}
    expected_out = {t.name for t in entry.outputs}
    if set(inputs) != expected_in or outputs != expected_out:
        raise BundleError(f"graph {entry.name!r}: the ONNX file's IO (inputs {sorted(inputs)}, outputs "
                          f"{sorted(outputs)}) differs from the manifest's (inputs {sorted(expected_in)}, "
                          f"outputs {sorted(expected_out)})")
    for name, tensor in inputs.items():
        if getattr(tensor, "is_shape_tensor", False):
            raise BundleError(f"graph {entry.name!r}: input {name!r} is a shape tensor for TensorRT (its values decide "
                              f"tensor shapes); the exporter must compute shapes from input dimensions instead")


# ----------------------------------------------------------------------------------------------------------------
# Command line: mirasol-build-engines BUNDLE [options]
# ----------------------------------------------------------------------------------------------------------------

def _parse_axis_max(pairs: Sequence[str], max_batch: int | None) -> dict[str, int]:
    result: dict[str, int] = {}
    for pair in pairs:
        axis, sep, value = pair.partition("=")
        if not sep or not axis or not value.strip().isdigit():
            raise BundleError(f"--max {pair!r}: expected AXIS=N, e.g. --max past_av=256")
        result[axis.strip()] = int(value)
    if max_batch is not None:
        result["batch"] = int(max_batch)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `mirasol-build-engines` (click); returns the exit status when called with argv."""
    try:
        import click  # noqa: PLC0415
    except ImportError:
        print("mirasol-build-engines needs click: pip install click", file=sys.stderr)
        return 2

    @click.command(name=BUILD_COMMAND, context_settings={"help_option_names": ["-h", "--help"]})
    @click.argument("bundle", type=click.Path(exists=True, file_okay=False))
    @click.option("--precision", type=click.Choice(NAMES), default=None,
                  help="Engine precision (default: the bundle's; fp16 can be built from an fp32 bundle).")
    @click.option("--max-batch", type=click.IntRange(min=1), default=None, help="Shorthand for --max batch=N.")
    @click.option("--max", "axis_max", multiple=True, metavar="AXIS=N",
                  help="Lower an axis maximum of the optimization profile (repeatable), e.g. --max past_av=256.")
    @click.option("--workspace-mb", type=click.IntRange(min=1), default=DEFAULT_WORKSPACE_MB, show_default=True,
                  help="Builder workspace memory pool limit.")
    @click.option("--graph", "graphs", multiple=True, help="Build only this graph (repeatable).")
    @click.option("--typing", type=click.Choice(TYPINGS), default="auto", show_default=True,
                  help="Strongly or weakly typed network.")
    @click.option("--int8-fp16/--int8-fp32", default=True, show_default=True,
                  help="int8 engines: let unquantized layers run in fp16 (weak typing).")
    @click.option("--tf32/--no-tf32", default=False, show_default=True, help="Allow TF32 in fp32 engines.")
    @click.option("--opt-level", type=click.IntRange(0, 5), default=None, help="Builder optimization level.")
    @click.option("--timing-cache/--no-timing-cache", default=True, show_default=True,
                  help=f"Load and save BUNDLE/{TIMING_CACHE_FILE}.")
    @click.option("--force", is_flag=True, help="Rebuild engines that are up to date.")
    @click.option("--device", type=click.IntRange(min=0), default=0, show_default=True, help="CUDA device ordinal.")
    @click.option("--verbose", is_flag=True, help="TensorRT's verbose log.")
    @click.option("--quiet", is_flag=True, help="No progress lines.")
    def command(bundle: str, precision: str | None, max_batch: int | None, axis_max: tuple[str, ...],
                workspace_mb: int, graphs: tuple[str, ...], typing: str, int8_fp16: bool, tf32: bool,
                opt_level: int | None, timing_cache: bool, force: bool, device: int, verbose: bool,
                quiet: bool) -> None:
        """Build TensorRT engines for the graphs of BUNDLE on this GPU and record them in its manifest."""
        try:
            records = build_engines(
                bundle, precision=precision, graphs=graphs or None, axis_max=_parse_axis_max(axis_max, max_batch),
                workspace_mb=workspace_mb, typing=typing, int8_fp16=int8_fp16, tf32=tf32,
                optimization_level=opt_level, timing_cache=timing_cache, force=force, device=device,
                verbose=verbose, progress=None if quiet else (lambda line: click.echo(line, err=True)))
        except MirasolError as error:
            raise click.ClickException(str(error)) from None
        for name, record in records.items():
            click.echo(f"{name}: {record['file']} ({record['precision']}, TensorRT {record['tensorrt']}, "
                       f"{record['gpu']}, sm {record['compute_capability']})")

    if argv is None:
        command.main(prog_name=BUILD_COMMAND)  # exits
        return 0
    try:
        command.main(args=list(argv), prog_name=BUILD_COMMAND, standalone_mode=False)
    except click.ClickException as error:
        error.show()
        return error.exit_code
    except click.exceptions.Abort:
        return 1
    return 0


if __name__ == "__main__":
    main()
