"""tests/gpu_check.py, run by hand on a GPU, dry-run here: without CUDA it says so and exits 0; its PyTorch timing
code runs (tiny, on the CPU) and reports what it should."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

SCRIPT = Path(__file__).resolve().parent / "gpu_check.py"


def test_without_cuda_it_skips_cleanly(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is here: run the script by hand")
    done = subprocess.run([sys.executable, str(SCRIPT), "--json", str(tmp_path / "out.json")], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["skipped"].startswith("no CUDA GPU here")


def test_the_timing_code_runs_on_the_cpu():
    from tests import gpu_check  # noqa: PLC0415

    result = gpu_check.torch_eager("tiny", rounds=3, device="cpu")
    for precision in ("fp32", "fp16"):
        for what in ("per_chunk", "per_token"):
            assert result[precision][what]["n"] == 2 and result[precision][what]["median_ms"] > 0
