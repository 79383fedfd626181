"""Every precision of the registry (`mirasol.runtime.precision`) and the graph source that makes its graphs.

Adding a precision: its entry in `runtime/precision.py`, its source here (a class with `write` and `report`,
see `sources.py`), and the transform it applies.
"""
from __future__ import annotations

from collections.abc import Callable

from .int8 import Int8Graphs
from .sources import ExportContext, Fp16Graphs, GraphSource, PrecisionOptions, TracedGraphs

TRANSFORMS: dict[str, Callable[[ExportContext, PrecisionOptions], GraphSource]] = {
    "fp32": TracedGraphs, "fp16": Fp16Graphs, "int8": Int8Graphs}
