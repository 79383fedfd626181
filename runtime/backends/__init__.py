"""Backends: ONNX Runtime (any provider it has) and native TensorRT, behind one interface."""
from __future__ import annotations

from typing import Any

from ..bundle.tensors import TensorInfo
from ..errors import BackendError
from .base import Backend, GraphSession

BACKENDS = ("onnxruntime", "tensorrt")


def get_backend(name: str | Backend = "onnxruntime", **options: Any) -> Backend:
    """A backend by name ("onnxruntime", "tensorrt") with its options, or the Backend given."""
    if isinstance(name, Backend):
        return name
    if name == "onnxruntime":
        from .onnxruntime import OnnxRuntimeBackend
        return OnnxRuntimeBackend(**options)
    if name == "tensorrt":
        from ..tensorrt.backend import TensorRTBackend
        return TensorRTBackend(**options)
    raise BackendError(f"unknown backend {name!r}; choose one of {BACKENDS}")


__all__ = ["BACKENDS", "Backend", "GraphSession", "TensorInfo", "get_backend"]
