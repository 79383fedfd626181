"""The oldest onnxruntime pyproject.toml allows runs our bundles and gives what the installed one gives (issue 13).

Runs where MIRASOL_ORT_FLOOR_PYTHON names a Python that has that onnxruntime (and numpy) and nothing of ours:
.ci/run makes one (`.venv-ort-floor`). Elsewhere it skips, saying how to run it.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from mirasol.runtime.bundle.manifest import Manifest

from .conftest import QUESTION

REPO = Path(__file__).resolve().parent.parent
RUN = """
import json, sys
import numpy as np, onnxruntime
from mirasol.runtime import Pipeline
results = []
for path in sys.argv[1:]:
    pipe = Pipeline.load(path)
    stream = pipe.stream()
    for i in range(5):
        rng = np.random.default_rng(i)
        context = stream.push(rng.random(pipe.chunk_inputs["video"].shape[1:], dtype=np.float32),
                              rng.standard_normal(pipe.chunk_inputs["audio"].shape[1:]).astype(np.float32))
    results.append({"context": context.tolist(), "tokens": stream.token_ids(%r, 12)[0]})
print(json.dumps({"onnxruntime": onnxruntime.__version__, "results": results}))
""" % QUESTION


def floor() -> str:
    """The lower bound pyproject.toml's `cpu` extra sets on onnxruntime."""
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["cpu"]
    return next(re.fullmatch(r"onnxruntime>=([\d.]+)", d).group(1) for d in dependencies  # type: ignore[union-attr]
                if d.startswith("onnxruntime"))


def run(python: str, bundles: list[Path], path: Path) -> dict:
    """RUN under `python`, importing this checkout from `path`."""
    done = subprocess.run([python, "-c", RUN, *map(str, bundles)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(path)})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_oldest_onnxruntime_runs_our_bundles(request, tmp_path) -> None:
    python = os.environ.get("MIRASOL_ORT_FLOOR_PYTHON")
    if not python:
        pytest.skip(f"set MIRASOL_ORT_FLOOR_PYTHON to a Python with onnxruntime=={floor()} installed (.ci/run does)")
    path = tmp_path / "path"
    path.mkdir()
    (path / "mirasol").symlink_to(REPO)  # this checkout, with that Python's onnxruntime and numpy
    tiny_bundles = request.getfixturevalue("tiny_bundles")  # (after the skip: exporting them takes a while)
    bundles = [request.getfixturevalue("tiny_bundle"), tiny_bundles["ttm"], tiny_bundles["ttm-fp16"]]
    there, here = run(python, bundles, path), run(sys.executable, bundles, path)
    assert there["onnxruntime"] == floor()
    for bundle, old, new in zip(bundles, there["results"], here["results"]):
        fp16 = Manifest.read(bundle).precision == "fp16"
        assert np.allclose(old["context"], new["context"], atol=1e-2 if fp16 else 1e-4, rtol=0), bundle
        if not fp16:  # (fp16 kernels differ between versions: greedy tokens may too)
            assert old["tokens"] == new["tokens"], bundle
