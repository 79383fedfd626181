"""The costs section: FLOPs and bytes per chunk and per token for every preset (the cost model of `flops.py`), and
a roofline ESTIMATE for NVIDIA Jetson Orin modules from their published peak figures, next to what this run
measured on this machine.

Published figures used (GPU only; the DLAs are not used by this toolkit):
- Jetson AGX Orin 64GB: GPU 170 sparse INT8 TOPS (2048 CUDA cores, 64 Tensor Cores, 1.3 GHz), LPDDR5 204.8 GB/s
  (NVIDIA Jetson AGX Orin Series Technical Brief v1.2);
- Jetson Orin NX 16GB: 100 TOPS of which the two DLAs give 40, so GPU 60 sparse INT8 TOPS (1024 cores, 32 Tensor
  Cores, 918 MHz), 102.4 GB/s (Jetson Orin NX Series data sheet);
- Jetson Orin Nano 8GB with JetPack 6.1+ ("Super" clocks): 67 sparse INT8 TOPS (1024 cores, 1020 MHz), 102 GB/s
  (Jetson Orin Nano Super Developer Kit data sheet, Dec 2024).
Dense INT8 is half the sparse figure and dense FP16 half of dense INT8 (Ampere Tensor Cores). The estimate is
max(FLOPs / dense peak, (weights + state) bytes / bandwidth): a floor that real kernels reach a fraction of.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mirasol.model import PRESETS
from mirasol.runtime.bundle.precisions import PRECISIONS

from .context import Run
from .flops import step_costs
from .stats import median


@dataclass(frozen=True)
class Device:
    name: str
    sparse_int8_tops: float  # the GPU's published peak
    bandwidth_gb_per_second: float
    memory_gb: float  # shared by the CPU and the GPU

    def peak(self, precision: str) -> float:
        """Dense operations per second at `precision` ("int8" or "fp16")."""
        dense_int8 = self.sparse_int8_tops * 1e12 / 2
        return dense_int8 if precision == "int8" else dense_int8 / 2


JETSONS = (Device("Jetson AGX Orin 64GB", 170, 204.8, 64), Device("Jetson Orin NX 16GB", 60, 102.4, 16),
           Device("Jetson Orin Nano 8GB (Super)", 67, 102, 8))
FIT_SHARE = 0.75  # of the module's memory for the weights (the rest: OS, app, activations, the carried state)


def estimate(cost: dict[str, int], device: Device, precision: str) -> float:
    """Seconds one step cannot beat on `device`: max(compute at dense peak, weight + state bytes at bandwidth)."""
    moved = cost["weight_bytes"] + cost["state_read_bytes"] + cost["state_written_bytes"]
    return max(cost["flops"] / device.peak(precision), moved / (device.bandwidth_gb_per_second * 1e9))


def costs(run: Run) -> dict[str, Any]:
    run.log("costs: FLOPs and bytes per step per preset, Jetson estimates")
    configs = dict(PRESETS)
    configs.setdefault(run.config.preset, run.config)  # a checkpoint's own sizes too
    presets: dict[str, Any] = {}
    for name, config in configs.items():
        per_precision = {p.name: step_costs(config, p.weight_bytes, p.state_bytes) for p in PRECISIONS.values()}
        presets[name] = {
            **per_precision,
            "jetson_estimate": {
                device.name: {p: {"chunk_ms": 1e3 * estimate(per_precision[p]["chunk"], device, p),
                                  "tokens_per_second": 1 / estimate(per_precision[p]["token"], device, p),
                                  "weights_fit": (per_precision[p]["weights_total_bytes"]
                                                  <= FIT_SHARE * device.memory_gb * 1e9)}
                              for p in ("fp16", "int8")}
                for device in JETSONS}}
    streaming = run.report["streaming"]["engines"].get(f"runtime_{run.primary}", {})
    return {"presets": presets, "this_run": run.config.preset, "past_tokens": 32,
            "measured_here": {"engine": f"runtime_{run.primary}", "chunk_ms": median(streaming),
                              "tokens_per_second": run.report["text"].get("runtime_decode_tokens_per_second")},
            "note": "Jetson: ESTIMATES from published peak figures, not measurements: the roofline floor max(FLOPs / "
                    f"dense peak, bytes / bandwidth); '(does not fit)': the weights need more than {FIT_SHARE:.0%} of "
                    f"the module's memory"}
