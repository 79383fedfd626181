"""fp16 graphs: weights and compute in fp16, with fp32 kept where measurement says fp16 loses too much.

Candidate groups of nodes (rotary angles, normalizations, softmax, the logits head) start in fp32; one by
one, a group moves to fp16 when the graph's error with it (and the groups already moved) stays within
KEEP_FACTOR times the all-kept baseline. The decisions and errors are returned for the manifest.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

from .onnx_graph import remove_dead, sort_topologically

KEEP_FACTOR = 1.5


def _ancestors(graph: onnx.GraphProto, targets: set[str]) -> set[str]:
    """Names of the nodes computing any of the `targets` values, transitively (graph inputs stop it)."""
    producer = {out: node for node in graph.node for out in node.output}
    found, todo = set(), list(targets)
    while todo:
        node = producer.get(todo.pop())
        if node is not None and node.name not in found:
            found.add(node.name)
            todo.extend(node.input)
    return found


def candidate_groups(model: onnx.ModelProto) -> dict[str, set[str]]:
    """Node names per candidate group of the graph (empty groups dropped)."""
    graph = model.graph
    by_type: dict[str, set[str]] = {}
    for node in graph.node:
        by_type.setdefault(node.op_type, set()).add(node.name)
    trig_inputs = {i for node in graph.node if node.op_type in ("Cos", "Sin") for i in node.input}
    groups = {
        "rotary_angles": _ancestors(graph, trig_inputs) | by_type.get("Cos", set()) | by_type.get("Sin", set()),
        "layer_norm": by_type.get("LayerNormalization", set()),
        "softmax": by_type.get("Softmax", set()),
        "logits_head": {node.name for node in graph.node if "logits" in node.output and node.op_type == "MatMul"},
    }
    return {name: nodes for name, nodes in groups.items() if nodes}


def convert(model: onnx.ModelProto, keep_fp32: set[str], fp16_io: bool) -> onnx.ModelProto:
    converted = convert_float_to_float16(model, keep_io_types=not fp16_io, op_block_list=list(DEFAULT_OP_BLOCK_LIST),
                                         node_block_list=sorted(keep_fp32), disable_shape_infer=False)
    return _drop_round_trips(converted, model)


def _drop_round_trips(converted: onnx.ModelProto, original: onnx.ModelProto) -> onnx.ModelProto:
    """Undo the converter's fp32 -> fp16 -> fp32 detours between nodes kept in fp32.

    The converter casts every kept node's output to fp16 and back before the next kept node, and stores
    their weights in fp16: rotary angles at the text decoder's far positions (fp16 spacing 0.25 at 511) lose
    precision that way. A Cast to fp32 of (a Cast to fp16 of an fp32 value) or (an fp16 copy of an fp32
    initializer) reads the fp32 value directly.
    """
    graph = converted.graph
    fp32_initializers = {t.name: t for t in original.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    producer = {out: node for node in graph.node for out in node.output}
    initializers = {t.name: t for t in graph.initializer}
    replace: dict[str, str] = {}
    restored: list[onnx.TensorProto] = []
    for node in graph.node:
        if node.op_type != "Cast" or onnx.helper.get_attribute_value(node.attribute[0]) != onnx.TensorProto.FLOAT:
            continue
        source = node.input[0]
        upstream = producer.get(source)
        if (upstream is not None and upstream.op_type == "Cast"
                and onnx.helper.get_attribute_value(upstream.attribute[0]) == onnx.TensorProto.FLOAT16):
            replace[node.output[0]] = upstream.input[0]
        elif source in initializers and source in fp32_initializers \
                and initializers[source].data_type == onnx.TensorProto.FLOAT16:
            restored_name = f"{source}_fp32"
            if restored_name not in {t.name for t in restored}:
                copy = onnx.TensorProto()
                copy.CopyFrom(fp32_initializers[source])
                copy.name = restored_name
                restored.append(copy)
            replace[node.output[0]] = restored_name
    graph.initializer.extend(restored)
    graph_outputs = {o.name for o in graph.output}
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in replace and name not in graph_outputs:
                node.input[i] = replace[name]
    remove_dead(graph)
    sort_topologically(graph)
    del graph.value_info[:]  # the converter's annotations no longer hold for the rewired values
    return converted


def _relative_error(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], reference: list[np.ndarray]) -> float:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    outputs = session.run(None, dict(feeds))
    return max(float(np.abs(o.astype(np.float32) - r).max() / max(float(np.abs(r).max()), 1e-6))
               for o, r in zip(outputs, reference) if r.size)


def to_fp16(model: onnx.ModelProto, feeds_list: list[Mapping[str, np.ndarray]], fp16_io: bool = False,
            log: Callable[[str], None] = lambda _: None) -> tuple[onnx.ModelProto, dict[str, object]]:
    """Convert an fp32 graph to fp16, choosing by measurement which candidate groups stay fp32."""
    fp32_session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    references = [fp32_session.run(None, dict(feeds)) for feeds in feeds_list]

    def error(keep: set[str]) -> float:
        converted = convert(model, keep, fp16_io=False)
        return max(_relative_error(converted, feeds, ref) for feeds, ref in zip(feeds_list, references))

    groups = candidate_groups(model)
    keep = set().union(*groups.values()) if groups else set()
    baseline = error(keep)
    budget = KEEP_FACTOR * max(baseline, 1e-4)
    decisions: dict[str, dict[str, object]] = {}
    for name, nodes in groups.items():  # cumulative: each group released to fp16 only while the total holds
        err = error(keep - nodes)
        kept = err > budget
        decisions[name] = {"nodes": len(nodes), "error_in_fp16": err, "kept_fp32": kept}
        log(f"fp16: {name} ({len(nodes)} nodes) in fp16 -> rel error {err:.2e} "
            f"(budget {budget:.2e}) -> {'keep fp32' if kept else 'fp16'}")
        if not kept:
            keep -= nodes
    final = convert(model, keep, fp16_io)
    return final, {"baseline_error": baseline, "groups": decisions,
                   "final_error": error(keep), "fp16_io": fp16_io}
