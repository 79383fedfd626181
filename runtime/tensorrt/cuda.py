"""CUDA device memory for the TensorRT backend: cuda-python loading, versions, allocations, pinned host buffers,
DeviceArray, copy counters.

`import mirasol.runtime.tensorrt.cuda` works without cuda-python: it is imported on first use, from
`cuda.bindings.runtime` (cuda-python >= 12.6 / 13) or the older `cuda.cudart`. Its calls return
(cudaError_t, *values), as in NVIDIA/TensorRT samples/python/common_runtime.py; `check` raises on an error.

- `availability_problem`: whether cuda-python's CUDA runtime can run on this driver (both versions compared, the
  pin that fits named: `cuda_versions.py` has the rules), then whether there is a GPU.
- Memory: device allocations come from the device's stream-ordered pool (cudaMallocAsync / cudaFreeAsync, which
  do not synchronize the device as cudaMalloc / cudaFree do) where the GPU has memory pools; the pool keeps freed
  memory for reuse instead of returning it to the driver at every synchronization. Host memory on the hot path
  (a call's inputs and outputs) is copied through pinned buffers (cudaMallocHost), which the GPU reads and writes
  asynchronously; from pageable numpy memory the driver stages the copy synchronously.
- Every copy between host and device that this package makes is counted by a `Transfers` (a session's, which
  also adds to the process-wide `TRANSFERS`), so a caller can assert how many bytes a step moved.
"""
from __future__ import annotations

import ctypes
import math
import threading
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from ..backends.transfers import Transfers
from ..errors import BackendError, InputError
from .cuda_versions import CudaVersion, jetson_release, runtime_mismatch, runtime_too_new

ALIGNMENT = 256  # bytes; TensorRT needs IO and scratch addresses 256-byte aligned (and non-null, even if empty)
_UINT64_MAX = (1 << 64) - 1

_cudart_module: Any = None
_local = threading.local()  # per-thread utility stream for DeviceArray copies
_lock = threading.Lock()
_mempool: dict[int, bool] = {}
_release_streams: dict[int, Any] = {}  # per device: where pooled memory is freed (never destroyed)


def cudart() -> Any:
    """The cuda-python runtime module (imported once)."""
    global _cudart_module
    if _cudart_module is None:
        try:
            from cuda.bindings import runtime as module  # noqa: PLC0415  (cuda-python >= 12.6)
        except ImportError:
            try:
                from cuda import cudart as module  # type: ignore[no-redef]  # noqa: PLC0415  (older cuda-python)
            except ImportError as missing:
                raise BackendError(f"cuda-python is not installed ({missing}): pip install "
                                   f"'mirasol-edge[tensorrt-cu12]' (or [tensorrt-cu13] for a driver of CUDA 13; on a "
                                   f"Jetson with JetPack 6: pip install 'cuda-python==12.6.2.post1')") from None
        _cudart_module = module
    return _cudart_module


def check(result: Any, what: str) -> Any:
    """cuda-python calls return (cudaError_t, *values): raise on error, return the value(s)."""
    err = result[0] if isinstance(result, tuple) else result
    if err != cudart().cudaError_t.cudaSuccess:
        raise BackendError(f"CUDA call {what} failed: {err!r}")
    if not isinstance(result, tuple) or len(result) == 1:
        return None
    return result[1] if len(result) == 2 else result[1:]


def versions() -> tuple[CudaVersion | None, CudaVersion | None]:
    """(cuda-python's CUDA runtime version, the driver's CUDA version); None where it cannot be read (no driver:
    cuda-python 12.9+ reports 0, 12.6 raises)."""
    runtime = cudart()
    found: list[CudaVersion | None] = []
    for call in (runtime.cudaRuntimeGetVersion, runtime.cudaDriverGetVersion):
        try:
            err, value = call()
            found.append(CudaVersion.from_int(value) if err == runtime.cudaError_t.cudaSuccess and value else None)
        except Exception:  # noqa: BLE001 - "Failed to dlopen libcuda.so.1" and the like
            found.append(None)
    return found[0], found[1]


def availability_problem() -> str | None:
    """Why CUDA cannot be used here through cuda-python (None when a GPU is there): no driver, a runtime newer than
    the driver (naming both and the cuda-python that fits), no device."""
    runtime_version, driver_version = versions()
    if driver_version is None:
        return "no NVIDIA driver: libcuda.so.1 cannot be loaded (on a Jetson it comes with JetPack)"
    if runtime_version is None:
        return "cuda-python cannot report its CUDA runtime version (a broken install?)"
    jetson = jetson_release() is not None
    if runtime_too_new(runtime_version, driver_version, jetson):
        return runtime_mismatch(runtime_version, driver_version, jetson)
    count, why = device_count()
    if count:
        return None
    if runtime_version > driver_version:  # minor version compatibility did not hold on this machine
        return f"{runtime_mismatch(runtime_version, driver_version, jetson)} ({why})"
    return f"no CUDA GPU ({why})"


