"""No poisoned stream: every tensor a step commits (and what it returns) is checked for NaN and inf itself, so a
non-finite value is refused wherever it comes from (extreme inputs, a broken weight, a broken backend), in every
precision, whether or not it would have reached another checked output."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from mirasol.runtime.backends.base import GraphSession
from mirasol.runtime.bundle.reader import sha256_file
from mirasol.runtime.errors import InputError
from mirasol.runtime.pipeline import Pipeline

from .conftest import assert_same_stream_state, chunk, copy_bundle, read_manifest, stream_snapshot, write_manifest


def committed_outputs(pipe: Pipeline) -> list[tuple[str, str]]:
    """(graph, output) of everything the push step commits for the stream or returns, read from the manifest."""
    manifest = pipe.bundle.manifest
    push = manifest.steps["push"]
    found = [(s.source_graph, s.output) for s in manifest.state
             if s.scope == "stream" and s.source_graph in push.graphs]
    graph, _ = manifest.step_tensor("push", push.returns, output=True)
    return sorted(set(found) | {(graph, push.returns)})


class _Poisoning(GraphSession):
    """A session that writes `value` into the last element of one output (a broken graph or backend)."""

    def __init__(self, inner: GraphSession, output: str, value: float) -> None:
        self.inner, self.output, self.value = inner, output, value
        self.name, self.inputs, self.outputs = inner.name, inner.inputs, inner.outputs

    def run(self, feeds: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        outputs = self.inner.run(feeds, output_names)
        outputs[self.output] = outputs[self.output].copy()
        outputs[self.output].flat[-1] = self.value
        return outputs

    def close(self) -> None:
        self.inner.close()


@pytest.mark.parametrize("precision", ["ttm", "ttm-fp16"], ids=["fp32", "fp16"])
def test_every_committed_output_is_checked_itself(tiny_bundles, precision) -> None:
    """Each committed output poisoned alone (the others as computed): the push is refused naming it, and the
    stream goes on as if the chunk had never come."""
    pipe = Pipeline.load(tiny_bundles[precision])
    plan = pipe._plans["push"]
    reference = pipe.stream()
    for i in range(4):  # past tiny's window of 2 chunks
        reference.push(*chunk(pipe, i))
    expected = reference.push(*chunk(pipe, 4))
    outputs = committed_outputs(pipe)
    assert len(outputs) > 3 and ("av_autoregressor", "av_context") in outputs
    for n, (graph, output) in enumerate(outputs):
        stream = pipe.stream()
        for i in range(3):
            stream.push(*chunk(pipe, i))
        before = stream_snapshot(stream)
        index = next(k for k, call in enumerate(plan.calls) if call.session.name == graph)
        call = plan.calls[index]
        plan.calls[index] = type(call)(_Poisoning(call.session, output, [np.nan, np.inf, -np.inf][n % 3]), call.feeds,
                                       call.keep, call.checks)
        try:
            with pytest.raises(InputError, match=f"push: graph '{graph}' output '{output}' holds NaN or inf"):
                stream.push(*chunk(pipe, 3))
        finally:
            plan.calls[index] = call
        assert_same_stream_state(before, stream_snapshot(stream))
        stream.push(*chunk(pipe, 3))
        assert np.array_equal(stream.push(*chunk(pipe, 4)), expected), (graph, output)


def _poison_weight(bundle: Path, graph: str, initializer: str, index: int) -> None:
    """Set one element of a graph's initializer to +inf (in its own dtype) and re-checksum the graph file."""
    path = bundle / f"{graph}.onnx"
    model = onnx.load(str(path))
    tensor = next(t for t in model.graph.initializer if t.name == initializer)
    values = numpy_helper.to_array(tensor).copy()
    values.flat[index] = np.inf
    tensor.CopyFrom(numpy_helper.from_array(values, initializer))
    onnx.save(model, str(path))
    manifest = read_manifest(bundle)
    manifest["graphs"][graph]["sha256"] = sha256_file(path)
    write_manifest(bundle, manifest)


# (graph, initializer, the committed output it poisons first): the TTM memory's write is computed apart from the
# chunk's latents, so a broken write poisons the carried memory while the chunk's av_context stays finite.
POISONED_WEIGHTS = {
    "TTM memory write": ("combiner", "inner.model.combiner.write.score.2.bias", "memory_out"),
    "AV key projection": ("av_autoregressor", "inner.model.av_autoregressor.blocks.1.self_attn.k_proj.bias",
                          "av_context"),
}


@pytest.mark.parametrize("precision", ["ttm", "ttm-fp16"], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", list(POISONED_WEIGHTS))
def test_a_poisoned_weight_is_never_committed(tiny_bundles, tmp_path, precision, case) -> None:
    graph, initializer, first = POISONED_WEIGHTS[case]
    bundle = copy_bundle(tiny_bundles[precision], tmp_path)
    _poison_weight(bundle, graph, initializer, 0)
    pipe, healthy = Pipeline.load(bundle), Pipeline.load(tiny_bundles[precision])
    stream = pipe.stream()
    with pytest.raises(InputError, match=f"graph '{graph}' output '{first}' holds NaN or inf"):
        stream.push(*chunk(pipe, 0))
    assert stream.chunks == 0 and stream.batch is None and stream.state == {}
    if case == "TTM memory write":  # the case a check of av_context alone would let through
        plan = pipe._plans["push"]
        context, produced = _unchecked_push(pipe, plan)
        assert np.isfinite(context).all() and not np.isfinite(produced["memory_out"]).all()
    # a stream of the healthy bundle is untouched by the other pipeline's refusals
    assert np.isfinite(healthy.stream().push(*chunk(healthy, 0))).all()


def _unchecked_push(pipe: Pipeline, plan):
    """The push step's outputs without the checks (to show what a narrower check would have committed)."""
    stream = pipe.stream()
    feeds, batch, _ = stream._chunk_feeds(*chunk(pipe, 0))
    carried = stream._fresh("stream", batch)
    produced: dict[str, np.ndarray] = {}
    sources = (feeds, produced, carried.state, carried.counters, {}, {})
    for call in plan.calls:
        produced.update(call.session.run({name: sources[s][key] for name, s, key in call.feeds}))
    return produced[plan.returns], produced
