"""int4 graphs: each fp32 graph's MatMul weights as int4 blocks (`mirasol.calibration.int4`), calibration-free.

Graph by graph, from the weightless fp32 graph, its weights read from the fp32 bundle's files one at a time, so a
mirasol3b graph never sits in memory as fp32. Each written graph is loaded in ONNX Runtime as the runtime loads it
and its optimized form checked: every int4 weight must have fused into MatMulNBits (a form that silently stays a
DequantizeLinear runs a dequantization on every call; it is an export error). Once written, the bundle's report
compares it with the fp32 bundle on held-out clips (`mirasol.calibration.report`): the calibration data's held-out
clips when given, else synthetic ones.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from mirasol.calibration.data import SYNTHETIC, load_clips
from mirasol.calibration.external_data import load_weightless
from mirasol.calibration.int4 import BLOCK_SIZES, HIGH, LOW, OPSET, check_fused, int4_dequantizers, quantize_weights
from mirasol.calibration.kv_cache import kv_codecs
from mirasol.calibration.report import evaluate
from mirasol.runtime.bundle.reports import format_quantization

from .graph_sources import ExportContext, PrecisionOptions, save_graph
from .specs import GraphSpec

REPORT_CLIPS = 4  # held-out synthetic clips when no calibration data is given


class Int4Graphs:
    precision = "int4"
    needs_model = False

    def __init__(self, context: ExportContext, options: PrecisionOptions) -> None:
        """The report's held-out clips: the calibration data's, else synthetic."""
        calibration = options.calibration
        if calibration is not None:
            self.clip_set = load_clips(calibration.data, context.model.config, clips=calibration.clips,
                                       held_out=calibration.held_out, max_chunks=calibration.max_chunks,
                                       seed=calibration.seed, log=context.progress)
        else:
            self.clip_set = load_clips(SYNTHETIC, context.model.config, clips=1, held_out=REPORT_CLIPS,
                                       log=context.progress)
        self.bar = calibration.bar if calibration is not None else None

    def write(self, context: ExportContext, spec: GraphSpec, path: Path) -> dict[str, Any]:
        start = time.perf_counter()
        fp32_path = context.fp32_source() / spec.file
        model, report = quantize_weights(load_weightless(fp32_path), fp32_path.parent)
        save_graph(model, path, self.precision, fp32_path.parent)
        del model
        fused = check_fused(path, len(int4_dequantizers(load_weightless(path))))
        context.progress(f"int4 {spec.file}: {len(report.quantized)} weights in blocks of "
                         f"{'/'.join(map(str, report.block_sizes)) or '-'} (weight error {report.weight_error:.3f}), "
                         f"{len(report.float_weights)} kept float; onnxruntime fuses {fused['MatMulNBits']} into "
                         f"MatMulNBits; {time.perf_counter() - start:.1f}s")
        return {**report.to_dict(), "onnxruntime_fused": fused}

    def report(self, context: ExportContext, bundle: Path, graph_reports: dict[str, Any]) -> dict[str, Any]:
        start = time.perf_counter()
        accuracy = evaluate(context.fp32_source(), bundle, self.clip_set.held_out, bar=self.bar,
                            codecs=kv_codecs(bundle), label="int4", progress=context.progress)
        context.progress(f"compared with fp32 on {len(self.clip_set.held_out)} held-out clips in "
                         f"{time.perf_counter() - start:.1f}s")
        report = {
            "format": "int4", "method": "weights only (no calibration)",
            "recipe": {"name": "int4", "form": f"DequantizeLinear(int4, axis 0, block_size) -> MatMul, opset {OPSET}",
                       "block_sizes": list(BLOCK_SIZES), "codes": [LOW, HIGH],
                       "scales": "float32, positive: max(max / 7, -min / 8) per block and output column",
                       "zero_point": "none (0)", "activations": "float32"},
            "data": self.clip_set.describe(), "weights": graph_reports, "accuracy": accuracy}
        context.progress(format_quantization(report))
        return report
