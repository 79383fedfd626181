"""Running one step of a plan (`step_plan.py`): feed each graph, run it, check what it gives, then work out the new
state and counters. Nothing a caller holds changes until it applies the changes, so a step that fails anywhere
(a graph, a check, a state that does not fit) leaves every table as it was."""
from __future__ import annotations

import math
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .backends import Backend
from .errors import BackendError, InputError
from .step_plan import Carried, StepPlan, Update, is_finite

EMPTY: dict[str, Any] = {}
Change = tuple[dict[str, Any], str, Any]  # (table, name, new value)


@dataclass
class Timings:
    """Seconds spent per graph in backend run calls, and in whole steps (for overhead accounting)."""

    graph_seconds: dict[str, float] = field(default_factory=dict)
    graph_calls: dict[str, int] = field(default_factory=dict)
    step_seconds: dict[str, float] = field(default_factory=dict)

    def add(self, table: dict[str, float], key: str, seconds: float) -> None:
        table[key] = table.get(key, 0.0) + seconds

    def to_dict(self) -> dict[str, Any]:
        return {"graph_seconds": self.graph_seconds, "graph_calls": self.graph_calls,
                "step_seconds": self.step_seconds}


def execute(plan: StepPlan, backend: Backend, inputs: Mapping[str, Any], batch: int, stream: Carried,
            question: Carried | None, timings: Timings) -> tuple[np.ndarray | None, dict[str, Any]]:
    """Run the step's graphs: (its returned output on the host, None for a step that returns nothing; every output
    by name). Raises, naming the graph and output, where an output that is carried, returned or fed on has another
    dtype or shape than the manifest's, or where what the step commits or returns holds NaN or inf."""
    produced: dict[str, Any] = {}
    sources = (inputs, produced, stream.state, stream.counters,
               EMPTY if question is None else question.state, EMPTY if question is None else question.counters)
    seconds, calls = timings.graph_seconds, timings.graph_calls
    for call in plan.calls:
        session = call.session
        values = {name: sources[source][key] for name, source, key in call.feeds}
        start = time.perf_counter()
        outputs = session.run(values, keep_on_device=call.keep) if call.keep else session.run(values)
        spent = time.perf_counter() - start
        seconds[session.name] = seconds.get(session.name, 0.0) + spent
        calls[session.name] = calls.get(session.name, 0) + 1
        call.checks.check(outputs, batch, plan.name)
        produced.update(outputs)
    returned = None if plan.returns is None else backend.to_host(produced[plan.returns])
    check_finite(plan, produced, returned)
    return returned, produced


def check_finite(plan: StepPlan, produced: Mapping[str, Any], returned: np.ndarray | None) -> None:
    """One fused test over everything the step commits or returns (the sum of per-array probes, finite only if every
    value is); only where it fails are the arrays checked one by one, to name the first that holds NaN or inf."""
    total = 0.0
    for _, name, probe in plan.finite:
        value = returned if name == plan.returns else produced[name]
        if isinstance(value, np.ndarray):  # host arrays (a backend's device arrays are checked where they lead)
            total += probe(value)
    if math.isfinite(total):
        return
    for graph, name, _ in plan.finite:
        value = returned if name == plan.returns else produced[name]
        if isinstance(value, np.ndarray) and not is_finite(value):
            if plan.name == "push":
                raise InputError(f"push: graph {graph!r} output {name!r} holds NaN or inf (are the chunk's values of "
                                 f"a sane magnitude?); the stream was not changed")
            raise BackendError(f"{plan.name}: graph {graph!r} output {name!r} holds NaN or inf; the stream was not "
                               f"changed")


def updated(update: Update, carried: Any, output: Any, backend: Backend) -> Any:
    """A carried tensor after a step: the output, or the carried one with the output appended; then windowed
    (what the window drops of the carried tensor is left out before joining, so the result is copied once)."""
    spec, axis, window = update.spec, update.axis, update.window
    value = output
    try:
        if update.append:
            drop = 0 if window is None else carried.shape[axis] + output.shape[axis] - window
            if 0 < drop < carried.shape[axis]:
                carried = part_of(carried, axis, drop, carried.shape[axis], backend)
            value = backend.concatenate([carried, output], axis)
        if window is not None and value.shape[axis] > window:
            value = backend.slice(value, axis, value.shape[axis] - window)
    except (ValueError, InputError):
        raise BackendError(f"state {spec.name}: output {spec.source_graph}.{spec.output} of shape {output.shape} "
                           f"does not fit the carried {getattr(carried, 'shape', None)}") from None
    return value


def changes(plan: StepPlan, inputs: Mapping[str, Any], produced: Mapping[str, Any], scopes: Mapping[str, Carried],
            backend: Backend, names: Collection[str] | None = None) -> list[Change]:
    """The step's new state and counters in the tables of `scopes` ("stream", "question"), not yet applied; only
    the state and counters in `names`, if given."""
    found: list[Change] = [(scopes[scope].state, name, produced[output]) for scope, name, output in plan.replaced
                           if names is None or name in names]
    for update in plan.updates:
        spec = update.spec
        if (names is None or spec.name in names) and (update.append or update.window is not None):
            table = scopes[spec.scope].state
            found.append((table, spec.name, updated(update, table.get(spec.name), produced[spec.output], backend)))
    for counter in plan.counters:
        if names is None or counter.name in names:
            table = scopes[counter.scope].counters
            length_of = counter.length_of
            step = counter.step if length_of is None else inputs[length_of[0]].shape[length_of[1]]
            found.append((table, counter.name, table[counter.name] + step))
    return found


def apply(found: list[Change]) -> None:
    for table, name, value in found:
        table[name] = value


def part_of(value: Any, axis: int, begin: int, end: int, backend: Backend) -> Any:
    """value[..., begin:end, ...] along `axis`: a view of a host array, else the backend's copy."""
    if isinstance(value, np.ndarray):
        index: list[slice] = [slice(None)] * value.ndim
        index[axis] = slice(begin, end)
        return value[tuple(index)]
    return backend.slice(value, axis, begin, end)
