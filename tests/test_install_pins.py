"""The installs are right by construction (issue 23): the pins of pyproject.toml and of the docs' install lines follow
the version rules of runtime/tensorrt/cuda_versions.py, read here without any network (test_install_resolution.py
resolves the same lines with pip).

- no extra, expanded, holds both ONNX Runtime wheels (they install the same package), and none is a core dependency;
- a `-cuNN` extra brings wheels of CUDA major NN only: cuda-python NN.x, onnxruntime-gpu built for NN (1.21-1.26 for
  12, 1.27+ for 13), TensorRT 10 (what ONNX Runtime's TensorRT provider links);
- the Jetson lines pin the CUDA runtime of JetPack 6.1/6.2's driver, NVIDIA's Jetson index, and this version's wheel;
- the x86 lines and README's lines name extras that exist and this version's wheel; the nvidia-smi table says the
  drivers the code knows;
- the rules: a runtime newer than the driver, the pin that fits, the errors naming both versions.
"""
from __future__ import annotations

import re
import subprocess
import sys

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from mirasol.runtime.backends.onnxruntime_checks import JETSON_ONNXRUNTIME
from mirasol.runtime.cli.commandline import missing_extra
from mirasol.runtime.tensorrt import cuda_versions as cv
from mirasol.runtime.tensorrt.cuda_versions import CudaVersion

from .install_lines import DOCS, EXTRAS, PROJECT, ROOT, WHEEL, doc_block, expanded, requirements_of


def test_no_venv_gets_both_onnxruntime_wheels():
    assert not [d for d in PROJECT["dependencies"] if Requirement(d).name.startswith("onnxruntime")]
    for extra in EXTRAS:
        names = {r.name for r in expanded(extra)}
        assert not {"onnxruntime", "onnxruntime-gpu"} <= names, extra
    assert "onnxruntime" in {r.name for r in expanded("dev")} and "onnxruntime" in {r.name for r in expanded("cpu")}


@pytest.mark.parametrize("major", [12, 13])
def test_cuda_extras_bring_one_cuda_major(major):
    onnxruntime = {r.name: r for r in expanded(f"onnxruntime-cu{major}")}["onnxruntime-gpu"]
    assert {"cuda", "cudnn"} <= onnxruntime.extras  # the CUDA libraries from PyPI, of the wheel's own major
    spec = onnxruntime.specifier
    built_for_13 = "1.27.0"  # the first onnxruntime-gpu built for CUDA 13 (1.21-1.26: CUDA 12)
    assert spec.contains(built_for_13) == (major == 13) and spec.contains("1.26.0") == (major == 12)
    assert not spec.contains("1.20.0")  # the [cuda, cudnn] extras begin at 1.21
    tensorrt = {r.name: r for r in expanded(f"tensorrt-cu{major}")}
    assert set(tensorrt) == {f"tensorrt-cu{major}", "cuda-python"}
    assert not tensorrt[f"tensorrt-cu{major}"].specifier.contains("11.0.0")  # TensorRT 10: ONNX Runtime's provider
    assert tensorrt[f"tensorrt-cu{major}"].specifier.contains("10.13.3")
    cuda_python = tensorrt["cuda-python"].specifier
    assert cuda_python.contains(f"{major}.9.0") or cuda_python.contains(f"{major}.0.0")
    assert not any(cuda_python.contains(f"{other}.0.0") for other in (11, 12, 13, 14) if other != major)
    assert cv.DRIVER_FOR_CUDA_MAJOR[major] in (525, 580)


