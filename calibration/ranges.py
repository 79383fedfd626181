"""Activation ranges accumulated per tensor while the calibration clips stream: running min/max or histograms,
never the activations themselves.

Which tensors: the float inputs and outputs of the graph's quantizable nodes (MatMul/Gemm/Conv), the tensors ONNX
Runtime's calibrators would measure. How: each graph is loaded weightless (`external_data.load_weightless`), given
extra outputs (ReduceMin/ReduceMax of each tensor for minmax, the tensor itself for the histogram methods) and run
as an ONNX Runtime session that reads the weights from the bundle's own files; each call folds its extra outputs
into the running ranges (`RangeCollector`) and hands the Pipeline only the graph's own outputs. So calibrating
every call of every graph costs one session per graph plus one call's activations, whatever the number of calls
and the model size (recording calls and running ONNX Runtime's calibrator keeps every call and copies the graph).

Methods:
- minmax: the smallest and largest value seen (ONNX Runtime's MinMax calibrator folds batches the same way);
- percentile: 99.999th percentile of a histogram of 2048 bins, grown as values outgrow it (ONNX Runtime's
  HistogramCollector);
- entropy: the threshold of least KL divergence between the 2048-bin histogram and its 128-level quantization.
  ONNX Runtime's EntropyCalibrater defaults to 128 bins for 128 levels: a single candidate (the full range), so
  `entropy` was minmax; and its search loops in Python over every bin. `entropy_threshold` is the same search
  (same candidates, smoothing and divergence), vectorized.
"""
from __future__ import annotations

import contextlib
import io
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper
from onnxruntime.quantization.calibrate import CalibrationMethod, HistogramCollector, TensorData, TensorsData, entropy
from onnxruntime.quantization.quant_utils import smooth_distribution

from mirasol.runtime.backends.base import Backend, GraphSession
from mirasol.runtime.backends.onnxruntime import OnnxRuntimeBackend
from mirasol.runtime.bundle.manifest import GraphEntry
from mirasol.runtime.bundle.reader import Bundle
from mirasol.runtime.errors import ExportError

from .external_data import load_weightless, weightless_session, with_shapes

METHODS = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
           "percentile": CalibrationMethod.Percentile}
HISTOGRAM_BINS = 2048
QUANTIZED_BINS = 128  # int8 levels the entropy method quantizes a histogram into
PERCENTILE = 99.999
FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16)


