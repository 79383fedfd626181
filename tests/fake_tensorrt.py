"""A fake TensorRT (10.3 or 11), as strict as the real one where a difference could hide a bug, on the fake CUDA
runtime of fake_cuda.py. It runs the ONNX graph with ONNX Runtime, so the engine builder and the TensorRT backend
run end to end in CI. What it enforces, like the real thing:
- only names the real bindings have: tests/tensorrt_api/tensorrt_names.tsv gives the status of every name defined
  here in the real tensorrt-cu12-bindings 10.3.0 and 11.4.0.106 (tests/tensorrt_api/extract.py reads the wheels),
  and tests/test_tensorrt_build.py compares; the TensorRT 11 variant has no BuilderFlag.FP16/INT8 and types every
  network strongly; NetworkDefinitionCreationFlag.STRONGLY_TYPED is 1 (a bit index: create_network takes 1 << 1);
- TF32 is on in a new builder config; a strongly typed network with FP16/INT8 flags does not build;
- IOptimizationProfile.set_shape raises ValueError unless 0 <= min <= opt <= max with equal ranks, and a profile
  that varies a dimension the network fixes does not build;
- set_tensor_address returns False for null or misaligned addresses; at launch every IO address must lie in a live
  allocation large enough for the tensor, and a context made with USER_MANAGED memory must have been given
  enough (update_device_memory_size_for_shapes) through set_device_memory;
- execute_async_v3 is queued on its stream and runs at cudaStreamSynchronize;
- an engine deserializes only in the TensorRT version that built it;
- the network has a layer per ONNX node (type, inputs, outputs with their types); layer precisions and output types
  can be set only on a weakly typed network; a weakly typed network built with FP16 allowed is flagged (a warning in
  the log, "weak_unpinned" in the engine) when a rotary-angle layer (Cos, Sin and the float layers feeding them) is
  not pinned to fp32 with OBEY_PRECISION_CONSTRAINTS;
- stricter than documented, as Polygraphy's runner behaves: a context whose input shapes changed runs only after
  set_device_memory was called again;
- engines are built on the calling thread's current device (cudaSetDevice), recorded in the engine.
The fake's engine is JSON (its build plan: flags, typing, profile, the ONNX path), so tests can read what was built.
"""
from __future__ import annotations

import enum
import json
import threading
import types
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from .fake_cuda import ALIGNMENT, Device, IllegalAddress, make_cudart, make_cudriver
from .fake_tensorrt_network import make_network

VERSIONS = ("10.3.0", "11.4.0.106")  # the wheels tests/tensorrt_api/tensorrt_names.tsv was extracted from


