"""Native TensorRT backend: runs the engines `mirasol-build-engines` recorded in the bundle.

    from mirasol.runtime.tensorrt.backend import TensorRTBackend, is_available
    ok, why = is_available()
    with Pipeline.load("bundle/", backend="tensorrt") as pipe: ...      # or, one graph:
    session = TensorRTBackend().load(bundle.graphs["combiner"], bundle)  # bundle = Bundle.load("bundle/")
    out = session.run({"video": v, "audio": a, "memory_in": m}, ["chunk_latents"])

`import mirasol.runtime.tensorrt.backend` works without TensorRT and cuda-python: both are imported on first use.

Loading checks that cuda-python's CUDA runtime and TensorRT's CUDA major fit the driver (`is_available`: both
versions and the install that fits are named), then takes the graph's manifest entry (its IO and its engine record)
and refuses, with the exact command that rebuilds, an engine that is missing, that another TensorRT version or another
GPU / compute capability built, or that was built from another version of the ONNX graph. The engine is deserialized
from a read-only memory map of its file, not from a copy in Python bytes.

Execution (one `run`): input shapes are checked against the engine's optimization profile and set with
IExecutionContext.set_input_shape when they changed, after which the context's activation memory is sized for them
and given to it again (`slots.py`); every IO tensor gets a 256-byte aligned address (set_tensor_address, whose
refusal is an error naming the tensor); host inputs go through the slot's pinned buffers; the engine runs with
execute_async_v3 on the slot's CUDA stream, the requested outputs are copied back on the same stream (into pinned
buffers), and the stream is synchronized before anything is returned.

Thread safety and memory: a session is shared by every stream and thread. It keeps a small pool of execution
slots, each one IExecutionContext + one CUDA stream + that slot's grow-only device buffers; a call takes an idle
slot, creates one when fewer than `max_contexts` exist, and otherwise waits for one. Contexts are created with
ExecutionContextAllocationStrategy.USER_MANAGED: instead of TensorRT reserving activation memory for the largest
profile shape in every context (the default, STATIC), each slot holds memory sized for the largest shapes it has
actually run. `max_contexts` defaults to 1 on devices with less than SMALL_DEVICE_BYTES of memory (an 8 GB Jetson
shares it with the CPU) and 2 elsewhere; with 1 it is exactly a lock.

Keeping carried state on the GPU: feeds may be `DeviceArray`s (used in place, no copy), and outputs named in
`keep_on_device` (per call, or the session's default `session.keep_on_device`) come back as fresh `DeviceArray`s
that the caller owns (TensorRT writes straight into them). `session.transfers` counts the bytes each session copied
between host and device (cuda.TRANSFERS: the whole process), so a caller can check what staying on the device saves.

Documentation followed (every TensorRT and CUDA name used here is checked against the real bindings' name tables
by tests/test_tensorrt.py, see tests/tensorrt_api/):
- "Performing Inference" in https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/python-api-docs.html
- ICudaEngine (num_io_tensors, get_tensor_name, get_tensor_mode, get_tensor_dtype, get_tensor_profile_shape,
  is_shape_inference_io, create_execution_context(ExecutionContextAllocationStrategy), device_memory_size_v2) and
  IExecutionContext (set_input_shape, update_device_memory_size_for_shapes, set_device_memory(memory, size): "256-byte
  aligned device memory", set_tensor_address, get_tensor_shape, execute_async_v3):
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/Engine.html and
  .../ExecutionContext.html
"""
from __future__ import annotations

import mmap
import shlex
import threading
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..backends.base import Backend, BackendSettings, GraphSession
from ..bundle.manifest import check_file_name
from ..bundle.reader import sha256_file
from ..errors import BackendError, BundleError, InputError
from . import cuda
from .cuda import ALIGNMENT, DeviceArray
from .cuda_versions import tensorrt_mismatch
from .plan import int8_problem
from .env import (
    BUILD_COMMAND,
    SMALL_DEVICE_BYTES,
    engine_mismatch,
    gpu_info,
    import_tensorrt,
    rebuild_command,
    trt_logger,
)
from .slots import Slot

if TYPE_CHECKING:
    from ..bundle.manifest import GraphEntry
    from ..bundle.reader import Bundle


