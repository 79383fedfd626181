"""ONNX Runtime backend: one InferenceSession per graph, shared by every stream and thread."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort

from ..errors import BackendError
from .base import Backend, GraphSession, TensorInfo

if TYPE_CHECKING:
    from ..bundle import Bundle
    from ..manifest import GraphEntry

OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


class OrtGraphSession(GraphSession):
    def __init__(self, name: str, session: ort.InferenceSession, inputs: Sequence[TensorInfo],
                 outputs: Sequence[TensorInfo]) -> None:
        self.name = name
        self.session: ort.InferenceSession | None = session
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        self._all_outputs = [t.name for t in self.outputs]

    def run(self, feeds: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None
            ) -> dict[str, np.ndarray]:
        session = self.session
        if session is None:
            raise BackendError(f"graph {self.name!r}: the session is closed")
        names = self._all_outputs if output_names is None else list(output_names)
        try:
            values = session.run(names, feeds)  # type: ignore[arg-type]
        except Exception as failure:  # onnxruntime raises its own exception types
            raise BackendError(f"onnxruntime failed running graph {self.name!r}: {failure}") from failure
        return dict(zip(names, values))

    def close(self) -> None:
        """Drop the InferenceSession (its memory goes when no call still runs on it)."""
        self.session = None


class OnnxRuntimeBackend(Backend):
    """Providers are tried in the order given (CPU by default); options map to ort.SessionOptions.

    `spinning=False` (the default) stops idle intra-op threads from busy-waiting: measured by mirasol-bench on a
    2-core machine with other work running, spinning made the fp32 runtime 3.5x slower per chunk; on a device
    the app shares the CPU too. Pass `spinning=True` for a dedicated, quiet CPU.
    """

    name = "onnxruntime"

    def __init__(self, providers: Sequence[str | tuple[str, dict]] | None = None, threads: int | None = None,
                 inter_op_threads: int | None = None, optimization: str = "all", profile_dir: str | None = None,
                 spinning: bool = False) -> None:
        available = ort.get_available_providers()
        self.providers = list(providers or ["CPUExecutionProvider"])
        for provider in self.providers:
            provider_name = provider[0] if isinstance(provider, tuple) else provider
            if provider_name not in available:
                raise BackendError(f"onnxruntime provider {provider_name!r} is not available in this install "
                                   f"(available: {available}); install onnxruntime-gpu for CUDA/TensorRT")
        if optimization not in OPTIMIZATION_LEVELS:
            raise BackendError(f"optimization must be one of {sorted(OPTIMIZATION_LEVELS)}, got {optimization!r}")
        self.options = ort.SessionOptions()
        self.options.graph_optimization_level = OPTIMIZATION_LEVELS[optimization]
        self.options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        if threads:
            self.options.intra_op_num_threads = threads
        if inter_op_threads:
            self.options.inter_op_num_threads = inter_op_threads
        if profile_dir:
            self.options.enable_profiling = True
            self.options.profile_file_prefix = profile_dir.rstrip("/") + "/ort"

    def load(self, entry: GraphEntry, bundle: Bundle) -> GraphSession:
        """An InferenceSession of the entry's ONNX file, whose IO must be the entry's (names, dtypes, ranks)."""
        path = bundle.file(entry.file)
        try:
            session = ort.InferenceSession(str(path), sess_options=self.options, providers=self.providers)
        except Exception as failure:
            raise BackendError(f"onnxruntime could not load graph {entry.name!r} from {path}: {failure}") from failure
        declared = {t.name: t for t in (*entry.inputs, *entry.outputs)}
        actual = {**{i.name: i for i in session.get_inputs()}, **{o.name: o for o in session.get_outputs()}}
        if set(declared) != set(actual):
            raise BackendError(f"graph {entry.name!r} at {path}: its IO {sorted(actual)} does not match the "
                               f"manifest's {sorted(declared)}")
        for name, tensor in declared.items():
            onnx_type = actual[name].type  # e.g. "tensor(float)"
            if onnx_type != _ORT_TYPES.get(tensor.dtype):
                raise BackendError(f"graph {entry.name!r}: {name!r} is {onnx_type} in the file but "
                                   f"{tensor.dtype} in the manifest")
            if len(actual[name].shape) != len(tensor.shape):
                raise BackendError(f"graph {entry.name!r}: {name!r} has rank {len(actual[name].shape)} in the "
                                   f"file but {len(tensor.shape)} in the manifest")
        return OrtGraphSession(entry.name, session, entry.inputs, entry.outputs)


_ORT_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)", "int64": "tensor(int64)",
              "int32": "tensor(int32)"}
