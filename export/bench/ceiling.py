"""The ceiling section (a roofline): a step cannot beat max(FLOPs / GEMM rate, weight bytes / memory bandwidth)
on this machine; how close each engine and the text decoder come."""
from __future__ import annotations

from typing import Any

import numpy as np

from .children import run_child
from .context import Run
from .flops import chunk_step_flops, step_weight_bytes
from .stats import median, ratio

BLAS_THREADS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def ceiling(run: Run) -> dict[str, Any]:
    """FLOPs and weight bytes per step against the GEMM rate and GEMV bandwidth measured in a child process."""
    run.log("ceiling: FLOPs and weight bytes per step vs measured GEMM rate and memory bandwidth")
    flops = chunk_step_flops(run.config)
    n = 512 if run.quick else 1024
    section: dict[str, Any] = {"flops_per_chunk": flops, "gemm_size": n, "gemm_threads": run.threads}
    rates: dict[tuple[int, str], tuple[float, float]] = {}  # (threads, library) -> (GEMM FLOP/s, GEMV bytes/s)
    for count in sorted({run.threads, 1}, reverse=True):  # a busy machine can be faster on one thread
        try:
            measured = run_child("child_gemm", [str(n), "5" if run.quick else "15", "2048" if run.quick else "4096",
                                                str(count)], env={name: str(count) for name in BLAS_THREADS})
        except Exception as failure:  # noqa: BLE001 - reported; the other sections stand
            section.update(status="failed", reason=str(failure)[:500])
            return section
        for library, seconds in measured["seconds"].items():
            rates[count, library] = (2 * n ** 3 / float(np.median(seconds)),
                                     measured["gemv_bytes"] / float(np.median(measured["gemv_seconds"][library])))
    best = max(rates, key=lambda key: rates[key][0])
    rate, bandwidth = rates[best][0], max(r[1] for r in rates.values())
    section.update(status="ok", gemm_flops_per_second=rate, gemv_bytes_per_second=bandwidth,
                   gemm_threads=best[0], gemm_library=best[1], gemv_matrix_mb=measured["gemv_bytes"] / 2 ** 20,
                   gemm_by_threads={f"{k[0]} {k[1]}": {"flops_per_second": v[0], "gemv_bytes_per_second": v[1]}
                                    for k, v in rates.items()})
    weight_bytes = {p: step_weight_bytes(path) for p, path in run.paths.items()}
    section["weight_bytes"] = weight_bytes
    section["engines"] = {}
    for name, entry in run.report["streaming"]["engines"].items():
        ms = median(entry)
        if not ms or name == "pytorch_naive_rerun":
            continue
        precision = next((p for p in run.paths if name.startswith(f"runtime_{p}")), "fp32")
        weights = weight_bytes.get(precision, weight_bytes.get(run.primary, {})).get("push")
        floor = max(flops["total"] / rate, (weights or 0) / bandwidth)
        achieved = flops["total"] / (ms / 1e3)
        integer = precision == "int8"  # integer kernels: the fp32 GEMM rate is not their ceiling
        section["engines"][name] = {"flops_per_second": achieved,
                                    "fraction_of_gemm": None if integer else achieved / rate,
                                    "floor_ms": None if integer else floor * 1e3,
                                    "fraction_of_floor": None if integer else floor / (ms / 1e3)}
    section["fraction_of_gemm"] = section["engines"].get(f"runtime_{run.primary}", {}).get("fraction_of_gemm")
    decode = run.report["text"].get("runtime_decode_tokens_per_second")
    token_bytes = weight_bytes[run.primary]["token"]
    section["decode"] = {
        "engine": f"runtime_{run.primary}", "weight_bytes_per_token": token_bytes,
        "bandwidth_bound_tokens_per_second": bandwidth / token_bytes,
        "runtime_decode_tokens_per_second": decode,
        "fraction_of_bound": ratio(decode, bandwidth / token_bytes)}
    return section
