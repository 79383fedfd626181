"""CUDA device memory for the TensorRT backend: cuda-python loading, allocations, DeviceArray, copy counters.

`import mirasol.runtime.tensorrt.cuda` works without cuda-python: it is imported on first use, from
`cuda.bindings.runtime` (cuda-python >= 12.6 / 13) or the older `cuda.cudart`. Its calls return
(cudaError_t, *values), as in NVIDIA/TensorRT samples/python/common_runtime.py; `check` raises on an error.

Every copy between host and device that this package makes is counted by a `Transfers` (a session's, which
also adds to the process-wide `TRANSFERS`), so a caller can assert how many bytes a step moved.
"""
from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import BackendError, InputError

ALIGNMENT = 256  # bytes; TensorRT needs IO and scratch addresses 256-byte aligned (and non-null, even if empty)

_cudart_module: Any = None
_local = threading.local()  # per-thread utility stream for DeviceArray copies
_mempool: dict[int, bool] = {}


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
                raise BackendError(f"cuda-python is not installed ({missing}): pip install cuda-python") from None
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
    if device not in _mempool:
        runtime = cudart()
        try:
            supported = check(runtime.cudaDeviceGetAttribute(
                runtime.cudaDeviceAttr.cudaDevAttrMemoryPoolsSupported, device), "cudaDeviceGetAttribute")
            _mempool[device] = bool(supported) and hasattr(runtime, "cudaMallocAsync")
        except Exception:  # noqa: BLE001 - no memory pools: plain cudaMalloc
            _mempool[device] = False
    return _mempool[device]


def _utility_stream() -> Any:
    stream = getattr(_local, "stream", None)
    if stream is None:
        stream = _local.stream = new_stream()
    return stream


@dataclass
class Transfers:
    """Bytes copied host -> device and device -> host, counted when the copy is queued; thread-safe.

    `parent` (if any) counts the same copies too: every session's counter adds to the process-wide TRANSFERS.
    """

    host_to_device: int = 0
    device_to_host: int = 0
    copies: int = 0
    parent: "Transfers | None" = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, to_device: bool, nbytes: int) -> None:
        with self._lock:
            if to_device:
                self.host_to_device += nbytes
            else:
                self.device_to_host += nbytes
            self.copies += 1
        if self.parent is not None:
            self.parent.add(to_device, nbytes)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {"host_to_device": self.host_to_device, "device_to_host": self.device_to_host,
                    "copies": self.copies}


TRANSFERS = Transfers()  # every host <-> device copy of this process made by this package


def to_device(dst: int, host: np.ndarray, stream: Any, counter: Transfers, what: str) -> None:
    """Queue a copy of a C-contiguous host array to device address `dst` on `stream`."""
    if host.nbytes:
        runtime = cudart()
        check(runtime.cudaMemcpyAsync(dst, host.ctypes.data, host.nbytes, runtime.cudaMemcpyKind.cudaMemcpyHostToDevice,
                                      stream), f"cudaMemcpyAsync H2D {what}")
        counter.add(True, host.nbytes)


def to_host(host: np.ndarray, src: int, stream: Any, counter: Transfers, what: str) -> None:
    """Queue a copy from device address `src` into a C-contiguous host array on `stream`."""
    if host.nbytes:
        runtime = cudart()
        check(runtime.cudaMemcpyAsync(host.ctypes.data, src, host.nbytes, runtime.cudaMemcpyKind.cudaMemcpyDeviceToHost,
                                      stream), f"cudaMemcpyAsync D2H {what}")
        counter.add(False, host.nbytes)


class Allocation:
    """One block of device memory (at least ALIGNMENT bytes), freed when dropped; stream-ordered pools where the
    GPU supports them and a stream is given."""

    __slots__ = ("ptr", "nbytes", "_pooled", "__weakref__")

    def __init__(self, nbytes: int, *, device: int = 0, stream: Any = None) -> None:
        runtime = cudart()
        self.nbytes = max(int(nbytes), ALIGNMENT)
        self._pooled = stream is not None and _mempool_supported(device)
        if self._pooled:
            self.ptr = int(check(runtime.cudaMallocAsync(self.nbytes, stream), f"cudaMallocAsync({self.nbytes})"))
        else:
            self.ptr = int(check(runtime.cudaMalloc(self.nbytes), f"cudaMalloc({self.nbytes})"))

    def free(self) -> None:
        ptr, self.ptr = getattr(self, "ptr", 0), 0
        if not ptr:
            return
        try:
            runtime = cudart()
            # Every run synchronizes its stream before its results are visible, so nothing in flight uses `ptr`.
            if self._pooled:
                runtime.cudaFreeAsync(ptr, 0)
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
        array = cls.empty(shape, dtype, device=device)
        if array.nbytes:
            runtime, stream = cudart(), _utility_stream()
            check(runtime.cudaMemsetAsync(array.ptr, 0, array.nbytes, stream), "cudaMemsetAsync")
            synchronize(stream, "cudaStreamSynchronize")
        return array

    @classmethod
    def from_numpy(cls, array: np.ndarray, *, device: int = 0) -> "DeviceArray":
        host = np.ascontiguousarray(array)
        result = cls.empty(host.shape, host.dtype, device=device)
        stream = _utility_stream()
        to_device(result.ptr, host, stream, TRANSFERS, "DeviceArray.from_numpy")
        synchronize(stream, "cudaStreamSynchronize")
        return result

    # -- reading -----------------------------------------------------------------------------------------------
    def numpy(self) -> np.ndarray:
        """A host copy."""
        host = np.empty(self.shape, self.dtype)
        stream = _utility_stream()
        to_host(host, self.ptr, stream, TRANSFERS, "DeviceArray.numpy")
        synchronize(stream, "cudaStreamSynchronize")
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
    runtime, stream = cudart(), _utility_stream()
    check(runtime.cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, height,
                                    runtime.cudaMemcpyKind.cudaMemcpyDeviceToDevice, stream), "cudaMemcpy2DAsync")
    synchronize(stream, "cudaStreamSynchronize")
