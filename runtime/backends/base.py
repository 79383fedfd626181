"""The backend interface: load a graph, run named arrays to named arrays, close.

The stream and generation loops only see this interface; they never know which backend runs.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..bundle.tensors import TensorInfo

if TYPE_CHECKING:
    from ..bundle.manifest import GraphEntry
    from ..bundle.reader import Bundle


class GraphSession(ABC):
    """A loaded graph. One session serves every stream; `run` must be safe to call from many threads."""

    name: str
    inputs: Sequence[TensorInfo]
    outputs: Sequence[TensorInfo]

    @abstractmethod
    def run(self, feeds: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None
            ) -> dict[str, np.ndarray]:
        """Run the graph on named arrays; returns the requested outputs (all when None) by name."""

    @abstractmethod
    def close(self) -> None:
        """Release what the session holds (memory, contexts, threads); idempotent. `run` then raises."""


class Backend(ABC):
    """Turns a graph of a bundle into a GraphSession, and says how arrays live where its sessions compute.

    A backend whose device is not the host (`keeps_on_device`) lets the stream carry its state there: its sessions
    take `run(..., keep_on_device=names)` and return those outputs as device arrays, which the stream feeds back and
    updates with `concatenate` / `slice` (device copies) and reads with `to_host` only where the caller asks.
    """

    name: str
    keeps_on_device: bool = False

    def to_host(self, value: Any) -> np.ndarray:
        """A host (numpy) array of a value this backend's sessions returned."""
        return np.asarray(value)

    def concatenate(self, values: Sequence[Any], axis: int) -> Any:
        """`values` joined along `axis`, where this backend keeps arrays."""
        return np.concatenate(values, axis=axis)

    def slice(self, value: Any, axis: int, start: int, stop: int | None = None) -> Any:
        """A contiguous copy of `value[..., start:stop, ...]` along `axis`, where this backend keeps arrays."""
        index: list[slice] = [slice(None)] * value.ndim
        index[axis] = slice(start, stop)
        return np.ascontiguousarray(value[tuple(index)])

    @abstractmethod
    def load(self, entry: GraphEntry, bundle: Bundle) -> GraphSession:
        """Load the graph `entry` of `bundle` (its manifest entry: file, IO, axes, engine record).

        Files are reached through `bundle.file(name)`, which keeps them inside the bundle directory.
        """
