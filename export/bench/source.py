"""Where a run's model and bundles come from: a preset (random init), a checkpoint or a given bundle, and the
bundles exported here per precision through the exporter's public API."""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mirasol.calibration.quantize import CalibrationOptions
from mirasol.model import Mirasol
from mirasol.runtime.bundle.manifest import Manifest
from mirasol.runtime.bundle.precisions import NAMES as PRECISION_NAMES
from mirasol.runtime.bundle.tokenizer import ByteTokenizer

from ..bundle import export_bundle
from .baselines import pytorch_model

Progress = Callable[[str], None]


@dataclass
class Source:
    """The model of a run."""

    label: str
    model: Mirasol  # for bundles of a checkpoint/preset, or a random init of a given bundle's config
    spec: dict[str, Any]  # how the PyTorch child process rebuilds it (`baselines.pytorch_model`)
    eos_zeroed: bool
    model_note: str


def build_source(preset: str, checkpoint: str | Path | None, bundle: str | Path | None, seed: int,
                 suppress_eos: bool) -> Source:
    """The model of a checkpoint, else a random init of a given bundle's config, else of a preset."""
    if checkpoint is not None:
        spec = {"checkpoint": str(checkpoint)}
        return Source(f"checkpoint {checkpoint}", pytorch_model(spec), spec, False, "the checkpoint's weights")
    if bundle is not None:
        spec = {"config": Manifest.read(bundle).config, "seed": seed}
        return Source(f"bundle {bundle}", pytorch_model(spec), spec, False,
                      "PyTorch baselines use a random init of the bundle's config (same shapes and FLOPs)")
    spec = {"preset": preset, "seed": seed}
    model = pytorch_model(spec)
    if suppress_eos:
        # The lm_head is tied to the embedding: a zero EOS row makes the EOS logit exactly 0, below the best
        # of 256+ random logits, so greedy decoding runs the full token count. EOS is never an input, so
        # nothing else changes. Timing does not depend on weights; token counts are still reported as counted.
        with torch.no_grad():
            model.text_decoder.embed.weight[ByteTokenizer.EOS].zero_()
    return Source(f"preset {preset} (random init, seed {seed})", model, spec, suppress_eos,
                  "random init" + (", EOS logit held at 0" if suppress_eos else ""))


def checks(manifest: Manifest) -> str:
    """In words, how a bundle was checked: against PyTorch (its validation results), or int8 against fp32."""
    if manifest.validation:
        passed = sum(bool(result.get("passed")) for result in manifest.validation.values())
        return f"validated against PyTorch: {passed} of {len(manifest.validation)} graphs passed"
    if manifest.quantization.get("accuracy"):
        return f"{manifest.precision}: compared with its validated fp32 bundle on held-out clips"
    return "NOT validated: its manifest holds no validation results (exported with --no-validate?)"


def export_bundles(source: Source, bundle: str | Path | None, precisions: Sequence[str], workdir: Path,
                   calibration_data: str, calibration_clips: int, progress: Progress
                   ) -> tuple[dict[str, Path], dict[str, Any]]:
    """Bundles per precision: the given one, and those exported (fp32/fp16) or quantized (int8/int4) here; with the
    report's "export" section (per precision: status, source, path, seconds, or why not)."""
    paths: dict[str, Path] = {}
    report: dict[str, Any] = {}
    if bundle is not None:
        manifest = Manifest.read(bundle)
        paths[manifest.precision] = Path(bundle)
        report[manifest.precision] = {"status": "ok", "source": "given", "path": str(bundle), "seconds": 0.0,
                                      "checks": checks(manifest)}
    can_export = bundle is None or not source.spec.get("config")
    ours: Path | None = None  # an fp32 bundle exported here from source.model
    for precision in sorted(precisions, key=PRECISION_NAMES.index):
        if precision in paths:
            continue
        if not can_export:
            report[precision] = {"status": "not available",
                                 "reason": "only the given bundle (add --checkpoint to export other precisions)"}
            continue
        out = workdir / f"bundle-{precision}"
        start = time.perf_counter()
        try:
            # fp16, int8 and int4 start from the fp32 bundle exported above (its graphs are traced once); the
            # int8 and int4 accuracy reports are not what this tool measures: one held-out clip
            calibration = CalibrationOptions(calibration_data, clips=calibration_clips, held_out=1)
            manifest = export_bundle(source.model, out, precision, reference=ours, progress=progress,
                                     calibration=calibration)
            if precision == "fp32":
                ours = out
        except Exception as failure:  # noqa: BLE001 - a failed precision is reported, the others still run
            report[precision] = {"status": "failed", "reason": f"{type(failure).__name__}: {failure}"[:500]}
            progress(f"export {precision} failed: {failure}")
            continue
        seconds = time.perf_counter() - start
        paths[precision] = out
        report[precision] = {"status": "ok", "source": "exported", "path": str(out), "seconds": seconds,
                             "checks": checks(manifest)}
        progress(f"exported {precision} bundle in {seconds:.1f}s")
    return paths, report