def calibrated_tensors(model: onnx.ModelProto, op_types: Sequence[str]) -> list[str]:
    """The float, non-constant inputs and outputs of `op_types` nodes (as ONNX Runtime's calibrators select them).
    `model` may be weightless: shape inference reads only the tensors' types and shapes."""
    inferred = with_shapes(model)
    types = {vi.name: vi.type.tensor_type.elem_type
             for vi in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
    constants = {t.name for t in model.graph.initializer}
    return sorted({name for node in model.graph.node if node.op_type in op_types
                   for name in (*node.input, *node.output)
                   if name and name not in constants and types.get(name) in FLOAT_TYPES})


class RangeCollector:
    """The ranges of `tensors` of one graph over every call it runs (`method`: minmax, percentile or entropy)."""

    def __init__(self, method: str, tensors: Sequence[str]) -> None:
        if method not in METHODS:
            raise ExportError(f"calibration method {method!r} is not one of {sorted(METHODS)}")
        self.method = method
        self.tensors = list(tensors)
        self.low: dict[str, float] = {}
        self.high: dict[str, float] = {}
        self.calls = 0
        self._histograms = None if method == "minmax" else HistogramCollector(
            method=method, symmetric=False, num_bins=HISTOGRAM_BINS, num_quantized_bins=QUANTIZED_BINS,
            percentile=PERCENTILE, scenario="same")

    @property
    def outputs(self) -> list[str]:
        """The extra graph outputs a call of the augmented graph gives this collector."""
        if self._histograms is not None:
            return list(self.tensors)
        return [f"{t}{suffix}" for t in self.tensors for suffix in ("__range_min", "__range_max")]

    def augment(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """`model` (weightless) with this collector's outputs added."""
        inferred = with_shapes(model)
        infos = {vi.name: vi for vi in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
        existing = {o.name for o in model.graph.output}
        if self._histograms is not None:
            model.graph.output.extend(infos[t] for t in self.tensors if t not in existing)
            return model
        for tensor in self.tensors:
            elem = infos[tensor].type.tensor_type.elem_type
            for op, suffix in (("ReduceMin", "__range_min"), ("ReduceMax", "__range_max")):
                # keepdims: ONNX Runtime cannot reduce an empty axis away (an empty KV cache's first call)
                model.graph.node.append(helper.make_node(op, [tensor], [tensor + suffix], keepdims=1,
                                                         name=tensor + suffix))
                model.graph.output.append(helper.make_tensor_value_info(tensor + suffix, elem, None))
        return model

    def add(self, values: Mapping[str, np.ndarray]) -> None:
        """Fold one call's extra outputs (by name) into the ranges."""
        self.calls += 1
        if self._histograms is not None:
            present = {t: values[t] for t in self.tensors if values[t].size}
            with contextlib.redirect_stdout(io.StringIO()):  # the collector prints its progress
                self._histograms.collect(present)
            for name, value in present.items():
                self._fold(name, float(np.min(value)), float(np.max(value)))
            return
        for tensor in self.tensors:
            low, high = values[tensor + "__range_min"], values[tensor + "__range_max"]
            if low.size and np.isfinite(low).all() and np.isfinite(high).all():  # an empty tensor reduces to +-inf
                self._fold(tensor, float(np.min(low)), float(np.max(high)))

    def _fold(self, name: str, low: float, high: float) -> None:
        self.low[name] = min(self.low.get(name, low), low)
        self.high[name] = max(self.high.get(name, high), high)

    def result(self) -> TensorsData:
        """The calibrated range of every tensor seen (float32 lowest/highest, as ONNX Runtime's quantizers take)."""
        if not self.low:
            raise ExportError("calibration saw no values: no calls were run, or every calibrated tensor was empty")
        ranges: dict[str, tuple[float, float]] = {}
        if self._histograms is None:
            ranges = {name: (self.low[name], self.high[name]) for name in self.low}
        else:
            for name, histogram in self._histograms.get_histogram_dict().items():
                hist, edges = histogram[0], histogram[1]
                if self.method == "entropy":
                    ranges[name] = entropy_threshold(hist, edges, QUANTIZED_BINS, self.low[name], self.high[name])
                else:
                    ranges[name] = percentile_threshold(hist, edges, PERCENTILE, self.low[name], self.high[name])
        return TensorsData(METHODS[self.method], {
            name: TensorData(lowest=np.array(low, np.float32), highest=np.array(high, np.float32))
            for name, (low, high) in sorted(ranges.items())})


def percentile_threshold(hist: np.ndarray, edges: np.ndarray, percentile: float, low: float, high: float
                         ) -> tuple[float, float]:
    """ONNX Runtime's percentile range of a histogram of values (both tails cut equally), within [low, high]."""
    cdf = np.cumsum(hist / hist.sum())
    cut = (100.0 - percentile) / 200.0
    left, right = float(edges[np.searchsorted(cdf, cut)]), float(edges[np.searchsorted(cdf, 1.0 - cut)])
    return max(left, low), min(right, high)


def entropy_threshold(hist: np.ndarray, edges: np.ndarray, quantized_bins: int, low: float, high: float
                      ) -> tuple[float, float]:
    """The range of least KL divergence between a symmetric histogram and its `quantized_bins`-level quantization,
    within [low, high]: ONNX Runtime's `HistogramCollector.get_entropy_threshold`, with numpy instead of Python
    loops over the bins (same candidates, same merging, smoothing and divergence)."""
    hist = np.asarray(hist, dtype=np.int64)
    num_bins = hist.size
    zero = num_bins // 2
    half = quantized_bins // 2
    cumulative = np.concatenate([[0], np.cumsum(hist)])
    total = int(cumulative[-1])
    best, best_div = (float(edges[0]), float(edges[-1])), np.inf
    for i in range(half, zero + 1):
        start, end = zero - i, min(zero + i + 1, num_bins)
        sliced = hist[start:end]
        p = sliced.copy()
        p[0] += cumulative[start]
        p[-1] += total - cumulative[end]
        merged = sliced.size // quantized_bins
        whole = quantized_bins * merged
        quantized = sliced[:whole].reshape(quantized_bins, merged).sum(axis=1)
        quantized[-1] += sliced[whole:].sum()
        norms = (p[:whole] != 0).reshape(quantized_bins, merged).sum(axis=1)
        q = np.zeros(p.size, dtype=np.int64)  # int64 as in ONNX Runtime: each share is truncated
        q[:whole] = np.repeat(np.where(norms > 0, quantized / np.maximum(norms, 1), 0), merged).astype(np.int64)
        p_smooth, q_smooth = smooth_distribution(p), smooth_distribution(q)
        div = np.inf if p_smooth is None or q_smooth is None else float(entropy(p_smooth, q_smooth))
        if div < best_div:
            best, best_div = (float(edges[start]), float(edges[end])), div
    return max(best[0], low), min(best[1], high)


class RangeSession(GraphSession):
    """A graph run with extra outputs that a collector folds; the caller sees only the graph's own outputs."""

    def __init__(self, entry: GraphEntry, session: ort.InferenceSession, collector: RangeCollector) -> None:
        self.name = entry.name
        self.inputs, self.outputs = entry.inputs, entry.outputs
        self.session: ort.InferenceSession | None = session
        self.collector = collector
        self._own = [t.name for t in entry.outputs]
        self._extra = [name for name in collector.outputs if name not in self._own]

    def run(self, feeds: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None,
            **_: Any) -> dict[str, np.ndarray]:
        assert self.session is not None, f"graph {self.name!r}: the session is closed"
        values = dict(zip(self._own + self._extra, self.session.run(self._own + self._extra, dict(feeds))))
        self.collector.add(values)
        wanted = self._own if output_names is None else list(output_names)
        return {name: values[name] for name in wanted}

    def close(self) -> None:
        self.session = None


class RangeBackend(Backend):
    """Loads each graph of `collectors` augmented (weightless, weights read by ONNX Runtime from the bundle's
    files) and the others plainly."""

    name = "onnxruntime"

    def __init__(self, collectors: Mapping[str, RangeCollector], work: Path, threads: int | None = None) -> None:
        self.collectors = dict(collectors)
        self.work = work  # where a graph whose weights are inline is written out with them beside it
        self.threads = threads
        self.plain = OnnxRuntimeBackend(threads=threads)

    def load(self, entry: GraphEntry, bundle: Bundle) -> GraphSession:
        collector = self.collectors.get(entry.name)
        if collector is None:
            return self.plain.load(entry, bundle)
        path = Path(bundle.file(entry.file))
        model = collector.augment(load_weightless(path))
        try:
            session = weightless_session(model, path.parent, self.work, self.threads)
        except Exception as failure:  # noqa: BLE001 - onnxruntime raises its own types
            raise ExportError(f"cannot calibrate graph {entry.name!r} ({path}): {failure}") from None
        return RangeSession(entry, session, collector)


def ranges_of(path: str | Path, feeds: Iterable[Mapping[str, np.ndarray]], method: str, op_types: Sequence[str]
              ) -> TensorsData:
    """The ranges of the graph at `path` over recorded `feeds` (the streaming calibration does the same call by
    call, as the clips run)."""
    path = Path(path)
    collector = RangeCollector(method, calibrated_tensors(load_weightless(path), op_types))
    with tempfile.TemporaryDirectory(prefix="mirasol-ranges-") as work:
        session = weightless_session(collector.augment(load_weightless(path)), path.parent, Path(work))
        names = collector.outputs
        for feed in feeds:
            collector.add(dict(zip(names, session.run(names, dict(feed)))))
        del session
    return collector.result()


def collectors_for(bundle: str | Path, graphs: Iterable[tuple[str, str]], method: str, op_types: Sequence[str]
                   ) -> dict[str, RangeCollector]:
    """A collector per (graph name, file) of `bundle`, for the tensors `op_types` nodes read and write."""
    return {name: RangeCollector(method, calibrated_tensors(load_weightless(Path(bundle) / file), op_types))
            for name, file in graphs}
