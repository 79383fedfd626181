"""ONNX Runtime on an NVIDIA GPU, with the carried state kept there: the backends `onnxruntime-cuda` (CUDA execution
provider) and `onnxruntime-tensorrt` (TensorRT execution provider, CUDA for what TensorRT does not take).

    with Pipeline.load("bundle/", backend="onnxruntime-cuda") as pipe: ...      # onnxruntime-gpu installed
    OnnxRuntimeDeviceBackend("cpu")     # the same binding code on the CPU provider (what CI tests)

- Sessions are OnnxRuntimeBackend's (its session options and IO checks), with providers per graph: the CUDA provider
  with TF32 off unless asked (`use_tf32`, on by default in ONNX Runtime; it rounds fp32 matmul inputs to 10-bit
  mantissas), or the TensorRT provider with one optimization profile from the manifest's axes (min/opt/max shapes of
  every input, as `mirasol-build-engines` makes: no rebuild for a new cache length), fp16 / int8 per the bundle,
  its engine and timing caches in the bundle's `onnxruntime-tensorrt/` folder (made under the ownership rule).
- The provider must really run the graph: ONNX Runtime falls back to the CPU, with only a log line, when the CUDA or
  TensorRT libraries cannot be loaded; a session whose first provider is not the one asked for is refused, saying
  why and what to install.
- The state stays on the device (`keeps_on_device`): inputs and outputs are bound with IOBinding to OrtValues on the
  device; outputs the pipeline carries come back as `OrtDeviceArray`s and are fed back as they are; appends and
  windows run as one-operator ONNX models on the same provider (`onnx_ops.py`). A fresh IOBinding per call: reusing
  one while holding an output of the previous call corrupts that output in onnxruntime 1.19-1.26.
- Copies are counted where they happen (`transfers`, per session and for the backend): a host array bound as an
  input is a copy to the device, an output read as numpy a copy back. With the CPU provider ("cpu") the same code
  runs and counts the same bytes, though no copy happens there: that is how CI checks what a GPU would move.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort

from ..errors import BackendError, InputError
from ..files.atomic import prepare_output_dir
from ..files.ownership import BUNDLE_FOLDERS
from ..tensorrt.plan import input_shapes, int8_problem, profile_axes
from . import onnx_ops
from .base import BackendSettings, GraphSession
from .onnxruntime import OnnxRuntimeBackend
from .onnxruntime_checks import EXECUTIONS, check_install, preload_libraries
from .transfers import Transfers

if TYPE_CHECKING:
    from ..bundle.manifest import GraphEntry
    from ..bundle.reader import Bundle

CACHE_DIR = "onnxruntime-tensorrt"  # in the bundle: the TensorRT provider's engine and timing caches
CACHE_KIND = BUNDLE_FOLDERS[CACHE_DIR]  # the bundle's ownership check knows the folder by it
_INT64_MAX = (1 << 63) - 1
_DTYPES = {element: dtype for dtype, element in onnx_ops.ELEMENT_TYPES.items()}


class OrtDeviceArray:
    """An OrtValue on the backend's device, as the pipeline sees arrays: `shape`, `dtype`; `np.asarray` copies it to
    the host (counted)."""

    __slots__ = ("value", "shape", "dtype", "_counter")

    def __init__(self, value: Any, counter: Transfers) -> None:
        self.value = value
        self.shape = tuple(int(d) for d in value.shape())
        self.dtype = _DTYPES[value.element_type()]
        self._counter = counter

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def numpy(self) -> np.ndarray:
        """A host copy."""
        self._counter.add(False, self.nbytes)
        return self.value.numpy()

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        host = self.numpy()
        return host if dtype is None else host.astype(dtype, copy=False)

    def __repr__(self) -> str:
        return f"OrtDeviceArray(shape={self.shape}, dtype={self.dtype}, device={self.value.device_name()})"


class OrtDeviceSession(GraphSession):
    """One graph: every call binds its inputs and outputs on the device through a fresh IOBinding."""

    def __init__(self, name: str, session: ort.InferenceSession, entry: GraphEntry, backend: OnnxRuntimeDeviceBackend
                 ) -> None:
        self.name = name
        self.session: ort.InferenceSession | None = session
        self.inputs = tuple(entry.inputs)
        self.outputs = tuple(entry.outputs)
        self.transfers = Transfers(parent=backend.transfers)
        self._backend = backend

    def run(self, feeds: Mapping[str, Any], output_names: Sequence[str] | None = None,
            keep_on_device: Collection[str] = ()) -> dict[str, Any]:
        session = self.session
        if session is None:
            raise BackendError(f"graph {self.name!r}: the session is closed")
        wanted = [t.name for t in self.outputs] if output_names is None else list(output_names)
        unknown = [n for n in wanted if n not in {t.name for t in self.outputs}]
        if unknown:
            raise InputError(f"graph {self.name!r} has no output {unknown[0]!r}")
        missing = [t.name for t in self.inputs if t.name not in feeds]
        if missing:
            raise InputError(f"graph {self.name!r}: missing input(s) {', '.join(missing)}")
        backend = self._backend
        binding = session.io_binding()
        held = []  # the OrtValues of this call's host inputs, alive until it returns
        for tensor in self.inputs:
            value = backend.on_device(feeds[tensor.name], self.transfers)
            held.append(value)
            binding.bind_ortvalue_input(tensor.name, value.value)
        for name in wanted:
            binding.bind_output(name, backend.device_type, backend.device_id)
        try:
            session.run_with_iobinding(binding)
        except Exception as failure:  # onnxruntime raises its own exception types
            raise BackendError(f"onnxruntime failed running graph {self.name!r}: {failure}") from failure
        results: dict[str, Any] = {}
        for name, value in zip(wanted, binding.get_outputs()):
            array = OrtDeviceArray(value, self.transfers)
            results[name] = array if name in keep_on_device else array.numpy()
        return results

    def close(self) -> None:
        self.session = None


class OnnxRuntimeDeviceBackend(OnnxRuntimeBackend):
    """ONNX Runtime with the state on the device. `execution`: "cuda", "tensorrt" or "cpu" (the CPU provider running
    the same binding code); `device`: the GPU; `tf32`: allow TF32 in fp32 bundles; `workspace_mb`: the TensorRT
    provider's builder workspace; `cache_dir`: where the TensorRT provider keeps engines (default: in the bundle)."""

    keeps_on_device = True

    @classmethod
    def options_from(cls, settings: BackendSettings) -> dict[str, Any]:
        return {"threads": settings.threads, "graph_threads": dict(settings.graph_threads), "device": settings.device}

    def __init__(self, execution: str = "cuda", *, device: int = 0, threads: int | None = None,
                 graph_threads: Mapping[str, int] | None = None, optimization: str = "all", tf32: bool = False,
                 workspace_mb: int = 1024, cache_dir: str | os.PathLike[str] | None = None,
                 spinning: bool = False) -> None:
        if execution not in EXECUTIONS:
            raise BackendError(f"execution must be one of {sorted(EXECUTIONS)}, got {execution!r}")
        check_install(execution)
        self.execution = execution
        self.name = f"onnxruntime-{execution}"
        self.device_type, self.device_id = ("cpu", 0) if execution == "cpu" else ("cuda", int(device))
        self.tf32, self.workspace_mb = tf32, int(workspace_mb)
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.transfers = Transfers()
        self._ops: dict[tuple, ort.InferenceSession] = {}
        self._ops_lock = threading.Lock()
        if execution != "cpu":
            preload_libraries(execution)
        super().__init__(providers=[EXECUTIONS[execution]], threads=threads, optimization=optimization,
                         spinning=spinning, graph_threads=graph_threads)

    # -- sessions ---------------------------------------------------------------------------------------------------
    def cuda_options(self) -> dict[str, Any]:
        return {"device_id": self.device_id, "use_tf32": 1 if self.tf32 else 0}

    def providers_for(self, entry: GraphEntry, bundle: Bundle) -> list[Any]:
        if self.execution == "cpu":
            return ["CPUExecutionProvider"]
        cuda = ("CUDAExecutionProvider", self.cuda_options())
        if self.execution == "cuda":
            return [cuda]
        return [("TensorrtExecutionProvider", tensorrt_options(entry, bundle.manifest.precision, self._cache(bundle),
                                                               self.device_id, self.workspace_mb)), cuda]

    def _cache(self, bundle: Bundle) -> Path:
        if self.cache_dir is not None:
            return prepare_output_dir(self.cache_dir, CACHE_KIND)
        return prepare_output_dir(bundle.path / CACHE_DIR, CACHE_KIND)

    def load(self, entry: GraphEntry, bundle: Bundle) -> OrtDeviceSession:
        if self.execution == "tensorrt":
            problem = int8_problem(bundle.manifest, bundle.path)
            if problem:
                raise BackendError(problem)
            if bundle.manifest.precision == "fp32" and not self.tf32:
                # TensorRT allows TF32 by default and the provider has no option for it; NVIDIA's libraries read this
                os.environ.setdefault("NVIDIA_TF32_OVERRIDE", "0")
        session = super().load(entry, bundle).session  # type: ignore[attr-defined]
        check_loaded(session, EXECUTIONS[self.execution], f"graph {entry.name!r}", self.execution)
        return OrtDeviceSession(entry.name, session, entry, self)

    # -- arrays on the device (see Backend) ------------------------------------------------------------------------
    def on_device(self, value: Any, counter: Transfers) -> OrtDeviceArray:
        """`value` as an OrtDeviceArray: itself, or a host array copied to the device (counted)."""
        if isinstance(value, OrtDeviceArray):
            return value
        host = np.ascontiguousarray(value)
        counter.add(True, host.nbytes)
        return OrtDeviceArray(ort.OrtValue.ortvalue_from_numpy(host, self.device_type, self.device_id), counter)

    def to_host(self, value: Any) -> np.ndarray:
        return value.numpy() if isinstance(value, OrtDeviceArray) else np.asarray(value)

    def join_on_device(self, parts: Sequence[Any], axis: int) -> OrtDeviceArray:
        arrays = [self.on_device(v, self.transfers) for v in parts]
        rank = arrays[0].ndim
        session = self._op(("concat", arrays[0].dtype, rank, axis % rank, len(arrays)),
                           lambda: onnx_ops.concat_model(arrays[0].dtype, rank, axis % rank, len(arrays)))
        return self._run_op(session, {f"x{i}": a for i, a in enumerate(arrays)}, {})

    def slice(self, value: Any, axis: int, start: int, stop: int | None = None) -> Any:
        if not isinstance(value, OrtDeviceArray):
            return super().slice(value, axis, start, stop)
        session = self._op(("slice", value.dtype, value.ndim), lambda: onnx_ops.slice_model(value.dtype, value.ndim))
        bounds = {"starts": start, "ends": _INT64_MAX if stop is None else stop, "axes": axis}
        return self._run_op(session, {"x": value}, {k: np.array([v], np.int64) for k, v in bounds.items()})

    def _op(self, key: tuple, model: Any) -> ort.InferenceSession:
        with self._ops_lock:
            if key not in self._ops:
                providers = ["CPUExecutionProvider"] if self.execution == "cpu" else \
                    [("CUDAExecutionProvider", self.cuda_options())]
                session = ort.InferenceSession(model(), providers=providers)
                check_loaded(session, providers[0] if isinstance(providers[0], str) else providers[0][0],
                             f"the {key[0]} of carried state", self.execution)
                self._ops[key] = session
            return self._ops[key]

    def _run_op(self, session: ort.InferenceSession, device_inputs: Mapping[str, OrtDeviceArray],
                parameters: Mapping[str, np.ndarray]) -> OrtDeviceArray:
        binding = session.io_binding()
        for name, array in device_inputs.items():
            binding.bind_ortvalue_input(name, array.value)
        for name, array in parameters.items():  # kernel parameters, read on the host by every provider
            binding.bind_cpu_input(name, array)
        binding.bind_output("y", self.device_type, self.device_id)
        session.run_with_iobinding(binding)
        return OrtDeviceArray(binding.get_outputs()[0], self.transfers)


