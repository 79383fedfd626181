"""The docs' install lines resolve with pip for the machines they are for, to wheels whose CUDA fits the documented
driver (issue 23). Network: each line of docs/tensorrt-jetson.md's `jetson-install` block is resolved for a Jetson
(aarch64, Python 3.10, every wheel tag its glibc 2.35 takes), each line of its `x86-install` block for x86 with
the oldest Python each CUDA major's wheels support (3.10; 3.11 for CUDA 13, whose refusal on 3.10 is checked too),
with `cu13` for `cu12` as the page says for a CUDA 13 driver. `pip install --dry-run --report` resolves and installs
nothing (pip reads the wheels' metadata from the index where it serves it, PEP 658, else fetches the wheels into its
cache), with `--only-binary=:all:` as on a device without compilers. All resolutions run at once: about a minute
where the index answers fast.

Skipped with the reason: everything where PyPI is unreachable; the lines (or parts) only NVIDIA's indexes serve where
those are unreachable: onnxruntime-gpu for Jetson (pypi.jetson-ai-lab.io) and the tensorrt-cuNN wheels
(pypi.nvidia.com; PyPI's `tensorrt-cuNN` are stubs that fetch them), whose PyPI-hosted bindings are resolved instead.
"""
from __future__ import annotations

import functools
import json
import shlex
import shutil
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mirasol.runtime.tensorrt import cuda_versions as cv
from mirasol.runtime.tensorrt.cuda_versions import CudaVersion

from .install_lines import DOCS, PROJECT, ROOT, doc_block, expanded

GLIBC = 35  # Ubuntu 22.04 (JetPack 6, and the x86 machine assumed): pip, given tags, expands none of them


def platform(arch: str, python: str) -> tuple[str, ...]:
    """pip's options for a machine of `arch` with glibc 2.35 and `python`: every wheel tag such a pip accepts."""
    tags = [f"manylinux_2_{minor}_{arch}" for minor in range(GLIBC, 16, -1)]
    tags += [f"manylinux2014_{arch}", f"linux_{arch}"]
    return ("--python-version", python, *(f"--platform={tag}" for tag in tags))


JETSON = platform("aarch64", "3.10")  # (linux_aarch64: the Jetson AI Lab index's tag)


def x86(python: str) -> tuple[str, ...]:
    return platform("x86_64", python)


