"""The installed TensorRT and the GPU, as the engine builder and the TensorRT backend both see them.

- `import_tensorrt`: `import tensorrt` (10 or newer) with a message that says what to install;
- `has_precision_flags`: TensorRT 10 has BuilderFlag.FP16/INT8, TensorRT 11 has none (always strongly typed);
- `use_device`: make a GPU current for this thread (TensorRT builds on the current device);
- `trt_logger`: one trt.Logger per verbosity for the process;
- `gpu_info`, `gpu_count`: the GPUs' names, compute capabilities and memory, through the CUDA driver API with
  ctypes (no cuda-python);
- `engine_mismatch` / `rebuild_command`: whether an engine record fits this machine, and the command that
  rebuilds the engines of a bundle.
"""
from __future__ import annotations

import ctypes
import os
import shlex
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import BackendError

BUILD_COMMAND = "mirasol-build-engines"
SMALL_DEVICE_BYTES = 12 << 30  # below this much device memory (8 GB Jetsons), the backend runs one context per graph

_logger_lock = threading.Lock()
_loggers: dict[bool, Any] = {}
_CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75  # cuda.h CUdevice_attribute
_CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR = 76
_gpu_cache: dict[int, dict[str, str]] = {}


def import_tensorrt() -> Any:
    """`import tensorrt`, with a message that says what to install; requires TensorRT 10 or newer."""
    try:
        import tensorrt as trt  # noqa: PLC0415
    except ImportError as missing:
        raise BackendError(
            f"TensorRT is not installed ({missing}). On Jetson it ships with JetPack (python3-libnvinfer); make the "
            f"virtual environment with --system-site-packages. Elsewhere, by the CUDA version nvidia-smi shows: pip "
            f"install 'mirasol-edge[tensorrt-cu12]' (CUDA 12.x) or 'mirasol-edge[tensorrt-cu13]' (CUDA 13.x)"
        ) from None
    major = int(str(trt.__version__).split(".")[0])
    if major < 10:
        raise BackendError(f"TensorRT {trt.__version__} is too old: mirasol-edge uses the TensorRT 10 API "
                           f"(JetPack 6.1 or newer ships TensorRT 10.3)")
    return trt


def has_precision_flags(trt: Any) -> bool:
    """Whether this TensorRT has the weak-typing precision flags (TensorRT 10: yes; 11: no, always strongly typed)."""
    return hasattr(trt.BuilderFlag, "FP16") and hasattr(trt.BuilderFlag, "INT8")


def use_device(device: int) -> None:
    """Make CUDA device `device` current for this thread, as trtexec does before building: TensorRT builds and
    deserializes on the current device. Through cuda-python where installed, else through the driver API with ctypes
    (the device's primary context made current, which is what cudaSetDevice does)."""
    from . import cuda  # noqa: PLC0415

    try:
        cuda.cudart()
    except BackendError:
        lib, handle, context = _driver_library(), ctypes.c_int(), ctypes.c_void_p()
        steps = (("cuInit", lambda: lib.cuInit(0)),
                 (f"cuDeviceGet({device})", lambda: lib.cuDeviceGet(ctypes.byref(handle), int(device))),
                 ("cuDevicePrimaryCtxRetain", lambda: lib.cuDevicePrimaryCtxRetain(ctypes.byref(context), handle)),
                 ("cuCtxSetCurrent", lambda: lib.cuCtxSetCurrent(context)))
        for what, call in steps:
            code = call()
            if code != 0:
                raise BackendError(f"CUDA driver call {what} failed with CUresult {code} (device {device})") from None
        return
    cuda.set_device(device)


def trt_logger(verbose: bool = False) -> Any:
    """One trt.Logger per verbosity for the process (builders and runtimes share it; it outlives them)."""
    trt = import_tensorrt()
    with _logger_lock:
        if verbose not in _loggers:
            _loggers[verbose] = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
        return _loggers[verbose]


def gpu_info(device: int = 0) -> dict[str, str]:
    """{"name", "compute_capability", "memory_bytes"} of a CUDA device (ordinal as the CUDA runtime counts,
    CUDA_VISIBLE_DEVICES applied), read with the driver API (cuInit, cuDeviceGet, cuDeviceGetName,
    cuDeviceGetAttribute, cuDeviceTotalMem_v2)."""
    if device in _gpu_cache:
        return dict(_gpu_cache[device])
    lib = _driver_library()

    def call(result: int, what: str) -> None:
        if result != 0:
            raise BackendError(f"CUDA driver call {what} failed with CUresult {result}")

    call(lib.cuInit(0), "cuInit")
    handle = ctypes.c_int()
    call(lib.cuDeviceGet(ctypes.byref(handle), int(device)), f"cuDeviceGet({device})")
    name = ctypes.create_string_buffer(256)
    call(lib.cuDeviceGetName(name, ctypes.c_int(256), handle), "cuDeviceGetName")
    major, minor = ctypes.c_int(), ctypes.c_int()
    call(lib.cuDeviceGetAttribute(ctypes.byref(major), _CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, handle),
         "cuDeviceGetAttribute(major)")
    call(lib.cuDeviceGetAttribute(ctypes.byref(minor), _CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, handle),
         "cuDeviceGetAttribute(minor)")
    memory = ctypes.c_size_t()
    total = f"{memory.value}" if lib.cuDeviceTotalMem_v2(ctypes.byref(memory), handle) == 0 else ""
    info = {"name": name.value.decode("utf-8", errors="replace").strip(),
            "compute_capability": f"{major.value}.{minor.value}", "memory_bytes": total}
    _gpu_cache[device] = info
    return dict(info)


def gpu_count() -> int:
    """How many CUDA devices the driver shows (CUDA_VISIBLE_DEVICES applied); 0 without a driver or a GPU."""
    try:
        lib = _driver_library()
    except BackendError:
        return 0
    count = ctypes.c_int()
    if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return int(count.value)


def _driver_library() -> Any:
    for candidate in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            return ctypes.CDLL(candidate)
        except OSError:
            continue
    raise BackendError("the CUDA driver library (libcuda.so.1) cannot be loaded: no NVIDIA driver on this machine")


def engine_mismatch(record: Mapping[str, Any], gpu: Mapping[str, str], trt_version: str) -> str | None:
    """Why an engine record does not fit this machine (None when it fits): TensorRT version, GPU, compute capability.

    TensorRT engines are specific to the TensorRT version and the GPU they were built on (the default hardware
    compatibility level), so any difference means rebuilding.
    """
    problems = []
    if str(record.get("tensorrt")) != trt_version:
        problems.append(f"it was built with TensorRT {record.get('tensorrt')}, this is TensorRT {trt_version}")
    if str(record.get("compute_capability")) != gpu.get("compute_capability"):
        problems.append(f"it was built for compute capability {record.get('compute_capability')}, "
                        f"this GPU has {gpu.get('compute_capability')}")
    if str(record.get("gpu")) != gpu.get("name"):
        problems.append(f"it was built on GPU {record.get('gpu')!r}, this GPU is {gpu.get('name')!r}")
    return "; ".join(problems) or None


def rebuild_command(bundle_dir: str | os.PathLike[str], precision: str | None = None,
                    args: Sequence[str] | None = None) -> str:
    """The exact shell command that (re)builds the engines of a bundle on this machine.

    `args`: the options an engine was built with (its record's "build_args"); else just `--precision`.
    """
    if args is None:
        args = ["--precision", precision] if precision else []
    return " ".join([BUILD_COMMAND, shlex.quote(str(bundle_dir)), *(shlex.quote(str(a)) for a in args)])
