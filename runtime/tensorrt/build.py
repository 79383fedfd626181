"""Build TensorRT engines for a bundle, on the device that will run them.

Runs where only numpy and TensorRT (10 or newer) are installed: no torch, no onnx, no cuda-python. For each
graph of the bundle it parses the ONNX file, makes one optimization profile from the manifest's axes, builds a
serialized engine `<graph>.<precision>.engine` into the bundle and records it in the manifest (GraphEntry.engine),
with the device memory it needs: the engine itself, and the activation memory of one execution context at the
profile's largest shapes (the backend gives each context only what the shapes it runs need).

    mirasol-build-engines bundle/ --max-batch 1 --workspace-mb 1024

Python API: `build_engines(bundle_dir, ...)`; the planning (profiles, typing, flags, records) is in
`plan.py` and imports anywhere; this module imports tensorrt lazily.

Documentation followed (TensorRT 10 Python API; every name used is checked against the real bindings' name tables
by tests/test_tensorrt.py):
- build phase, parser, profiles, serialization, runtime: "Python API Documentation",
  https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/python-api-docs.html
- Builder / NetworkDefinitionCreationFlag (STRONGLY_TYPED = 1, passed as the bit 1 << 1):
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/Builder.html
- IBuilderConfig (set_flag / clear_flag, set_memory_pool_limit(MemoryPoolType.WORKSPACE, bytes),
  add_optimization_profile, create_timing_cache / set_timing_cache, progress_monitor, builder_optimization_level):
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/BuilderConfig.html
- IOptimizationProfile.set_shape: min <= opt <= max, and a dimension the network fixes must be that size at
  min, opt and max (raises ValueError on what it can check; the rest fails at build time):
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/OptimizationProfile.html
- IProgressMonitor (phase_start / step_complete / phase_finish; must be thread-safe; returning False from
  step_complete cancels the build):
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/ProgressMonitor.html
  and the sample NVIDIA/TensorRT samples/python/simple_progress_monitor/simple_progress_monitor.py
- ICudaEngine.device_memory_size_v2 (activation memory of a context at the profile's largest shapes):
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/Engine.html
- Explicit quantization (Q/DQ networks; symmetric quantization; TensorRT 11 removes the precision flags and
  is always strongly typed):
  https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/quantized-types-explicit-quantization.html
  and https://docs.nvidia.com/deeplearning/tensorrt/11.0.0/api/migration/tensorrt-10x-to-11x-c-api.html
"""
from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..bundle.manifest import AxisRange, GraphEntry, Manifest
from ..bundle.reader import sha256_file
from ..errors import BackendError, BundleError
from ..files.atomic import write_file
from .env import SMALL_DEVICE_BYTES, gpu_info, has_precision_flags, import_tensorrt, trt_logger, use_device
from .plan import (
    DEFAULT_WORKSPACE_MB,
    BuildPlan,
    build_args,
    check_axis_overrides,
    check_fixed_dims,
    engine_file_name,
    input_shapes,
    int8_problem,
    plan_build,
    profile_axes,
    record_engine,
)

TIMING_CACHE_FILE = "timing.cache"
ENGINE_RECORD_VERSION = 2  # 2: "build_args" compared for up-to-date, "context_memory_bytes"

Progress = Callable[[str], None]


