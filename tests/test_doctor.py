"""`mirasol-doctor` (issue 23): on this machine (no GPU, no TensorRT), without onnxruntime at all, and on the strict
fake GPU (a Jetson whose cuda-python is too new, engines that fit), saying for each backend of the registry why it
cannot run a bundle and the fix."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from mirasol.runtime.backends import REGISTRY
from mirasol.runtime.cli import doctor
from mirasol.runtime.tensorrt import cuda_versions

# The doctor's entry point with some modules made unimportable, as where they are not installed
WITHOUT = """
import sys
for name in sys.argv.pop(1).split(","):
    sys.modules[name] = None
from mirasol.runtime.cli.doctor import main
sys.exit(main())
"""


def test_doctor_here_lists_every_backend_and_what_is_missing(tiny_bundle: Path, capsys):
    assert doctor.main([str(tiny_bundle)]) == 0
    out = capsys.readouterr().out
    for line in ("Jetson: ", "NVIDIA driver: ", "GPUs:", "cuda-python: ", "TensorRT: ", "onnxruntime: ",
                 "install that fits: ", f"backends for {tiny_bundle}: fp32, 4 graphs:"):
        assert line in out, line
    assert "  onnxruntime: can run it here" in out
    backends = [line.split(":")[0].strip() for line in out.split("backends for")[1].splitlines()[1:]]
    assert backends == list(REGISTRY)
    assert doctor.main(["--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["bundle"] is None and set(result["backends"]) == set(REGISTRY)
    if cuda_versions.driver_cuda_version() is None:  # this machine: says so, and the GPU backends say why not
        assert result["machine"]["NVIDIA driver"].startswith("none (libcuda.so.1 cannot be loaded")
        assert all(result["backends"][name] for name, entry in REGISTRY.items() if entry.device == "gpu")


def test_doctor_runs_with_none_of_the_libraries(tiny_bundle: Path):
    hidden = "onnxruntime,tensorrt,cuda,cuda.bindings"
    done = subprocess.run([sys.executable, "-c", WITHOUT, hidden, str(tiny_bundle)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert "onnxruntime: not installed: pip install 'mirasol-edge[cpu]'" in done.stdout
    assert "TensorRT: not installed" in done.stdout and "cuda-python: " in done.stdout
    assert "  onnxruntime: cannot: onnxruntime is not installed: pip install 'mirasol-edge[cpu]'" in done.stdout
    assert "  tensorrt: cannot: TensorRT is not installed" in done.stdout


def test_doctor_on_a_jetson_with_the_wrong_cuda_python(monkeypatch, capsys):
    """JetPack 6.2 with cuda-python 12.9 (what `cuda-python>=12.6,<13` resolves to): the pin that fits is named."""
    from . import fake_tensorrt  # noqa: PLC0415

    fake_tensorrt.install(monkeypatch, runtime_version=12090, driver_version=12060, jetson=True)
    monkeypatch.setattr(cuda_versions, "jetson_release",
                        lambda: {"l4t": "36.4.3", "jetpack": cuda_versions.JETPACKS["36.4.3"], "model": "Orin"})
    monkeypatch.setattr(cuda_versions, "driver_cuda_version", lambda: cuda_versions.CudaVersion(12, 6))
    real = doctor.metadata.version
    monkeypatch.setattr(doctor, "_has_distribution", lambda name: name.startswith("cuda-"))
    monkeypatch.setattr(doctor.metadata, "version", lambda name: "12.9.10" if name.startswith("cuda-") else real(name))
    assert doctor.main([]) == 0
    out = capsys.readouterr().out
    assert "Jetson: Orin, L4T 36.4.3 = JetPack 6.2 (CUDA 12.6, TensorRT 10.3)" in out
    assert ("cuda-python's CUDA runtime is 12.9 but the driver supports CUDA 12.6: pip install "
            "'cuda-python==12.6.2.post1'") in out
    assert "install that fits: cuda-python==12.6.2.post1, TensorRT from JetPack" in out


def test_doctor_says_jetpack_6_0_is_too_old(monkeypatch):
    monkeypatch.setattr(cuda_versions, "jetson_release",
                        lambda: {"l4t": "36.3.0", "jetpack": cuda_versions.jetpack_of("36.3.0"), "model": "Orin Nano"})
    said = doctor._jetson()
    assert "JetPack 6.0 (CUDA 12.2, TensorRT 8.6)" in said and "upgrade to JetPack 6.1 or 6.2" in said


def test_doctor_on_engines_that_fit(monkeypatch, tiny_bundles, tmp_path, capsys):
    from mirasol.runtime.tensorrt import build as tb  # noqa: PLC0415

    from . import fake_tensorrt  # noqa: PLC0415

    fake_tensorrt.install(monkeypatch)
    monkeypatch.setattr(cuda_versions, "tensorrt_wheels", lambda: {})
    bundle = Path(shutil.copytree(tiny_bundles["ttm"], tmp_path / "bundle"))
    assert doctor.main([str(bundle)]) == 0
    assert "  tensorrt: cannot: graph 'combiner' has no TensorRT engine" in capsys.readouterr().out
    tb.build_engines(bundle)
    assert doctor.main([str(bundle)]) == 0
    assert "  tensorrt: can run it here" in capsys.readouterr().out


def test_jetson_release_is_read_from_nv_tegra_release(tmp_path):
    release, model = tmp_path / "nv_tegra_release", tmp_path / "model"
    release.write_text("# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, DATE: Wed Jan\n"
                       "# KERNEL_VARIANT: oot\n")
    model.write_bytes(b"NVIDIA Jetson AGX Orin Developer Kit\x00")
    found = cuda_versions.jetson_release(release, model)
    assert found == {"l4t": "36.4.3", "jetpack": cuda_versions.JETPACKS["36.4.3"],
                     "model": "NVIDIA Jetson AGX Orin Developer Kit"}
    assert cuda_versions.jetson_release(tmp_path / "absent", model) is None
    assert cuda_versions.jetpack_of("36.4.7").version == cuda_versions.jetpack_of("36.4.9").version == "6.2.1"
    assert cuda_versions.jetpack_of("35.5.0") is None  # JetPack 5: not supported
