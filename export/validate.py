"""Check an exported graph against its PyTorch module at several values of every dynamic axis.

In two phases, so that the PyTorch model and an ONNX Runtime session never need memory at the same time (the
mirasol3b AV graph is 8 GB of weights, its batch-4 full-cache case 6 GB of inputs and outputs): `record_references`
runs the module at every validation case and writes its outputs to a directory, one case at a time;
`compare_graph` redraws the same inputs from the seed, runs the graph and compares, one case at a time.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from mirasol.model import Mirasol
from mirasol.runtime.errors import ExportError
from mirasol.runtime.bundle.precisions import get_precision

from .specs import GraphSpec


def torch_reference(spec: GraphSpec, model: Mirasol, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    with torch.no_grad():
        outputs = spec.build(model)(*(torch.from_numpy(v) for v in feeds.values()))
    return {t.name: o.numpy() for t, o in zip(spec.outputs, outputs)}


def validation_cases(spec: GraphSpec, seed: int = 0) -> Iterator[tuple[dict[str, int], dict[str, np.ndarray]]]:
    """(axis sizes, seeded random inputs) of every validation case; the same seed draws the same inputs."""
    rng = np.random.default_rng(seed)
    for sizes in spec.validation_sizes():
        yield sizes, spec.example(sizes, rng)


def _reference_file(directory: Path, spec: GraphSpec, case: int) -> Path:
    return directory / f"{spec.name}.{case}.npz"


def record_references(spec: GraphSpec, model: Mirasol, directory: Path, seed: int = 0) -> None:
    """The PyTorch module's outputs at every validation case, written to `directory` (one .npz per case)."""
    for case, (_, feeds) in enumerate(validation_cases(spec, seed)):
        np.savez(_reference_file(directory, spec, case), **torch_reference(spec, model, feeds))


def compare_graph(spec: GraphSpec, references: Path, path: Path, precision: str, seed: int = 0,
                  ) -> dict[str, object]:
    """Max abs and rel error per output against `record_references(spec, ..., references, seed)`; raises
    ExportError past the precision's tolerance."""
    tolerance = get_precision(precision).tolerance
    if tolerance is None:
        raise ExportError(f"{precision} graphs are not validated against PyTorch (their calibration report checks "
                          f"them)")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    input_types = {i.name: i.type for i in session.get_inputs()}
    errors = {t.name: {"max_abs": 0.0, "max_rel": 0.0, "worst_sizes": None} for t in spec.outputs}
    failures = []
    cases = 0
    for case, (sizes, feeds) in enumerate(validation_cases(spec, seed)):
        cases += 1
        onnx_feeds = {k: v.astype(np.float16) if input_types[k] == "tensor(float16)" else v for k, v in feeds.items()}
        outputs = dict(zip((t.name for t in spec.outputs), session.run(None, onnx_feeds)))
        del feeds, onnx_feeds
        with np.load(_reference_file(references, spec, case), allow_pickle=False) as reference:
            for name in errors:
                got, ref = outputs.pop(name).astype(np.float32), reference[name]
                if got.shape != ref.shape:
                    raise ExportError(f"{spec.name}: output {name!r} has shape {got.shape}, PyTorch gives "
                                      f"{ref.shape} (axis sizes {sizes})")
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
    result = {"precision": precision, "cases": cases, "tolerance": tolerance.__dict__, "outputs": errors,
              "passed": not failures}
    if failures:
        raise ExportError(f"validation of {spec.name} ({precision}) failed against PyTorch: "
                          + "; ".join(failures[:5]) + (f" (+{len(failures) - 5} more)" if len(failures) > 5 else ""))
    return result
