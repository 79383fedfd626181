"""One execution slot of a TensorRT session: an IExecutionContext with user-managed activation memory, its CUDA
stream, and the grow-only device buffers and pinned host buffers of the calls it runs.

The context's input shapes are set only when they change (IExecutionContext.set_input_shape), and after every change
its activation memory is sized for the new shapes (update_device_memory_size_for_shapes) and given to it again
(set_device_memory), as Polygraphy's TensorRT runner does: the memory is grow-only, the call is cheap, and a context
never runs on memory sized for other shapes. set_device_memory returns nothing to check (errors go to TensorRT's log);
update_device_memory_size_for_shapes returns 0 on an error, which is refused here for an engine that needs memory.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import BackendError, InputError
from . import cuda
from .cuda import ALIGNMENT

_GROWTH = 1.5  # grow-only buffers grow at least this much, so a cache growing by one token does not realloc each step


class Slot:
    """One execution context, its stream and buffers; used by one call at a time (the session's pool hands it out)."""

    def __init__(self, engine: Any, trt: Any, device: int, graph: str) -> None:
        self.device = device
        self.graph = graph
        self.context = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if self.context is None:
            raise BackendError("TensorRT could not create an execution context (out of GPU memory?)")
        self.needs_memory = int(engine.device_memory_size_v2) > 0
        self.stream = cuda.new_stream()
        self.buffers: dict[str, cuda.Allocation] = {}
        self.staging: dict[str, cuda.PinnedBuffer] = {}
        self.dummy = cuda.Allocation(ALIGNMENT, device=device, stream=self.stream)  # the address of empty tensors
        self.scratch: cuda.Allocation | None = None
        self.shapes: dict[str, tuple[int, ...]] = {}  # the input shapes the context holds now

    def buffer(self, name: str, nbytes: int) -> int:
        """The device address of this slot's buffer `name`, grown to `nbytes` if needed (stream-ordered)."""
        current = self.buffers.get(name)
        if current is None or current.nbytes < nbytes:
            self.buffers[name] = cuda.Allocation(_grown_size(current, nbytes), device=self.device, stream=self.stream)
            if current is not None:
                current.free()
        return self.buffers[name].ptr

    def pinned(self, name: str, nbytes: int) -> cuda.PinnedBuffer:
        """This slot's pinned host buffer `name`, grown to `nbytes` if needed."""
        current = self.staging.get(name)
        if current is None or current.nbytes < nbytes:
            self.staging[name] = cuda.PinnedBuffer(_grown_size(current, nbytes))
            if current is not None:
                current.free()
        return self.staging[name]

    def set_shapes(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Give the context these input shapes; after any change, activation memory for them (see the module)."""
        changed = False
        for name, shape in shapes.items():
            if self.shapes.get(name) != shape:
                self.shapes.pop(name, None)
                if not self.context.set_input_shape(name, shape):
                    raise InputError(f"graph {self.graph!r}: TensorRT refused shape {shape} for input {name!r}")
                self.shapes[name] = shape
                changed = True
        if not changed and self.scratch is not None:
            return
        size = int(self.context.update_device_memory_size_for_shapes())
        if size <= 0 and self.needs_memory:
            raise BackendError(f"graph {self.graph!r}: TensorRT's update_device_memory_size_for_shapes failed (it "
                               f"returned {size}) for input shapes {dict(self.shapes)}; see the TensorRT log")
        if self.scratch is None or self.scratch.nbytes < size:
            old, self.scratch = self.scratch, cuda.Allocation(_grown_size(self.scratch, size), device=self.device,
                                                              stream=self.stream)
            if old is not None:
                old.free()
        self.context.set_device_memory(self.scratch.ptr, self.scratch.nbytes)

    def memory(self) -> tuple[int, int]:
        """(activation bytes, IO buffer bytes) this slot holds on the device."""
        return (self.scratch.nbytes if self.scratch else 0), sum(b.nbytes for b in self.buffers.values())

    def close(self) -> None:
        self.context = None  # before the memory it used
        for allocation in (*self.buffers.values(), *self.staging.values(), self.dummy, self.scratch):
            if allocation is not None:
                allocation.free()
        self.buffers.clear()
        self.staging.clear()
        stream, self.stream = self.stream, None
        if stream is not None:
            cuda.destroy_stream(stream)


def _grown_size(current: Any, nbytes: int) -> int:
    """The size of a buffer replacing `current` (None at first) to hold `nbytes`: at least _GROWTH times larger."""
    return nbytes if current is None else max(nbytes, int(current.nbytes * _GROWTH))
