"""Groups of nodes whose int8 the sensitivity sweep decides on, and what keeping each in fp32 costs.

The groups are `fp16.candidate_groups` (rotary angles, layer norms, softmax, logits head)
plus `attention_scores` (the activation x activation MatMuls of Q.K^T). Only MatMul/Gemm/Conv are quantized
(see `int8_targets.py`), so a group's int8 is what the quantizer does at its edges: a group "in int8" has its
own quantizable nodes quantized and its outputs quantized where a quantized MatMul reads them (through
shape-only ops). Keeping a group fp32 excludes those nodes; a group that reaches no quantized node (the rotary
angles, which only feed Cos/Sin and elementwise rotations) is already fp32 and is reported as such.

What a group costs in fp32 is the share of the graph's quantizable weights it takes out of int8 (the weights
are where int8 saves memory traffic; activation x activation MatMuls carry none).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx

from .fp16 import candidate_groups

# value-preserving ops a quantized tensor passes through on its way to a MatMul, and which of their inputs
# carry the values (the others are shapes, indices, conditions); None: all of them
PASS_THROUGH: dict[str, tuple[int, ...] | None] = {
    "Reshape": (0,), "Transpose": (0,), "Squeeze": (0,), "Unsqueeze": (0,), "Flatten": (0,), "Cast": (0,),
    "Identity": (0,), "Split": (0,), "Slice": (0,), "Expand": (0,), "Gather": (0,), "Concat": None, "Where": (1, 2)}


@dataclass(frozen=True)
class Group:
    name: str
    nodes: frozenset[str]  # the group's own nodes
    excluded: frozenset[str]  # what keeping it fp32 excludes from quantization (nodes + quantized readers)
    quantized: frozenset[str]  # of those, the nodes the quantizer would otherwise quantize
    weight_share: float  # share of the graph's quantizable weight elements in `quantized`

    def to_dict(self) -> dict[str, object]:
        return {"nodes": len(self.nodes), "quantized_nodes": len(self.quantized),
                "weight_share": round(self.weight_share, 4)}


def weight_elements(model: onnx.ModelProto, node: onnx.NodeProto) -> int:
    """Elements of the constant weight a node multiplies by (an initializer, or a Transpose of one)."""
    initializers = {t.name: t for t in model.graph.initializer}
    producer = {out: n for n in model.graph.node for out in n.output}
    total = 0
    for name in node.input[1:2]:
        source = producer.get(name)
        while source is not None and source.op_type in ("Transpose", "Reshape", "Cast", "Identity"):
            name = source.input[0]
            source = producer.get(name)
        if name in initializers:
            total += int(np.prod(initializers[name].dims))
    return total


def _readers(model: onnx.ModelProto, nodes: set[str], target: Callable[[onnx.NodeProto], bool]) -> set[str]:
    """`target` nodes reading an output of `nodes`, directly or through PASS_THROUGH ops."""
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in model.graph.node:
        for index, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, index))
    by_name = {node.name: node for node in model.graph.node}
    found: set[str] = set()
    todo = [out for name in nodes for out in by_name[name].output]
    seen: set[str] = set()
    while todo:
        value = todo.pop()
        if value in seen:
            continue
        seen.add(value)
        for reader, index in consumers.get(value, []):
            if target(reader):
                found.add(reader.name)
            elif reader.op_type in PASS_THROUGH and reader.name not in nodes:
                data_inputs = PASS_THROUGH[reader.op_type]
                if data_inputs is None or index in data_inputs:
                    todo.extend(reader.output)
    return found


def attention_scores(model: onnx.ModelProto, softmax_readers: set[str]) -> set[str]:
    """MatMuls of two activations that do not read a softmax: the Q.K^T products."""
    constants = {t.name for t in model.graph.initializer}
    producer = {out: n for n in model.graph.node for out in n.output}

    def constant(name: str) -> bool:
        node = producer.get(name)
        while node is not None and node.op_type in ("Transpose", "Reshape", "Cast", "Identity"):
            name = node.input[0]
            node = producer.get(name)
        return name in constants or (node is not None and node.op_type == "Constant")

    return {n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in softmax_readers
            and not any(constant(i) for i in n.input)}


def sweep_groups(model: onnx.ModelProto, quantizable: set[str]) -> dict[str, Group]:
    """The groups of a graph, with what excluding each removes from quantization (`quantizable`: the names of
    the nodes the recipe quantizes)."""
    weights = {node.name: weight_elements(model, node) for node in model.graph.node if node.name in quantizable}
    total = max(sum(weights.values()), 1)
    raw = {name: set(nodes) for name, nodes in candidate_groups(model).items()}
    softmax_readers = _readers(model, raw.get("softmax", set()), lambda n: n.op_type == "MatMul")
    scores = attention_scores(model, softmax_readers)
    if scores:
        raw["attention_scores"] = scores
    groups = {}
    for name, nodes in raw.items():
        quantized = (nodes & quantizable) | _readers(model, nodes, lambda n: n.name in quantizable)
        groups[name] = Group(name, frozenset(nodes), frozenset(nodes | quantized), frozenset(quantized),
                             sum(weights.get(n, 0) for n in quantized) / total)
    return groups
