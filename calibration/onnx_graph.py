"""ONNX graph edits shared by the precision transforms (fp16 conversion, int8 quantization)."""
from __future__ import annotations

import onnx

from mirasol.runtime.errors import ExportError


def sort_topologically(graph: onnx.GraphProto) -> None:
    """Order nodes producers-first, as the checker wants (converters and quantizers append nodes at the end).
    Stable: nodes keep their order wherever it is already valid."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = []
        for node in pending:
            if all(i in available for i in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise ExportError(f"graph {graph.name!r} has a cycle or an input nothing produces "
                              f"(first unresolved node: {rest[0].name or rest[0].op_type})")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def remove_dead(graph: onnx.GraphProto) -> None:
    """Drop nodes whose outputs nothing reads (a graph output counts as read) and initializers nothing reads."""
    while True:
        used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
        dead = [node for node in graph.node if not any(out in used for out in node.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    used = {name for node in graph.node for name in node.input}
    for init in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(init)
