"""A step's plan, resolved once at load from the manifest into flat tables: where each graph input comes from, which
outputs are checked (dtype and shape; finite values of what is committed or returned), kept on the backend's device,
carried and counted. The per-chunk and per-token loops (`steps.py`) only walk these tables."""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .backends import GraphSession
from .bundle.manifest import CounterSpec, Manifest, StateSpec
from .bundle.tensors import TensorInfo
from .errors import BackendError, BundleError

# Where a graph input comes from: an index into the sources a step run lines up (steps.execute), in this order.
CALLER, STEP, STREAM_STATE, STREAM_COUNTERS, QUESTION_STATE, QUESTION_COUNTERS = range(6)
SOURCES = {("state", "stream"): STREAM_STATE, ("counter", "stream"): STREAM_COUNTERS,
           ("state", "question"): QUESTION_STATE, ("counter", "question"): QUESTION_COUNTERS}
SEEN_LIMIT = 4096  # distinct output shape sets remembered per graph (then the memory starts afresh)


@dataclass(frozen=True)
class CheckedOutput:
    """A graph output that is carried, returned or fed to a later graph: its dtype and shape are checked before
    the step commits."""

    graph: str
    info: TensorInfo
    dtype: np.dtype
    fixed: tuple[tuple[int, int | None], ...] = ()  # (axis, size) the manifest fixes; size None: the batch

    @classmethod
    def of(cls, graph: str, info: TensorInfo) -> "CheckedOutput":
        fixed = tuple((axis, None if size == "batch" else size) for axis, size in enumerate(info.shape)
                      if size == "batch" or isinstance(size, int))
        return cls(graph, info, np.dtype(info.dtype), fixed)


class ShapeChecks:
    """The dtype and shape checks of one graph's checked outputs, each distinct set of (dtype, shape) checked in
    full once and then recognised by a set lookup: a step whose outputs look as they did before costs one tuple."""

    def __init__(self, outputs: tuple[CheckedOutput, ...]) -> None:
        self.outputs = outputs
        self.names = tuple(checked.info.name for checked in outputs)
        self._seen: set[tuple] = set()

    def check(self, outputs: Mapping[str, Any], batch: int, step: str) -> None:
        try:
            signature = (batch, *[(outputs[name].dtype, outputs[name].shape) for name in self.names])
        except AttributeError:  # not an array: the full check says what it is
            signature = None
        if signature is not None and signature in self._seen:
            return
        for checked in self.outputs:
            check_output(outputs[checked.info.name], checked, batch, step)
        if signature is not None:
            if len(self._seen) >= SEEN_LIMIT:
                self._seen.clear()
            self._seen.add(signature)


@dataclass(frozen=True)
class GraphCall:
    """One graph of a step: its session, each input's source (graph input, source index, key), the outputs that
    stay on the backend's device, and the shape checks of the outputs the step uses."""

    session: GraphSession
    feeds: tuple[tuple[str, int, str], ...]
    keep: frozenset[str]
    checks: ShapeChecks


@dataclass(frozen=True)
class Update:
    """How a carried tensor takes a step's output: replace it, or append along `axis`; then keep the last
    `window` entries along `axis` (None: all)."""

    spec: StateSpec
    append: bool
    axis: int
    window: int | None


@dataclass
class StepPlan:
    name: str
    calls: list[GraphCall]
    returns: str | None
    finite: tuple[tuple[str, str, Callable[[Any], float]], ...]  # (graph, output, probe): committed or returned
    state: list[StateSpec]  # carried tensors this step produces
    updates: list[Update]  # one per entry of `state`
    replaced: tuple[tuple[str, str, str], ...]  # (scope, state name, output) of those simply replaced by an output
    counters: list[CounterSpec]  # counters this step advances
    reads: frozenset[str]  # stream-scope state names the step's graphs read


@dataclass
class Carried:
    """State tensors and counters of one scope: the stream's, or one question's."""

    state: dict[str, np.ndarray] = field(default_factory=dict)
    counters: dict[str, np.ndarray] = field(default_factory=dict)


