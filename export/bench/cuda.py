"""The CUDA section: the runtime on ONNX Runtime's CUDA provider against PyTorch eager on the GPU, where there is
CUDA (else the report says so)."""
from __future__ import annotations

import copy
from typing import Any

import onnxruntime
import torch

from mirasol.runtime.pipeline import Pipeline

from .baselines import TorchStepper
from .context import Run
from .stats import Engine, interleave, median, ratio, stats_ms

NO_CUDA = "no CUDA here"


def cuda(run: Run) -> dict[str, Any]:
    """Per-chunk latency of every bundle on the CUDA provider and of PyTorch eager stepping on the GPU."""
    torch_cuda = torch.cuda.is_available()
    ort_cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    section: dict[str, Any] = {"torch_cuda": torch_cuda, "onnxruntime_cuda": ort_cuda}
    if not (torch_cuda or ort_cuda):
        section.update(available=False, note=NO_CUDA)
        return section
    section.update(available=True, device=torch.cuda.get_device_name(0) if torch_cuda else "unknown", engines={})
    run.log("cuda: GPU paths")
    pool = run.pool
    engines: dict[str, Engine] = {}
    if torch_cuda:
        try:
            stepper = TorchStepper(copy.deepcopy(run.model).to("cuda"), "cuda")
            gpu_pool = [(v.to("cuda"), a.to("cuda")) for v, a in run.torch_pool]
            for i in range(run.warmup):
                stepper.push(*gpu_pool[i % len(gpu_pool)])
            engines["pytorch_eager_step_cuda"] = Engine(lambda i: stepper.push(*gpu_pool[i % len(gpu_pool)]))
        except Exception as failure:  # noqa: BLE001 - reported; the other engines still run
            section["engines"]["pytorch_eager_step_cuda"] = {"status": "failed", "reason": str(failure)[:500]}
    if ort_cuda:
        for precision, path in run.paths.items():
            name = f"runtime_{precision}_ort_cuda"
            try:
                stream = Pipeline.load(path, providers=["CUDAExecutionProvider", "CPUExecutionProvider"]).stream()
                for i in range(run.warmup):
                    stream.push(*pool[i % len(pool)])
                engines[name] = Engine((lambda s: lambda i: s.push(*pool[i % len(pool)]))(stream))
            except Exception as failure:  # noqa: BLE001 - reported; the other engines still run
                section["engines"][name] = {"status": "failed", "reason": str(failure)[:500]}
    times = interleave(engines, run.rounds, run.block)
    for name, samples in times.items():
        section["engines"][name] = {"status": "ok", **stats_ms(samples)}
    base = median(section["engines"].get("pytorch_eager_step_cuda"))
    section["speedup_vs_pytorch_eager_cuda"] = {
        name: ratio(base, median(entry)) for name, entry in section["engines"].items()
        if name != "pytorch_eager_step_cuda" and median(entry) is not None}
    return section
