"""ONNX Runtime backend: one InferenceSession per graph, shared by every stream and thread."""
from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort

from ..bundle.tensors import TensorInfo
from ..errors import BackendError
from .base import Backend, BackendSettings, GraphSession

if TYPE_CHECKING:
    from ..bundle.manifest import GraphEntry
    from ..bundle.reader import Bundle

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

    def run(self, feeds: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None,
            keep_on_device: Collection[str] = ()) -> dict[str, np.ndarray]:
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

    `spinning=False` (the default) stops idle intra-op threads from busy-waiting: on a CPU that other work shares
    (a device runs the app too) the spinning threads take the cores that work needs, and every run waits for them
    (docs/benchmark.md has the measurement). Pass `spinning=True` for a dedicated, quiet CPU.

    `graph_threads` gives some graphs their own intra-op thread count, e.g. {"text_decoder": 1}: a small graph
    run once per token can be faster on one thread than on several (mirasol-bench's text section measures both).

    `arena=False` (the default) turns ONNX Runtime's CPU memory arena off: each run's intermediate tensors go back to
    the system allocator instead of an arena that grows to the largest run and keeps that memory for the life of
    the session, which costs peak memory on an 8 GB device and, measured, no speed (docs/benchmark.md).
    `arena=True` gives ONNX Runtime's default.
    """

    name = "onnxruntime"

    @classmethod
    def options_from(cls, settings: BackendSettings) -> dict[str, Any]:
        return {"providers": settings.providers, "threads": settings.threads,
                "graph_threads": dict(settings.graph_threads)}

    def __init__(self, providers: Sequence[str | tuple[str, dict]] | None = None, threads: int | None = None,
                 inter_op_threads: int | None = None, optimization: str = "all", profile_dir: str | None = None,
                 spinning: bool = False, graph_threads: Mapping[str, int] | None = None, arena: bool = False) -> None:
        available = ort.get_available_providers()
        self.providers = list(providers or ["CPUExecutionProvider"])
        for provider in self.providers:
            provider_name = provider[0] if isinstance(provider, tuple) else provider
            if provider_name not in available:
                raise BackendError(f"onnxruntime provider {provider_name!r} is not available in this install "
                                   f"(available: {available}); install onnxruntime-gpu for CUDA/TensorRT")
        if optimization not in OPTIMIZATION_LEVELS:
            raise BackendError(f"optimization must be one of {sorted(OPTIMIZATION_LEVELS)}, got {optimization!r}")
        self.graph_threads = dict(graph_threads or {})
        for graph, count in self.graph_threads.items():
            if not isinstance(count, int) or count < 1:
                raise BackendError(f"graph_threads[{graph!r}] must be a positive int, got {count!r}")
        self.options = self._session_options(threads, inter_op_threads, optimization, profile_dir, spinning, arena)
        self._graph_options = {
            graph: self._session_options(count, inter_op_threads, optimization, profile_dir, spinning, arena)
            for graph, count in self.graph_threads.items()}

    @staticmethod
    def _session_options(threads: int | None, inter_op_threads: int | None, optimization: str,
                         profile_dir: str | None, spinning: bool, arena: bool = False) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.graph_optimization_level = OPTIMIZATION_LEVELS[optimization]
        options.enable_cpu_mem_arena = arena
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        if threads:
            options.intra_op_num_threads = threads
        if inter_op_threads:
            options.inter_op_num_threads = inter_op_threads
        if profile_dir:
            options.enable_profiling = True
            options.profile_file_prefix = profile_dir.rstrip("/") + "/ort"
        return options

    def providers_for(self, entry: GraphEntry, bundle: Bundle) -> list[Any]:
        """The execution providers (with their options) of one graph's session; here the same for every graph."""
        return self.providers

    def load(self, entry: GraphEntry, bundle: Bundle) -> GraphSession:
        """An InferenceSession of the entry's ONNX file, whose IO must be the entry's (names, dtypes, ranks)."""
        path = bundle.file(entry.file)
        unknown = set(self.graph_threads) - set(bundle.manifest.graphs)
        if unknown:
            raise BackendError(f"graph_threads names {sorted(unknown)}, not graphs of this bundle "
                               f"({sorted(bundle.manifest.graphs)})")
        options = self._graph_options.get(entry.name, self.options)
        try:
            session = ort.InferenceSession(str(path), sess_options=options, providers=self.providers_for(entry, bundle))
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
              "int32": "tensor(int32)", "int8": "tensor(int8)"}