def plan_step(manifest: Manifest, sessions: Mapping[str, GraphSession], step_name: str, keeps_on_device: bool
              ) -> StepPlan:
    """How a step runs: each graph's feeds, what it produces for the state and counters, what is checked, what
    stays on the backend's device.

    Finite values are checked on exactly what the step commits or returns: the stream-scope state it produces and
    its returned output. Not on what one graph only feeds to the next (its effect shows in what is committed),
    nor on a question's own state (never saved; what it would spoil shows in the logits, which are returned and
    checked). Checking less than what is committed, on the argument that a non-finite value would reach a checked
    output anyway, does not hold: a key of -inf gives its attention score -inf, softmax gives it weight 0 and the
    step's context stays finite while the cache carries the -inf on; an attention mask applied with Where drops a
    NaN score the same way; a saturating int8 cast hides an inf. So every committed tensor is checked itself.
    """
    step = manifest.steps[step_name]
    produced: set[str] = set()
    feeds_per_graph: list[tuple[str, tuple[tuple[str, int, str], ...]]] = []
    reads: set[str] = set()
    for graph_name in step.graphs:
        feeds = []
        for tensor in manifest.graphs[graph_name].inputs:
            binding = manifest.binding(graph_name, tensor.name)
            if tensor.name in step.inputs:
                feeds.append((tensor.name, CALLER, tensor.name))
            elif tensor.name in produced:
                feeds.append((tensor.name, STEP, tensor.name))
            elif binding is None:
                raise BundleError(f"step {step_name!r}: input {tensor.name!r} of graph {graph_name!r} is not fed")
            else:
                kind = "state" if isinstance(binding, StateSpec) else "counter"
                feeds.append((tensor.name, SOURCES[kind, binding.scope], binding.name))
                if kind == "state" and binding.scope == "stream":
                    reads.add(binding.name)
        produced.update(t.name for t in manifest.graphs[graph_name].outputs)
        feeds_per_graph.append((graph_name, tuple(feeds)))
    state = [s for s in manifest.state if s.source_graph in step.graphs]
    passed_on = {step.returns} | {key for _, feeds in feeds_per_graph for _, source, key in feeds if source == STEP}
    used = passed_on | {s.output for s in state}
    kept = (used - {step.returns}) | {s.output for s in state} if keeps_on_device else set()
    calls = []
    for graph_name, feeds in feeds_per_graph:
        outputs = manifest.graphs[graph_name].outputs
        checks = ShapeChecks(tuple(CheckedOutput.of(graph_name, t) for t in outputs if t.name in used))
        keep = frozenset(t.name for t in outputs if t.name in kept)
        calls.append(GraphCall(sessions[graph_name], feeds, keep, checks))
    committed = {step.returns} | {s.output for s in state if s.scope == "stream"}
    finite = tuple((g, t.name, float16_probe if t.dtype == "float16" else square_probe)
                   for g in step.graphs for t in manifest.graphs[g].outputs
                   if t.name in committed and np.dtype(t.dtype).kind == "f"
                   and (t.name == step.returns or t.name not in kept))
    updates = [Update(s, s.update == "append", s.axis if s.axis is not None else 0, s.window) for s in state]
    replaced = tuple((u.spec.scope, u.spec.name, u.spec.output) for u in updates if not u.append and u.window is None)
    return StepPlan(step_name, calls, step.returns, finite, state, updates, replaced,
                    [c for c in manifest.counters if c.graph in step.graphs], frozenset(reads))


def fresh_state(manifest: Manifest, scope: str, batch: int, produced_by: StepPlan | None = None) -> Carried:
    """The initial state and counters of `scope` ("stream" or "question") for `batch` rows (only those the step
    `produced_by` produces, if given)."""
    carried = Carried()
    for spec in manifest.state:
        if spec.scope == scope and (produced_by is None or spec in produced_by.state):
            info = manifest.graphs[spec.graph].input(spec.input)
            shape = [batch if d == "batch" else (0 if i == spec.axis and spec.init == "empty" else d)
                     for i, d in enumerate(info.shape)]
            if any(isinstance(d, str) for d in shape):
                raise BundleError(f"state {spec.name}: cannot size axes {info.shape} of {spec.graph}.{spec.input}")
            carried.state[spec.name] = np.zeros(shape, dtype=info.dtype)
    for counter in manifest.counters:
        if counter.scope == scope and (produced_by is None or counter in produced_by.counters):
            carried.counters[counter.name] = np.zeros(batch, dtype=np.int64)
    return carried


def square_probe(value: Any) -> float:
    """A number that is finite only if every value of the float array is: the sum of the squares (one BLAS dot of
    the array with itself: no term is negative, a NaN or inf term never sums back to finite, and no floating-point
    warning is raised). A finite array may give inf by overflow, so a non-finite probe is settled by `is_finite`."""
    flat = value.reshape(-1)
    return float(np.dot(flat, flat))


def float16_probe(value: Any) -> float:
    """`square_probe` for float16, through the bits (numpy has no fast float16 dot or isfinite)."""
    return 0.0 if value.size == 0 or int((value.view(np.uint16) & 0x7FFF).max()) < 0x7C00 else math.inf


def is_finite(value: Any) -> bool:
    """Whether a float array holds no NaN or inf (exact)."""
    probe = float16_probe if value.dtype == np.float16 else square_probe
    return math.isfinite(probe(value)) or bool(np.isfinite(value).all())


def check_output(value: Any, checked: CheckedOutput, batch: int, step: str) -> None:
    """An output that is carried, returned or fed on: the manifest's dtype and shape (batch and fixed sizes)."""
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

