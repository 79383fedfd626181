"""Child: this machine's fp32 GEMM rate and memory bandwidth (GEMV over a matrix larger than the caches), with
numpy's BLAS and with ONNX Runtime's own MatMul kernels (what the runtime's graphs run on); the ceiling takes the
faster, so an engine is never compared with a slow library's rate.

    python -m mirasol.export.bench.child_gemm N REPEATS BIG THREADS    # N x N GEMM, BIG x BIG GEMV
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


def matmuls_session(matrices: list[np.ndarray], rows: int, threads: int) -> Callable[[], object]:
    """A call running x [rows, K] @ W for every W of `matrices` in one ONNX Runtime session (the W as initializers,
    as in the exported graphs; one seeded x per distinct K), with the session options of the runtime's graphs."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from mirasol.runtime.backends.onnxruntime import OnnxRuntimeBackend

    sizes = sorted({w.shape[0] for w in matrices})
    graph = helper.make_graph(
        [helper.make_node("MatMul", [f"x{w.shape[0]}", f"w{i}"], [f"y{i}"]) for i, w in enumerate(matrices)],
        "matmuls", [helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, [rows, k]) for k in sizes],
        [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [rows, w.shape[1]]) for i, w in enumerate(matrices)],
        [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(matrices)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    options = OnnxRuntimeBackend(threads=threads).options  # the session options the runtime's graphs get
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {f"x{k}": rng.standard_normal((rows, k), dtype=np.float32) for k in sizes}
    return lambda: session.run(None, feeds)


def main(n: int, repeats: int, big: int, threads: int) -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    gemm = {"numpy": seconds_per_call(lambda: a @ b, repeats)}
    gemm["onnxruntime"] = seconds_per_call(matmuls_session([b], n, threads), repeats)
    # memory bandwidth as a batch-1 layer sees it: matrix-vector products over a matrix larger than the caches
    w = rng.standard_normal((big, big), dtype=np.float32)
    x = rng.standard_normal((1, big), dtype=np.float32)
    gemv = {"numpy": seconds_per_call(lambda: x @ w, repeats)}
    gemv["onnxruntime"] = seconds_per_call(matmuls_session([w], 1, threads), repeats)
    print(json.dumps({"n": n, "seconds": gemm, "gemv_bytes": w.nbytes, "gemv_seconds": gemv}))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
