"""Native TensorRT backend: runs the engines `mirasol-build-engines` recorded in the bundle.

    from mirasol.runtime.backends.tensorrt import TensorRTBackend, is_available
    ok, why = is_available()
    backend = TensorRTBackend("bundle/")               # or TensorRTBackend(manifest=m, bundle_dir="bundle/")
    session = backend.load("combiner", "bundle/combiner.onnx", entry.inputs, entry.outputs)
    out = session.run({"video": v, "audio": a, "memory_in": m}, ["chunk_latents"])

`import mirasol.runtime.backends.tensorrt` works without TensorRT and cuda-python: both are imported on first use.

Loading refuses, with the exact command that rebuilds, an engine that is missing, that another TensorRT version or
another GPU / compute capability built, or that was built from another version of the ONNX graph.

Execution (one `run`): input shapes are checked against the engine's optimization profile, set with
IExecutionContext.set_input_shape, every IO tensor gets an address (set_tensor_address), the engine runs with
execute_async_v3 on a CUDA stream, and only the outputs named in `output_names` are copied back.

Thread safety: a session is shared by every stream and thread. It keeps a small pool of execution slots, each one
IExecutionContext + one CUDA stream + that slot's grow-only device buffers; a call takes an idle slot, creates one
when fewer than `max_contexts` exist, and otherwise waits for one. So up to `max_contexts` calls run concurrently
and GPU memory stays bounded by max_contexts x (activation memory + IO buffers). This is neither one context per
thread (threading.local: thread pools would create contexts without bound, never released) nor one lock (which
would serialize every stream); with max_contexts=1 it is exactly a lock.

Keeping carried state on the GPU: feeds may be `DeviceArray`s (used in place, no copy), and outputs named in
`keep_on_device` (per call, or the session's default `session.keep_on_device`) come back as fresh `DeviceArray`s
that the caller owns (TensorRT writes straight into them; freed when the last reference goes). A pipeline that
feeds `present_*` back as `past_*` can keep the KV caches on the device between steps; `DeviceArray.slice` and
`DeviceArray.concatenate` implement a window or an append on the device, `.numpy()` copies to the host.

Documentation followed:
- "Performing Inference" in https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/python-api-docs.html
  (Runtime.deserialize_cuda_engine, create_execution_context, set_input_shape, set_tensor_address,
  execute_async_v3(stream_handle))
- ICudaEngine (num_io_tensors, get_tensor_name, get_tensor_mode -> TensorIOMode, get_tensor_dtype,
  get_tensor_profile_shape, is_shape_inference_io):
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/Engine.html
- IExecutionContext (get_tensor_shape after the input shapes are set; multiple contexts per engine):
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/ExecutionContext.html
- cuda-python runtime bindings as used by NVIDIA/TensorRT samples/python/common_runtime.py (cudaMalloc,
  cudaMemcpyAsync, cudaStreamCreate, cudaStreamSynchronize; calls return (cudaError_t, *values)); import
  `from cuda.bindings import runtime as cudart` (cuda-python >= 12.6 / 13), older `from cuda import cudart`.
"""
from __future__ import annotations

import math
import shlex
import threading
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import tensorrt_build as _build
from ..errors import BackendError, BundleError, InputError
from ..bundle import sha256_file
from ..manifest import Manifest, check_file_name
from .base import Backend, GraphSession, TensorInfo

_MIN_ALLOCATION = 256  # bytes; TensorRT wants non-null, 256-byte aligned addresses even for empty tensors
_GROWTH = 1.5  # grow-only buffers grow at least this much, so a cache growing by one token does not realloc each step

_cudart_module: Any = None
_local = threading.local()  # per-thread utility stream for DeviceArray copies
_mempool: dict[int, bool] = {}


def _cudart() -> Any:
    global _cudart_module
    if _cudart_module is None:
        try:
            from cuda.bindings import runtime as cudart  # noqa: PLC0415  (cuda-python >= 12.6)
        except ImportError:
            try:
                from cuda import cudart  # type: ignore[no-redef]  # noqa: PLC0415  (older cuda-python)
            except ImportError as missing:
                raise BackendError(f"cuda-python is not installed ({missing}): pip install cuda-python") from None
        _cudart_module = cudart
    return _cudart_module


