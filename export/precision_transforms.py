"""Every precision of the registry (`mirasol.runtime.bundle.precisions`) and the graph source that makes its graphs.

Adding a precision: its entry in `runtime/bundle/precisions.py`, its source here (a class with `write` and `report`,
see `graph_sources.py`), and the transform it applies.
"""
from __future__ import annotations

from collections.abc import Callable

from .graph_sources import ExportContext, Fp16Graphs, GraphSource, PrecisionOptions, TracedGraphs
from .int4 import Int4Graphs
from .int8 import Int8Graphs

TRANSFORMS: dict[str, Callable[[ExportContext, PrecisionOptions], GraphSource]] = {
    "fp32": TracedGraphs, "fp16": Fp16Graphs, "int8": Int8Graphs, "int4": Int4Graphs}
