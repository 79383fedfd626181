"""Whether this machine's ONNX Runtime can run a backend, without loading a bundle: the installed wheel (CPU or GPU,
and for which CUDA major), the driver, and whether the execution provider really loads (ONNX Runtime falls back to
the CPU with only a log line when the CUDA or TensorRT libraries are missing).

Imports onnxruntime only when called, so that `mirasol-doctor` runs (and says what is missing) without it. The
registry (`__init__.py`) names `check_cpu`, `check_cuda` and `check_tensorrt` as the checks of its ONNX Runtime
backends: each returns None when the backend can run the bundle here, else one line saying why and the fix.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import BackendError
from ..tensorrt.cuda_versions import driver_cuda_version, extra_for, jetson_release, onnxruntime_build
from ..tensorrt.plan import int8_problem

if TYPE_CHECKING:
    from ..bundle.reader import Bundle

EXECUTIONS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
JETSON_ONNXRUNTIME = ("pip install onnxruntime-gpu==1.23.0 --extra-index-url https://pypi.jetson-ai-lab.io/jp6/cu126 "
                      "(after pip uninstall -y onnxruntime)")


def gpu_wheel_fix() -> str:
    """The install that gives this machine an ONNX Runtime for its GPU."""
    if jetson_release() is not None:
        return JETSON_ONNXRUNTIME
    driver = driver_cuda_version()
    return (f"pip uninstall -y onnxruntime onnxruntime-gpu && pip install "
            f"'mirasol-edge[onnxruntime-{extra_for(driver)}]'")


def check_install(execution: str) -> None:
    """Raise a BackendError naming the fix when the installed onnxruntime cannot run `execution` here: not
    installed, the CPU wheel where a GPU provider is asked for, a wheel built for a newer CUDA than the driver's."""
    try:
        import onnxruntime as ort  # noqa: PLC0415
    except ImportError:
        fix = "pip install 'mirasol-edge[cpu]'" if execution == "cpu" else gpu_wheel_fix()
        raise BackendError(f"onnxruntime is not installed: {fix}") from None
    provider = EXECUTIONS[execution]
    available = ort.get_available_providers()
    if provider not in available:
        build = onnxruntime_build()
        raise BackendError(f"this onnxruntime ({build['package'] or ort.__version__}) has no {provider} (it has "
                           f"{', '.join(available)}): {gpu_wheel_fix()}")
    if execution == "cpu":
        return
    driver = driver_cuda_version()
    if driver is None:
        raise BackendError("no NVIDIA driver: libcuda.so.1 cannot be loaded (on a Jetson it comes with JetPack)")
    built = onnxruntime_build()["cuda"]
    if built and int(built.split(".")[0]) > driver.major:
        raise BackendError(f"onnxruntime-gpu {ort.__version__} is built for CUDA {built}, but the driver supports CUDA "
                           f"{driver}: {gpu_wheel_fix()}")


def preload_libraries(execution: str) -> None:
    """Load the CUDA/cuDNN libraries of the nvidia-* wheels (onnxruntime >= 1.21: `preload_dlls`), and for the
    TensorRT provider the TensorRT libraries of the tensorrt wheels (`import tensorrt` loads them), so that ONNX
    Runtime finds them without LD_LIBRARY_PATH."""
    import onnxruntime as ort  # noqa: PLC0415

    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        preload()
    if execution == "tensorrt":
        try:
            import tensorrt  # noqa: F401, PLC0415
        except ImportError:  # JetPack's or a system install: found by the loader, or reported by check_loaded
            pass


def _provider_loads(execution: str, device: int) -> str | None:
    """Why the provider does not really load here (a one-operator session is made with it), or None."""
    import numpy as np  # noqa: PLC0415
    import onnxruntime as ort  # noqa: PLC0415

    from . import onnx_ops  # noqa: PLC0415

    preload_libraries(execution)
    provider = EXECUTIONS[execution]
    options: dict[str, Any] = {"device_id": device}
    try:
        session = ort.InferenceSession(onnx_ops.concat_model(np.dtype(np.float32), 1, 0, 2),
                                       providers=[(provider, options)])
    except Exception as failure:  # noqa: BLE001 - any refusal is the answer
        return f"{provider} cannot make a session: {' '.join(str(failure).split())[:300]}"
    loaded = session.get_providers()
    if not loaded or loaded[0] != provider:
        return (f"onnxruntime does not load {provider} (a session falls back to {loaded}): its CUDA"
                f"{'/TensorRT' if execution == 'tensorrt' else ''} libraries were not found (see the log above)")
    return None


def _check(execution: str, bundle: Bundle | None, device: int) -> str | None:
    if execution == "tensorrt" and bundle is not None:  # said first: no install makes TensorRT build it
        problem = int8_problem(bundle.manifest, bundle.path)
        if problem:
            return problem
    try:
        check_install(execution)
    except BackendError as problem:
        return str(problem)
    if execution != "cpu":
        return _provider_loads(execution, device)
    return None


def check_cpu(bundle: Bundle | None, device: int = 0) -> str | None:
    """Whether the `onnxruntime` backend (CPU provider) runs here."""
    return _check("cpu", bundle, device)


def check_cuda(bundle: Bundle | None, device: int = 0) -> str | None:
    """Whether the `onnxruntime-cuda` backend runs here."""
    return _check("cuda", bundle, device)


def check_tensorrt(bundle: Bundle | None, device: int = 0) -> str | None:
    """Whether the `onnxruntime-tensorrt` backend runs the bundle here."""
    return _check("tensorrt", bundle, device)