def _check(result: Any, what: str) -> Any:
    """cuda-python calls return (cudaError_t, *values): raise on error, return the value(s)."""
    cudart = _cudart()
    err = result[0] if isinstance(result, tuple) else result
    if err != cudart.cudaError_t.cudaSuccess:
        raise BackendError(f"CUDA call {what} failed: {err!r}")
    if not isinstance(result, tuple) or len(result) == 1:
        return None
    return result[1] if len(result) == 2 else result[1:]


def is_available() -> tuple[bool, str]:
    """(True, description) when TensorRT >= 10, cuda-python and a CUDA GPU are all present; else (False, reason)."""
    try:
        trt = _build.import_tensorrt()
    except BackendError as missing:
        return False, str(missing)
    try:
        cudart = _cudart()
    except BackendError as missing:
        return False, str(missing)
    try:
        err, count = cudart.cudaGetDeviceCount()
    except Exception as broken:  # noqa: BLE001 - a broken driver install shows up here
        return False, f"the CUDA runtime cannot be used: {broken}"
    if err != cudart.cudaError_t.cudaSuccess or count == 0:
        return False, f"no CUDA GPU (cudaGetDeviceCount: {err!r}, {count} devices)"
    return True, f"TensorRT {trt.__version__}, {count} CUDA device(s)"


def _mempool_supported(device: int) -> bool:
    if device not in _mempool:
        cudart = _cudart()
        try:
            supported = _check(cudart.cudaDeviceGetAttribute(
                cudart.cudaDeviceAttr.cudaDevAttrMemoryPoolsSupported, device), "cudaDeviceGetAttribute")
            _mempool[device] = bool(supported) and hasattr(cudart, "cudaMallocAsync")
        except Exception:  # noqa: BLE001 - no memory pools: plain cudaMalloc
            _mempool[device] = False
    return _mempool[device]


def _utility_stream() -> Any:
    stream = getattr(_local, "stream", None)
    if stream is None:
        stream = _local.stream = _check(_cudart().cudaStreamCreate(), "cudaStreamCreate")
    return stream


class _Allocation:
    """One block of device memory, freed when dropped (stream-ordered pools where the GPU supports them)."""

    __slots__ = ("ptr", "nbytes", "_pooled", "__weakref__")

    def __init__(self, nbytes: int, *, device: int = 0, stream: Any = None) -> None:
        cudart = _cudart()
        self.nbytes = max(int(nbytes), _MIN_ALLOCATION)
        self._pooled = stream is not None and _mempool_supported(device)
        if self._pooled:
            self.ptr = int(_check(cudart.cudaMallocAsync(self.nbytes, stream), f"cudaMallocAsync({self.nbytes})"))
        else:
            self.ptr = int(_check(cudart.cudaMalloc(self.nbytes), f"cudaMalloc({self.nbytes})"))

    def free(self) -> None:
        ptr, self.ptr = getattr(self, "ptr", 0), 0
        if not ptr:
            return
        try:
            cudart = _cudart()
            # Every run synchronizes its stream before its results are visible, so nothing in flight uses `ptr`.
            if self._pooled:
                cudart.cudaFreeAsync(ptr, 0)
            else:
                cudart.cudaFree(ptr)
        except Exception:  # noqa: BLE001 - interpreter shutdown or a dead context: nothing left to free
            pass

    def __del__(self) -> None:
        self.free()


def _prod(shape: Iterable[int]) -> int:
    return int(math.prod(int(d) for d in shape))