def check_loaded(session: ort.InferenceSession, provider: str, what: str, execution: str) -> None:
    """Refuse a session ONNX Runtime quietly moved off the provider asked for (it logs why and falls back)."""
    loaded = session.get_providers()
    if not loaded or loaded[0] != provider:
        raise BackendError(f"onnxruntime did not load {provider} for {what}: the session would run on {loaded}. The "
                           f"{'TensorRT' if execution == 'tensorrt' else 'CUDA'} libraries it needs were not found or "
                           f"do not fit this driver (see onnxruntime's log above); mirasol-doctor says what is missing")


def tensorrt_options(entry: GraphEntry, precision: str, cache: Path, device: int, workspace_mb: int) -> dict[str, Any]:
    """The TensorRT provider's options for one graph: one profile from the manifest's axes, precision flags per the
    bundle (fp16 bundles: fp16; int8 bundles: explicit Q/DQ int8), engine and timing caches in `cache`."""
    shapes = input_shapes(entry, profile_axes(entry))

    def profile(which: str) -> str:
        return ",".join(f"{name}:{'x'.join(str(d) for d in shape[which])}" for name, shape in shapes.items())
    return {"device_id": device, "trt_max_workspace_size": int(workspace_mb) << 20,
            "trt_fp16_enable": precision == "fp16", "trt_int8_enable": precision == "int8",
            "trt_profile_min_shapes": profile("min"), "trt_profile_opt_shapes": profile("opt"),
            "trt_profile_max_shapes": profile("max"), "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(cache), "trt_engine_cache_prefix": entry.name,
            "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache)}