def test_jetson_lines_pin_what_jetpack_6_has():
    lines = doc_block(DOCS, "jetson-install")
    pins = {Requirement(r).name: Requirement(r) for line in lines for r in requirements_of(line)
            if not r.startswith("dist/")}
    assert str(pins["cuda-python"]) == cv.JETSON_CUDA_PYTHON
    runtime = CudaVersion.parse(str(pins["cuda-python"].specifier).removeprefix("=="))
    for l4t in ("36.4.0", "36.4.3", "36.4.7"):  # JetPack 6.1, 6.2, 6.2.1
        driver = cv.jetpack_of(l4t).cuda
        assert runtime == driver and not cv.runtime_too_new(runtime, driver, jetson=True)
    assert not cv.runtime_too_new(CudaVersion(12, 9), CudaVersion(12, 6), jetson=False)  # x86: minor compatibility
    assert cv.runtime_too_new(CudaVersion(12, 9), CudaVersion(12, 6), jetson=True)  # what `>=12.6,<13` gives a Jetson
    assert pins["numpy"].specifier == SpecifierSet("<2")
    index = "--extra-index-url https://pypi.jetson-ai-lab.io/jp6/cu126"  # NVIDIA's wheels for JetPack 6, CUDA 12.6
    onnxruntime_line = next(line for line in lines if "onnxruntime-gpu" in line)
    assert index in onnxruntime_line and index in JETSON_ONNXRUNTIME  # what mirasol-doctor tells a Jetson
    assert f"{pins['onnxruntime-gpu']} " in JETSON_ONNXRUNTIME
    assert lines[-1].startswith(f"pip install '{WHEEL}[media]'")
    assert not any("tensorrt-cu" in line or "mirasol-edge[" in line for line in lines)


def test_x86_and_readme_lines_name_extras_that_exist():
    readme = (ROOT / "README.md").read_text()
    lines = doc_block(DOCS, "x86-install") + doc_block(ROOT / "README.md", "device")[:1]
    for line in lines:
        [wheel] = requirements_of(line)
        path, extras = re.fullmatch(r"(.+)\[(.+)\]", wheel).groups()
        assert path == WHEEL and set(extras.split(",")) <= set(EXTRAS), line
    assert "`[media,cpu]`" in readme and "`[onnxruntime-cu12]` / `[onnxruntime-cu13]`" in readme
    table = DOCS.read_text()
    for major, driver in cv.DRIVER_FOR_CUDA_MAJOR.items():
        assert re.search(rf"\| `CUDA Version: {major}\.x` \| {driver} or newer", table), major
    assert "`[tensorrt]`" not in readme and "mirasol-edge[tensorrt]" not in table


def test_the_rules_name_both_versions_and_the_pin():
    assert cv.cuda_python_pin(CudaVersion(12, 6)) == "cuda-python==12.6.2.post1"
    assert cv.cuda_python_pin(CudaVersion(12, 8)) == "cuda-python>=12.8,<12.9"
    assert cv.runtime_mismatch(CudaVersion(12, 9), CudaVersion(12, 6), jetson=True) == (
        "cuda-python's CUDA runtime is 12.9 but the driver supports CUDA 12.6: pip install 'cuda-python==12.6.2.post1',"
        " or install the cuda-compat-12-9 package (forward compatibility)")
    assert cv.extra_for(CudaVersion(13, 0)) == "cu13" and cv.extra_for(CudaVersion(12, 2)) == "cu12"
    assert CudaVersion.from_int(12060) == CudaVersion(12, 6) and str(CudaVersion.from_int(13040)) == "13.4"


def test_a_runtime_without_onnxruntime_names_the_extras(tiny_bundle):
    """The one-line error when no ONNX Runtime is installed names the CPU extra and the GPU ones."""
    error = ImportError("No module named 'onnxruntime'", name="onnxruntime")
    assert missing_extra(error).startswith("this needs 'onnxruntime', which the [cpu] extra installs (or "
                                           "[onnxruntime-cu12] / [onnxruntime-cu13] for ONNX Runtime on an NVIDIA GPU")
    script = ("import sys; sys.modules['onnxruntime'] = None\n"
              "from mirasol.runtime.cli.run import main; sys.exit(main())")
    done = subprocess.run([sys.executable, "-c", script, str(tiny_bundle), "--chunks", "none.npz", "--question", "q"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.strip() == f"error: {missing_extra(error)}", done.stderr