def build_engines(
    bundle_dir: str | Path,
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
    `timing.cache`. force: rebuild engines that are already up to date (same options, same ONNX file, same
    TensorRT and GPU). progress: called with one line of text at a time (None: silent).
    Returns {graph: engine record}; the record is also written to the manifest after each graph.
    """
    report: Progress = progress or (lambda line: None)
    bundle = Path(bundle_dir)
    manifest = Manifest.read(bundle)
    unbuildable = int8_problem(manifest, bundle)
    if unbuildable:  # said before any work, from the manifest alone
        raise BundleError(unbuildable)
    precision = precision or manifest.precision
    selected = list(graphs) if graphs else list(manifest.graphs)
    for name in selected:
        if name not in manifest.graphs:
            raise BundleError(f"bundle {bundle} has no graph {name!r} (it has {', '.join(manifest.graphs)})")
    check_axis_overrides(manifest, axis_max, selected)
    if workspace_mb is not None and workspace_mb <= 0:
        raise BundleError(f"--workspace-mb must be positive, got {workspace_mb}")

    trt = import_tensorrt()
    plan = plan_build(precision, manifest.precision, typing=typing, has_precision_flags=has_precision_flags(trt),
                      int8_fp16=int8_fp16, tf32=tf32)
    use_device(device)  # TensorRT builds on the thread's current device
    gpu = gpu_info(device)
    builder = _Builder(trt, bundle, plan, verbose, timing_cache, report)
    args = build_args(precision, axis_max, typing=typing, workspace_mb=workspace_mb, int8_fp16=int8_fp16, tf32=tf32,
                      optimization_level=optimization_level)
    report(f"building {precision} engines for {len(selected)} graph(s) on {gpu['name']} "
           f"(compute capability {gpu['compute_capability']}), TensorRT {trt.__version__}")
    results: dict[str, dict[str, Any]] = {}
    for name in selected:
        entry = manifest.graphs[name]
        axes = profile_axes(entry, axis_max)
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
                  "flags": list(plan.set_flags), "pinned_fp32": list(plan.pinned), "build_args": args}
        old = entry.engine or {}
        if (not force and engine_path.is_file() and old.get("file") == engine_name
                and all(old.get(k) == v for k, v in wanted.items()) and old.get("sha256") == sha256_file(engine_path)):
            report(f"[{name}] {engine_name} is up to date (use --force to rebuild)")
            results[name] = dict(old)
            continue
        data, seconds, context_memory = builder.build(entry, onnx_path, engine_name, axes, workspace_mb,
                                                      optimization_level)
        write_file(engine_path, data)  # a name of ours in the bundle
        builder.save_timing_cache()
        size = int(data.nbytes)
        record = {
            "format": ENGINE_RECORD_VERSION, "file": engine_name, "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": size, "context_memory_bytes": context_memory, **wanted,
            "input_shapes": input_shapes(entry, axes), "workspace_mb": workspace_mb,
            "build_seconds": round(seconds, 3), "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        manifest = record_engine(bundle, name, record)
        results[name] = record
        del data
        report(f"[{name}] wrote {engine_name} ({size / 1e6:.1f} MB) in {seconds:.1f} s; a context needs up to "
               f"{context_memory / 1e6:.1f} MB of activation memory")
    return results


class _Builder:
    """One trt.Builder, Runtime and shared timing cache for the graphs of one `build_engines` call."""

    def __init__(self, trt: Any, bundle: Path, plan: BuildPlan, verbose: bool, timing_cache: bool,
                 report: Progress) -> None:
        self.trt = trt
        self.plan = plan
        self.report = report
        self.logger = trt_logger(verbose)
        self.builder = trt.Builder(self.logger)
        self.runtime = trt.Runtime(self.logger)
        self.cache_path = bundle / TIMING_CACHE_FILE if timing_cache else None
        self.cache: Any = None  # one ITimingCache shared by every graph's config, saved after each build

    def build(self, entry: GraphEntry, onnx_path: Path, engine_name: str, axes: Mapping[str, AxisRange],
              workspace_mb: int | None, optimization_level: int | None) -> tuple[Any, float, int]:
        """(serialized engine: TensorRT's IHostMemory, written as it is without a copy; build seconds; activation
        bytes of one context at the profile's largest shapes)."""
        trt, name = self.trt, entry.name
        self.report(f"[{name}] parsing {entry.file}")
        network = self.builder.create_network(
            1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if self.plan.strongly_typed else 0)
        parser = trt.OnnxParser(network, self.logger)
        # parse_from_file (not parse(bytes)) so external-data files next to the graph are found.
        if not parser.parse_from_file(str(onnx_path)):
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise BackendError(f"graph {name!r}: TensorRT's ONNX parser rejected {onnx_path}:\n  " + "\n  ".join(errors)
                               + "\n(run the readiness check: it names unsupported operators and dtypes)")
        network_shapes = _check_network_io(network, entry)
        if self.plan.pinned:
            pinned = pin_fp32(trt, rotary_layers(trt, network))
            self.report(f"[{name}] weakly typed: {pinned} rotary-angle layer(s) pinned to fp32 "
                        f"(OBEY_PRECISION_CONSTRAINTS); TensorRT chooses the precision of the others")

        config = self.builder.create_builder_config()
        if workspace_mb is not None:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
        for flag in self.plan.set_flags:
            config.set_flag(getattr(trt.BuilderFlag, flag))
        for flag in self.plan.clear_flags:
            if hasattr(trt.BuilderFlag, flag):
                config.clear_flag(getattr(trt.BuilderFlag, flag))
        if optimization_level is not None:
            config.builder_optimization_level = int(optimization_level)
        profile = self.builder.create_optimization_profile()
        for tensor_name, shape in input_shapes(entry, axes).items():
            check_fixed_dims(entry, tensor_name, network_shapes[tensor_name], shape)
            try:
                profile.set_shape(tensor_name, shape["min"], shape["opt"], shape["max"])
            except (ValueError, RuntimeError, TypeError) as refused:
                raise BundleError(f"graph {name!r}: TensorRT refused the profile of input {tensor_name!r} (min "
                                  f"{shape['min']}, opt {shape['opt']}, max {shape['max']}): {refused}") from None
        if config.add_optimization_profile(profile) < 0:
            raise BundleError(f"graph {name!r}: TensorRT refused the optimization profile (see its log)")
        self._use_timing_cache(config)
        monitor = _make_progress_monitor(trt, name, self.report)
        if monitor is not None:
            config.progress_monitor = monitor  # kept alive by `monitor` until the build returns

        self.report(f"[{name}] building {engine_name} (typing {'strong' if self.plan.strongly_typed else 'weak'}, "
                    f"flags {'+'.join(self.plan.set_flags) or 'none'}, profile "
                    + ", ".join(f"{a}={r.min}..{r.opt}..{r.max}" for a, r in axes.items()) + ")")
        started = time.monotonic()
        serialized = self.builder.build_serialized_network(network, config)
        seconds = time.monotonic() - started
        if monitor is not None and monitor.cancelled:
            raise KeyboardInterrupt
        if serialized is None:
            raise BackendError(f"graph {name!r}: TensorRT could not build the engine (see the TensorRT log above; "
                               f"a larger --workspace-mb or smaller --max values may help)")
        engine = self.runtime.deserialize_cuda_engine(serialized)
        if engine is None:
            raise BackendError(f"graph {name!r}: TensorRT cannot deserialize the engine it just built (see its log)")
        return serialized, seconds, int(engine.device_memory_size_v2)

    def _use_timing_cache(self, config: Any) -> None:
        if self.cache_path is None:
            return
        if self.cache is None:
            data = self.cache_path.read_bytes() if self.cache_path.is_file() else b""
            try:
                self.cache = config.create_timing_cache(data)
            except Exception as bad:  # noqa: BLE001 - a corrupt cache file only costs build time
                self.report(f"timing cache {self.cache_path} is unreadable ({bad}); starting a new one")
                data, self.cache = b"", config.create_timing_cache(b"")
            if data:
                self.report(f"reusing timing cache {self.cache_path} ({len(data)} bytes)")
        if not config.set_timing_cache(self.cache, False):
            self.report(f"timing cache {self.cache_path} was made by another TensorRT or GPU; starting a new one")
            self.cache = config.create_timing_cache(b"")
            config.set_timing_cache(self.cache, False)

    def save_timing_cache(self) -> None:
        if self.cache_path is not None and self.cache is not None:
            write_file(self.cache_path, bytes(memoryview(self.cache.serialize())))


def rotary_layers(trt: Any, network: Any) -> list[Any]:
    """The layers computing the rotary angles: every Cos and Sin unary layer and, transitively, the layers that
    produce their inputs (the positions, their cast, the frequencies), as calibration/fp16.py's `rotary_angles`
    group finds them in the ONNX graph. Found by layer type, not by name (the ONNX parser's layer names are its own)."""
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    producer = {layer.get_output(k).name: i for i, layer in enumerate(layers) for k in range(layer.num_outputs)}
    todo = []
    for i, layer in enumerate(layers):
        if layer.type == trt.LayerType.UNARY:
            layer.__class__ = trt.IUnaryLayer  # the Python API's downcast, to read the operation
            if layer.op in (trt.UnaryOperation.COS, trt.UnaryOperation.SIN):
                todo.append(i)
    found: set[int] = set()
    while todo:
        i = todo.pop()
        if i in found:
            continue
        found.add(i)
        for j in range(layers[i].num_inputs):
            tensor = layers[i].get_input(j)
            if tensor is not None and tensor.name in producer:
                todo.append(producer[tensor.name])
    return [layers[i] for i in sorted(found)]


def pin_fp32(trt: Any, layers: Sequence[Any]) -> int:
    """Constrain the floating-point layers among `layers` to compute and output fp32 (with the builder flag
    OBEY_PRECISION_CONSTRAINTS, which the plan sets); returns how many were pinned. Integer layers (shape
    arithmetic, the int64 positions) keep their types."""
    floats = (trt.float32, trt.float16)
    pinned = 0
    for layer in layers:
        outputs = [k for k in range(layer.num_outputs) if layer.get_output(k).dtype in floats]
        if not outputs:
            continue
        layer.precision = trt.float32
        for k in outputs:
            layer.set_output_type(k, trt.float32)
        pinned += 1
    return pinned


def _check_network_io(network: Any, entry: GraphEntry) -> dict[str, tuple[int, ...]]:
    """The parsed network's inputs/outputs are the manifest's and no input is a shape tensor; returns each input's
    network shape (-1 where dynamic)."""
    inputs = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
    outputs = {network.get_output(i).name for i in range(network.num_outputs)}
    expected_in = {t.name for t in entry.inputs}
    expected_out = {t.name for t in entry.outputs}
    if set(inputs) != expected_in or outputs != expected_out:
        raise BundleError(f"graph {entry.name!r}: the ONNX file's IO (inputs {sorted(inputs)}, outputs "
                          f"{sorted(outputs)}) differs from the manifest's (inputs {sorted(expected_in)}, "
                          f"outputs {sorted(expected_out)})")
    for name, tensor in inputs.items():
        if tensor.is_shape_tensor:
            raise BundleError(f"graph {entry.name!r}: input {name!r} is a shape tensor for TensorRT (its values decide "
                              f"tensor shapes); the exporter must compute shapes from input dimensions instead")
    return {name: tuple(int(d) for d in tensor.shape) for name, tensor in inputs.items()}


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


def memory_report(records: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One line per engine (file, precision, TensorRT, GPU, engine and per-context activation memory) and a total."""
    lines = [f"{name}: {r['file']} ({r['precision']}, TensorRT {r['tensorrt']}, {r['gpu']}, sm "
             f"{r['compute_capability']}): engine {_mb(r.get('bytes'))}, context memory up to "
             f"{_mb(r.get('context_memory_bytes'))}" for name, r in records.items()]
    if len(records) > 1:
        lines.append(f"total: engines {_mb(sum(r.get('bytes') or 0 for r in records.values()))}, context memory up "
                     f"to {_mb(sum(r.get('context_memory_bytes') or 0 for r in records.values()))} per context of "
                     f"each graph (the backend allocates what the shapes run need; 1 context per graph below "
                     f"{SMALL_DEVICE_BYTES >> 30} GiB of device memory, else 2)")
    return lines


def _mb(nbytes: Any) -> str:
    return "unknown" if nbytes is None else f"{int(nbytes) / 1e6:.1f} MB"
