"""Which CUDA this machine runs, and the install that fits it: the driver's CUDA version, cuda-python's runtime,
the CUDA major TensorRT and ONNX Runtime were built for, and the Jetson release.

The rules (docs/tensorrt-jetson.md says them to people; tests/test_install_pins.py checks the docs' and
pyproject.toml's pins against the tables here):
- a CUDA runtime newer than the driver fails (`cudaErrorInsufficientDriver`) when their majors differ, and on a
  Jetson also when only the minor differs: minor version compatibility is for discrete GPUs; a Jetson needs its
  JetPack's runtime (or the cuda-compat forward-compatibility package). So JetPack 6.1/6.2 (CUDA 12.6) pins
  `cuda-python==12.6.2.post1` (there is no cuda-bindings 12.6.x; `cuda-python>=12.6,<13` resolves to 12.9);
- on x86, the CUDA major of the wheels picks the extra: driver CUDA 12.x (r525+, TensorRT's wheels ask r535+)
  -> `-cu12`, CUDA 13.x (r580+) -> `-cu13`.

Everything here reads files and the driver through ctypes; nothing needs cuda-python, TensorRT or a GPU.
"""
from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any


@dataclass(frozen=True, order=True)
class CudaVersion:
    major: int
    minor: int

    @classmethod
    def from_int(cls, value: int) -> "CudaVersion":
        """From the CUDA API's integer form: 12060 -> 12.6."""
        return cls(int(value) // 1000, (int(value) % 1000) // 10)

    @classmethod
    def parse(cls, text: str) -> "CudaVersion":
        major, minor, *_ = (str(text).split(".") + ["0"])
        return cls(int(major), int(minor))

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}"


@dataclass(frozen=True)
class JetPack:
    version: str
    cuda: CudaVersion
    tensorrt: str


# JetPack releases by L4T (jetson_stats' NVIDIA_JETPACK table; JetPack 6.1 and 6.2 = CUDA 12.6, TensorRT 10.3)
_JP6 = (CudaVersion(12, 6), "10.3")
JETPACKS = {
    "36.2": JetPack("6.0 DP", CudaVersion(12, 2), "8.6"), "36.3": JetPack("6.0", CudaVersion(12, 2), "8.6"),
    "36.4.0": JetPack("6.1", *_JP6), "36.4.2": JetPack("6.1", *_JP6), "36.4.3": JetPack("6.2", *_JP6),
    "36.4.4": JetPack("6.2.1", *_JP6), "36.4.7": JetPack("6.2.1", *_JP6), "36.5.0": JetPack("6.2.2", *_JP6),
}
SUPPORTED_JETPACK = "6.1 or 6.2 (L4T 36.4 or newer: CUDA 12.6, TensorRT 10.3)"
# The least Linux driver per CUDA major (CUDA minor version compatibility; TensorRT's CUDA 12 wheels ask r535+)
DRIVER_FOR_CUDA_MAJOR = {12: 525, 13: 580}
# cuda-python on a Jetson with JetPack 6.1/6.2: the 12.6 runtime of its driver (aarch64 wheel for Python 3.10)
JETSON_CUDA_PYTHON = "cuda-python==12.6.2.post1"
NV_TEGRA_RELEASE = Path("/etc/nv_tegra_release")
DEVICE_TREE_MODEL = Path("/proc/device-tree/model")