@functools.cache
def reachable(host: str) -> bool:
    try:
        socket.create_connection((host, 443), timeout=5).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding `dist/` with this checkout's wheel, as the docs' lines expect; skips without PyPI."""
    if not reachable("pypi.org"):
        pytest.skip("pypi.org is unreachable here: the install lines cannot be resolved")
    work = tmp_path_factory.mktemp("resolve")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(ROOT),
                            "-w", str(work / "dist")], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    build = ROOT / "build"
    if build.is_dir() and not any(build.iterdir()):
        shutil.rmtree(build)
    return work


def resolve(line: str, platform: tuple[str, ...], work: Path, key: str, extra_index: str | None = None
            ) -> dict[str, str]:
    """{distribution: version} pip resolves for a `pip install ...` line on that platform (raises on failure)."""
    report, target = work / f"{key}.json", work / f"{key}-target"
    args = shlex.split(line)[2:] + (["--extra-index-url", extra_index] if extra_index else [])
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                           "--disable-pip-version-check", "--only-binary=:all:", "--report", str(report), "--target",
                           str(target), *platform, *args], cwd=work, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise AssertionError(f"{line} ({' '.join(platform)}): pip could not resolve it:\n{done.stderr[-3000:]}")
    return {item["metadata"]["name"].lower().replace("_", "-"): item["metadata"]["version"]
            for item in json.loads(report.read_text())["install"]}


def jobs() -> dict[str, tuple[str, tuple[str, ...], str | None]]:
    """Every resolution, by key: (the `pip install` line, the platform, an extra index)."""
    found: dict[str, tuple[str, tuple[str, ...], str | None]] = {}
    for i, line in enumerate(doc_block(DOCS, "jetson-install")):
        if "onnxruntime-gpu" not in line or reachable("pypi.jetson-ai-lab.io"):
            found[f"jetson-{i}"] = (line, JETSON, None)
    nvidia = reachable("pypi.nvidia.com")
    for major, python in ((12, "3.10"), (13, "3.11")):  # the oldest Python each supports (CUDA 13: 3.11+)
        for i, line in enumerate(doc_block(DOCS, "x86-install")):
            line = line.replace("cu12", f"cu{major}")
            key = f"x86-cu{major}-{python}-{i}"
            if "tensorrt-cu" not in line:
                found[key] = (line, x86(python), None)
            elif nvidia:
                found[key] = (line, x86(python), "https://pypi.nvidia.com")
            else:  # what PyPI itself serves of that extra: the bindings and cuda-python, in the extra's ranges
                pieces = [str(r).replace(f"tensorrt-cu{major}", f"tensorrt-cu{major}-bindings")
                          for r in expanded(f"tensorrt-cu{major}")]
                found[key] = (shlex.join(["pip", "install", *pieces]), x86(python), None)
    line = doc_block(DOCS, "x86-install")[0].replace("cu12", "cu13")
    found["x86-cu13-3.10-refused"] = (line, x86("3.10"), None)  # the docs' claim: not on Python 3.10
    return found


@pytest.fixture(scope="module")
def results(work: Path) -> dict[str, tuple[str, dict[str, str] | AssertionError]]:
    """Every resolution, run in parallel (they wait on the network): key -> (line, {name: version} or the failure)."""
    planned = jobs()

    def one(item: tuple[str, tuple]) -> dict[str, str] | AssertionError:
        key, (line, platform, extra_index) = item
        try:
            return resolve(line, platform, work, key, extra_index)
        except AssertionError as failed:
            return failed
    with ThreadPoolExecutor(4) as pool:
        return {key: (planned[key][0], found) for key, found in zip(planned, pool.map(one, planned.items()))}


def cuda_python_runtime(found: dict[str, str]) -> CudaVersion:
    """The CUDA runtime a resolved cuda-python carries (cuda-python X.Y.* / cuda-bindings X.Y.* carry CUDA X.Y)."""
    return CudaVersion.parse(found.get("cuda-bindings", found["cuda-python"]))


def onnxruntime_cuda_major(version: str) -> int:
    """The CUDA major of an onnxruntime-gpu release on PyPI (1.19-1.26: 12; 1.27 and newer: 13)."""
    return 13 if tuple(int(p) for p in version.split(".")[:2]) >= (1, 27) else 12


def test_jetson_lines_resolve_to_jetpack_6(results):
    jetson = {key: found for key, (_, found) in results.items() if key.startswith("jetson-")}
    for key, found in jetson.items():
        if isinstance(found, AssertionError):
            raise found
        assert "onnxruntime" not in found and not any(name.startswith("tensorrt") for name in found), found
        assert int(found.get("numpy", "1").split(".")[0]) < 2, found
        if "cuda-python" in found:  # the CUDA runtime must be JetPack's driver's own (no minor compatibility there)
            driver = cv.jetpack_of("36.4.3").cuda
            assert found["cuda-python"] == "12.6.2.post1" and "cuda-bindings" not in found, found
            assert not cv.runtime_too_new(cuda_python_runtime(found), driver, jetson=True)
        if "onnxruntime-gpu" in found:
            assert found["onnxruntime-gpu"].startswith("1.23")
    mirasol = [found for found in jetson.values() if "mirasol-edge" in found]
    assert mirasol and mirasol[0]["mirasol-edge"] == PROJECT["version"] and "av" in mirasol[0]
    if len(jetson) < len(doc_block(DOCS, "jetson-install")):
        pytest.skip("pypi.jetson-ai-lab.io is unreachable here: the onnxruntime-gpu line for JetPack 6 was not "
                    "resolved (the other Jetson lines were)")


@pytest.mark.parametrize("major", [12, 13])
def test_x86_lines_resolve_to_one_cuda_major(results, major):
    if major == 13:
        assert isinstance(results["x86-cu13-3.10-refused"][1], AssertionError)
    mine = {key: value for key, value in results.items() if key.startswith(f"x86-cu{major}-") and "refused" not in key}
    assert mine
    for key, (line, found) in mine.items():
        if isinstance(found, AssertionError):
            raise found
        assert "onnxruntime" not in found, (key, found)  # never the CPU wheel beside the GPU one
        assert not [n for n in found if n.startswith("nvidia-") and n.endswith(f"-cu{25 - major}")], (key, found)
        if "onnxruntime-gpu" in found:
            assert onnxruntime_cuda_major(found["onnxruntime-gpu"]) == major, (key, found)
            assert any(n.startswith("nvidia-cuda-runtime") for n in found), (key, found)
        if "cuda-python" in found:
            assert cuda_python_runtime(found).major == major, (key, found)
        if "tensorrt-cu" in line:  # TensorRT 10, what ONNX Runtime's TensorRT provider links
            trt = [v for n, v in found.items() if n.startswith(f"tensorrt-cu{major}")]
            assert trt and all(v.startswith("10.") for v in trt), (key, found)
    if not reachable("pypi.nvidia.com"):
        pytest.skip(f"pypi.nvidia.com is unreachable here: the tensorrt-cu{major} wheels were not resolved (their "
                    f"bindings on PyPI and cuda-python were, in the extra's ranges)")
