"""A step's plan, resolved once at load from the manifest: where each graph input comes from, which outputs are
carried, counted, checked (dtype, shape, finite values) and kept on the backend's device."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .backends import GraphSession
from .bundle.manifest import CounterSpec, Manifest, StateSpec
from .bundle.tensors import TensorInfo
from .errors import BackendError, InputError


@dataclass(frozen=True)
class Feed:
    """Where one graph input comes from in a step: 'input' (the caller), 'step' (an earlier graph), 'state'
    or 'counter' (by name, of the stream or of the question: `scope`)."""

    input: str
    kind: str
    key: str
    scope: str = ""


@dataclass(frozen=True)
class CheckedOutput:
    """A graph output that is carried, returned or fed to a later graph: checked before the step commits. Its
    dtype and shape always; its values (`finite`) where they are returned, fed on or carried for the stream (a
    question's own state is never saved, and what it would spoil shows in the logits, which are checked)."""

    graph: str
    info: TensorInfo
    dtype: np.dtype
    finite: Callable[[np.ndarray], bool] | None  # how its values are checked (None: they are not)
    fixed: tuple[tuple[int, int | None], ...] = ()  # (axis, size) the manifest fixes; size None: the batch

    @classmethod
    def of(cls, graph: str, info: TensorInfo, finite: bool) -> "CheckedOutput":
        fixed = tuple((axis, None if size == "batch" else size) for axis, size in enumerate(info.shape)
                      if size == "batch" or isinstance(size, int))
        return cls(graph, info, np.dtype(info.dtype), finite_check(info.dtype) if finite else None, fixed)


@dataclass
class StepPlan:
    graphs: list[tuple[GraphSession, list[Feed]]]
    state: list[StateSpec]  # carried tensors this step produces
    counters: list[CounterSpec]  # counters this step advances
    returns: str | None
    checked: dict[str, list[CheckedOutput]]  # per graph: its outputs that are carried, returned or fed to a later graph
    keep: dict[str, frozenset[str]]  # per graph: outputs that stay where the backend computes (carried or fed on)


@dataclass
class Carried:
    """State tensors and counters of one scope: the stream's, or one question's."""

    state: dict[str, np.ndarray] = field(default_factory=dict)
    counters: dict[str, np.ndarray] = field(default_factory=dict)


def plan_step(manifest: Manifest, sessions: Mapping[str, GraphSession], step_name: str, keeps_on_device: bool
          ) -> StepPlan:
    """How a step runs: each graph's feeds, what it produces for the state and counters, what is checked, what
    stays on the backend's device."""
    step = manifest.steps[step_name]
    produced: set[str] = set()
    graphs = []
    for graph_name in step.graphs:
        feeds = []
        for tensor in manifest.graphs[graph_name].inputs:
            binding = manifest.binding(graph_name, tensor.name)
            if tensor.name in step.inputs:
                feeds.append(Feed(tensor.name, "input", tensor.name))
            elif tensor.name in produced:
                feeds.append(Feed(tensor.name, "step", tensor.name))
            elif isinstance(binding, StateSpec):
                feeds.append(Feed(tensor.name, "state", binding.name, binding.scope))
            else:
                feeds.append(Feed(tensor.name, "counter", binding.name, binding.scope))  # type: ignore[union-attr]
        produced.update(t.name for t in manifest.graphs[graph_name].outputs)
        graphs.append((sessions[graph_name], feeds))
    state = [s for s in manifest.state if s.source_graph in step.graphs]
    passed_on = {step.returns} | {f.key for _, feeds in graphs for f in feeds if f.kind == "step"}
    finite = passed_on | {s.output for s in state if s.scope == "stream"}
    used = passed_on | {s.output for s in state}
    checked = {g: [CheckedOutput.of(g, t, t.name in finite) for t in manifest.graphs[g].outputs if t.name in used]
               for g in step.graphs}
    kept = (used - {step.returns}) | {s.output for s in state} if keeps_on_device else set()
    keep = {g: frozenset(t.name for t in manifest.graphs[g].outputs if t.name in kept) for g in step.graphs}
    return StepPlan(graphs, state, [c for c in manifest.counters if c.graph in step.graphs], step.returns,
                    checked, keep)


def finite_check(dtype: str) -> Callable[[np.ndarray], bool] | None:
    """A function telling whether an array of `dtype` holds no NaN or inf (None for integer dtypes)."""
    if dtype == "float16":  # through its bits: np.isfinite is ~20x slower on float16
        return lambda value: value.size == 0 or int((value.view(np.uint16) & 0x7FFF).max()) < 0x7C00
    if np.dtype(dtype).kind == "f":
        return lambda value: bool(np.isfinite(value).all())
    return None


def check_output(value: Any, checked: CheckedOutput, batch: int, step: str, error: type[Exception]) -> None:
    """An output that is carried, returned or fed on: the manifest's dtype and shape (batch and fixed sizes), and
    finite."""
    info = checked.info
    shape = getattr(value, "shape", ())
    fits = getattr(value, "dtype", None) == checked.dtype and len(shape) == len(info.shape)
    if fits:
        for axis, size in checked.fixed:
            if shape[axis] != (batch if size is None else size):
                fits = False
                break
    if not fits:
        raise BackendError(f"{step}: graph {checked.graph!r} output {info.name!r} is {getattr(value, 'dtype', None)} "
                           f"{list(shape)}, the manifest says {info.dtype} {list(info.shape)} (batch {batch}); "
                           f"nothing was changed")
    if checked.finite is not None and isinstance(value, np.ndarray) and not checked.finite(value):
        hint = " (are the chunk's values of a sane magnitude?)" if error is InputError else ""
        raise error(f"{step}: graph {checked.graph!r} output {info.name!r} holds NaN or inf{hint}; the stream was "
                    f"not changed")