def jetson_release(release_file: Path = NV_TEGRA_RELEASE, model_file: Path = DEVICE_TREE_MODEL
                   ) -> dict[str, Any] | None:
    """{"l4t", "jetpack" (a JetPack or None if unknown), "model"} on a Jetson, None elsewhere.

    L4T from the first line of /etc/nv_tegra_release, e.g. `# R36 (release), REVISION: 4.3, ...` -> 36.4.3."""
    try:
        first = release_file.read_text(errors="replace").splitlines()[0]
    except (OSError, IndexError):
        return None
    found = re.search(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", first)
    if not found:
        return None
    l4t = f"{found.group(1)}.{found.group(2)}"
    try:
        model = model_file.read_bytes().rstrip(b"\x00").decode(errors="replace").strip()
    except OSError:
        model = ""
    return {"l4t": l4t, "jetpack": jetpack_of(l4t), "model": model}


def jetpack_of(l4t: str) -> JetPack | None:
    """The JetPack of an L4T version: the newest entry of the same major.minor not newer than it."""
    version = _numbers(l4t)
    known = [k for k in JETPACKS if _numbers(k)[:2] == version[:2] and _numbers(k) <= version]
    return JETPACKS[max(known, key=_numbers)] if known else None


def _numbers(version: str) -> list[int]:
    return [int(p) for p in version.split(".") if p.isdigit()]


def driver_cuda_version() -> CudaVersion | None:
    """The CUDA version the NVIDIA driver supports (cuDriverGetVersion through ctypes); None without a driver."""
    for name in ("libcuda.so.1", "libcuda.so"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        value = ctypes.c_int()
        if lib.cuDriverGetVersion(ctypes.byref(value)) == 0 and value.value > 0:
            return CudaVersion.from_int(value.value)
        return None
    return None


def cuda_python_pin(driver: CudaVersion) -> str:
    """The cuda-python requirement whose CUDA runtime is the driver's own version."""
    if driver == CudaVersion(12, 6):
        return JETSON_CUDA_PYTHON
    return f"cuda-python>={driver.major}.{driver.minor},<{driver.major}.{driver.minor + 1}"


def runtime_too_new(runtime: CudaVersion, driver: CudaVersion, jetson: bool) -> bool:
    """Whether a CUDA runtime cannot run on this driver whatever happens next (see the module docstring)."""
    return runtime > driver and (runtime.major != driver.major or jetson)


def runtime_mismatch(runtime: CudaVersion, driver: CudaVersion, jetson: bool) -> str:
    """The error for a cuda-python runtime the driver cannot run: both versions and the fix."""
    fix = f"pip install '{cuda_python_pin(driver)}'"
    if jetson:
        fix += f", or install the cuda-compat-{runtime.major}-{runtime.minor} package (forward compatibility)"
    elif runtime.major in DRIVER_FOR_CUDA_MAJOR:
        fix += f", or a driver for CUDA {runtime.major} (r{DRIVER_FOR_CUDA_MAJOR[runtime.major]} or newer)"
    return f"cuda-python's CUDA runtime is {runtime} but the driver supports CUDA {driver}: {fix}"


def extra_for(driver: CudaVersion | None) -> str:
    """The extras suffix for the driver's CUDA major: "cu12" or "cu13" (cu12 when unknown)."""
    return "cu13" if driver is not None and driver.major >= 13 else "cu12"


def tensorrt_wheels() -> dict[str, tuple[int, str]]:
    """Installed TensorRT wheels of a CUDA major: distribution name -> (CUDA major, version). Empty for JetPack's
    TensorRT (apt's python3-libnvinfer), whose CUDA is the JetPack's."""
    found: dict[str, tuple[int, str]] = {}
    for dist in metadata.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        match = re.fullmatch(r"tensorrt-cu(\d+)(-bindings|-libs)?", name)
        if match:
            found[name] = (int(match.group(1)), dist.version)
    return found


def tensorrt_mismatch(trt_version: str, driver: CudaVersion) -> str | None:
    """Why the installed TensorRT wheels cannot run on this driver (built for a newer CUDA major), or None."""
    wheels = tensorrt_wheels()
    newer = sorted(name for name, (major, _) in wheels.items() if major > driver.major)
    if not newer:
        return None
    major = max(wheels[name][0] for name in newer)
    return (f"TensorRT {trt_version} ({', '.join(newer)}) is built for CUDA {major}, but the driver supports CUDA "
            f"{driver}: pip uninstall -y {' '.join(newer)} && pip install 'mirasol-edge[tensorrt-{extra_for(driver)}]'"
            f" (or a driver for CUDA {major}: r{DRIVER_FOR_CUDA_MAJOR.get(major, '?')} or newer)")


def onnxruntime_build() -> dict[str, str]:
    """The installed ONNX Runtime wheel, without importing it: {"package", "version", "cuda"} ("" where unknown).

    Both `onnxruntime` and `onnxruntime-gpu` install the package `onnxruntime`; `package` lists every distribution
    that installed it (two means they overwrite each other's files)."""
    packages = []
    for name in ("onnxruntime", "onnxruntime-gpu"):
        try:
            packages.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    cuda = ""
    try:
        import importlib.util  # noqa: PLC0415
        spec = importlib.util.find_spec("onnxruntime")
        info = Path(spec.origin).parent / "capi" / "build_and_package_info.py" if spec and spec.origin else None
        if info is not None and info.is_file():
            found = re.search(r"cuda_version\s*=\s*['\"]([\d.]+)['\"]", info.read_text(errors="replace"))
            cuda = found.group(1) if found else ""
    except (ImportError, ValueError, OSError):
        pass
    return {"package": ", ".join(packages), "cuda": cuda}