def make_tensorrt(gpu: Device, version: str = "10.3.0") -> types.ModuleType:
    """A fake `tensorrt` module of that version ("10.3.0" or "11.4.0.106"). Attributes that tests/tensorrt_api checks
    against the real bindings are public (methods, properties, enum members, `__slots__`); the fake's own state is
    underscored."""
    trt11 = int(version.split(".")[0]) >= 11

    class ILogger:
        class Severity(enum.IntEnum):
            INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = 0, 1, 2, 3, 4

    class Logger(ILogger):
        __slots__ = ("min_severity",)
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = tuple(ILogger.Severity)

        def __init__(self, min_severity: int = ILogger.Severity.WARNING) -> None:
            self.min_severity = min_severity

    class DataType(enum.IntEnum):
        FLOAT, HALF, INT8, INT32, BOOL, UINT8, FP8, BF16, INT64, INT4 = range(10)

    # TensorRT 11 removed the precision flags and weak typing (NvInfer.h of 10.3: kTF32 = 6, kOBEY_... = 9)
    precision_flags = {} if trt11 else {"FP16": 0, "INT8": 1, "OBEY_PRECISION_CONSTRAINTS": 9}
    BuilderFlag = enum.IntEnum("BuilderFlag", {**precision_flags, "TF32": 6})  # noqa: N806
    creation_flags = {} if trt11 else {"EXPLICIT_BATCH": 0}
    NetworkDefinitionCreationFlag = enum.IntEnum(  # noqa: N806
        "NetworkDefinitionCreationFlag", {**creation_flags, "STRONGLY_TYPED": 1})

    class MemoryPoolType(enum.IntEnum):
        WORKSPACE = 0

    class TensorIOMode(enum.IntEnum):
        NONE, INPUT, OUTPUT = 0, 1, 2

    class ExecutionContextAllocationStrategy(enum.IntEnum):
        STATIC, ON_PROFILE_CHANGE, USER_MANAGED = 0, 1, 2

    numpy_types = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT8: np.int8,
                   DataType.INT32: np.int32, DataType.INT64: np.int64, DataType.BOOL: np.bool_,
                   DataType.UINT8: np.uint8}
    onnx_types = {onnx.TensorProto.FLOAT: DataType.FLOAT, onnx.TensorProto.FLOAT16: DataType.HALF,
                  onnx.TensorProto.INT64: DataType.INT64, onnx.TensorProto.INT32: DataType.INT32,
                  onnx.TensorProto.BOOL: DataType.BOOL, onnx.TensorProto.INT8: DataType.INT8,
                  onnx.TensorProto.UINT8: DataType.UINT8}

    def nptype(trt_type: DataType) -> type:
        if trt_type in numpy_types:
            return numpy_types[trt_type]
        raise TypeError("Could not resolve TensorRT datatype to an equivalent numpy datatype.")

    def refuse(message: str) -> None:
        """Log an error the way TensorRT does (and return None, as its failing calls do)."""
        gpu.log.append(f"[TRT] [E] {message}")

    def nbytes(shape: Any, dtype: DataType) -> int:
        return int(np.prod(shape, dtype=np.int64)) * np.dtype(nptype(dtype)).itemsize

    class IHostMemory(bytes):
        nbytes = property(lambda self: len(self))

    network = make_network(DataType, onnx_types, NetworkDefinitionCreationFlag, trt11)
    ITensor, LayerType, UnaryOperation, ILayer, IUnaryLayer, INetworkDefinition, OnnxParser = (  # noqa: N806
        network.ITensor, network.LayerType, network.UnaryOperation, network.ILayer, network.IUnaryLayer,
        network.INetworkDefinition, network.OnnxParser)
    unpinned_rotary = network.unpinned_rotary

    class IOptimizationProfile:
        def __init__(self) -> None:
            self._shapes: dict[str, list[list[int]]] = {}

        def set_shape(self, input: str, min: Any, opt: Any, max: Any) -> None:  # noqa: A002 - the real names
            low, mid, high = ([int(d) for d in s] for s in (min, opt, max))
            if not len(low) == len(mid) == len(high) or not all(0 <= a <= b <= c for a, b, c in zip(low, mid, high)):
                raise ValueError(f"set_shape({input!r}): min {low}, opt {mid}, max {high} is not "
                                 f"0 <= min <= opt <= max with equal ranks")
            self._shapes[input] = [low, mid, high]

    cache_header = f"fake-timing-cache {version}".encode()

    class ITimingCache:
        def __init__(self, data: bytes) -> None:
            if data and not data.startswith(b"fake-timing-cache"):
                raise RuntimeError("timing cache: not a timing cache")
            self._data = bytes(data) or cache_header

        def serialize(self) -> IHostMemory:
            return IHostMemory(self._data)

    class IProgressMonitor:
        def __init__(self) -> None:
            self._initialized = True

    class IBuilderConfig:
        __slots__ = ("builder_optimization_level", "_flags", "_profiles", "_cache", "_monitor")

        def __init__(self) -> None:
            self._flags = {BuilderFlag.TF32}  # TF32 is on by default
            self._profiles: list[IOptimizationProfile] = []
            self._cache: ITimingCache | None = None
            self._monitor: Any = None
            self.builder_optimization_level = 3

        def set_memory_pool_limit(self, pool: MemoryPoolType, pool_size: int) -> None:
            if MemoryPoolType(pool) != MemoryPoolType.WORKSPACE or pool_size <= 0:
                raise ValueError(f"set_memory_pool_limit({pool}, {pool_size})")

        def set_flag(self, flag: Any) -> None:
            self._flags.add(BuilderFlag(flag))

        def clear_flag(self, flag: Any) -> None:
            self._flags.discard(BuilderFlag(flag))

        def get_flag(self, flag: Any) -> bool:
            return BuilderFlag(flag) in self._flags

        def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
            self._profiles.append(profile)
            return len(self._profiles) - 1

        def create_timing_cache(self, serialized_timing_cache: bytes) -> ITimingCache:
            return ITimingCache(serialized_timing_cache)

        def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
            if cache._data != cache_header and not ignore_mismatch:
                return False
            self._cache = cache
            return True

        @property
        def progress_monitor(self) -> Any:
            return self._monitor

        @progress_monitor.setter
        def progress_monitor(self, monitor: Any) -> None:
            if not getattr(monitor, "_initialized", False):
                raise TypeError("IProgressMonitor.__init__() must be called when overriding __init__")
            self._monitor = monitor

    class Builder:
        def __init__(self, logger: Logger) -> None:
            self._logger = logger

        def create_network(self, flags: int = 0) -> INetworkDefinition:
            return INetworkDefinition(flags)

        def create_builder_config(self) -> IBuilderConfig:
            return IBuilderConfig()

        def create_optimization_profile(self) -> IOptimizationProfile:
            return IOptimizationProfile()

        def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig) -> Any:
            monitor = config._monitor
            if monitor is not None:
                monitor.phase_start("Building engine", None, 4)
                for step in range(4):
                    if not monitor.step_complete("Building engine", step):
                        return None
                monitor.phase_finish("Building engine")
            precision = sorted(f.name for f in config._flags if f.name in ("FP16", "INT8"))
            if network._strongly_typed and precision:
                return refuse(f"BuilderFlag {precision} cannot be set for a strongly typed network")
            if network._refused:
                return refuse("; ".join(network._refused))
            unpinned = [] if network._strongly_typed or "FP16" not in precision else unpinned_rotary(network, config)
            if unpinned:
                gpu.log.append(f"[TRT] [W] weakly typed network with FP16: rotary-angle layers {unpinned} are not "
                               f"pinned to fp32 (layer precision, output types and OBEY_PRECISION_CONSTRAINTS)")
            if len(config._profiles) != 1:
                return refuse(f"expected one optimization profile, got {len(config._profiles)}")
            profile = config._profiles[0]._shapes
            for tensor in network._inputs:
                shapes = profile.get(tensor.name)
                if shapes is None:
                    return refuse(f"input {tensor.name!r} has no optimization profile shape")
                if any(len(s) != len(tensor.shape) for s in shapes):
                    return refuse(f"input {tensor.name!r}: the profile's rank differs from the network's "
                                  f"{tensor.shape}")
                for i, fixed in enumerate(tensor.shape):
                    if fixed >= 0 and {s[i] for s in shapes} != {fixed}:
                        return refuse(f"input {tensor.name!r} dimension {i} is fixed to {fixed}, profile {shapes}")
            return IHostMemory(json.dumps({
                "fake_tensorrt": version, "path": network._path, "profile": profile,
                "inputs": [t.name for t in network._inputs], "outputs": [t.name for t in network._outputs],
                "dtypes": {t.name: int(t.dtype) for t in (*network._inputs, *network._outputs)},
                "flags": sorted(f.name for f in config._flags), "strongly_typed": network._strongly_typed,
                "pinned_fp32": sorted(layer.name for layer in network._layers if layer._precision == DataType.FLOAT),
                "weak_unpinned": unpinned, "device": gpu.current_device()}).encode())

    def activation_bytes(shapes: dict[str, Any], dtypes: dict[str, DataType]) -> int:
        """The fake engine's activation memory for these input shapes: it grows with them."""
        return 1024 + 2 * sum(nbytes(s, dtypes[n]) for n, s in shapes.items())

    class ICudaEngine:
        def __init__(self, plan: dict[str, Any]) -> None:
            self._plan = plan
            self._names = plan["inputs"] + plan["outputs"]
            self._dtypes = {n: DataType(v) for n, v in plan["dtypes"].items()}
            self._ort: ort.InferenceSession | None = None
            self._lock = threading.Lock()

        @property
        def _session(self) -> ort.InferenceSession:
            """The ONNX Runtime session that computes what the engine would (made on first use)."""
            with self._lock:
                if self._ort is None:
                    self._ort = ort.InferenceSession(self._plan["path"], providers=["CPUExecutionProvider"])
                return self._ort

        num_io_tensors = property(lambda self: len(self._names))

        @property
        def device_memory_size_v2(self) -> int:
            return activation_bytes({n: s[2] for n, s in self._plan["profile"].items()}, self._dtypes)

        def get_tensor_name(self, index: int) -> str:
            return self._names[index]

        def get_tensor_mode(self, name: str) -> TensorIOMode:
            if name not in self._names:
                return TensorIOMode.NONE
            return TensorIOMode.INPUT if name in self._plan["inputs"] else TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name: str) -> DataType:
            return self._dtypes[name]

        def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[list[int]]:
            if profile_index != 0:
                raise ValueError(f"profile {profile_index}: the engine has one")
            return self._plan["profile"][name]

        def is_shape_inference_io(self, name: str) -> bool:
            return False

        def create_execution_context(self, strategy: Any = ExecutionContextAllocationStrategy.STATIC
                                     ) -> "IExecutionContext":
            return IExecutionContext(self, ExecutionContextAllocationStrategy(strategy))

    class IExecutionContext:
        def __init__(self, engine: ICudaEngine, strategy: ExecutionContextAllocationStrategy) -> None:
            self._engine, self._strategy = engine, strategy
            self._shapes: dict[str, tuple[int, ...]] = {}
            self._addresses: dict[str, int] = {}
            self._memory: tuple[int, int] | None = None
            self._output_shapes: dict[tuple, dict[str, tuple[int, ...]]] = {}
            if strategy != ExecutionContextAllocationStrategy.USER_MANAGED:
                gpu.static_context_bytes += engine.device_memory_size_v2

        def set_input_shape(self, name: str, shape: Any) -> bool:
            shape = tuple(int(d) for d in shape)
            low, _, high = self._engine._plan["profile"].get(name, ([], [], []))
            if name not in self._engine._plan["inputs"] or len(shape) != len(low) or not all(
                    a <= d <= b for a, d, b in zip(low, shape, high)):
                refuse(f"set_input_shape({name!r}, {shape}): outside the profile {low}..{high}")
                return False
            if self._shapes.get(name) != shape:
                self._memory = None  # the fake asks for set_device_memory after every shape change
            self._shapes[name] = shape
            return True

        def _all_shapes(self) -> bool:
            return all(n in self._shapes for n in self._engine._plan["inputs"])

        def update_device_memory_size_for_shapes(self) -> int:
            return activation_bytes(self._shapes, self._engine._dtypes) if self._all_shapes() else 0

        def set_device_memory(self, memory: int, size: int) -> None:
            memory, size = int(memory), int(size)
            if not memory or memory % ALIGNMENT or not gpu.holds(memory, size):
                refuse(f"set_device_memory(0x{memory:x}, {size}): not 256-byte aligned allocated memory")
                return
            self._memory = (memory, size)

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            if name in self._shapes:
                return self._shapes[name]
            if not self._all_shapes():
                return (-1,)
            key = tuple(sorted(self._shapes.items()))
            if key not in self._output_shapes:
                session = self._engine._session
                outs = session.run(None, {n: np.zeros(s, nptype(self._engine._dtypes[n]))
                                          for n, s in self._shapes.items()})
                self._output_shapes[key] = {o.name: a.shape for o, a in zip(session.get_outputs(), outs)}
            return self._output_shapes[key][name]

        def set_tensor_address(self, name: str, memory: int) -> bool:
            memory = int(memory)
            if name not in self._engine._names or not memory or memory % ALIGNMENT:
                refuse(f"set_tensor_address({name!r}, 0x{memory:x}): null, misaligned or unknown tensor")
                return False
            self._addresses[name] = memory
            return True

        def execute_async_v3(self, stream_handle: int) -> bool:
            engine = self._engine
            if not self._all_shapes():
                refuse("execute_async_v3: not every input shape is set")
                return False
            if self._strategy == ExecutionContextAllocationStrategy.USER_MANAGED:
                need = self.update_device_memory_size_for_shapes()
                if self._memory is None or self._memory[1] < need or not gpu.holds(*self._memory):
                    refuse(f"execute_async_v3: the context needs {need} bytes of device memory, it has "
                           f"{self._memory} (set_device_memory)")
                    return False
            io = {}
            for name in engine._names:
                shape = self.get_tensor_shape(name)
                io[name] = (self._addresses.get(name), shape, nbytes(shape, engine._dtypes[name]))
                if io[name][0] is None or not gpu.holds(io[name][0], io[name][2]):
                    refuse(f"execute_async_v3: tensor {name!r} ({io[name][2]} bytes) has no valid address")
                    return False
            memory = self._memory

            def run() -> None:
                if memory is not None and not gpu.holds(*memory):
                    raise IllegalAddress("the context's activation memory was freed")
                feeds = {n: np.frombuffer(gpu.read(io[n][0], io[n][2], n), nptype(engine._dtypes[n])).reshape(io[n][1])
                         for n in engine._plan["inputs"]}
                outs = engine._session.run(engine._plan["outputs"], feeds)
                for name, value in zip(engine._plan["outputs"], outs):
                    if value.shape != tuple(io[name][1]):
                        raise IllegalAddress(f"{name}: ran to shape {value.shape}, get_tensor_shape said {io[name][1]}")
                    gpu.write(io[name][0], np.ascontiguousarray(value).tobytes(), name)
            return gpu.enqueue(int(stream_handle), run)

    class Runtime:
        def __init__(self, logger: Logger) -> None:
            self._logger = logger

        def deserialize_cuda_engine(self, serialized_engine: Any) -> ICudaEngine | None:
            gpu.deserialized_from.append(type(serialized_engine).__name__)
            plan = json.loads(bytes(serialized_engine))
            if plan.get("fake_tensorrt") != version:
                return refuse(f"the engine was built by TensorRT {plan.get('fake_tensorrt')}, this is {version}")
            return ICudaEngine(plan)

    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    for value in (ILogger, Logger, DataType, BuilderFlag, NetworkDefinitionCreationFlag, MemoryPoolType, TensorIOMode,
                  ExecutionContextAllocationStrategy, IHostMemory, ITensor, LayerType, UnaryOperation, ILayer,
                  IUnaryLayer, INetworkDefinition, OnnxParser,
                  IOptimizationProfile, ITimingCache, IProgressMonitor, IBuilderConfig, Builder, ICudaEngine,
                  IExecutionContext, Runtime, nptype):
        setattr(trt, value.__name__, value)
    for alias, member in (("float32", DataType.FLOAT), ("float16", DataType.HALF), ("int8", DataType.INT8),
                          ("int32", DataType.INT32), ("int64", DataType.INT64), ("bool", DataType.BOOL),
                          ("uint8", DataType.UINT8)):
        setattr(trt, alias, member)
    return trt