def is_available() -> tuple[bool, str]:
    """(True, description) when TensorRT >= 10, cuda-python and a CUDA GPU are present and fit the driver (the CUDA
    runtime of cuda-python and TensorRT's CUDA major compared with the driver's); else (False, reason and fix)."""
    try:
        trt = import_tensorrt()
        cuda.cudart()
    except BackendError as missing:
        return False, str(missing)
    problem = cuda.availability_problem()
    if problem:
        return False, problem
    _, driver = cuda.versions()
    mismatch = tensorrt_mismatch(str(trt.__version__), driver) if driver is not None else None
    if mismatch:
        return False, mismatch
    count, _ = cuda.device_count()
    return True, f"TensorRT {trt.__version__}, {count} CUDA device(s), driver CUDA {driver}"


def engine_problem(entry: GraphEntry, bundle: Bundle, gpu: Mapping[str, str] | None, trt_version: str | None,
                   verify: bool = True) -> str | None:
    """Why the engine recorded for `entry` cannot run here (missing, built by another TensorRT or for another GPU,
    from another ONNX file, altered), with the command that rebuilds it; None when it fits. Without `gpu` and
    `trt_version`, only the record and the file are checked; `verify`: also hash the engine."""
    record = entry.engine or {}
    command = rebuild_command(bundle.path, bundle.manifest.precision, record.get("build_args"))
    if not record.get("file"):
        return (f"graph {entry.name!r} has no TensorRT engine in {bundle.path}: build the engines on this device with: "
                f"{command}")
    engine_file = str(record["file"])
    check_file_name(engine_file, f"graph {entry.name!r}: engine")
    if not (bundle.path / engine_file).is_file():
        return (f"graph {entry.name!r}: engine {bundle.path / engine_file} is missing; build it on this device with: "
                f"{command}")
    mismatch = engine_mismatch(record, gpu, trt_version) if gpu is not None and trt_version is not None else None
    if mismatch:
        return (f"graph {entry.name!r}: engine {engine_file} does not fit this machine: {mismatch}. Rebuild it here "
                f"with: {command}")
    if record.get("onnx_sha256") not in (None, entry.sha256):
        return (f"graph {entry.name!r}: engine {engine_file} was built from another version of {entry.file}; rebuild "
                f"with: {command} --force")
    if verify and record.get("sha256") and sha256_file(bundle.file(engine_file)) != record["sha256"]:
        return (f"graph {entry.name!r}: {bundle.path / engine_file} does not match its recorded sha256; rebuild with: "
                f"{command} --force")
    return None


def check(bundle: Bundle | None, device: int = 0) -> str | None:
    """Whether the tensorrt backend can run `bundle` here (the registry's check, for mirasol-doctor): TensorRT,
    cuda-python and the driver (`is_available`), a bundle TensorRT can build, and engines built for this machine."""
    problem = int8_problem(bundle.manifest, bundle.path) if bundle is not None else None
    if problem:  # said first: no install makes TensorRT build it
        return problem
    available, why = is_available()
    if not available:
        return why
    if bundle is None:
        return None
    version, gpu = str(import_tensorrt().__version__), gpu_info(device)
    for entry in bundle.manifest.graphs.values():
        problem = engine_problem(entry, bundle, gpu, version, verify=False)
        if problem:
            return problem
    return None


