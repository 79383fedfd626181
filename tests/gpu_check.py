"""A GPU check to run by hand on a machine with PyTorch and CUDA (no TensorRT, no package index needed), in under
8 minutes:

    python tests/gpu_check.py [--wheels DIR] [--bundle DIR] [--json OUT] [--presets small,base]

1. PyTorch eager on CUDA, fp32 and fp16 (autocast): the median time per chunk (combiner + AV autoregressor step
   with the carried state, at a full KV window) and per generated token (text decoder step with its cache), at
   `small` and `base`, with the 10th/90th percentiles; fp32 and fp16 alternate call by call (a noisy GPU affects
   both alike).
2. The project's GPU code that runs there: the CUDA side of the `tensorrt` backend through cuda-python
   (`--wheels DIR`: a folder of cuda-bindings / cuda-pathfinder wheels, unpacked and imported, for a machine without
   a package index): runtime and driver versions and the availability check, device arrays made, sliced, joined and
   read back (stream-ordered pool, pinned buffers) against numpy; `mirasol-doctor`'s report; and with onnxruntime-gpu
   installed and `--bundle DIR`, the `onnxruntime-cuda` backend against ONNX Runtime on the CPU, with the bytes copied
   per chunk.

Without CUDA it says so and exits 0 (it is dry-run in CI: tests/test_gpu_check.py). It imports this checkout as
`mirasol`, whether installed or not.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def import_checkout(scratch: Path, wheels: Path | None) -> None:
    """Make `import mirasol` this checkout and the carried wheels importable (extension modules cannot be imported
    from a zip: the wheels are unpacked)."""
    (scratch / "mirasol").symlink_to(ROOT)
    sys.path.insert(0, str(scratch))
    for wheel in sorted(wheels.glob("*.whl")) if wheels else ():
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(scratch / "wheels")
    if wheels:
        sys.path.insert(0, str(scratch / "wheels"))


def percentiles(samples: list[float]) -> dict[str, float]:
    import numpy as np  # noqa: PLC0415

    ms = np.array(samples) * 1e3
    return {"median_ms": round(float(np.median(ms)), 3), "p10_ms": round(float(np.percentile(ms, 10)), 3),
            "p90_ms": round(float(np.percentile(ms, 90)), 3), "n": len(samples)}


def torch_eager(preset: str, rounds: int, device: str = "cuda") -> dict[str, Any]:
    """Per chunk and per token, fp32 and fp16 (autocast: PyTorch's eager mixed precision), PyTorch eager on `device`
    (cuda:0; CI dry-runs it on the CPU)."""
    import contextlib  # noqa: PLC0415

    import torch  # noqa: PLC0415

    from mirasol.export.bench.baselines import TorchStepper  # noqa: PLC0415
    from mirasol.model import build_model  # noqa: PLC0415

    model = build_model(preset, seed=0).to(device)
    c = model.config
    modes = {"fp32": contextlib.nullcontext, "fp16": lambda: torch.autocast(device, dtype=torch.float16)}
    video = torch.rand(c.frames_per_chunk, 3, c.image_size, c.image_size, device=device)
    audio = torch.randn(c.n_mels, c.audio_frames_per_chunk, device=device)
    steppers = {name: TorchStepper(model, device) for name in modes}
    chunk: dict[str, list[float]] = {name: [] for name in modes}
    tokens: dict[str, list[float]] = {name: [] for name in modes}
    for name, mode in modes.items():
        with mode():
            for _ in range(c.av_window_chunks + 1):  # a full window before timing
                steppers[name].push(video, audio)
    for _ in range(rounds):  # fp32 and fp16 alternate call by call
        for name, mode in modes.items():
            with mode():
                start = time.perf_counter()
                steppers[name].push(video, audio)  # synchronizes
                chunk[name].append(time.perf_counter() - start)
    for name, mode in modes.items():
        with torch.inference_mode(), mode():
            cross = model.text_cross_kv(steppers[name].av_memory())
            past = model.text_decoder.empty_cache(1, torch.device(device))
            ids = torch.zeros(1, 1, dtype=torch.long, device=device)
            for position in range(min(rounds, c.max_text_len - 1)):
                start = time.perf_counter()
                logits, past = model.text_step(ids, torch.tensor([position], device=device), cross, past)
                ids = logits[:, -1:].argmax(-1)
                if device == "cuda":
                    torch.cuda.synchronize()
                tokens[name].append(time.perf_counter() - start)
    return {name: {"per_chunk": percentiles(chunk[name][1:]), "per_token": percentiles(tokens[name][1:])}
            for name in modes}


def cuda_side() -> dict[str, Any]:
    """The tensorrt backend's CUDA code on this GPU: versions, the availability check, device arrays vs numpy."""
    import numpy as np  # noqa: PLC0415

    from mirasol.runtime.tensorrt import cuda  # noqa: PLC0415

    cuda.cudart()
    runtime, driver = cuda.versions()
    result: dict[str, Any] = {"runtime": str(runtime), "driver": str(driver), "problem": cuda.availability_problem()}
    rng = np.random.default_rng(0)
    cache = rng.standard_normal((1, 4, 37, 64)).astype(np.float16)
    step = rng.standard_normal((1, 4, 3, 64)).astype(np.float16)
    on_device = cuda.DeviceArray.from_numpy(cache)
    joined = cuda.DeviceArray.concatenate([on_device, cuda.DeviceArray.from_numpy(step)], axis=2)
    window = joined.slice(2, -32)
    ok = (np.array_equal(joined.numpy(), np.concatenate([cache, step], axis=2))
          and np.array_equal(window.numpy(), np.concatenate([cache, step], axis=2)[:, :, -32:]))
    timings = []
    for _ in range(200):
        start = time.perf_counter()
        window = cuda.DeviceArray.concatenate([window, cuda.DeviceArray.from_numpy(step)], axis=2).slice(2, -32)
        timings.append(time.perf_counter() - start)
    result.update(device_arrays_equal_numpy=bool(ok), append_and_window=percentiles(timings),
                  memory_pools=cuda._mempool_supported(0), transfers=cuda.TRANSFERS.snapshot())
    return result


def onnxruntime_cuda(bundle: Path) -> dict[str, Any]:
    """The onnxruntime-cuda backend against ONNX Runtime on the CPU, on a carried bundle."""
    import numpy as np  # noqa: PLC0415

    from mirasol.runtime.backends.onnxruntime_device import OnnxRuntimeDeviceBackend  # noqa: PLC0415
    from mirasol.runtime.pipeline import Pipeline  # noqa: PLC0415

    backend = OnnxRuntimeDeviceBackend("cuda")
    with Pipeline.load(bundle) as cpu, Pipeline.load(bundle, backend=backend) as gpu:
        rng = np.random.default_rng(0)
        want, got, errors, moved, times = cpu.stream(), gpu.stream(), [], [], []
        for _ in range(gpu.config["av_window_chunks"] + 3):
            video = rng.random(gpu.chunk_inputs["video"].shape[1:], dtype=np.float32)
            audio = rng.standard_normal(gpu.chunk_inputs["audio"].shape[1:]).astype(np.float32)
            before = backend.transfers.snapshot()
            start = time.perf_counter()
            context = got.push(video, audio)
            times.append(time.perf_counter() - start)
            moved.append({k: backend.transfers.snapshot()[k] - before[k] for k in before})
            errors.append(float(np.abs(context - want.push(video, audio)).max()))
        return {"max_abs_error_vs_cpu": max(errors), "bytes_per_chunk": moved[-1], "per_chunk": percentiles(times[2:])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheels", type=Path, help="a folder of wheels to import (cuda-bindings, cuda-pathfinder)")
    parser.add_argument("--bundle", type=Path, help="a bundle to run on onnxruntime-cuda (with onnxruntime-gpu)")
    parser.add_argument("--presets", default="small,base")
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mirasol-gpu-check-") as scratch:
        import_checkout(Path(scratch), args.wheels)
        results = run(args)
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        import torch  # noqa: PLC0415
    except ImportError as missing:
        return {**results, "skipped": f"no PyTorch ({missing})"}
    if not torch.cuda.is_available():
        return {**results, "skipped": "no CUDA GPU here (torch.cuda.is_available() is False)",
                "torch": torch.__version__}
    results.update(gpu=torch.cuda.get_device_name(0), torch=torch.__version__, torch_cuda=torch.version.cuda,
                   eager={})
    for preset in args.presets.split(","):
        results["eager"][preset] = guarded(lambda preset=preset: torch_eager(preset, args.rounds))
    results["cuda_python"] = guarded(cuda_side)
    from mirasol.runtime.cli.doctor import report  # noqa: PLC0415

    results["doctor"] = guarded(lambda: report(None, 0))
    if args.bundle:
        results["onnxruntime_cuda"] = guarded(lambda: onnxruntime_cuda(args.bundle))
    return results


def guarded(probe: Any) -> Any:
    try:
        return probe()
    except Exception as failure:  # noqa: BLE001 - each part reports its own failure; the others still run
        return {"failed": f"{type(failure).__name__}: {' '.join(str(failure).split())[:500]}"}


if __name__ == "__main__":
    sys.exit(main())
