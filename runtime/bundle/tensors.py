"""A graph input or output as the manifest describes it: the unit of every graph's IO description."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


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
