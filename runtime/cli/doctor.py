"""`mirasol-doctor [BUNDLE]`: what this machine has for running bundles (GPU, driver, CUDA runtime, TensorRT,
ONNX Runtime, the Jetson's JetPack), the install that fits it, and for a bundle which backends of the registry can run
it here, with for each that cannot one line saying why and the fix.

Every probe is guarded: on a machine with none of these (no driver, no cuda-python, no TensorRT, no onnxruntime) the
doctor still runs and says what is missing. It reads the driver through ctypes and imports each library only to ask
its version; it loads no graph.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from ..backends import REGISTRY
from ..tensorrt import cuda_versions as versions
from ..tensorrt.env import gpu_count, gpu_info
from .commandline import bounded, command_parser, existing_dir, run_command

NVIDIA_PROC = Path("/proc/driver/nvidia/version")


def _guarded(probe: Callable[[], Any]) -> Any:
    try:
        return probe()
    except Exception as failure:  # noqa: BLE001 - a doctor reports what it cannot read
        return f"cannot be read ({type(failure).__name__}: {' '.join(str(failure).split())[:200]})"


def _jetson() -> str:
    release = versions.jetson_release()
    if release is None:
        return "no"
    jetpack = release["jetpack"]
    said = f"{release['model'] or 'a Jetson'}, L4T {release['l4t']}"
    if jetpack is None:
        return f"{said} (a JetPack this version does not know; it supports JetPack {versions.SUPPORTED_JETPACK})"
    said += f" = JetPack {jetpack.version} (CUDA {jetpack.cuda}, TensorRT {jetpack.tensorrt})"
    if int(jetpack.tensorrt.split(".")[0]) < 10:
        said += f"; TensorRT {jetpack.tensorrt} is too old for mirasol-edge: upgrade to JetPack 6.1 or 6.2"
    return said


def _driver() -> str:
    driver = versions.driver_cuda_version()
    if driver is None:
        return "none (libcuda.so.1 cannot be loaded: install the NVIDIA driver; on a Jetson it comes with JetPack)"
    try:
        kernel = NVIDIA_PROC.read_text().split("Kernel Module")[1].split()[0]
    except (OSError, IndexError):
        kernel = ""
    return f"{kernel + ', ' if kernel else ''}supports CUDA {driver}"


def _gpus() -> list[str]:
    found = []
    for device in range(gpu_count()):
        info = gpu_info(device)
        memory = f", {int(info['memory_bytes']) / 2**30:.1f} GiB" if info.get("memory_bytes") else ""
        found.append(f"{device}: {info['name']}, compute capability {info['compute_capability']}{memory}")
    return found or ["none"]


def _install() -> str:
    if versions.jetson_release() is not None:
        return (f"{versions.JETSON_CUDA_PYTHON}, TensorRT from JetPack, onnxruntime-gpu from the Jetson AI Lab "
                f"index (docs/tensorrt-jetson.md, 'Set up Python on the Jetson')")
    driver = versions.driver_cuda_version()
    if driver is None:
        return "pip install 'mirasol-edge[cpu]' (no NVIDIA GPU here: ONNX Runtime on the CPU)"
    extra = versions.extra_for(driver)
    return (f"pip install 'mirasol-edge[onnxruntime-{extra},tensorrt-{extra}]' (driver CUDA {driver}: the "
            f"{extra} wheels)")


def _cuda_python() -> str:
    installed = [f"{name} {metadata.version(name)}" for name in ("cuda-python", "cuda-bindings")
                 if _has_distribution(name)]
    if not installed:
        return "not installed (needed by the tensorrt backend)"
    from ..tensorrt import cuda  # noqa: PLC0415

    runtime, _ = cuda.versions()
    driver = versions.driver_cuda_version()
    said = f"{', '.join(installed)}: CUDA runtime {runtime}"
    if runtime is not None and driver is not None and runtime > driver:
        jetson = versions.jetson_release() is not None
        if versions.runtime_too_new(runtime, driver, jetson):
            return f"{said}; {versions.runtime_mismatch(runtime, driver, jetson)}"
        said += f" (newer than the driver's {driver}: runs by CUDA minor version compatibility)"
    return said


def _tensorrt() -> str:
    try:
        import tensorrt  # noqa: PLC0415
    except ImportError:
        return "not installed"
    wheels = versions.tensorrt_wheels()
    source = ", ".join(f"{name} (CUDA {major})" for name, (major, _) in sorted(wheels.items())) or "not a pip wheel"
    said = f"{tensorrt.__version__} ({source})"
    driver = versions.driver_cuda_version()
    mismatch = versions.tensorrt_mismatch(str(tensorrt.__version__), driver) if driver is not None else None
    return f"{said}; {mismatch}" if mismatch else said


def _onnxruntime() -> str:
    build = versions.onnxruntime_build()
    try:
        import onnxruntime  # noqa: PLC0415
    except ImportError:
        return "not installed: pip install 'mirasol-edge[cpu]' (or [onnxruntime-cu12] / [onnxruntime-cu13] for the GPU)"
    said = f"{build['package'] or onnxruntime.__version__}"
    said += f" built for CUDA {build['cuda']}" if build["cuda"] else " (CPU build)"
    said += f"; providers: {', '.join(onnxruntime.get_available_providers())}"
    if "," in build["package"]:
        said += ("; both wheels are installed and overwrite each other's files: pip uninstall -y onnxruntime "
                 "onnxruntime-gpu, then install the one you want")
    return said


def _has_distribution(name: str) -> bool:
    try:
        metadata.version(name)
        return True
    except metadata.PackageNotFoundError:
        return False


def report(bundle_dir: Path | None, device: int) -> dict[str, Any]:
    """What the doctor says, as data: {"machine": {name: text | [text]}, "bundle": ..., "backends": {name: None |
    why not}}."""
    machine = {
        "machine": f"{platform.machine()}, {platform.system()} {platform.release()}, "
                   f"Python {platform.python_version()}",
        "Jetson": _guarded(_jetson), "NVIDIA driver": _guarded(_driver), "GPUs": _guarded(_gpus),
        "cuda-python": _guarded(_cuda_python), "TensorRT": _guarded(_tensorrt), "onnxruntime": _guarded(_onnxruntime),
        "install that fits": _guarded(_install),
    }
    result: dict[str, Any] = {"machine": machine, "bundle": None, "backends": {}}
    bundle = None
    if bundle_dir is not None:
        from ..bundle.reader import Bundle  # noqa: PLC0415

        bundle = Bundle.load(bundle_dir, verify=False)
        manifest = bundle.manifest
        target = (manifest.quantization.get("recipe") or {}).get("name")
        result["bundle"] = (f"{bundle_dir}: {manifest.precision}{f' (int8 target {target})' if target else ''}, "
                            f"{len(manifest.graphs)} graphs")
    for name, entry in REGISTRY.items():
        result["backends"][name] = _guarded(lambda entry=entry: entry.problem(bundle, device))
    return result


def format_report(result: dict[str, Any]) -> str:
    lines = []
    for name, value in result["machine"].items():
        if isinstance(value, list):
            lines.append(f"{name}:")
            lines += [f"  {item}" for item in value]
        else:
            lines.append(f"{name}: {value}")
    lines.append(f"backends{' for ' + result['bundle'] if result['bundle'] else ' (no bundle given)'}:")
    for name, problem in result["backends"].items():
        lines.append(f"  {name}: {'can run it here' if problem is None else 'cannot: ' + problem}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `mirasol-doctor`; returns the exit status."""
    parser = command_parser(
        "mirasol-doctor",
        "Say what this machine has for running bundles (GPU, NVIDIA driver, CUDA runtime of cuda-python, TensorRT, "
        "ONNX Runtime and its providers, JetPack on a Jetson), the install that fits it, and which backends can run "
        "BUNDLE here: for each that cannot, why and the fix. Loads no graph; runs without any of them.",
        epilog="Examples:\n  mirasol-doctor\n  mirasol-doctor bundles/demo --device 1\n  mirasol-doctor bundles/demo "
               "--json")
    parser.add_argument("bundle", type=existing_dir, nargs="?", help="a bundle directory (optional)")
    parser.add_argument("--device", type=bounded(int, 0, 1023), default=0, metavar="N", help="CUDA device ordinal")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    return run_command(parser, _doctor, argv)


def _doctor(args: argparse.Namespace) -> None:
    result = report(args.bundle, args.device)
    print(json.dumps(result, indent=2, default=str) if args.json else format_report(result))


if __name__ == "__main__":
    sys.exit(main())
