"""int8 graphs: each fp32 graph quantized with ranges calibrated on the activations the runtime really feeds it.

The calibration clips stream through the fp32 bundle (`mirasol.calibration.quantize.record_feeds`); per graph the
ranges are calibrated, the sensitivity sweep decides which groups stay fp32, and the recipe quantizes it
(`cpu`, `cpu-dynamic` or `tensorrt`, `mirasol.calibration.int8_targets`). Ranges and sweep decisions are cached.
Once the bundle is written, its report compares it with the fp32 bundle on held-out clips.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization.quant_utils import load_model_with_shape_infer

from mirasol.calibration.data import load_clips
from mirasol.calibration.int8_targets import get_int8_recipe
from mirasol.calibration.quantize import (CACHE_VERSION, KEEP_FACTOR, MAX_KEEP_WEIGHT_SHARE, METHODS, QUESTION_TOKENS,
                                          SWEEP_SAMPLES, CalibrationCache, cache_key, calibrate_ranges,
                                          default_cache_dir, record_feeds, sensitivity_sweep)
from mirasol.calibration.record import FeedRecorder
from mirasol.calibration.report import evaluate
from mirasol.runtime.errors import ExportError
from mirasol.runtime.bundle.manifest import Manifest
from mirasol.runtime.bundle.reports import format_quantization

from .graph_sources import ExportContext, PrecisionOptions, save_graph
from .specs import GraphSpec


class Int8Graphs:
    precision = "int8"
    needs_model = False

    def __init__(self, context: ExportContext, options: PrecisionOptions) -> None:
        """Checks the options and loads the calibration clips; the fp32 bundle is recorded at the first write."""
        calibration = options.calibration
        if calibration is None:
            raise ExportError("int8 needs calibration data: mirasol-export --precision int8 --calibration-data "
                              "DIR|synthetic")
        if calibration.method not in METHODS:
            raise ExportError(f"calibration method {calibration.method!r} is not one of {sorted(METHODS)}")
        self.options = calibration
        self.recipe = get_int8_recipe(calibration.target)
        self.clip_set = load_clips(calibration.data, context.model.config, clips=calibration.clips,
                                   held_out=calibration.held_out, max_chunks=calibration.max_chunks,
                                   seed=calibration.seed, log=context.progress)
        context.progress(f"calibration data: {self.clip_set.kind} ({self.clip_set.generator}, "
                         f"{self.clip_set.source}): {len(self.clip_set.calibration)} calibration clips, "
                         f"{len(self.clip_set.held_out)} held-out clips")
        directory = Path(calibration.cache_dir) if calibration.cache_dir else default_cache_dir()
        self.cache = CalibrationCache(directory if calibration.use_cache else None)
        self.fp32_manifest: Manifest | None = None
        self.recorder: FeedRecorder | None = None

    def _prepare(self, context: ExportContext) -> Manifest:
        """Once: cached ranges and sweeps of the fp32 graphs; what is not cached is recorded from the fp32 bundle."""
        if self.fp32_manifest is not None:
            return self.fp32_manifest
        options, progress = self.options, context.progress
        self.fp32_manifest = manifest = Manifest.read(context.fp32_source())
        settings = {"method": options.method, "op_types": list(self.recipe.op_types),
                    "max_samples": options.max_samples, "question_tokens": QUESTION_TOKENS,
                    "version": CACHE_VERSION, "seed": options.seed, "onnxruntime": ort.__version__}
        self.range_keys = {name: cache_key("ranges", g.sha256, self.clip_set.digest, settings)
                           for name, g in manifest.graphs.items()}
        self.sweep_keys = {name: cache_key("sweep", self.range_keys[name], self.recipe.settings(), KEEP_FACTOR,
                                           MAX_KEEP_WEIGHT_SHARE, SWEEP_SAMPLES) for name in manifest.graphs}
        self.ranges = {name: self.cache.ranges(key) for name, key in self.range_keys.items()}
        self.sweeps = {name: self.cache.sweep(key) for name, key in self.sweep_keys.items()}
        self.cached = sorted(name for name in manifest.graphs
                             if (self.ranges[name] is not None or not self.recipe.uses_ranges)
                             and self.sweeps[name] is not None)
        if len(self.cached) < len(manifest.graphs):
            start = time.perf_counter()
            self.recorder = record_feeds(context.fp32_source(), self.clip_set, options.max_samples, options.seed,
                                         options.bar)
            progress(f"recorded graph inputs in {time.perf_counter() - start:.1f}s: "
                     + ", ".join(f"{g} {len(self.recorder.calls.get(g, []))}/{self.recorder.seen.get(g, 0)} calls"
                                 for g in manifest.graphs))
        else:
            progress(f"calibration cache hit ({self.cache.directory}): ranges and sweep decisions of every graph "
                     f"reused")
        return manifest

    def write(self, context: ExportContext, spec: GraphSpec, path: Path) -> dict[str, Any]:
        manifest = self._prepare(context)
        name, options = spec.name, self.options
        start = time.perf_counter()
        fp32_path = context.fp32_source() / manifest.graphs[name].file
        fp32_model = load_model_with_shape_infer(fp32_path)
        feeds = [call.feeds for call in self.recorder.calls.pop(name, [])] if self.recorder is not None else []
        if self.recorder is not None and not feeds:
            raise ExportError(f"calibration recorded no inputs for graph {name!r}")
        if self.ranges[name] is None and self.recipe.uses_ranges:
            with tempfile.TemporaryDirectory(prefix="mirasol-calibrate-") as scratch:
                self.ranges[name] = calibrate_ranges(fp32_path, feeds, options.method, self.recipe.op_types,
                                                     Path(scratch))
            self.cache.save_ranges(self.range_keys[name], self.ranges[name])
        if self.sweeps[name] is None:
            sample = [feeds[i] for i in np.linspace(0, len(feeds) - 1, min(SWEEP_SAMPLES, len(feeds))).astype(int)]
            exclude, decision = sensitivity_sweep(name, fp32_model, self.ranges[name], self.recipe, sample,
                                                  context.progress)
            self.sweeps[name] = {"exclude": sorted(exclude), "report": decision}
            self.cache.save_sweep(self.sweep_keys[name], self.sweeps[name])
        sweep = self.sweeps[name]
        save_graph(self.recipe.quantize(fp32_model, self.ranges[name], set(sweep["exclude"])), path, self.precision)
        context.progress(f"quantized {spec.file} ({self.recipe.name}"
                         f"{', ' + options.method if self.recipe.uses_ranges else ''}) in "
                         f"{time.perf_counter() - start:.1f}s")
        return sweep["report"]

    def report(self, context: ExportContext, bundle: Path, graph_reports: dict[str, Any]) -> dict[str, Any]:
        options, progress, manifest = self.options, context.progress, self._prepare(context)
        start = time.perf_counter()
        accuracy = evaluate(context.fp32_source(), bundle, self.clip_set.held_out, bar=options.bar,
                            int8_options=self.recipe.backend_options())
        progress(f"compared with fp32 on {len(self.clip_set.held_out)} held-out clips in "
                 f"{time.perf_counter() - start:.1f}s")
        report = {
            "format": "int8", "recipe": self.recipe.settings(),
            "method": options.method if self.recipe.uses_ranges else "dynamic (ranges per call)",
            "data": self.clip_set.describe(),
            "calibration": {"max_samples_per_graph": options.max_samples, "question_tokens": QUESTION_TOKENS,
                            "cached": self.cached},
            "sweep": graph_reports, "accuracy": accuracy,
            "reference": {"precision": "fp32", "graphs": {n: g.sha256 for n, g in manifest.graphs.items()},
                          "validation": manifest.validation}}
        progress(format_quantization(report))
        return report
