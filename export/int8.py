"""int8 graphs: each fp32 graph quantized with ranges calibrated on the activations the runtime really feeds it.

The calibration clips stream once through the fp32 bundle (`mirasol.calibration.quantize.calibrate`): every call of
every graph is folded into per-tensor ranges as it runs, and a few calls per graph are kept on disk for the
sensitivity sweep. Then graph by graph: the sweep decides which groups stay fp32, and the recipe quantizes it
(`cpu`, `cpu-dynamic` or `tensorrt`, `mirasol.calibration.int8_targets`). Every step works on the weightless fp32
graph and reads its weights from the fp32 bundle's files a tensor at a time, and every graph is written with its
weights beside it once they pass 2 GB, so memory is bounded by one fp32 bundle's ONNX Runtime sessions while
calibrating (mirasol3b: ~13 GB) and by one graph's int8 weights afterwards. Ranges and sweep decisions are cached.
Once the bundle is written, its report compares it with the fp32 bundle on held-out clips.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import onnxruntime as ort

from mirasol.calibration.data import load_clips
from mirasol.calibration.external_data import load_weightless, with_shapes
from mirasol.calibration.int8_targets import get_int8_recipe
from mirasol.calibration.kv_cache import kv_codecs
from mirasol.calibration.quantize import (CACHE_VERSION, KEEP_FACTOR, MAX_KEEP_WEIGHT_SHARE, METHODS, QUESTION_TOKENS,
                                          SWEEP_SAMPLES, CalibrationCache, cache_key, calibrate, default_cache_dir,
                                          sensitivity_sweep)
from mirasol.calibration.ranges import collectors_for
from mirasol.calibration.report import evaluate
from mirasol.calibration.samples import SampleStore
from mirasol.runtime.bundle.manifest import Manifest
from mirasol.runtime.bundle.reports import format_quantization
from mirasol.runtime.errors import ExportError

from .graph_sources import ExportContext, PrecisionOptions, save_graph
from .specs import GraphSpec


class Int8Graphs:
    precision = "int8"
    needs_model = False

    def __init__(self, context: ExportContext, options: PrecisionOptions) -> None:
        """Checks the options and loads the calibration clips; the fp32 bundle is calibrated at the first write."""
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
        self.samples: SampleStore | None = None
        self.calls: dict[str, int] = {}
        self._scratch: tempfile.TemporaryDirectory[str] | None = None

    def _prepare(self, context: ExportContext) -> Manifest:
        """Once: cached ranges and sweeps of the fp32 graphs; what is not cached is calibrated on the fp32 bundle."""
        if self.fp32_manifest is not None:
            return self.fp32_manifest
        options, progress, bundle = self.options, context.progress, context.fp32_source()
        self.fp32_manifest = manifest = Manifest.read(bundle)
        settings = {"method": options.method, "op_types": list(self.recipe.op_types),
                    "question_tokens": QUESTION_TOKENS, "version": CACHE_VERSION, "seed": options.seed,
                    "onnxruntime": ort.__version__}
        self.range_keys = {name: cache_key("ranges", g.sha256, self.clip_set.digest, settings)
                           for name, g in manifest.graphs.items()}
        self.sweep_keys = {name: cache_key("sweep", self.range_keys[name], self.recipe.settings(), KEEP_FACTOR,
                                           MAX_KEEP_WEIGHT_SHARE, SWEEP_SAMPLES) for name in manifest.graphs}
        self.ranges = {name: self.cache.ranges(key) for name, key in self.range_keys.items()}
        self.sweeps = {name: self.cache.sweep(key) for name, key in self.sweep_keys.items()}
        self.cached = sorted(name for name in manifest.graphs
                             if (self.ranges[name] is not None or not self.recipe.uses_ranges)
                             and self.sweeps[name] is not None)
        if len(self.cached) == len(manifest.graphs):
            progress(f"calibration cache hit ({self.cache.directory}): ranges and sweep decisions of every graph "
                     f"reused")
            return manifest
        start = time.perf_counter()
        self._scratch = tempfile.TemporaryDirectory(prefix="mirasol-calibration-")
        self.samples = SampleStore(self._scratch.name, SWEEP_SAMPLES, seed=options.seed)
        uncalibrated = [(name, g.file) for name, g in manifest.graphs.items()
                        if self.ranges[name] is None and self.recipe.uses_ranges]
        collectors = collectors_for(bundle, uncalibrated, options.method, self.recipe.op_types)
        with tempfile.TemporaryDirectory(prefix="mirasol-augmented-") as work:
            chunks = calibrate(bundle, self.clip_set, collectors, Path(work), [self.samples], options.bar,
                               options.threads)
        for name, collector in collectors.items():
            self.ranges[name] = collector.result()
            self.cache.save_ranges(self.range_keys[name], self.ranges[name])
        self.calls = {name: self.samples.seen(name) for name in manifest.graphs}
        progress(f"calibrated on {chunks} chunks in {time.perf_counter() - start:.1f}s ({options.method}, every call: "
                 + ", ".join(f"{g} {self.calls[g]} calls, {self.samples.kept(g)} kept for the sweep"
                             for g in manifest.graphs) + ")")
        return manifest

    def write(self, context: ExportContext, spec: GraphSpec, path: Path) -> dict[str, Any]:
        manifest = self._prepare(context)
        name = spec.name
        start = time.perf_counter()
        fp32_path = context.fp32_source() / manifest.graphs[name].file
        weights = fp32_path.parent
        model = with_shapes(load_weightless(fp32_path))
        if self.sweeps[name] is None:
            assert self.samples is not None and self._scratch is not None
            if not self.samples.kept(name):
                raise ExportError(f"calibration recorded no calls of graph {name!r}")
            samples = self.samples
            exclude, decision = sensitivity_sweep(
                name, model, weights, self.ranges[name], self.recipe, lambda: samples.calls(name),
                samples.kept(name), Path(self._scratch.name), context.progress)
            self.sweeps[name] = {"exclude": sorted(exclude), "report": decision}
            self.cache.save_sweep(self.sweep_keys[name], self.sweeps[name])
        sweep = self.sweeps[name]
        save_graph(self.recipe.quantize(model, self.ranges[name], set(sweep["exclude"]), weights), path,
                   self.precision, weights)
        context.progress(f"quantized {spec.file} ({self.recipe.name}"
                         f"{', ' + self.options.method if self.recipe.uses_ranges else ''}) in "
                         f"{time.perf_counter() - start:.1f}s")
        return sweep["report"]

    def report(self, context: ExportContext, bundle: Path, graph_reports: dict[str, Any]) -> dict[str, Any]:
        options, progress, manifest = self.options, context.progress, self._prepare(context)
        if self._scratch is not None:  # the sweep's samples are no longer needed
            self._scratch.cleanup()
            self._scratch = self.samples = None
        start = time.perf_counter()
        accuracy = evaluate(context.fp32_source(), bundle, self.clip_set.held_out, bar=options.bar,
                            options=self.recipe.backend_options(), codecs=kv_codecs(bundle), label="int8",
                            progress=progress)
        progress(f"compared with fp32 on {len(self.clip_set.held_out)} held-out clips in "
                 f"{time.perf_counter() - start:.1f}s")
        report = {
            "format": "int8", "recipe": self.recipe.settings(),
            "method": options.method if self.recipe.uses_ranges else "dynamic (ranges per call)",
            "data": self.clip_set.describe(),
            "calibration": {"calls": self.calls, "streamed": "every call of every graph folded into running ranges",
                            "question_tokens": QUESTION_TOKENS, "cached": self.cached},
            "sweep": graph_reports, "accuracy": accuracy,
            "reference": {"precision": "fp32", "graphs": {n: g.sha256 for n, g in manifest.graphs.items()},
                          "validation": manifest.validation}}
        progress(format_quantization(report))
        return report
