"""Child: this machine's fp32 GEMM rate and memory bandwidth (GEMV over a matrix larger than the caches), numpy.

    python -m mirasol.export.bench.child_gemm N REPEATS BIG    # N x N GEMM, BIG x BIG GEMV
"""
from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable

import numpy as np


def seconds_per_call(fn: Callable[[], object], repeats: int) -> list[float]:
    """One untimed call, then `repeats` timed ones."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def main(n: int, repeats: int, big: int) -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    gemm = seconds_per_call(lambda: a @ b, repeats)
    # memory bandwidth as a batch-1 layer sees it: matrix-vector products over a matrix larger than the caches
    w = rng.standard_normal((big, big), dtype=np.float32)
    x = rng.standard_normal(big, dtype=np.float32)
    gemv = seconds_per_call(lambda: w @ x, repeats)
    print(json.dumps({"n": n, "seconds": gemm, "gemv_bytes": w.nbytes, "gemv_seconds": gemv}))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
