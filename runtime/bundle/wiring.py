"""The manifest's state wiring: the tensors a stream carries between steps (state), the integer inputs that count
steps (counters), and which graphs each step runs (steps), with the rule that holds them together: every graph input
of a step is fed exactly once (by the caller, an earlier graph of the same step, a state or a counter), and a state
fits both the output it comes from and the input it feeds, on every axis but the one it grows or is windowed along.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import BundleError
from .json_reader import JsonReader
from .tensors import TensorInfo

MAX_RANK = 8
MAX_STATE_ELEMENTS = 1 << 28  # a zeros-initialised state tensor, per batch row
SCOPES = ("stream", "question")


@dataclass(frozen=True)
class StateSpec:
    """A carried tensor: `source_graph.output` at one step becomes `graph.input` at the next."""

    name: str
    graph: str
    input: str
    source_graph: str
    output: str
    init: str  # "zeros": zeros of the input's shape; "empty": size 0 along `axis`
    update: str = "replace"  # "replace" by the output, or "append" it along `axis`
    axis: int | None = None
    window: int | None = None  # keep at most the last `window` entries along `axis`
    scope: str = "stream"  # "stream": lives until the stream ends; "question": reset by each ask

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class CounterSpec:
    """An int64 [batch] input counting what came before: +`step` per run, or + the length of an input."""

    name: str
    graph: str
    input: str
    step: int | None = None
    length_of: tuple[str, int] | None = None  # (input name, axis)
    scope: str = "stream"

    def to_dict(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data["length_of"] = list(self.length_of) if self.length_of else None
        return data


@dataclass(frozen=True)
class StepSpec:
    graphs: tuple[str, ...]
    inputs: tuple[str, ...] = ()
    returns: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"graphs": list(self.graphs), "inputs": list(self.inputs), "returns": self.returns}


def binding(state: Sequence[StateSpec], counters: Sequence[CounterSpec], graph: str, input_name: str
            ) -> StateSpec | CounterSpec | None:
    """The state or counter that feeds `graph`'s input `input_name`, if one does."""
    for spec in (*state, *counters):
        if spec.graph == graph and spec.input == input_name:
            return spec
    return None


def check_wiring(graphs: Mapping[str, Any], state: Sequence[StateSpec], counters: Sequence[CounterSpec],
                 steps: Mapping[str, StepSpec], where: str) -> None:
    """Every name the wiring uses exists, each state fits the tensors it joins, and every graph input of a step is
    bound exactly once (`graphs`: the manifest's graph entries by name; `where`: the manifest, for messages)."""
    _check_bindings(graphs, state, counters, where)
    for counter in counters:
        _check_counter(graphs, counter, steps, where)
    for spec in state:
        _check_state(graphs, spec, where)
    for step_name, step in steps.items():
        _check_step(graphs, state, counters, step_name, step, where)


def _check_bindings(graphs: Mapping[str, Any], state: Sequence[StateSpec], counters: Sequence[CounterSpec],
                    where: str) -> None:
    """Names used once, known scopes, each graph input fed by at most one state or counter."""
    names: set[str] = set()
    bound: dict[tuple[str, str], str] = {}
    for spec in (*state, *counters):
        if spec.name in names:
            raise BundleError(f"{where}: state/counter name {spec.name!r} is used twice")
        names.add(spec.name)
        if spec.scope not in SCOPES:
            raise BundleError(f"{where}: {spec.name}: scope {spec.scope!r} is not one of {SCOPES}")
        who = f"{'counter' if isinstance(spec, CounterSpec) else 'state'} {spec.name}"
        _input(graphs, spec.graph, spec.input, where, who)
        if (spec.graph, spec.input) in bound:
            raise BundleError(f"{where}: input {spec.input!r} of graph {spec.graph!r} is fed by both "
                              f"{bound[spec.graph, spec.input]!r} and {spec.name!r}")
        bound[spec.graph, spec.input] = spec.name