def device_count() -> tuple[int, str]:
    """(number of CUDA devices, "" or why there are none)."""
    runtime = cudart()
    try:
        err, count = runtime.cudaGetDeviceCount()
    except Exception as broken:  # noqa: BLE001 - a broken driver install shows up here
        return 0, f"the CUDA runtime cannot be used: {broken}"
    if err != runtime.cudaError_t.cudaSuccess:
        return 0, f"cudaGetDeviceCount: {err!r}"
    return int(count), "" if count else "cudaGetDeviceCount found 0 devices"


def set_device(device: int) -> None:
    """Make GPU `device` current for this thread (TensorRT builds and runs on the current device)."""
    check(cudart().cudaSetDevice(int(device)), f"cudaSetDevice({device})")


def memory_info(device: int) -> tuple[int, int]:
    """(free, total) bytes of device memory (on Jetson: the memory the CPU and GPU share)."""
    runtime = cudart()
    check(runtime.cudaSetDevice(device), "cudaSetDevice")
    free, total = check(runtime.cudaMemGetInfo(), "cudaMemGetInfo")
    return int(free), int(total)


def new_stream() -> Any:
    return check(cudart().cudaStreamCreate(), "cudaStreamCreate")


def synchronize(stream: Any, what: str) -> None:
    check(cudart().cudaStreamSynchronize(stream), what)


def destroy_stream(stream: Any) -> None:
    try:
        cudart().cudaStreamDestroy(stream)
    except Exception:  # noqa: BLE001 - interpreter shutdown or a dead context
        pass


def _mempool_supported(device: int) -> bool:
    """Whether `device` has stream-ordered memory pools; the first time, its default pool is told to keep freed
    memory for reuse (release threshold: unlimited) instead of returning it at every synchronization."""
    with _lock:
        if device in _mempool:
            return _mempool[device]
        runtime = cudart()
        try:
            supported = bool(check(runtime.cudaDeviceGetAttribute(
                runtime.cudaDeviceAttr.cudaDevAttrMemoryPoolsSupported, device), "cudaDeviceGetAttribute"))
        except BackendError:
            supported = False
        if supported:
            pool = check(runtime.cudaDeviceGetDefaultMemPool(device), "cudaDeviceGetDefaultMemPool")
            try:
                from cuda.bindings.driver import cuuint64_t  # noqa: PLC0415
            except ImportError:  # the older cuda.cudart: the pool keeps its default threshold
                cuuint64_t = None
            if cuuint64_t is not None:
                check(runtime.cudaMemPoolSetAttribute(pool, runtime.cudaMemPoolAttr.cudaMemPoolAttrReleaseThreshold,
                                                      cuuint64_t(_UINT64_MAX)), "cudaMemPoolSetAttribute")
            _release_streams[device] = new_stream()
        _mempool[device] = supported
        return supported


def _utility_stream() -> Any:
    stream = getattr(_local, "stream", None)
    if stream is None:
        stream = _local.stream = new_stream()
    return stream


def _utility_staging(nbytes: int) -> "PinnedBuffer":
    """This thread's pinned buffer for DeviceArray's own copies (grow-only; used between two synchronizations)."""
    buffer = getattr(_local, "staging", None)
    if buffer is None or buffer.nbytes < nbytes:
        if buffer is not None:
            buffer.free()
        buffer = _local.staging = PinnedBuffer(max(nbytes, 2 * (buffer.nbytes if buffer else 0)))
    return buffer


TRANSFERS = Transfers()  # every host <-> device copy of this process made by this package


class PinnedBuffer:
    """Page-locked host memory (cudaMallocHost): the GPU copies from and to it asynchronously. Freed when dropped."""

    __slots__ = ("ptr", "nbytes", "__weakref__")

    def __init__(self, nbytes: int) -> None:
        self.nbytes = max(int(nbytes), ALIGNMENT)
        self.ptr = int(check(cudart().cudaMallocHost(self.nbytes), f"cudaMallocHost({self.nbytes})"))

    def view(self, shape: Sequence[int], dtype: Any) -> np.ndarray:
        """A numpy array over the buffer's first bytes (valid while the buffer lives)."""
        dtype = np.dtype(dtype)
        count = _prod(shape)
        if count * dtype.itemsize > self.nbytes:
            raise BackendError(f"pinned buffer of {self.nbytes} bytes cannot hold {tuple(shape)} {dtype}")
        raw = (ctypes.c_byte * max(count * dtype.itemsize, 1)).from_address(self.ptr)
        return np.frombuffer(raw, dtype=dtype, count=count).reshape(tuple(shape))

    def free(self) -> None:
        ptr, self.ptr = getattr(self, "ptr", 0), 0
        if ptr:
            try:
                cudart().cudaFreeHost(ptr)
            except Exception:  # noqa: BLE001 - interpreter shutdown
                pass

    def __del__(self) -> None:
        self.free()


def to_device(dst: int, host: np.ndarray, stream: Any, counter: Transfers, what: str,
              staging: PinnedBuffer | None = None) -> None:
    """Queue a copy of a C-contiguous host array to device address `dst` on `stream`; through `staging` (pinned
    memory the caller keeps until the stream is synchronized) when given."""
    if host.nbytes:
        runtime = cudart()
        source = host.ctypes.data
        if staging is not None:
            np.copyto(staging.view(host.shape, host.dtype), host)
            source = staging.ptr
        check(runtime.cudaMemcpyAsync(dst, source, host.nbytes, runtime.cudaMemcpyKind.cudaMemcpyHostToDevice,
                                      stream), f"cudaMemcpyAsync H2D {what}")
        counter.add(True, host.nbytes)


