"""The backend interface: load a graph, run named arrays to named arrays.

The stream and generation loops only see this interface; they never know which backend runs.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TensorInfo:
    """One graph input or output: name, numpy dtype name, symbolic shape (ints or axis names)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> "TensorInfo":
        return cls(str(data["name"]), str(data["dtype"]), tuple(data["shape"]))  # type: ignore[arg-type]


class GraphSession(ABC):
    """A loaded graph. One session serves every stream; `run` must be safe to call from many threads."""

    name: str
    inputs: Sequence[TensorInfo]
    outputs: Sequence[TensorInfo]

    @abstractmethod
    def run(self, feeds: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None
            ) -> dict[str, np.ndarray]:
        """Run the graph on named arrays; returns the requested outputs (all when None) by name."""


class Backend(ABC):
    """Turns a graph file into a GraphSession."""

    name: str

    @abstractmethod
    def load(self, graph_name: str, path: str, inputs: Sequence[TensorInfo], outputs: Sequence[TensorInfo]
             ) -> GraphSession:
        """Load the graph at `path`; `inputs`/`outputs` are the manifest's description of its IO."""
