"""The costs section: FLOPs and bytes per chunk and per token for every preset (the cost model of `flops.py`), and
a roofline ESTIMATE for NVIDIA Jetson Orin modules from their published peak figures (`jetsons.py`), next to what
this run measured on this machine.

Dense INT8 is half the sparse figure and dense FP16 half of dense INT8 (Ampere Tensor Cores); int4 weights are
weight-only (dequantized into fp16 GEMMs), so int4 computes at the FP16 peak and reads its weight bytes. The estimate
is max(FLOPs / dense peak, (weights + state) bytes / bandwidth): a floor that real kernels reach a fraction of.
What fits in each module's memory, and how many streams, is `fit.py`'s budget ("jetson_fit").
"""
from __future__ import annotations

from typing import Any

from mirasol.model import PRESETS
from mirasol.runtime.bundle.precisions import PRECISIONS

from .context import Run
from .fit import fit_table
from .flops import step_costs
from .jetsons import JETSONS, Device
from .stats import median


def estimate(cost: dict[str, int], device: Device, precision: str) -> float:
    """Seconds one step cannot beat on `device`: max(compute at dense peak, weight + state bytes at bandwidth)."""
    moved = cost["weight_bytes"] + cost["state_read_bytes"] + cost["state_written_bytes"]
    return max(cost["flops"] / device.peak(precision), moved / (device.bandwidth_gb_per_second * 1e9))


def costs(run: Run) -> dict[str, Any]:
    run.log("costs: FLOPs and bytes per step per preset, Jetson estimates and memory budgets")
    configs = dict(PRESETS)
    configs.setdefault(run.config.preset, run.config)  # a checkpoint's own sizes too
    jetson_fit = fit_table(configs, {device.name: device.memory_gb * 1e9 for device in JETSONS})
    presets: dict[str, Any] = {}
    for name, config in configs.items():
        per_precision = {p.name: step_costs(config, p.weight_bytes, p.state_bytes) for p in PRECISIONS.values()}
        kv_int8 = {p: step_costs(config, PRECISIONS[p].weight_bytes, PRECISIONS[p].state_bytes, kv_bytes=1)
                   for p in ("int8", "int4")}  # with the AV KV cache in int8 (mirasol-export --kv-cache int8)
        presets[name] = {
            **per_precision, "kv_int8": kv_int8,
            "jetson_estimate": {
                device.name: {p: {"chunk_ms": 1e3 * estimate(per_precision[p]["chunk"], device, p),
                                  "tokens_per_second": 1 / estimate(per_precision[p]["token"], device, p),
                                  "weights_fit": jetson_fit[name][device.name][f"{p}+kv-fp16"]["fits"]}
                              for p in ("fp16", "int8", "int4")}
                for device in JETSONS}}
    streaming = run.report["streaming"]["engines"].get(f"runtime_{run.primary}", {})
    return {"presets": presets, "this_run": run.config.preset, "past_tokens": 32, "jetson_fit": jetson_fit,
            "measured_here": {"engine": f"runtime_{run.primary}", "chunk_ms": median(streaming),
                              "tokens_per_second": run.report["text"].get("runtime_decode_tokens_per_second")},
            "note": "Jetson: ESTIMATES from published peak figures, not measurements: the roofline floor max(FLOPs / "
                    "dense peak, bytes / bandwidth); '(does not fit)': weights, one step's activations, one stream's "
                    "state and the runtime's reserve need more than the module's memory (the memory budget below)"}
