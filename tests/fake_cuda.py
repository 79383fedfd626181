"""A fake CUDA runtime (`cuda.bindings.runtime` of cuda-python), as strict as the real one where a difference could
hide a bug. Host memory plays device memory.

- calls return (cudaError_t, *values), with the real functions' parameter names and enum values (checked against
  cuda-bindings 12.x by tests/test_tensorrt_build.py, see tests/tensorrt_api/);
- allocations are 256-byte aligned; copies and memsets must stay inside live allocations on their device side;
- asynchrony: cudaMemcpyAsync, cudaMemsetAsync, cudaMemcpy2DAsync (and TensorRT's execute_async_v3, see
  fake_tensorrt.py) are queued per stream and performed at cudaStreamSynchronize; cudaFree and the legacy default
  stream 0 drain every stream first. A result read before its stream is synchronized is therefore wrong, and memory
  freed before queued work ran is an illegal address at synchronization.
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

    def __init__(self, total_memory: int) -> None:
        self.total_memory = total_memory
        self.blocks: dict[int, tuple[int, Any]] = {}  # aligned address -> (size, backing ctypes buffer)
        self.queues: dict[int, list[Callable[[], None]]] = {0: []}
        self.log: list[str] = []
        self.static_context_bytes = 0  # activation memory STATIC contexts reserved
        self.lock = threading.RLock()

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
        cudaErrorInvalidDevice = 101
        cudaErrorInvalidResourceHandle = 400
        cudaErrorIllegalAddress = 700

    class cudaMemcpyKind(enum.IntEnum):  # noqa: N801
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2
        cudaMemcpyDeviceToDevice = 3

    class cudaDeviceAttr(enum.IntEnum):  # noqa: N801
        cudaDevAttrMemoryPoolsSupported = 115

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

    def cudaMalloc(size):  # noqa: N802
        if gpu.allocated + int(size) > gpu.total_memory:
            return cudaError_t.cudaErrorMemoryAllocation, None
        return cudaError_t.cudaSuccess, gpu.malloc(size)

    def cudaMallocAsync(size, hStream):  # noqa: N802, N803
        return cudaMalloc(size)

    def cudaFree(devPtr):  # noqa: N802, N803
        gpu.drain_all()  # cudaFree synchronizes the device
        return ok if gpu.free(devPtr) else (cudaError_t.cudaErrorInvalidValue,)

    def cudaFreeAsync(devPtr, hStream):  # noqa: N802, N803
        if not gpu.holds(int(devPtr), 0):
            return (cudaError_t.cudaErrorInvalidValue,)
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
        return ok if int(device) == 0 else (cudaError_t.cudaErrorInvalidDevice,)

    def cudaGetDeviceCount():  # noqa: N802
        return cudaError_t.cudaSuccess, 1

    def cudaDeviceGetAttribute(attr, device):  # noqa: N802
        if int(device) != 0:
            return cudaError_t.cudaErrorInvalidDevice, None
        return cudaError_t.cudaSuccess, 1

    def cudaMemGetInfo():  # noqa: N802
        return cudaError_t.cudaSuccess, gpu.total_memory - gpu.allocated, gpu.total_memory

    module = types.ModuleType("cuda.bindings.runtime")
    for value in (cudaError_t, cudaMemcpyKind, cudaDeviceAttr, cudaStream_t, cudaMalloc, cudaMallocAsync, cudaFree,
                  cudaFreeAsync, cudaMemcpyAsync, cudaMemcpy2DAsync, cudaMemsetAsync, cudaStreamCreate,
                  cudaStreamSynchronize, cudaStreamDestroy, cudaSetDevice, cudaGetDeviceCount, cudaDeviceGetAttribute,
                  cudaMemGetInfo):
        setattr(module, value.__name__, value)
    return module
