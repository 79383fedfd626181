"""Shared fixtures and helpers: tiny models and their exported bundles, built once per test session.

Test modules import the helpers from here (`from .conftest import chunk, ...`), never from another test module.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mirasol.model import Mirasol, get_preset
from mirasol.runtime.bundle.reader import sha256_file
from mirasol.runtime.bundle.manifest import MANIFEST_FILE
from mirasol.runtime.pipeline import Pipeline

VENV_BIN = Path(sys.executable).parent
QUESTION = "what is the man holding?"


def make_model(combiner: str = "transformer", seed: int = 0) -> Mirasol:
    """A tiny model whose random text decoder gives varied, input-dependent greedy answers.

    A plain random init with tied embeddings repeats its input token; scaling the decoder blocks and
    randomising the final norm makes greedy token-identity tests meaningful.
    """
    torch.manual_seed(seed)
    model = Mirasol(get_preset("tiny").replace(combiner=combiner)).eval()
    with torch.no_grad():
        model.text_decoder.norm.weight.normal_(0, 1.0)
        for p in model.text_decoder.blocks.parameters():
            if p.ndim == 2:
                p.mul_(3)
    return model


def random_clip(config, chunks: int, seed: int = 0, batch: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """video [B, N*F, 3, H, W] in [0, 1], audio log-mel [B, n_mels, N*A]."""
    rng = np.random.default_rng(seed)
    video = rng.random((batch, chunks * config.frames_per_chunk, 3, config.image_size, config.image_size),
                       dtype=np.float32)
    audio = rng.standard_normal((batch, config.n_mels, chunks * config.audio_frames_per_chunk)).astype(np.float32)
    return video, audio


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, Mirasol]:
    return {name: make_model(name) for name in ("transformer", "ttm")}


@pytest.fixture(scope="session")
def tiny_bundles(tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Mirasol]) -> dict[str, Path]:
    """fp32 bundles of both combiner variants, and an fp16 bundle of the TTM one."""
    from mirasol.export.bundle import export_bundle

    root = tmp_path_factory.mktemp("bundles")
    paths = {}
    for name, model in tiny_models.items():
        paths[name] = root / f"{name}-fp32"
        export_bundle(model, paths[name], precision="fp32")
    paths["ttm-fp16"] = root / "ttm-fp16"
    export_bundle(tiny_models["ttm"], paths["ttm-fp16"], precision="fp16", reference=paths["ttm"])
    return paths


@pytest.fixture(scope="session")
def tiny_int8_trt_bundle(tiny_bundles: dict[str, Path], tiny_models: dict[str, Mirasol],
                         tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An int8 bundle of the TTM model in the TensorRT recipe (explicit Q/DQ), calibrated on synthetic clips."""
    from mirasol.calibration.quantize import CalibrationOptions
    from mirasol.export.bundle import export_bundle

    out = tmp_path_factory.mktemp("int8-trt") / "bundle"
    export_bundle(tiny_models["ttm"], out, "int8", reference=tiny_bundles["ttm"],
                  calibration=CalibrationOptions("synthetic", clips=3, held_out=1, target="tensorrt", use_cache=False))
    return out


@pytest.fixture
def fake_tensorrt(monkeypatch: pytest.MonkeyPatch):
    """A strict fake TensorRT 10.3 and CUDA runtime (8 GB device) for one test (tests/fake_tensorrt.py)."""
    from .fake_tensorrt import install

    return install(monkeypatch)


@pytest.fixture(scope="session")
def demo_fp32_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped demo model (model/assets/demo) as a validated fp32 bundle."""
    from mirasol.export.bundle import export_bundle
    from mirasol.model import load_checkpoint
    from mirasol.model.demo_task import DEMO_CHECKPOINT

    path = tmp_path_factory.mktemp("demo") / "fp32"
    export_bundle(load_checkpoint(DEMO_CHECKPOINT), path, precision="fp32")
    return path


# ---- the reliability suite's tiny bundle and helpers ----
def tiny_model(seed: int = 0):
    """build_model('tiny'), with the text decoder scaled so that greedy answers vary with the input (a plain
    random init repeats one token, which would make answer-identity checks vacuous)."""
    from mirasol.model import build_model

    model = build_model("tiny", seed=seed).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        norm = model.text_decoder.norm.weight
        norm.copy_(torch.randn(norm.shape, generator=generator))
        for p in model.text_decoder.blocks.parameters():
            if p.ndim == 2:
                p.mul_(8)
    return model


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny fp32 bundle for the session: never change it, change a `copy_bundle` of it.
    (MIRASOL_TEST_TINY_BUNDLE=DIR: copy a bundle exported from `tiny_model()` earlier instead, to iterate quickly
    on a loaded machine.)"""
    from mirasol.export.bundle import export_bundle

    path = tmp_path_factory.mktemp("reliability") / "tiny-fp32"
    reuse = os.environ.get("MIRASOL_TEST_TINY_BUNDLE")
    if reuse:
        shutil.copytree(reuse, path)
    else:
        export_bundle(tiny_model(), path, precision="fp32", validate=False)
    return path


@pytest.fixture(scope="session")
def shared_pipeline(tiny_bundle: Path) -> Pipeline:
    return Pipeline.load(tiny_bundle)


