"""A fake CUDA runtime (`cuda.bindings.runtime` of cuda-python), as strict as the real one where a difference could
hide a bug. Host memory plays device memory.

- calls return (cudaError_t, *values), with the real functions' parameter names and enum values (checked against
  cuda-bindings 12.9 and cuda-python 12.6.2.post1 by tests/test_tensorrt_build.py, see tests/tensorrt_api/);
- allocations are 256-byte aligned; copies and memsets must stay inside live allocations on their device side;
- asynchrony: cudaMemcpyAsync, cudaMemsetAsync, cudaMemcpy2DAsync (and TensorRT's execute_async_v3, see
  fake_tensorrt.py) are queued per stream and performed at cudaStreamSynchronize; cudaFree and the legacy default
  stream 0 drain every stream first. A result read before its stream is synchronized is therefore wrong, and memory
  freed before queued work ran is an illegal address at synchronization;
- versions: cudaRuntimeGetVersion / cudaDriverGetVersion report the Device's; a runtime newer than the driver fails
  cudaGetDeviceCount with cudaErrorInsufficientDriver when the majors differ, or on a Jetson (no minor version
  compatibility there), and a driver of 0 is no driver at all;
- several GPUs (`Device(count=N)`): cudaSetDevice makes one current for the calling thread;
- the Device counts what costs a synchronization or a staged copy: cudaMalloc / cudaFree calls (each synchronizes
  the device) and copies from or to pageable host memory (anything not from cudaMallocHost).
"""
from __future__ import annotations

import ctypes
import enum
import threading
import types
from collections.abc import Callable
from typing import Any

ALIGNMENT = 256


class IllegalAddress(Exception):
    """Queued work touched memory that is no longer allocated (CUDA: cudaErrorIllegalAddress at synchronization)."""


