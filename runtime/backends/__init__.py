"""Backends by name: every way the runtime runs a bundle's graphs, behind one interface (`base.py`).

A backend is a class in a module of its own (imported only when chosen) and an entry in `REGISTRY`: its name, where
the class lives, the constructor options the name always passes (an ONNX Runtime execution provider, say), where it
computes (Triton's instance kind), a line of help, and the function that says whether it can run a bundle on this
machine (`mirasol-doctor`; imported without the backend's libraries). Adding a backend touches its module and this
table: the command lines' `--backend`, Triton's model repository, `mirasol-doctor` and `Pipeline.load(backend=NAME)`
read it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from importlib import import_module
from typing import TYPE_CHECKING, Any

from ..errors import BackendError
from .base import Backend, BackendSettings, GraphSession

if TYPE_CHECKING:
    from ..bundle.reader import Bundle


@dataclass(frozen=True)
class BackendEntry:
    name: str
    module: str  # under mirasol.runtime
    class_name: str
    device: str  # "cpu" or "gpu": where its graphs compute
    help: str
    check: str  # "module:function" under mirasol.runtime: function(bundle | None, device) -> None or why not + fix
    fixed_options: dict[str, Any] = field(default_factory=dict)  # passed whenever this name is chosen
    setup: str = ""  # what the device needs first, "{bundle}" standing for the bundle's path

    def backend_class(self) -> type[Backend]:
        return getattr(import_module(f"mirasol.runtime.{self.module}"), self.class_name)

    def problem(self, bundle: Bundle | None, device: int = 0) -> str | None:
        """Why this backend cannot run `bundle` (or anything, when None) on this machine, with the fix; None if it
        can. Cheap: it loads no graph."""
        module, _, function = self.check.partition(":")
        return getattr(import_module(f"mirasol.runtime.{module}"), function)(bundle, device)

    def options(self, settings: BackendSettings) -> dict[str, Any]:
        """The constructor options of this backend from settings a command line or a server gives."""
        return {**self.backend_class().options_from(settings), **self.fixed_options}

    def create(self, **options: Any) -> Backend:
        return self.backend_class()(**{**options, **self.fixed_options})


_ORT_CHECKS = "backends.onnxruntime_checks"
REGISTRY: dict[str, BackendEntry] = {entry.name: entry for entry in (
    BackendEntry("onnxruntime", "backends.onnxruntime", "OnnxRuntimeBackend", "cpu",
                 "ONNX Runtime with the providers given (default: the CPU)", f"{_ORT_CHECKS}:check_cpu"),
    BackendEntry("onnxruntime-cuda", "backends.onnxruntime_device", "OnnxRuntimeDeviceBackend", "gpu",
                 "ONNX Runtime's CUDA provider (onnxruntime-gpu), the carried state kept on the GPU",
                 f"{_ORT_CHECKS}:check_cuda", {"execution": "cuda"}),
    BackendEntry("onnxruntime-tensorrt", "backends.onnxruntime_device", "OnnxRuntimeDeviceBackend", "gpu",
                 "ONNX Runtime's TensorRT provider (onnxruntime-gpu and TensorRT 10), engines built at the first load "
                 "and cached in the bundle, the carried state kept on the GPU", f"{_ORT_CHECKS}:check_tensorrt",
                 {"execution": "tensorrt"}),
    BackendEntry("tensorrt", "tensorrt.backend", "TensorRTBackend", "gpu",
                 "TensorRT engines built by mirasol-build-engines on this device", "tensorrt.backend:check",
                 setup="build the engines on the device first: mirasol-build-engines {bundle}"),
)}
BACKENDS: tuple[str, ...] = tuple(REGISTRY)


def backend_entry(name: str) -> BackendEntry:
    """The registry entry of `name`; an unknown name raises a BackendError listing the known ones."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise BackendError(f"unknown backend {name!r}; choose one of {BACKENDS}") from None


def get_backend(name: str | Backend = "onnxruntime", **options: Any) -> Backend:
    """A backend by registry name with its constructor options, or the Backend given."""
    if isinstance(name, Backend):
        return name
    return backend_entry(name).create(**options)


__all__ = ["BACKENDS", "REGISTRY", "Backend", "BackendEntry", "BackendSettings", "GraphSession", "backend_entry",
           "get_backend"]
