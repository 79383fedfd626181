"""Check an exported graph against its PyTorch module at several values of every dynamic axis."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from mirasol.model import Mirasol
from mirasol.runtime.errors import ExportError
from mirasol.runtime.precision import get_precision

from .specs import GraphSpec


def torch_reference(spec: GraphSpec, model: Mirasol, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    with torch.no_grad():
        outputs = spec.build(model)(*(torch.from_numpy(v) for v in feeds.values()))
    return {t.name: o.numpy() for t, o in zip(spec.outputs, outputs)}


def validate_graph(spec: GraphSpec, model: Mirasol, path: Path, precision: str, seed: int = 0
                   ) -> dict[str, object]:
    """Max abs and rel error per output over all validation sizes; raises ExportError past tolerance."""
    tolerance = get_precision(precision).tolerance
    if tolerance is None:
        raise ExportError(f"{precision} graphs are not validated against PyTorch (their calibration report checks "
                          f"them)")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    input_types = {i.name: i.type for i in session.get_inputs()}
    rng = np.random.default_rng(seed)
    errors = {t.name: {"max_abs": 0.0, "max_rel": 0.0, "worst_sizes": None} for t in spec.outputs}
    failures = []
    cases = list(spec.validation_sizes())
    for sizes in cases:
        feeds = spec.example(sizes, rng)
        reference = torch_reference(spec, model, feeds)
        onnx_feeds = {k: v.astype(np.float16) if input_types[k] == "tensor(float16)" else v for k, v in feeds.items()}
        outputs = dict(zip((t.name for t in spec.outputs), session.run(None, onnx_feeds)))
        for name, ref in reference.items():
            got = outputs[name].astype(np.float32)
            if got.shape != ref.shape:
                raise ExportError(f"{spec.name}: output {name!r} has shape {got.shape}, PyTorch gives {ref.shape} "
                                  f"(axis sizes {sizes})")
            if ref.size == 0:
                continue
            scale = float(np.abs(ref).max())
            abs_err = float(np.abs(got - ref).max()) if np.isfinite(got).all() else float("inf")
            entry = errors[name]
            if abs_err >= entry["max_abs"]:
                entry.update(max_abs=abs_err, max_rel=abs_err / max(scale, 1e-12), worst_sizes=sizes)
            if not abs_err <= tolerance.bound(scale):
                failures.append(f"{name} at {sizes}: max abs error {abs_err:.3g} > "
                                f"{tolerance.abs:g} + {tolerance.rel:g} * {scale:.3g}")
    result = {"precision": precision, "cases": len(cases), "tolerance": tolerance.__dict__, "outputs": errors,
              "passed": not failures}
    if failures:
        raise ExportError(f"validation of {spec.name} ({precision}) failed against PyTorch: "
                          + "; ".join(failures[:5]) + (f" (+{len(failures) - 5} more)" if len(failures) > 5 else ""))
    return result