class TensorRTSession(GraphSession):
    """A deserialized engine; `run` is safe from many threads (see the module docstring for the slot pool)."""

    def __init__(self, entry: GraphEntry, engine: Any, *, engine_path: Path, runtime: Any, device: int = 0,
                 max_contexts: int = 2, keep_on_device: Collection[str] = ()) -> None:
        trt = import_tensorrt()
        if max_contexts < 1:
            raise BackendError(f"max_contexts must be at least 1, got {max_contexts}")
        self.name = entry.name
        self.inputs = tuple(entry.inputs)
        self.outputs = tuple(entry.outputs)
        self.engine: Any = engine
        self.engine_record = dict(entry.engine or {})
        self.engine_path = engine_path
        self.device = device
        self.keep_on_device: frozenset[str] = frozenset(keep_on_device)
        self.transfers = cuda.Transfers(parent=cuda.TRANSFERS)
        self._trt = trt
        self._runtime = runtime  # the Runtime must outlive its engines
        self._input_names: list[str] = []
        self._output_names: list[str] = []
        self._dtypes: dict[str, np.dtype] = {}
        for i in range(engine.num_io_tensors):
            tensor = engine.get_tensor_name(i)
            mode = engine.get_tensor_mode(tensor)
            (self._input_names if mode == trt.TensorIOMode.INPUT else self._output_names).append(tensor)
            try:
                self._dtypes[tensor] = np.dtype(trt.nptype(engine.get_tensor_dtype(tensor)))
            except TypeError:
                raise BackendError(f"graph {self.name!r}: IO tensor {tensor!r} has TensorRT type "
                                   f"{engine.get_tensor_dtype(tensor)}, which numpy cannot hold") from None
            if mode == trt.TensorIOMode.INPUT and engine.is_shape_inference_io(tensor):
                raise BundleError(f"graph {self.name!r}: input {tensor!r} is a shape tensor in {engine_path.name}; "
                                  f"re-export so that shapes come from input dimensions, not input values")
        self._profile = {t: tuple(tuple(int(d) for d in dims) for dims in engine.get_tensor_profile_shape(t, 0))
                         for t in self._input_names}
        self._declared = {t.name: t for t in self.inputs}
        self._max_contexts = int(max_contexts)
        self._cond = threading.Condition()
        self._idle: list[Slot] = []
        self._slots: list[Slot] = []
        self._creating = 0
        self._closed = False

    # -- running ------------------------------------------------------------------------------------------------
    def run(self, feeds: Mapping[str, Any], output_names: Sequence[str] | None = None, *,
            keep_on_device: Collection[str] | None = None) -> dict[str, Any]:
        """Run the engine on named numpy arrays or DeviceArrays (feeds not named by the graph are ignored).

        Returns the requested outputs (all when `output_names` is None) by name: numpy arrays, except the names in
        `keep_on_device` (default `self.keep_on_device`), which come back as DeviceArrays the caller owns.
        """
        wanted = list(self._output_names if output_names is None else output_names)
        for out in wanted:
            if out not in self._dtypes or out in self._profile:
                raise InputError(f"graph {self.name!r} has no output {out!r} "
                                 f"(outputs: {', '.join(self._output_names)})")
        keep = self.keep_on_device if keep_on_device is None else frozenset(keep_on_device)
        missing = [n for n in self._input_names if n not in feeds]
        if missing:
            raise InputError(f"graph {self.name!r}: missing input(s) {', '.join(missing)}")
        prepared = {n: self._prepare(n, feeds[n]) for n in self._input_names}

        cuda.set_device(self.device)
        slot = self._acquire()
        try:
            context, stream = slot.context, slot.stream
            slot.set_shapes({n: tuple(int(d) for d in value.shape) for n, value in prepared.items()})
            for n, value in prepared.items():
                if isinstance(value, DeviceArray):
                    address = value.ptr if value.nbytes else slot.dummy.ptr
                else:
                    address = slot.buffer(n, value.nbytes)
                    cuda.to_device(address, value, stream, self.transfers, f"{self.name}.{n}",
                                   staging=slot.pinned(n, value.nbytes))
                self._bind(context, n, address)
            results: dict[str, Any] = {}
            copies: list[tuple[str, tuple[int, ...], int, int]] = []  # (name, shape, device address, bytes)
            for n in self._output_names:
                shape = tuple(int(d) for d in context.get_tensor_shape(n))
                if any(d < 0 for d in shape):
                    raise BackendError(f"graph {self.name!r}: output {n!r} has a data-dependent shape {shape}, "
                                       f"which this backend does not support")
                nbytes = int(np.prod(shape, dtype=np.int64)) * self._dtypes[n].itemsize
                if n in keep and n in wanted:
                    array = DeviceArray.empty(shape, self._dtypes[n], device=self.device, stream=stream)
                    results[n] = array
                    address = array.ptr
                else:
                    address = slot.buffer(n, nbytes)
                    if n in wanted:
                        copies.append((n, shape, address, nbytes))
                self._bind(context, n, address)
            if not context.execute_async_v3(int(stream)):
                raise BackendError(f"graph {self.name!r}: TensorRT execute_async_v3 failed (see the TensorRT log)")
            for n, _, address, nbytes in copies:
                cuda.to_host(slot.pinned(n, nbytes), address, nbytes, stream, self.transfers, f"{self.name}.{n}")
            cuda.synchronize(stream, f"running graph {self.name!r}")
            for n, shape, _, _ in copies:  # out of the slot's pinned buffers, which the next call reuses
                results[n] = slot.pinned(n, 0).view(shape, self._dtypes[n]).copy()
        finally:
            self._release(slot)
        return {n: results[n] for n in wanted}

    def _bind(self, context: Any, name: str, address: int) -> None:
        if not context.set_tensor_address(name, address):
            raise BackendError(f"graph {self.name!r}: TensorRT refused device address 0x{address:x} for tensor "
                               f"{name!r} (see the TensorRT log)")

    def _prepare(self, name: str, value: Any) -> np.ndarray | DeviceArray:
        want = self._dtypes[name]
        if isinstance(value, DeviceArray):
            if value.dtype != want:
                raise InputError(f"graph {self.name!r}: input {name!r} is a {value.dtype} DeviceArray, the engine "
                                 f"takes {want} (device arrays are not converted)")
            if value.device != self.device:
                raise InputError(f"graph {self.name!r}: input {name!r} lives on device {value.device}, "
                                 f"the engine on device {self.device}")
            if value.nbytes and value.ptr % ALIGNMENT:
                raise InputError(f"graph {self.name!r}: input {name!r} is a DeviceArray at address 0x{value.ptr:x}, "
                                 f"which is not {ALIGNMENT}-byte aligned as TensorRT requires (a view at an offset "
                                 f"into another array?); pass an aligned copy, e.g. DeviceArray.slice")
            shape = value.shape
        else:
            array = np.asarray(value)
            if array.dtype != want:
                same_kind = (array.dtype.kind == want.kind or {array.dtype.kind, want.kind} <= set("iu"))
                if not same_kind:
                    raise InputError(f"graph {self.name!r}: input {name!r} has dtype {array.dtype}, the engine takes "
                                     f"{want}")
                array = array.astype(want)
            value = np.ascontiguousarray(array)
            shape = value.shape
        low, _, high = self._profile[name]
        if len(shape) != len(low):
            raise InputError(f"graph {self.name!r}: input {name!r} has {len(shape)} dimensions {tuple(shape)}, "
                             f"the engine takes {len(low)}")
        declared = self._declared.get(name)
        for i, (size, lo, hi) in enumerate(zip(shape, low, high)):
            if not lo <= size <= hi:
                axis = declared.shape[i] if declared is not None and i < len(declared.shape) else None
                what = f"axis {axis!r}" if isinstance(axis, str) else f"dimension {i}"
                raise InputError(
                    f"graph {self.name!r}: input {name!r} has size {size} along {what}; the engine "
                    f"{self.engine_path.name} accepts {lo}..{hi} there (its optimization profile). To accept more, "
                    f"rebuild it with a larger maximum (up to the bundle's axis range): {BUILD_COMMAND} "
                    f"{shlex.quote(str(self.engine_path.parent))} --max {axis if isinstance(axis, str) else 'AXIS'}=N "
                    f"--force")
        return value

    def memory(self) -> dict[str, int]:
        """What the session holds on the device now: contexts, their activation memory, their IO buffers (bytes)."""
        with self._cond:
            held = [slot.memory() for slot in self._slots]
        return {"contexts": len(held), "activation_bytes": sum(a for a, _ in held),
                "buffer_bytes": sum(b for _, b in held)}

    # -- the slot pool ---------------------------------------------------------------------------------------------
    def _acquire(self) -> Slot:
        with self._cond:
            while True:
                if self._closed:
                    raise BackendError(f"graph {self.name!r}: the session is closed")
                if self._idle:
                    return self._idle.pop()
                if len(self._slots) + self._creating < self._max_contexts:
                    self._creating += 1
                    break
                self._cond.wait()
        try:
            slot = Slot(self.engine, self._trt, self.device, self.name)
        except BaseException:
            with self._cond:
                self._creating -= 1
                self._cond.notify()
            raise
        with self._cond:
            self._creating -= 1
            self._slots.append(slot)
        return slot

    def _release(self, slot: Slot) -> None:
        with self._cond:
            if self._closed:
                self._slots.remove(slot)
                slot.close()
                self._drop_engine_when_idle()
            else:
                self._idle.append(slot)
            self._cond.notify()

    def close(self) -> None:
        """Free the contexts, streams, buffers and the engine (idle ones now, busy ones when their call returns)."""
        with self._cond:
            self._closed = True
            for slot in self._idle:
                self._slots.remove(slot)
                slot.close()
            self._idle.clear()
            self._drop_engine_when_idle()
            self._cond.notify_all()

    def _drop_engine_when_idle(self) -> None:
        if not self._slots and not self._creating:
            self.engine = None