@dataclass(frozen=True)
class CliResult:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def run_cli(main: Callable[[Sequence[str]], int], args: Sequence[str]) -> CliResult:
    """A command's `main(args)` run in this process, its output captured (with --debug its error is raised)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return CliResult(code, out.getvalue(), err.getvalue())


def run_export_cli(args: Sequence[str]) -> CliResult:
    from mirasol.export.cli import main

    return run_cli(main, args)


def copy_bundle(bundle: Path, tmp_path: Path, name: str = "bundle") -> Path:
    target = tmp_path / name
    shutil.copytree(bundle, target, symlinks=True)
    return target


def read_manifest(bundle: Path) -> dict[str, Any]:
    return json.loads((bundle / MANIFEST_FILE).read_text())


def write_manifest(bundle: Path, data: dict[str, Any]) -> None:
    (bundle / MANIFEST_FILE).write_text(json.dumps(data))


def snapshot(directory: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file (and link target of every symlink) under `directory`."""
    result = {}
    for path in sorted(directory.rglob("*")):
        rel = str(path.relative_to(directory))
        if path.is_symlink():
            result[rel] = "-> " + os.readlink(path)
        elif path.is_file():
            result[rel] = sha256_file(path)
    return result


def chunk(pipe: Pipeline, seed: int, batch: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A random chunk: video [F, 3, H, W] in [0, 1], audio log-mel [n_mels, A] (batched when `batch`)."""
    rng = np.random.default_rng(seed)
    video_shape = tuple(pipe.chunk_inputs["video"].shape[1:])
    audio_shape = tuple(pipe.chunk_inputs["audio"].shape[1:])
    lead = () if batch is None else (batch,)
    video = rng.random(lead + video_shape, dtype=np.float32)
    audio = rng.standard_normal(lead + audio_shape).astype(np.float32)
    return video, audio


def stream_snapshot(stream) -> dict[str, Any]:
    return {"batch": stream.batch, "chunks": stream.chunks,
            "state": {k: v.copy() for k, v in stream.state.items()},
            "counters": {k: v.copy() for k, v in stream.counters.items()}}


def assert_same_stream_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["batch"] == b["batch"] and a["chunks"] == b["chunks"]
    for table in ("state", "counters"):
        assert a[table].keys() == b[table].keys(), table
        for key in a[table]:
            assert a[table][key].dtype == b[table][key].dtype, key
            assert np.array_equal(a[table][key], b[table][key]), key


def finishes_within(seconds: float, call: Callable[[], Any]) -> Any:
    """`call()` run on a thread of its own; fails (instead of hanging the suite) if it has not returned in time.
    Returns its result or raises its exception."""
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["value"] = call()
        except BaseException as error:  # noqa: BLE001 - handed to the calling thread
            result["error"] = error

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"still running after {seconds} s: a deadlock"
    if "error" in result:
        raise result["error"]
    return result["value"]


def run_in_threads(session, inputs: list) -> list:
    """The results of `session.run` on each of `inputs`, all called at once from as many threads."""
    results: list = [None] * len(inputs)
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, session.run(inputs[i])))
               for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


# ---- live sources and the service: bundles and clips, built once per session ----
@pytest.fixture(scope="session")
def live_bundles(tmp_path_factory: pytest.TempPathFactory, demo_fp32_bundle: Path) -> dict[str, Path]:
    """The shipped demo model (answers the demo clips correctly) and a tiny model with 0.25 s chunks."""
    from mirasol.export.bundle import export_bundle

    from .live_tools import SHORT

    torch.manual_seed(0)
    short = tmp_path_factory.mktemp("live-bundles") / "short"
    export_bundle(Mirasol(SHORT).eval(), short)
    return {"demo": demo_fp32_bundle, "short": short}


@pytest.fixture(scope="session")
def short_clips(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Demo clips of 8 and 12 chunks for the 0.25 s-chunk model, rendered at 16 fps."""
    from mirasol.model.demo_task import DemoTask

    from .live_tools import SHORT

    root = tmp_path_factory.mktemp("live-short")
    clips = {}
    for n in (8, 12):
        task = DemoTask(SHORT, num_chunks=n, render_fps=16)
        clips[n] = task.write(task.clip(1, n), root / f"short-{n}.mp4")
    return clips



@pytest.fixture(scope="session")
def served(live_bundles: dict[str, Path]):
    """One `mirasol-serve` process for the service's tests (the 0.25 s-chunk bundle, a token, local sources
    allowed, stall timeout 1 s); stopped at the end of the session."""
    pytest.importorskip("starlette")
    from .serve_tools import Server

    server = Server(live_bundles["short"], "--allow-local-sources", "--stall-timeout", "1", "-q")
    yield server
    server.close()
def marked_block(page: Path, name: str) -> str:
    """The code block of a Markdown page marked `<!-- tested: NAME ... -->` on the line before it (exactly one)."""
    found = re.findall(rf"<!-- tested: {name}\b[^>]*-->\n```\w+\n(.*?)```", page.read_text(), re.S)
    assert len(found) == 1, f"{page.name} has {len(found)} blocks marked 'tested: {name}'"
    return found[0]


@pytest.fixture(scope="session")
def triton_served(tiny_bundles: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """The one Triton server of the test session (tests/triton_tools.py says what it serves); the Triton test
    modules share it. Skips where the wheel's server cannot run."""
    from mirasol.runtime.triton.server import availability

    from .triton_tools import start_served

    available, why = availability()
    if not available:
        pytest.skip(f"the Triton server cannot run here: {why}")
    served = start_served(tiny_bundles["ttm"], tmp_path_factory.mktemp("triton"))
    try:
        yield served
    finally:
        served.server.stop()