def _check_counter(graphs: Mapping[str, Any], spec: CounterSpec, steps: Mapping[str, StepSpec], where: str) -> None:
    """An int64 [batch] input, counting by a fixed step or by the length of an input every step gives."""
    who = f"counter {spec.name}"
    target = _input(graphs, spec.graph, spec.input, where, who)
    if target.dtype != "int64" or len(target.shape) != 1:
        raise BundleError(f"{where}: counter {spec.name}: {spec.graph}.{spec.input} must be int64 "
                          f"[batch], the manifest says {target.dtype} {list(target.shape)}")
    if (spec.step is None) == (spec.length_of is None):
        raise BundleError(f"{where}: counter {spec.name}: give exactly one of 'step' and 'length_of'")
    if spec.length_of is not None:
        length_input = _input(graphs, spec.graph, spec.length_of[0], where, who)
        if not 0 <= spec.length_of[1] < len(length_input.shape):
            raise BundleError(f"{where}: counter {spec.name}: axis {spec.length_of[1]} is outside "
                              f"{spec.length_of[0]!r} of rank {len(length_input.shape)}")
        not_given = [n for n, step in steps.items()
                     if spec.graph in step.graphs and spec.length_of[0] not in step.inputs]
        if not_given:
            raise BundleError(f"{where}: counter {spec.name}: length_of names {spec.length_of[0]!r}, "
                              f"which step {not_given[0]!r} does not take from the caller")


def _check_state(graphs: Mapping[str, Any], spec: StateSpec, where: str) -> None:
    """The output fits the input it feeds (dtype, rank, every axis but the one it grows along); sizes are bounded."""
    if spec.init not in ("zeros", "empty") or spec.update not in ("replace", "append"):
        raise BundleError(f"{where}: state {spec.name}: unknown init {spec.init!r} or update {spec.update!r}")
    target = _input(graphs, spec.graph, spec.input, where, f"state {spec.name}")
    source_graph = _graph(graphs, spec.source_graph, where, f"state {spec.name}")
    try:
        source = source_graph.output(spec.output)
    except BundleError as missing:
        raise BundleError(f"{where}: state {spec.name}: {missing}") from None
    if source.dtype != target.dtype or len(source.shape) != len(target.shape):
        raise BundleError(f"{where}: state {spec.name}: {spec.source_graph}.{spec.output} "
                          f"({source.dtype} {list(source.shape)}) cannot feed {spec.graph}.{spec.input} "
                          f"({target.dtype} {list(target.shape)})")
    for i, (out_dim, in_dim) in enumerate(zip(source.shape, target.shape)):
        if i == spec.axis:
            continue  # the axis the state grows / is windowed along
        if ((out_dim == "batch") != (in_dim == "batch") or isinstance(out_dim, int) != isinstance(in_dim, int)
                or (isinstance(out_dim, int) and out_dim != in_dim)):
            raise BundleError(f"{where}: state {spec.name}: axis {i} of {spec.source_graph}.{spec.output} "
                              f"{list(source.shape)} does not fit {spec.graph}.{spec.input} "
                              f"{list(target.shape)}")
    needs_axis = spec.init == "empty" or spec.update == "append" or spec.window is not None
    if needs_axis and (spec.axis is None or not 0 <= spec.axis < len(target.shape)):
        raise BundleError(f"{where}: state {spec.name}: axis {spec.axis!r} is not an axis of "
                          f"{spec.graph}.{spec.input} {list(target.shape)}")
    if spec.init == "zeros":
        fixed = [d for d in target.shape if d != "batch"]
        if any(isinstance(d, str) for d in fixed):
            raise BundleError(f"{where}: state {spec.name}: init 'zeros' needs fixed sizes, "
                              f"{spec.graph}.{spec.input} has {list(target.shape)}")
        if math.prod(fixed) > MAX_STATE_ELEMENTS:  # type: ignore[arg-type]
            raise BundleError(f"{where}: state {spec.name}: {list(target.shape)} is over the "
                              f"{MAX_STATE_ELEMENTS}-element limit per batch row")