class TensorRTBackend(Backend):
    """Loads `<graph>.<precision>.engine` files recorded in the bundle's manifest (GraphEntry.engine).

    max_contexts: execution contexts per graph (concurrent calls); None: 1 on devices with less than
    SMALL_DEVICE_BYTES of memory, else 2. keep_on_device: default `keep_on_device` of every session (output names
    returned as DeviceArrays).
    """

    name = "tensorrt"
    keeps_on_device = True

    @classmethod
    def options_from(cls, settings: BackendSettings) -> dict[str, Any]:
        return {"device": settings.device}

    def __init__(self, *, device: int = 0, max_contexts: int | None = None, keep_on_device: Collection[str] = (),
                 verbose: bool = False) -> None:
        if max_contexts is not None and max_contexts < 1:
            raise BackendError(f"max_contexts must be at least 1, got {max_contexts}")
        self.device = int(device)
        self.max_contexts = max_contexts
        self.keep_on_device = frozenset(keep_on_device)
        self.verbose = verbose
        self._runtime: Any = None
        self._lock = threading.Lock()

    def load(self, entry: GraphEntry, bundle: Bundle) -> TensorRTSession:
        """The entry's engine, checked against its record, this machine and the manifest's IO."""
        available, why = is_available()
        if not available:  # said first: without TensorRT, building engines is not the fix
            raise BackendError(f"the tensorrt backend cannot run here: {why}")
        problem = engine_problem(entry, bundle, None, None, verify=False)  # before TensorRT is needed
        trt = import_tensorrt() if problem is None else None
        problem = problem or engine_problem(entry, bundle, gpu_info(self.device), str(trt.__version__))
        if problem:
            raise BundleError(problem)
        record = entry.engine or {}
        command = rebuild_command(bundle.path, bundle.manifest.precision, record.get("build_args"))
        engine_file = str(record["file"])
        engine_path = bundle.file(engine_file)
        with self._lock:
            if self._runtime is None:
                self._runtime = trt.Runtime(trt_logger(self.verbose))
            runtime = self._runtime
            if self.max_contexts is None:
                _, total = cuda.memory_info(self.device)
                self.max_contexts = 1 if total < SMALL_DEVICE_BYTES else 2
        cuda.set_device(self.device)
        if engine_path.stat().st_size == 0:
            raise BundleError(f"graph {entry.name!r}: {engine_path} is empty; rebuild with: {command} --force")
        with open(engine_path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            engine = runtime.deserialize_cuda_engine(mapped)  # from the page cache: no copy of the engine in Python
        if engine is None:
            raise BundleError(f"graph {entry.name!r}: TensorRT could not deserialize {engine_path} (see its log); "
                              f"rebuild with: {command} --force")
        names_in, names_out = set(), set()
        for i in range(engine.num_io_tensors):
            tensor = engine.get_tensor_name(i)
            (names_in if engine.get_tensor_mode(tensor) == trt.TensorIOMode.INPUT else names_out).add(tensor)
        if names_in != {t.name for t in entry.inputs} or names_out != {t.name for t in entry.outputs}:
            raise BundleError(f"graph {entry.name!r}: engine {engine_file} has inputs {sorted(names_in)} and "
                              f"outputs {sorted(names_out)}, the manifest says {sorted(t.name for t in entry.inputs)} "
                              f"and {sorted(t.name for t in entry.outputs)}; rebuild with: {command} --force")
        return TensorRTSession(entry, engine, engine_path=engine_path, runtime=runtime, device=self.device,
                               max_contexts=self.max_contexts, keep_on_device=self.keep_on_device)

    # -- carried state on the device (see Backend) --------------------------------------------------------------
    def to_host(self, value: Any) -> np.ndarray:
        return value.numpy() if isinstance(value, DeviceArray) else np.asarray(value)

    def join_on_device(self, parts: Sequence[Any], axis: int) -> DeviceArray:
        on_device = [v if isinstance(v, DeviceArray) else DeviceArray.from_numpy(v, device=self.device) for v in parts]
        return DeviceArray.concatenate(on_device, axis)

    def slice(self, value: Any, axis: int, start: int, stop: int | None = None) -> Any:
        if isinstance(value, DeviceArray):
            return value.slice(axis, start, stop)
        return super().slice(value, axis, start, stop)


__all__ = ["DeviceArray", "SMALL_DEVICE_BYTES", "TensorRTBackend", "TensorRTSession", "is_available"]
