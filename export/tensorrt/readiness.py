"""TensorRT readiness of ONNX graphs, checked without TensorRT (numpy + onnx).

Run at export time, so a bundle that TensorRT's ONNX parser would reject, or would build badly, says so before it
reaches the device (where TensorRT's own parser has the final word, and onnx is not needed):

    from mirasol.export.tensorrt.readiness import check_bundle, check_model
    report = check_bundle("bundle/")           # every graph of the manifest
    for finding in report.findings: print(finding)   # "error [text_decoder] node 'CumSum_3': ..."
    findings = check_model("g.onnx", axes={"batch": (1, 1, 8)})

What is checked, per graph:
- every operator is in TensorRT's ONNX parser support matrix (domain ai.onnx), and new enough for the target
  TensorRT (default 10.3, what JetPack 6.1 / 6.2 ship); the per-operator type restrictions of the matrix for the
  node's data input, and the restrictions that matter for our graphs (constant `axes` of Reduce*/Squeeze/
  Unsqueeze, constant CumSum axis, LayerNormalization's extra outputs, Q/DQ zero points);
- the opset is one TensorRT parses;
- tensor dtypes TensorRT supports (no float64, no string, no complex, no 16/32/64-bit unsigned; uint8 only as
  graph input/output);
- every dynamic input dimension is bounded: it has a name, and that name has a range in the manifest's axes
  (which become the optimization profile); a dimension the ONNX file fixes is not under an axis whose range
  spans other sizes (TensorRT's builder refuses a profile that varies a fixed dimension);
- Q/DQ placement TensorRT can fuse: QuantizeLinear -> DequantizeLinear pairs whose DequantizeLinear feeds (possibly
  through shape-only ops) a MatMul / Gemm / Conv / ConvTranspose, both data inputs of such an op quantized, signed
  int8 with zero points equal to 0 (TensorRT's quantization is symmetric), constant positive scales.

The data checked against (the parser's support matrix and its sources) is in `support_matrix.py`.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx
from mirasol.runtime.bundle.manifest import Manifest

from .checks import GraphChecker
from .findings import Finding, ReadinessReport
from .support_matrix import DEFAULT_TARGET

__all__ = ["Finding", "ReadinessReport", "check_bundle", "check_model"]


def check_bundle(bundle_dir: str | os.PathLike[str], *, target: str = DEFAULT_TARGET) -> ReadinessReport:
    """Check every graph of a bundle against its manifest (axes, inputs, precision)."""
    bundle = Path(bundle_dir)
    manifest = Manifest.read(bundle)
    report = ReadinessReport(target=target, graphs=list(manifest.graphs))
    for name, entry in manifest.graphs.items():
        path = bundle / entry.file
        if not path.is_file():
            report.findings.append(Finding("error", name, "", f"graph file {path} is missing", "missing-file"))
            continue
        report.findings.extend(check_model(
            path, graph=name, axes=entry.axes, inputs={t.name: tuple(t.shape) for t in entry.inputs},
            target=target, precision=manifest.precision))
    return report


def check_model(model: Any, *, graph: str = "", axes: Mapping[str, Any] | None = None,
                inputs: Mapping[str, Sequence[int | str]] | None = None, target: str = DEFAULT_TARGET,
                precision: str | None = None, base_dir: str | os.PathLike[str] | None = None) -> list[Finding]:
    """Findings for one ONNX model (a path or a ModelProto).

    axes: axis name -> range (AxisRange, dict with min/opt/max, or (min, opt, max)); with it, every dynamic input
    dimension must be named by one of them. inputs: the manifest's symbolic shape per input name (the names the
    engine builder uses); when given they take precedence over the ONNX dim_params. precision: the bundle's (a
    quantized precision of `mirasol.runtime.bundle.precisions` expects Q/DQ nodes, the others do not). base_dir:
    where external data lives (default: the model's directory), to read zero points stored outside the model.
    """
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        base_dir = base_dir if base_dir is not None else path.parent
        proto = onnx.load(str(path), load_external_data=False)
        graph = graph or path.stem
    else:
        proto = model
    checker = GraphChecker(proto, graph=graph, axes=axes, inputs=inputs, target=target, precision=precision,
                           base_dir=Path(base_dir) if base_dir is not None else None)
    return checker.run()