def _check_step(graphs: Mapping[str, Any], state: Sequence[StateSpec], counters: Sequence[CounterSpec], step_name: str,
                step: StepSpec, where: str) -> None:
    """Each graph input of the step is given by the caller, an earlier graph of the step, a state or a counter."""
    produced: set[str] = set()
    graph_inputs = {t.name for g in step.graphs for t in _graph(graphs, g, where, f"step {step_name!r}").inputs}
    for name in step.inputs:
        if name not in graph_inputs:
            raise BundleError(f"{where}: step {step_name!r} takes input {name!r}, which none of its "
                              f"graphs {list(step.graphs)} has")
    for graph_name in step.graphs:
        graph = _graph(graphs, graph_name, where, f"step {step_name!r}")
        for tensor in graph.inputs:
            if not (tensor.name in step.inputs or tensor.name in produced
                    or binding(state, counters, graph_name, tensor.name) is not None):
                raise BundleError(f"{where}: step {step_name!r}: input {tensor.name!r} of graph "
                                  f"{graph_name!r} is fed by nothing")
        produced.update(t.name for t in graph.outputs)
    if step.returns is not None and step.returns not in produced:
        raise BundleError(f"{where}: step {step_name!r} returns {step.returns!r}, which no graph produces")

def _graph(graphs: Mapping[str, Any], name: str, where: str, who: str) -> Any:
    try:
        return graphs[name]
    except KeyError:
        raise BundleError(f"{where}: {who} names graph {name!r}, which the bundle does not have") from None


def _input(graphs: Mapping[str, Any], graph: str, name: str, where: str, who: str) -> TensorInfo:
    entry = _graph(graphs, graph, where, who)
    try:
        return entry.input(name)
    except BundleError as missing:
        raise BundleError(f"{where}: {who}: {missing}") from None


# -- reading the wiring from manifest.json (JsonReader: every malformed value names its key) ----------------------
def step_from_dict(r: JsonReader, name: str, data: Any) -> StepSpec:
    path = f"steps.{name}"
    data = r.fields(data, path, ("graphs",), ("inputs", "returns"))
    returns = data.get("returns")
    return StepSpec(
        tuple(r.name(g, f"{path}.graphs[{i}]") for i, g in enumerate(r.array(data["graphs"], f"{path}.graphs"))),
        tuple(r.name(t, f"{path}.inputs[{i}]")
              for i, t in enumerate(r.array(data.get("inputs", []), f"{path}.inputs"))),
        None if returns is None else r.name(returns, f"{path}.returns"))


def _optional_int(r: JsonReader, value: Any, path: str, low: int) -> int | None:
    return None if value is None else r.integer(value, path, low)


def state_from_dict(r: JsonReader, index: int, data: Any) -> StateSpec:
    path = f"state[{index}]"
    data = r.fields(data, path, ("name", "graph", "input", "source_graph", "output", "init"),
                    ("update", "axis", "window", "scope"))
    return StateSpec(
        name=r.name(data["name"], f"{path}.name"), graph=r.name(data["graph"], f"{path}.graph"),
        input=r.name(data["input"], f"{path}.input"), source_graph=r.name(data["source_graph"], f"{path}.source_graph"),
        output=r.name(data["output"], f"{path}.output"),
        init=r.choice(data["init"], f"{path}.init", ("zeros", "empty")),
        update=r.choice(data.get("update", "replace"), f"{path}.update", ("replace", "append")),
        axis=_optional_int(r, data.get("axis"), f"{path}.axis", 0),
        window=_optional_int(r, data.get("window"), f"{path}.window", 1),
        scope=r.choice(data.get("scope", "stream"), f"{path}.scope", SCOPES))


def counter_from_dict(r: JsonReader, index: int, data: Any) -> CounterSpec:
    path = f"counters[{index}]"
    data = r.fields(data, path, ("name", "graph", "input"), ("step", "length_of", "scope"))
    length_of = data.get("length_of")
    if length_of is not None:
        pair = r.array(length_of, f"{path}.length_of")
        if len(pair) != 2:
            raise r.fail(f"{path}.length_of", "[input name, axis]", pair)
        length_of = (r.name(pair[0], f"{path}.length_of[0]"), r.integer(pair[1], f"{path}.length_of[1]", 0, MAX_RANK))
    return CounterSpec(
        name=r.name(data["name"], f"{path}.name"), graph=r.name(data["graph"], f"{path}.graph"),
        input=r.name(data["input"], f"{path}.input"),
        step=_optional_int(r, data.get("step"), f"{path}.step", 0), length_of=length_of,
        scope=r.choice(data.get("scope", "stream"), f"{path}.scope", SCOPES))