class Device:
    """The fake GPU: allocations, per-stream queues of pending work, the TensorRT log, memory counters."""

    def __init__(self, total_memory: int, *, count: int = 1, runtime_version: int = 12060,
                 driver_version: int = 12060, jetson: bool = False) -> None:
        self.total_memory = total_memory
        self.count = count  # GPUs
        self.runtime_version, self.driver_version, self.jetson = runtime_version, driver_version, jetson
        self.blocks: dict[int, tuple[int, Any]] = {}  # aligned address -> (size, backing ctypes buffer)
        self.pinned: dict[int, tuple[int, Any]] = {}  # cudaMallocHost blocks
        self.queues: dict[int, list[Callable[[], None]]] = {0: []}
        self.log: list[str] = []
        self.static_context_bytes = 0  # activation memory STATIC contexts reserved
        self.synchronizing_calls = 0  # cudaMalloc / cudaFree: each synchronizes the device
        self.pageable_copies = 0  # host <-> device copies from or to pageable memory
        self.pool_release_threshold: int | None = None  # what cudaMemPoolSetAttribute set
        self.deserialized_from: list[str] = []  # the types TensorRT's deserialize_cuda_engine was given
        self.current = threading.local()  # the calling thread's device (cudaSetDevice)
        self.lock = threading.RLock()

    def current_device(self) -> int:
        return getattr(self.current, "device", 0)

    def is_pinned(self, address: int, nbytes: int) -> bool:
        with self.lock:
            return any(start <= address and address + nbytes <= start + size
                       for start, (size, _) in self.pinned.items())

    @property
    def allocated(self) -> int:
        return sum(size for size, _ in self.blocks.values())

    def malloc(self, size: int) -> int:
        buffer = ctypes.create_string_buffer(int(size) + ALIGNMENT)
        address = -(-ctypes.addressof(buffer) // ALIGNMENT) * ALIGNMENT
        with self.lock:
            self.blocks[address] = (int(size), buffer)
        return address

    def free(self, address: int) -> bool:
        with self.lock:
            return self.blocks.pop(int(address), None) is not None

    def holds(self, address: int, nbytes: int) -> bool:
        """Whether [address, address + nbytes) lies inside one live allocation."""
        with self.lock:
            for start, (size, _) in self.blocks.items():
                if start <= address and address + max(nbytes, 0) <= start + size and address < start + max(size, 1):
                    return True
        return False

    def enqueue(self, stream: int, work: Callable[[], None]) -> bool:
        with self.lock:
            if stream not in self.queues:
                return False
            self.queues[stream].append(work)
        if stream == 0:  # the legacy default stream waits for, and is waited for by, every other stream
            return self.drain_all() is None
        return True

    def drain(self, stream: int) -> str | None:
        """Run the stream's queued work; the name of the CUDA error it hit, or None."""
        with self.lock:
            work, self.queues[stream] = self.queues[stream], []
            try:
                for item in work:
                    item()
            except IllegalAddress as bad:
                self.log.append(f"illegal address: {bad}")
                return "cudaErrorIllegalAddress"
        return None

    def drain_all(self) -> str | None:
        with self.lock:
            errors = [self.drain(stream) for stream in list(self.queues)]
        return next((e for e in errors if e), None)

    def read(self, address: int, nbytes: int, what: str) -> bytes:
        if not self.holds(address, nbytes):
            raise IllegalAddress(f"{what}: reading {nbytes} bytes at 0x{address:x}")
        return ctypes.string_at(address, nbytes) if nbytes else b""

    def write(self, address: int, data: bytes, what: str) -> None:
        if not self.holds(address, len(data)):
            raise IllegalAddress(f"{what}: writing {len(data)} bytes at 0x{address:x}")
        ctypes.memmove(address, data, len(data))


def make_cudart(gpu: Device) -> types.ModuleType:
    """A fake `cuda.bindings.runtime` with the real functions' parameter names and enum values."""

    class cudaError_t(enum.IntEnum):  # noqa: N801
        cudaSuccess = 0
        cudaErrorInvalidValue = 1
        cudaErrorMemoryAllocation = 2
        cudaErrorInsufficientDriver = 35
        cudaErrorNoDevice = 100
        cudaErrorInvalidDevice = 101
        cudaErrorInvalidResourceHandle = 400
        cudaErrorIllegalAddress = 700

    class cudaMemcpyKind(enum.IntEnum):  # noqa: N801
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2
        cudaMemcpyDeviceToDevice = 3

    class cudaDeviceAttr(enum.IntEnum):  # noqa: N801
        cudaDevAttrMemoryPoolsSupported = 115

    class cudaMemPoolAttr(enum.IntEnum):  # noqa: N801
        cudaMemPoolAttrReleaseThreshold = 4

    class cudaMemPool_t:  # noqa: N801
        def __init__(self, device: int) -> None:
            self._device = device

    class cudaStream_t:  # noqa: N801
        _count = 0

        def __init__(self) -> None:
            cudaStream_t._count += 1
            self._handle = 0x5000 + cudaStream_t._count

        def __int__(self) -> int:
            return self._handle

    ok = (cudaError_t.cudaSuccess,)

    def handle(stream: Any) -> int:
        return int(stream)

    def queued(stream: Any, work: Callable[[], None]) -> tuple:
        return ok if gpu.enqueue(handle(stream), work) else (cudaError_t.cudaErrorInvalidResourceHandle,)

    def allocate(size: int) -> tuple:
        if gpu.allocated + int(size) > gpu.total_memory:
            return cudaError_t.cudaErrorMemoryAllocation, None
        return cudaError_t.cudaSuccess, gpu.malloc(size)

    def cudaMalloc(size):  # noqa: N802
        gpu.synchronizing_calls += 1
        gpu.drain_all()  # cudaMalloc may synchronize the device
        return allocate(size)

    def cudaMallocAsync(size, hStream):  # noqa: N802, N803
        if handle(hStream) not in gpu.queues:
            return cudaError_t.cudaErrorInvalidResourceHandle, None
        return allocate(size)

    def cudaFree(devPtr):  # noqa: N802, N803
        gpu.synchronizing_calls += 1
        gpu.drain_all()  # cudaFree synchronizes the device
        return ok if gpu.free(devPtr) else (cudaError_t.cudaErrorInvalidValue,)

    def cudaMallocHost(size):  # noqa: N802
        buffer = ctypes.create_string_buffer(int(size) + ALIGNMENT)
        address = -(-ctypes.addressof(buffer) // ALIGNMENT) * ALIGNMENT
        with gpu.lock:
            gpu.pinned[address] = (int(size), buffer)
        return cudaError_t.cudaSuccess, address

    def cudaFreeHost(ptr):  # noqa: N802
        with gpu.lock:
            return ok if gpu.pinned.pop(int(ptr), None) is not None else (cudaError_t.cudaErrorInvalidValue,)

    def cudaDeviceGetDefaultMemPool(device):  # noqa: N802
        if not 0 <= int(device) < gpu.count:
            return cudaError_t.cudaErrorInvalidDevice, None
        return cudaError_t.cudaSuccess, cudaMemPool_t(int(device))

    def cudaMemPoolSetAttribute(memPool, attr, value):  # noqa: N802, N803
        threshold = cudaMemPoolAttr.cudaMemPoolAttrReleaseThreshold
        if not isinstance(memPool, cudaMemPool_t) or cudaMemPoolAttr(attr) != threshold:
            return (cudaError_t.cudaErrorInvalidValue,)
        gpu.pool_release_threshold = int(value)
        return ok

    def cudaRuntimeGetVersion():  # noqa: N802
        return cudaError_t.cudaSuccess, gpu.runtime_version

    def cudaDriverGetVersion():  # noqa: N802
        return cudaError_t.cudaSuccess, gpu.driver_version

    def runnable() -> bool:
        """Whether this runtime runs on this driver (see the module docstring)."""
        if not gpu.driver_version:
            return False
        runtime, driver = divmod(gpu.runtime_version, 1000), divmod(gpu.driver_version, 1000)
        return runtime <= driver or (runtime[0] == driver[0] and not gpu.jetson)

    def cudaFreeAsync(devPtr, hStream):  # noqa: N802, N803
        if not gpu.holds(int(devPtr), 0):
            return (cudaError_t.cudaErrorInvalidValue,)
        with gpu.lock:
            idle = not gpu.queues.get(handle(hStream), [None])
        if idle:  # nothing before it in the stream: the memory is back in the pool at once
            gpu.free(devPtr)
            return ok
        return queued(hStream, lambda: gpu.free(devPtr))

    def copy(dst: int, src: int, count: int, kind: int, what: str) -> Callable[[], None]:
        def work() -> None:
            data = (gpu.read(src, count, what) if kind != cudaMemcpyKind.cudaMemcpyHostToDevice
                    else ctypes.string_at(src, count))
            if kind == cudaMemcpyKind.cudaMemcpyDeviceToHost:
                ctypes.memmove(dst, data, count)
            else:
                gpu.write(dst, data, what)
        return work

    def valid_copy(dst: int, src: int, count: int, kind: int) -> bool:
        to_device = kind in (cudaMemcpyKind.cudaMemcpyHostToDevice, cudaMemcpyKind.cudaMemcpyDeviceToDevice)
        from_device = kind in (cudaMemcpyKind.cudaMemcpyDeviceToHost, cudaMemcpyKind.cudaMemcpyDeviceToDevice)
        return ((not to_device or gpu.holds(dst, count)) and (not from_device or gpu.holds(src, count))
                and kind in tuple(cudaMemcpyKind))

    def cudaMemcpyAsync(dst, src, count, kind, stream):  # noqa: N802
        dst, src, count = int(dst), int(src), int(count)
        if not valid_copy(dst, src, count, kind):
            return (cudaError_t.cudaErrorInvalidValue,)
        host = {cudaMemcpyKind.cudaMemcpyHostToDevice: src, cudaMemcpyKind.cudaMemcpyDeviceToHost: dst}.get(kind)
        if host is not None and not gpu.is_pinned(host, count):
            gpu.pageable_copies += 1
        return queued(stream, copy(dst, src, count, kind, "cudaMemcpyAsync"))

    def cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, height, kind, stream):  # noqa: N802
        rows = [(int(dst) + r * int(dpitch), int(src) + r * int(spitch)) for r in range(int(height))]
        if not all(valid_copy(d, s, int(width), kind) for d, s in rows):
            return (cudaError_t.cudaErrorInvalidValue,)
        works = [copy(d, s, int(width), kind, "cudaMemcpy2DAsync") for d, s in rows]
        return queued(stream, lambda: [w() for w in works])

    def cudaMemsetAsync(devPtr, value, count, stream):  # noqa: N802, N803
        if not gpu.holds(int(devPtr), int(count)):
            return (cudaError_t.cudaErrorInvalidValue,)
        return queued(stream, lambda: gpu.write(int(devPtr), bytes([int(value)]) * int(count), "cudaMemsetAsync"))

    def cudaStreamCreate():  # noqa: N802
        stream = cudaStream_t()
        with gpu.lock:
            gpu.queues[int(stream)] = []
        return cudaError_t.cudaSuccess, stream

    def cudaStreamSynchronize(stream):  # noqa: N802
        if handle(stream) not in gpu.queues:
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        error = gpu.drain(handle(stream))
        return (cudaError_t[error],) if error else ok

    def cudaStreamDestroy(stream):  # noqa: N802
        if handle(stream) not in gpu.queues or handle(stream) == 0:
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        gpu.drain(handle(stream))  # the work already queued still completes
        with gpu.lock:
            gpu.queues.pop(handle(stream))
        return ok

    def cudaSetDevice(device):  # noqa: N802
        if not runnable():
            return (cudaError_t.cudaErrorInsufficientDriver,)
        if not 0 <= int(device) < gpu.count:
            return (cudaError_t.cudaErrorInvalidDevice,)
        gpu.current.device = int(device)
        return ok

    def cudaGetDeviceCount():  # noqa: N802
        if not runnable():  # cuda-bindings 12.9 says so also when there is no driver at all
            return cudaError_t.cudaErrorInsufficientDriver, None
        return cudaError_t.cudaSuccess, gpu.count

    def cudaDeviceGetAttribute(attr, device):  # noqa: N802
        if not 0 <= int(device) < gpu.count:
            return cudaError_t.cudaErrorInvalidDevice, None
        return cudaError_t.cudaSuccess, 1

    def cudaMemGetInfo():  # noqa: N802
        return cudaError_t.cudaSuccess, gpu.total_memory - gpu.allocated, gpu.total_memory

    module = types.ModuleType("cuda.bindings.runtime")
    for value in (cudaError_t, cudaMemcpyKind, cudaDeviceAttr, cudaMemPoolAttr, cudaMemPool_t, cudaStream_t,
                  cudaMalloc, cudaMallocAsync, cudaFree, cudaFreeAsync, cudaMallocHost, cudaFreeHost,
                  cudaDeviceGetDefaultMemPool, cudaMemPoolSetAttribute, cudaRuntimeGetVersion, cudaDriverGetVersion,
                  cudaMemcpyAsync, cudaMemcpy2DAsync, cudaMemsetAsync, cudaStreamCreate, cudaStreamSynchronize,
                  cudaStreamDestroy, cudaSetDevice, cudaGetDeviceCount, cudaDeviceGetAttribute, cudaMemGetInfo):
        setattr(module, value.__name__, value)
    return module


def make_cudriver() -> types.ModuleType:
    """A fake `cuda.bindings.driver` with the one name the code takes from it (the pool threshold's value type)."""

    class cuuint64_t(int):  # noqa: N801
        pass

    module = types.ModuleType("cuda.bindings.driver")
    module.cuuint64_t = cuuint64_t  # type: ignore[attr-defined]
    return module
