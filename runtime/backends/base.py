"""The backend interface: load a graph, run named arrays to named arrays, close.

The stream and generation loops only see this interface; they never know which backend runs.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..bundle.tensors import TensorInfo

if TYPE_CHECKING:
    from ..bundle.manifest import GraphEntry
    from ..bundle.reader import Bundle


@dataclass(frozen=True)
class BackendSettings:
    """What a command line or a server says about running graphs; each backend takes what applies to it
    (`Backend.options_from`)."""

    threads: int | None = None  # intra-op threads (None: the library's choice)
    graph_threads: Mapping[str, int] = field(default_factory=dict)  # per graph, overriding `threads`
    providers: Sequence[str] | None = None  # ONNX Runtime execution providers, in order
    device: int = 0  # GPU index


class GraphSession(ABC):
    """A loaded graph. One session serves every stream; `run` must be safe to call from many threads."""

    name: str
    inputs: Sequence[TensorInfo]
    outputs: Sequence[TensorInfo]

    @abstractmethod
    def run(self, feeds: Mapping[str, Any], output_names: Sequence[str] | None = None,
            keep_on_device: Collection[str] = ()) -> dict[str, Any]:
        """Run the graph on named arrays; returns the requested outputs (all when None) by name.

        Feeds are numpy arrays, or arrays this backend returned. `keep_on_device`: outputs to return as the
        backend's device arrays instead of numpy (only where `Backend.keeps_on_device`; others return numpy).
        """

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

    @classmethod
    def options_from(cls, settings: BackendSettings) -> dict[str, Any]:
        """The constructor options this backend takes from `settings` (the rest do not apply to it)."""
        return {}

    def to_host(self, value: Any) -> np.ndarray:
        """A host (numpy) array of a value this backend's sessions returned."""
        return np.asarray(value)

    def concatenate(self, values: Sequence[Any], axis: int) -> Any:
        """`values` joined along `axis`, where this backend keeps arrays: on the host while every part that holds
        anything is there, else on the device (`join_on_device`; empty parts cost nothing)."""
        parts = [v for v in values if v.shape[axis]] or list(values[:1])
        if all(isinstance(v, np.ndarray) for v in parts):
            return np.concatenate(values, axis=axis)
        if len(parts) == 1:
            return parts[0]
        return self.join_on_device(parts, axis)

    def join_on_device(self, parts: Sequence[Any], axis: int) -> Any:
        """`parts` (some on the device, each non-empty) joined on the device; host parts are copied there. Only a
        backend whose sessions keep outputs on the device is given any."""
        raise NotImplementedError(f"{type(self).__name__} keeps no arrays on a device")

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
