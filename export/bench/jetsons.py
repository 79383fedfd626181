"""The Jetson Orin modules the cost model answers for, with their published figures (GPU only; the DLAs are not
used by this toolkit):
- Jetson AGX Orin 64GB: GPU 170 sparse INT8 TOPS (2048 CUDA cores, 64 Tensor Cores, 1.3 GHz), LPDDR5 204.8 GB/s
  (NVIDIA Jetson AGX Orin Series Technical Brief v1.2);
- Jetson Orin NX 16GB: 100 TOPS of which the two DLAs give 40, so GPU 60 sparse INT8 TOPS (1024 cores, 32 Tensor
  Cores, 918 MHz), 102.4 GB/s (Jetson Orin NX Series data sheet);
- Jetson Orin Nano 8GB with JetPack 6.1+ ("Super" clocks): 67 sparse INT8 TOPS (1024 cores, 1020 MHz), 102 GB/s
  (Jetson Orin Nano Super Developer Kit data sheet, Dec 2024).
Memory is shared by the CPU and the GPU.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Device:
    name: str
    sparse_int8_tops: float  # the GPU's published peak
    bandwidth_gb_per_second: float
    memory_gb: float  # shared by the CPU and the GPU

    def peak(self, precision: str) -> float:
        """Dense operations per second at `precision` ("int8"; "fp16", and int4 weight-only, which computes in
        fp16)."""
        dense_int8 = self.sparse_int8_tops * 1e12 / 2
        return dense_int8 if precision == "int8" else dense_int8 / 2


JETSONS = (Device("Jetson AGX Orin 64GB", 170, 204.8, 64), Device("Jetson Orin NX 16GB", 60, 102.4, 16),
           Device("Jetson Orin Nano 8GB (Super)", 67, 102, 8))
