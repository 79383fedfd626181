"""Trace one graph of the model to ONNX with torch.export (dynamo) and dynamic shapes."""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch
from torch import nn
from torch.export import Dim

from mirasol.calibration.external_data import EXTERNAL_DATA_BYTES
from mirasol.model import Mirasol

from . import DEFAULT_OPSET
from .specs import GraphSpec



class _FlatInputs(nn.Module):
    """forward(*inputs) in the spec's input order, so dynamic_shapes is one tuple per input."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.inner(*inputs)


def export_graph(spec: GraphSpec, model: Mirasol, path: Path, metadata: dict[str, str],
                 opset: int = DEFAULT_OPSET) -> Path:
    """Write `spec`'s graph to `path` (plus `path.data` when its weights pass 2 GB)."""
    module = _FlatInputs(spec.build(model)).eval()
    sizes = spec.trace_sizes()
    example = spec.example(sizes, np.random.default_rng(0))
    dims = {axis: Dim(axis, min=r.min, max=r.max) for axis, r in spec.axes.items() if r.min != r.max}
    dynamic_shapes = (tuple({i: dims[d] for i, d in enumerate(t.shape) if d in dims} or None
                            for t in spec.inputs),)
    quiet = io.StringIO()
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(quiet), _quiet_loggers():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, tuple(torch.from_numpy(v) for v in example.values()), dynamo=True,
            dynamic_shapes=dynamic_shapes, input_names=[t.name for t in spec.inputs],
            output_names=[t.name for t in spec.outputs], opset_version=opset, optimize=True, verbose=False)
    _name_output_axes(program.model, spec)
    _drop_stack_traces(program.model)
    program.model.metadata_props.update(metadata)
    program.model.graph.name = spec.name
    weight_bytes = sum(v.const_value.nbytes for v in program.model.graph.initializers.values()
                       if v.const_value is not None)
    program.save(str(path), external_data=weight_bytes >= EXTERNAL_DATA_BYTES)
    for value in program.model.graph.initializers.values():  # onnxscript's rewrite rules keep the last graph they
        value.const_value = None  # matched (0.7.2): let it not keep the weights (and through them the model) alive
    return path


def graph_metadata(model: Mirasol, producer: dict[str, str], precision: str) -> dict[str, str]:
    """What each graph carries in metadata_props: the config and the producing versions."""
    return {"mirasol.config": model.config.to_json(), "mirasol.precision": precision,
            **{f"mirasol.producer.{k}": v for k, v in producer.items()}}


def _drop_stack_traces(model: ir.Model) -> None:
    """Remove the Python stack trace the exporter stores on every node.

    The traces name the exporting machine's absolute source paths (`/home/<user>/...`): a bundle would reveal them,
    and its bytes and sizes would depend on where mirasol-edge was installed. Each node keeps its module scope.
    """
    for graph in (model.graph, *model.functions.values()):
        for node in ir.traversal.RecursiveGraphIterator(graph):
            node.metadata_props.pop("pkg.torch.onnx.stack_trace", None)


def _name_output_axes(model: ir.Model, spec: GraphSpec) -> None:
    """Give output axes the spec's names (the exporter writes expressions like 'past_av + 4')."""
    for value, tensor in zip(model.graph.outputs, spec.outputs):
        value.shape = ir.Shape([ir.SymbolicDim(d) if isinstance(d, str) else d for d in tensor.shape])


@contextlib.contextmanager
def _quiet_loggers():
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch._dynamo", "torch.export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)

