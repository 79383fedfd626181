"""Streams pushed together (`Pipeline.push_streams`): the carried state their push step reads, stacked along the
batch axis, and kept stacked between calls that push the same streams together again.

Only what the push graphs read is stacked (the TTM memory, the AV key/value cache); what they do not read (the AV
memory that questions read) stays with each stream and is appended there. A `StackedState` is never changed: each
step makes a new one. A member stream holds (group, its index) and its tensors apart; it leaves the group when
anything else needs its state (`Stream._carried`), its rows then copied out.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .backends import Backend
from .bundle.manifest import Manifest
from .errors import BundleError
from .step_plan import Carried, StepPlan
from .steps import Timings, apply, changes, execute, part_of, updated


@dataclass(frozen=True, eq=False)
class StackedState:
    """Carried state of several streams stacked along the batch axis; member k owns rows bounds[k]."""

    carried: Carried
    axes: Mapping[str, int]  # batch axis per state tensor
    bounds: tuple[tuple[int, int], ...]
    key: tuple  # the shapes apart from the batch axis (what may stack with it)

    def rows(self, member: int, backend: Backend) -> Carried:
        """Member `member`'s state and counters, copied out."""
        begin, end = self.bounds[member]
        return Carried({n: backend.slice(v, self.axes[n], begin, end) for n, v in self.carried.state.items()},
                       {n: v[begin:end].copy() for n, v in self.carried.counters.items()})


class Stacking:
    """How the push step of a bundle runs for several streams at once: what it stacks, along which axes."""

    def __init__(self, manifest: Manifest, plan: StepPlan, backend: Backend) -> None:
        self.plan, self.backend = plan, backend
        self.axes: dict[str, int] = {}
        for spec in manifest.state:
            if spec.scope == "stream":
                shape = manifest.graphs[spec.graph].input(spec.input).shape
                if "batch" not in shape:
                    raise BundleError(f"push_streams: state {spec.name} ({spec.graph}.{spec.input} {list(shape)}) "
                                      f"has no batch axis to stack streams along")
                self.axes[spec.name] = shape.index("batch")
        self.state = sorted(plan.reads)
        self.counters = sorted(c.name for c in plan.counters)
        self.apart = [u for u in plan.updates if u.spec.name not in plan.reads]
        self.returns_axis = manifest.step_tensor("push", plan.returns, output=True)[1].shape.index("batch")

    def key(self, carried: Carried) -> tuple:
        """What a stream's state must share with others to stack: each stacked tensor's shape but the batch axis."""
        return tuple(carried.state[n].shape[:self.axes[n]] + carried.state[n].shape[self.axes[n] + 1:]
                     for n in self.state)

    def group_of(self, refs: Sequence[tuple[StackedState, int] | None], rows: Sequence[int]) -> StackedState | None:
        """The stacked group whose members are exactly these streams (their `_rows`), in order with these rows."""
        group = refs[0][0] if refs[0] is not None else None
        if group is None or group.bounds != bounds_of(rows):
            return None
        return group if all(ref is not None and ref[0] is group and ref[1] == k for k, ref in enumerate(refs)) else None

    def stack(self, members: Sequence[Carried]) -> Carried:
        """The stacked state and counters of several streams (no copy for one)."""
        if len(members) == 1:
            return Carried({n: members[0].state[n] for n in self.state},
                           {n: members[0].counters[n] for n in self.counters})
        return Carried({n: self.backend.concatenate([m.state[n] for m in members], self.axes[n]) for n in self.state},
                       {n: np.concatenate([m.counters[n] for m in members]) for n in self.counters})

    def run(self, stacked: Carried, feeds: Mapping[str, np.ndarray], rows: Sequence[int],
            apart: Sequence[Mapping[str, Any]]) -> tuple[StackedState, list[Any], list[dict[str, Any]]]:
        """One run of the push step for members of `rows` rows each: their new stacked state, each member's
        returned output, and each member's new tensors apart (from `apart`, its current ones). Changes nothing."""
        bounds = bounds_of(rows)
        context, produced = execute(self.plan, self.backend, feeds, bounds[-1][1], stacked, None, Timings())
        new = Carried(dict(stacked.state), dict(stacked.counters))
        apply(changes(self.plan, feeds, produced, {"stream": new}, self.backend, [*self.state, *self.counters]))
        contexts, changed = [], []
        for (begin, end), mine in zip(bounds, apart):
            contexts.append(part_of(context, self.returns_axis, begin, end, self.backend))
            changed.append({u.spec.name: updated(u, mine[u.spec.name], part_of(
                produced[u.spec.output], self.axes[u.spec.name], begin, end, self.backend), self.backend)
                for u in self.apart})
        return StackedState(new, self.axes, bounds, self.key(new)), contexts, changed


def bounds_of(rows: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """Row ranges of consecutive members with `rows` rows each."""
    ends = np.cumsum(rows).tolist()
    return tuple(zip([0, *ends[:-1]], ends))