def to_host(host: np.ndarray | PinnedBuffer, src: int, nbytes: int, stream: Any, counter: Transfers, what: str
            ) -> None:
    """Queue a copy of `nbytes` from device address `src` into a C-contiguous host array or a pinned buffer."""
    if nbytes:
        runtime = cudart()
        dst = host.ptr if isinstance(host, PinnedBuffer) else host.ctypes.data
        check(runtime.cudaMemcpyAsync(dst, src, nbytes, runtime.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream),
              f"cudaMemcpyAsync D2H {what}")
        counter.add(False, nbytes)


class Allocation:
    """One block of device memory (at least ALIGNMENT bytes), freed when dropped. From the device's stream-ordered
    pool where the GPU has one: allocated in `stream`'s order (use it there, or after synchronizing it), or without a
    stream usable anywhere at once; else cudaMalloc."""

    __slots__ = ("ptr", "nbytes", "device", "_pooled", "__weakref__")

    def __init__(self, nbytes: int, *, device: int = 0, stream: Any = None) -> None:
        runtime = cudart()
        self.nbytes = max(int(nbytes), ALIGNMENT)
        self.device = int(device)
        self._pooled = _mempool_supported(self.device)
        if self._pooled:
            ordered = stream is not None
            stream = stream if ordered else _utility_stream()
            self.ptr = int(check(runtime.cudaMallocAsync(self.nbytes, stream), f"cudaMallocAsync({self.nbytes})"))
            if not ordered:  # usable on any stream once the allocation is done
                synchronize(stream, "cudaStreamSynchronize")
        else:
            self.ptr = int(check(runtime.cudaMalloc(self.nbytes), f"cudaMalloc({self.nbytes})"))

    def free(self) -> None:
        ptr, self.ptr = getattr(self, "ptr", 0), 0
        if not ptr:
            return
        try:
            runtime = cudart()
            # Every run and copy synchronizes its stream before its results are visible, so nothing in flight uses
            # `ptr`: it goes back to the pool on the device's release stream (one never destroyed, unlike the
            # stream it may have been allocated on), without synchronizing anything.
            if self._pooled:
                runtime.cudaFreeAsync(ptr, _release_streams[self.device])
            else:
                runtime.cudaFree(ptr)
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
    The TensorRT backend takes only ALIGNMENT-aligned arrays: a view at an offset into another array is refused
    (`slice` makes an aligned copy).
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
        owner = Allocation(_prod(shape) * np.dtype(dtype).itemsize, device=device, stream=stream)
        return cls(shape, dtype, owner.ptr, device=device, owner=owner)

    @classmethod
    def zeros(cls, shape: Sequence[int], dtype: Any, *, device: int = 0) -> "DeviceArray":
        runtime, stream = cudart(), _utility_stream()
        array = cls.empty(shape, dtype, device=device, stream=stream)
        check(runtime.cudaMemsetAsync(array.ptr, 0, array.nbytes, stream), "cudaMemsetAsync")
        synchronize(stream, "cudaStreamSynchronize")
        return array

    @classmethod
    def from_numpy(cls, array: np.ndarray, *, device: int = 0) -> "DeviceArray":
        host = np.ascontiguousarray(array)
        stream = _utility_stream()
        result = cls.empty(host.shape, host.dtype, device=device, stream=stream)
        to_device(result.ptr, host, stream, TRANSFERS, "DeviceArray.from_numpy", _utility_staging(host.nbytes))
        synchronize(stream, "cudaStreamSynchronize")
        return result

    # -- reading -----------------------------------------------------------------------------------------------
    def numpy(self) -> np.ndarray:
        """A host copy."""
        stream, staging = _utility_stream(), _utility_staging(self.nbytes)
        to_host(staging, self.ptr, self.nbytes, stream, TRANSFERS, "DeviceArray.numpy")
        synchronize(stream, "cudaStreamSynchronize")
        return staging.view(self.shape, self.dtype).copy()

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
        result = DeviceArray.empty(shape, self.dtype, device=self.device, stream=_utility_stream())
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
        result = DeviceArray.empty(shape, first.dtype, device=first.device, stream=_utility_stream())
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
    """`height` rows of `width` bytes, device to device, with pitches (cudaMemcpy2DAsync) on this thread's utility
    stream (where the destination was allocated), then synchronize that stream (not the device)."""
    runtime, stream = cudart(), _utility_stream()
    if width == 0 or height == 0:
        synchronize(stream, "cudaStreamSynchronize")  # the allocation, ordered on this stream
        return
    check(runtime.cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, height,
                                    runtime.cudaMemcpyKind.cudaMemcpyDeviceToDevice, stream), "cudaMemcpy2DAsync")
    synchronize(stream, "cudaStreamSynchronize")