class DeviceArray:
    """A C-contiguous array in CUDA device memory: `shape`, `dtype`, device pointer `ptr`; `.numpy()` copies it.

    Arrays made by this module own their memory (freed when the last reference goes); `DeviceArray(shape, dtype,
    ptr)` wraps memory someone else owns and keeps alive. `np.asarray(device_array)` also copies to the host.
    """

    __slots__ = ("shape", "dtype", "ptr", "device", "_owner")

    def __init__(self, shape: Sequence[int], dtype: Any, ptr: int, *, device: int = 0, owner: Any = None) -> None:
        self.shape = tuple(int(d) for d in shape)
        if any(d < 0 for d in self.shape):
            raise InputError(f"DeviceArray shape {self.shape} has a negative dimension")
        self.dtype = np.dtype(dtype)
        self.ptr = int(ptr)
        self.device = int(device)
        self._owner = owner

    # -- metadata ---------------------------------------------------------------------------------------------
    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return _prod(self.shape)

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of a 0-d DeviceArray")
        return self.shape[0]

    def __repr__(self) -> str:
        return f"DeviceArray(shape={self.shape}, dtype={self.dtype}, ptr=0x{self.ptr:x}, device={self.device})"

    # -- making ------------------------------------------------------------------------------------------------
    @classmethod
    def empty(cls, shape: Sequence[int], dtype: Any, *, device: int = 0, stream: Any = None) -> "DeviceArray":
        """Uninitialized device memory of that shape (stream-ordered allocation on `stream` when given)."""
        shape = tuple(int(d) for d in shape)
        owner = _Allocation(_prod(shape) * np.dtype(dtype).itemsize, device=device, stream=stream)
        return cls(shape, dtype, owner.ptr, device=device, owner=owner)

    @classmethod
    def zeros(cls, shape: Sequence[int], dtype: Any, *, device: int = 0) -> "DeviceArray":
        array = cls.empty(shape, dtype, device=device)
        if array.nbytes:
            cudart, stream = _cudart(), _utility_stream()
            _check(cudart.cudaMemsetAsync(array.ptr, 0, array.nbytes, stream), "cudaMemsetAsync")
            _check(cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
        return array

    @classmethod
    def from_numpy(cls, array: np.ndarray, *, device: int = 0) -> "DeviceArray":
        host = np.ascontiguousarray(array)
        result = cls.empty(host.shape, host.dtype, device=device)
        if host.nbytes:
            cudart, stream = _cudart(), _utility_stream()
            _check(cudart.cudaMemcpyAsync(result.ptr, host.ctypes.data, host.nbytes,
                                          cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, stream), "cudaMemcpyAsync H2D")
            _check(cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
        return result

    # -- reading -----------------------------------------------------------------------------------------------
    def numpy(self) -> np.ndarray:
        """A host copy."""
        host = np.empty(self.shape, self.dtype)
        if host.nbytes:
            cudart, stream = _cudart(), _utility_stream()
            _check(cudart.cudaMemcpyAsync(host.ctypes.data, self.ptr, host.nbytes,
                                          cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream), "cudaMemcpyAsync D2H")
            _check(cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
        return host

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        host = self.numpy()
        return host if dtype is None else host.astype(dtype, copy=False)

    # -- device-side copies (a window or an append of carried state without a host round trip) ---------------
    def slice(self, axis: int, start: int | None = None, stop: int | None = None) -> "DeviceArray":
        """A device copy of `self[..., start:stop, ...]` along `axis` (Python slice bounds, step 1)."""
        axis = _axis(axis, self.ndim)
        begin, end, _ = slice(start, stop).indices(self.shape[axis])
        end = max(end, begin)
        shape = list(self.shape)
        shape[axis] = end - begin
        result = DeviceArray.empty(shape, self.dtype, device=self.device)
        inner = _prod(self.shape[axis + 1:]) * self.itemsize
        _copy_2d(result.ptr, (end - begin) * inner, self.ptr + begin * inner, self.shape[axis] * inner,
                 (end - begin) * inner, _prod(self.shape[:axis]))
        return result

    @staticmethod
    def concatenate(arrays: Sequence["DeviceArray"], axis: int = 0) -> "DeviceArray":
        """A new device array joining `arrays` along `axis` (same dtype; other dimensions equal)."""
        if not arrays:
            raise InputError("DeviceArray.concatenate needs at least one array")
        first = arrays[0]
        axis = _axis(axis, first.ndim)
        for other in arrays[1:]:
            if (other.dtype != first.dtype or other.ndim != first.ndim
                    or any(a != b for i, (a, b) in enumerate(zip(other.shape, first.shape)) if i != axis)):
                raise InputError(f"cannot concatenate {other!r} to {first!r} along axis {axis}")
        total = sum(a.shape[axis] for a in arrays)
        shape = list(first.shape)
        shape[axis] = total
        result = DeviceArray.empty(shape, first.dtype, device=first.device)
        inner = _prod(first.shape[axis + 1:]) * first.itemsize
        outer = _prod(first.shape[:axis])
        offset = 0
        for a in arrays:
            width = a.shape[axis] * inner
            _copy_2d(result.ptr + offset, total * inner, a.ptr, width, width, outer)
            offset += width
        return result


def _axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise InputError(f"axis {axis} is out of range for {ndim} dimensions")
    return axis % ndim


def _copy_2d(dst: int, dpitch: int, src: int, spitch: int, width: int, height: int) -> None:
    """`height` rows of `width` bytes, device to device, with pitches (cudaMemcpy2DAsync), then synchronize."""
    if width == 0 or height == 0:
        return
    cudart, stream = _cudart(), _utility_stream()
    _check(cudart.cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, height,
                                    cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice, stream), "cudaMemcpy2DAsync")
    _check(cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize")


class _Slot:
    """One execution context, its CUDA stream and its grow-only device buffers (one per IO tensor name)."""

    def __init__(self, engine: Any, device: int) -> None:
        cudart = _cudart()
        self.device = device
        self.context = engine.create_execution_context()
        if self.context is None:
            raise BackendError("TensorRT could not create an execution context (out of GPU memory?)")
        self.stream = _check(cudart.cudaStreamCreate(), "cudaStreamCreate")
        self.buffers: dict[str, _Allocation] = {}
        self.dummy = _Allocation(_MIN_ALLOCATION, device=device)

    def buffer(self, name: str, nbytes: int) -> int:
        current = self.buffers.get(name)
        if current is None or current.nbytes < nbytes:
            size = nbytes if current is None else max(nbytes, int(current.nbytes * _GROWTH))
            if current is not None:
                current.free()
            current = self.buffers[name] = _Allocation(size, device=self.device)
        return current.ptr

    def close(self) -> None:
        for allocation in self.buffers.values():
            allocation.free()
        self.buffers.clear()
        self.dummy.free()
        stream, self.stream = self.stream, None
        self.context = None
        if stream is not None:
            try:
                _cudart().cudaStreamDestroy(stream)
            except Exception:  # noqa: BLE001
                pass


class TensorRTSession(GraphSession):
    """A deserialized engine; `run` is safe from many threads (see the module docstring for the slot pool)."""

    def __init__(self, name: str, engine: Any, record: Mapping[str, Any], inputs: Sequence[TensorInfo],
                 outputs: Sequence[TensorInfo], *, engine_path: Path, runtime: Any, device: int = 0,
                 max_contexts: int = 2, keep_on_device: Collection[str] = ()) -> None:
        trt = _build.import_tensorrt()
        self.name = name
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        self.engine = engine
        self.engine_record = dict(record)
        self.engine_path = engine_path
        self.device = device
        self.keep_on_device: frozenset[str] = frozenset(keep_on_device)
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
                raise BackendError(f"graph {name!r}: IO tensor {tensor!r} has TensorRT type "
                                   f"{engine.get_tensor_dtype(tensor)}, which numpy cannot hold") from None
            if mode == trt.TensorIOMode.INPUT and engine.is_shape_inference_io(tensor):
                raise BundleError(f"graph {name!r}: input {tensor!r} is a shape tensor in {engine_path.name}; "
                                  f"re-export so that shapes come from input dimensions, not input values")
        self._profile = {t: tuple(tuple(int(d) for d in dims) for dims in engine.get_tensor_profile_shape(t, 0))
                         for t in self._input_names}
        self._declared = {t.name: t for t in self.inputs}
        if max_contexts < 1:
            raise BackendError(f"max_contexts must be at least 1, got {max_contexts}")
        self._max_contexts = int(max_contexts)
        self._cond = threading.Condition()
        self._idle: list[_Slot] = []
        self._slots: list[_Slot] = []
        self._creating = 0
        self._closed = False

    # -- the optimization profile, for callers that bound inputs ------------------------------------------------
    def input_range(self, input_name: str) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(min, opt, max) shape the engine accepts for an input."""
        try:
            return self._profile[input_name]  # type: ignore[return-value]
        except KeyError:
            raise InputError(f"graph {self.name!r} has no input {input_name!r}") from None

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

        cudart = _cudart()
        _check(cudart.cudaSetDevice(self.device), "cudaSetDevice")
        slot = self._acquire()
        try:
            context, stream = slot.context, slot.stream
            for n, value in prepared.items():
                if not context.set_input_shape(n, value.shape):
                    raise InputError(f"graph {self.name!r}: TensorRT refused shape {tuple(value.shape)} "
                                     f"for input {n!r}")
            for n, value in prepared.items():
                if isinstance(value, DeviceArray):
                    address = value.ptr if value.nbytes else slot.dummy.ptr
                else:
                    address = slot.buffer(n, value.nbytes)
                    if value.nbytes:
                        _check(cudart.cudaMemcpyAsync(address, value.ctypes.data, value.nbytes,
                                                      cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, stream),
                               f"cudaMemcpyAsync H2D {n}")
                context.set_tensor_address(n, address)
            results: dict[str, Any] = {}
            copies: list[tuple[str, np.ndarray, int]] = []
            for n in self._output_names:
                shape = tuple(int(d) for d in context.get_tensor_shape(n))
                if any(d < 0 for d in shape):
                    raise BackendError(f"graph {self.name!r}: output {n!r} has a data-dependent shape {shape}, "
                                       f"which this backend does not support")
                nbytes = _prod(shape) * self._dtypes[n].itemsize
                if n in keep and n in wanted:
                    array = DeviceArray.empty(shape, self._dtypes[n], device=self.device, stream=stream)
                    results[n] = array
                    address = array.ptr
                else:
                    address = slot.buffer(n, nbytes)
                    if n in wanted:
                        host = np.empty(shape, self._dtypes[n])
                        results[n] = host
                        copies.append((n, host, address))
                context.set_tensor_address(n, address)
            if not context.execute_async_v3(int(stream)):
                raise BackendError(f"graph {self.name!r}: TensorRT execute_async_v3 failed (see the TensorRT log)")
            for n, host, address in copies:
                if host.nbytes:
                    _check(cudart.cudaMemcpyAsync(host.ctypes.data, address, host.nbytes,
                                                  cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream),
                           f"cudaMemcpyAsync D2H {n}")
            _check(cudart.cudaStreamSynchronize(stream), f"running graph {self.name!r}")
        finally:
            self._release(slot)
        return {n: results[n] for n in wanted}

    def _prepare(self, name: str, value: Any) -> np.ndarray | DeviceArray:
        want = self._dtypes[name]
        if isinstance(value, DeviceArray):
            if value.dtype != want:
                raise InputError(f"graph {self.name!r}: input {name!r} is a {value.dtype} DeviceArray, the engine "
                                 f"takes {want} (device arrays are not converted)")
            if value.device != self.device:
                raise InputError(f"graph {self.name!r}: input {name!r} lives on device {value.device}, "
                                 f"the engine on device {self.device}")
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
                    f"rebuild it with a larger maximum (up to the bundle's axis range): {_build.BUILD_COMMAND} "
                    f"{shlex.quote(str(self.engine_path.parent))} --max {axis if isinstance(axis, str) else 'AXIS'}=N "
                    f"--force")
        return value

    # -- the slot pool ---------------------------------------------------------------------------------------------
    def _acquire(self) -> _Slot:
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
            slot = _Slot(self.engine, self.device)
        except BaseException:
            with self._cond:
                self._creating -= 1
                self._cond.notify()
            raise
        with self._cond:
            self._creating -= 1
            self._slots.append(slot)
        return slot

    def _release(self, slot: _Slot) -> None:
        with self._cond:
            if self._closed:
                slot.close()
            else:
                self._idle.append(slot)
            self._cond.notify()

    def close(self) -> None:
        """Free the contexts, streams and buffers (idle ones now, busy ones when their call returns)."""
        with self._cond:
            self._closed = True
            for slot in self._idle:
                slot.close()
            self._idle.clear()
            self._cond.notify_all()


class TensorRTBackend(Backend):
    """Loads `<graph>.<precision>.engine` files recorded in the bundle's manifest (GraphEntry.engine).

    bundle_dir / manifest: where the engines are and their records; by default the directory of the graph path
    given to `load` and its manifest.json. max_contexts: execution contexts per graph (concurrent calls).
    keep_on_device: default `keep_on_device` of every session (output names returned as DeviceArrays).
    """

    name = "tensorrt"

    def __init__(self, bundle_dir: str | Path | None = None, *, manifest: Manifest | None = None, device: int = 0,
                 max_contexts: int = 2, keep_on_device: Collection[str] = (), verbose: bool = False) -> None:
        self.bundle_dir = Path(bundle_dir) if bundle_dir is not None else None
        self.device = int(device)
        self.max_contexts = int(max_contexts)
        self.keep_on_device = frozenset(keep_on_device)
        self.verbose = verbose
        self._manifests: dict[Path, Manifest] = {}
        if manifest is not None:
            if self.bundle_dir is None:
                raise BackendError("TensorRTBackend(manifest=...) also needs bundle_dir= (where the engines are)")
            self._manifests[self.bundle_dir.resolve()] = manifest
        self._runtime: Any = None
        self._lock = threading.Lock()

    def load(self, graph_name: str, path: str, inputs: Sequence[TensorInfo], outputs: Sequence[TensorInfo]
             ) -> TensorRTSession:
        bundle = self.bundle_dir if self.bundle_dir is not None else Path(path).parent
        manifest = self._manifest(bundle)
        entry = manifest.graphs.get(graph_name)
        if entry is None:
            raise BundleError(f"{bundle}: the manifest has no graph {graph_name!r}")
        record = entry.engine
        command = _build.rebuild_command(bundle, manifest.precision, (record or {}).get("build_args"))
        if not record or not record.get("file"):
            raise BundleError(f"graph {graph_name!r} has no TensorRT engine in {bundle}: build the engines on this "
                              f"device with: {command}")
        engine_file = str(record["file"])
        check_file_name(engine_file, f"graph {graph_name!r}: engine")
        engine_path = bundle / engine_file
        if not engine_path.is_file():
            raise BundleError(f"graph {graph_name!r}: engine {engine_path} is missing; build it on this device with: "
                              f"{command}")
        available, why = is_available()
        if not available:
            raise BackendError(f"the tensorrt backend cannot run here: {why}")
        trt = _build.import_tensorrt()
        mismatch = _build.engine_mismatch(record, _build.gpu_info(self.device), str(trt.__version__))
        if mismatch:
            raise BundleError(f"graph {graph_name!r}: engine {engine_path.name} does not fit this machine: {mismatch}. "
                              f"Rebuild it here with: {command}")
        if record.get("onnx_sha256") not in (None, entry.sha256):
            raise BundleError(f"graph {graph_name!r}: engine {engine_path.name} was built from another version of "
                              f"{entry.file}; rebuild with: {command} --force")
        if record.get("sha256") and sha256_file(engine_path) != record["sha256"]:
            raise BundleError(f"graph {graph_name!r}: {engine_path} does not match its recorded sha256; rebuild with: "
                              f"{command} --force")
        with self._lock:
            if self._runtime is None:
                self._runtime = trt.Runtime(_build.trt_logger(self.verbose))
            runtime = self._runtime
        _check(_cudart().cudaSetDevice(self.device), "cudaSetDevice")
        engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if engine is None:
            raise BundleError(f"graph {graph_name!r}: TensorRT could not deserialize {engine_path} (see its log); "
                              f"rebuild with: {command} --force")
        names_in, names_out = set(), set()
        for i in range(engine.num_io_tensors):
            tensor = engine.get_tensor_name(i)
            (names_in if engine.get_tensor_mode(tensor) == trt.TensorIOMode.INPUT else names_out).add(tensor)
        if names_in != {t.name for t in inputs} or names_out != {t.name for t in outputs}:
            raise BundleError(f"graph {graph_name!r}: engine {engine_path.name} has inputs {sorted(names_in)} and "
                              f"outputs {sorted(names_out)}, the manifest says {sorted(t.name for t in inputs)} and "
                              f"{sorted(t.name for t in outputs)}; rebuild with: {command} --force")
        return TensorRTSession(graph_name, engine, record, inputs, outputs, engine_path=engine_path, runtime=runtime,
                               device=self.device, max_contexts=self.max_contexts, keep_on_device=self.keep_on_device)

    def _manifest(self, bundle: Path) -> Manifest:
        key = bundle.resolve()
        with self._lock:
            if key not in self._manifests:
                self._manifests[key] = Manifest.read(bundle)
            return self._manifests[key]
