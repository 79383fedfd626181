"""The machine a run measured: CPU model, CPU count and the vector extensions the kernels can use (lscpu's flags)."""
from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

# the flags that decide which fp32 / int8 / bf16 kernels ONNX Runtime and PyTorch pick, in the order shown
VECTOR_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512dq", "avx512bw", "avx512vl", "avx512_vnni",
                "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8",
                "asimd", "asimddp", "sve", "sve2", "i8mm", "bf16")


def cpu_info(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, Any]:
    """{"model": ..., "cpus": ..., "vector_extensions": [...]} from /proc/cpuinfo (what lscpu reads); the
    platform's processor name where there is no /proc/cpuinfo."""
    fields: dict[str, str] = {}
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip().lower(), value.strip())  # the first CPU's
    except OSError:
        pass
    model = fields.get("model name") or fields.get("hardware") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:  # x86: "model name" may be as short as "AMD EPYC"
        model += f" (family {fields['cpu family']}, model {fields['model']})"
    flags = set((fields.get("flags") or fields.get("features") or "").split())
    return {"model": model, "cpus": os.cpu_count(), "vector_extensions": [f for f in VECTOR_FLAGS if f in flags]}


def describe(cpu: dict[str, Any]) -> str:
    """'AMD EPYC 9R14 (2 CPUs; avx2 fma avx512f ...)': how the report names the machine."""
    extensions = " ".join(cpu.get("vector_extensions") or []) or "none reported"
    return f"{cpu.get('model')} ({cpu.get('cpus')} CPUs; vector extensions: {extensions})"