def surface(module: types.ModuleType) -> set[str]:
    """The names a fake module defines: its public names, and `Class.member` for the public members of its classes
    (methods, properties, `__slots__`, enum members, nested classes)."""
    names = set()
    for name, value in vars(module).items():
        if name.startswith("_") and name != "__version__":
            continue
        names.add(name)
        if isinstance(value, type):
            members = value.__members__ if issubclass(value, enum.Enum) else vars(value)
            names.update(f"{name}.{member}" for member in members if not member.startswith("_"))
    return names


class FakeGPU:
    """A fake TensorRT + CUDA runtime installed into sys.modules for a test (see `install`)."""

    def __init__(self, version: str, total_memory: int, **device: Any) -> None:
        self.device = Device(total_memory, **device)
        self.cudart = make_cudart(self.device)
        self.cudriver = make_cudriver()
        self.trt = make_tensorrt(self.device, version)


def built_plan(bundle: Path, graph: str) -> dict[str, Any]:
    """What the fake built for a graph of a bundle: its engine file's plan (flags, strongly_typed, profile, ...)."""
    record = json.loads((bundle / "manifest.json").read_text())["graphs"][graph]["engine"]
    return json.loads((bundle / record["file"]).read_bytes())


def install(monkeypatch: Any, version: str = "10.3.0", total_memory: int = 8 << 30, **device: Any) -> FakeGPU:
    """Make `import tensorrt`, `cuda.bindings.runtime` and `cuda.bindings.driver` the fakes for one test, and reset
    what our modules cached (the cuda-python module, memory-pool support, utility streams, TensorRT loggers, the
    GPUs' identity). `device`: the fake Device's options (count, runtime_version, driver_version, jetson); the code
    sees a Jetson when `jetson` is true."""
    import sys  # noqa: PLC0415

    from mirasol.runtime.tensorrt import cuda
    from mirasol.runtime.tensorrt import env as tensorrt_env  # noqa: PLC0415

    fake = FakeGPU(version, total_memory, **device)
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime = fake.cudart  # type: ignore[attr-defined]
    bindings.driver = fake.cudriver  # type: ignore[attr-defined]
    package = types.ModuleType("cuda")
    package.bindings = bindings  # type: ignore[attr-defined]
    for name, module in {"cuda": package, "cuda.bindings": bindings, "cuda.bindings.runtime": fake.cudart,
                         "cuda.bindings.driver": fake.cudriver, "tensorrt": fake.trt}.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(cuda, "_cudart_module", None)
    monkeypatch.setattr(cuda, "_mempool", {})
    monkeypatch.setattr(cuda, "_release_streams", {})
    monkeypatch.setattr(cuda, "_local", threading.local())
    jetson = {"l4t": "36.4.3", "jetpack": None, "model": "Fake Orin"} if fake.device.jetson else None
    monkeypatch.setattr(cuda, "jetson_release", lambda: jetson)
    monkeypatch.setattr(tensorrt_env, "_loggers", {})
    monkeypatch.setattr(tensorrt_env, "_gpu_cache", {i: {"name": "Fake Orin", "compute_capability": "8.7"}
                                                      for i in range(fake.device.count)})
    return fake
