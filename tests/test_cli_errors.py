"""The CLIs fail with a non-zero exit and one clear line; the traceback only with --debug (issue 9)."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from mirasol.runtime.errors import BundleError, OutputError
from mirasol.runtime.pipeline import Pipeline

from .conftest import (QUESTION, VENV_BIN, chunk, run_export_cli as _export_cli)

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------------------------
# 1b. The CLIs: non-zero exit with one clear line; the traceback only with --debug
# ---------------------------------------------------------------------------------------------------------------

def _npz_clip(pipe: Pipeline, path: Path, chunks: int = 2) -> Path:
    parts = [chunk(pipe, i) for i in range(chunks)]
    np.savez(path, video=np.concatenate([v for v, _ in parts]), audio=np.concatenate([a for _, a in parts], axis=1))
    return path


def test_run_cli_missing_bundle_one_line(tmp_path, capsys) -> None:
    from mirasol.runtime.cli.run import main

    missing = tmp_path / "no-bundle"
    assert main([str(missing), "--chunks", str(tmp_path / "c.npz"), "--question", "q"]) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [f"error: bundle directory {missing} does not exist"]
    with pytest.raises(BundleError, match="does not exist"):  # --debug: the exception itself, with its traceback
        main([str(missing), "--chunks", str(tmp_path / "c.npz"), "--question", "q", "--debug"])


def test_run_cli_subprocess_exit_code_and_single_line(tmp_path) -> None:
    result = subprocess.run([str(VENV_BIN / "mirasol-run"), str(tmp_path / "nope"), "--chunks", "x.npz",
                             "--question", "q"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"error: bundle directory {tmp_path / 'nope'} does not exist"]
    assert "Traceback" not in result.stderr and result.stdout == ""


@pytest.mark.parametrize("args, words", [
    (["--question"], ["--question", "expected one argument"]),
    (["--chunks", "c.npz", "--question", "q", "--max-new-tokens", "many"],
     ["--max-new-tokens", "expected an integer in [1, 1048576], got 'many'"]),
    (["--chunks", "c.npz", "--question", "q", "--max-new-tokens", "0"], ["--max-new-tokens", "got '0'"]),
    (["--chunks", "c.npz", "--question", "q", "--top-p", "1.5"], ["--top-p", "expected a number in (0, 1], got '1.5'"]),
    (["--chunks", "c.npz", "--video", "v.mp4", "--question", "q"], ["not allowed with argument"]),
    (["--chunks", "c.npz", "--question", "q", "--backend", "tpu"], ["--backend", "invalid choice: 'tpu'"]),
])
def test_run_cli_bad_argument(tiny_bundle, capsys, args, words) -> None:
    from mirasol.runtime.cli.run import main

    assert main([str(tiny_bundle), *args]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("mirasol-run: error:")
    for word in words:
        assert word in last


@pytest.mark.parametrize("extra, words", [
    (["--max-new-tokens", "1000"], ["max_new_tokens must be an int in [1,", "got 1000"]),
    (["--chunks-missing"], ["does not exist"]),
])
def test_run_cli_bad_value_one_line(shared_pipeline, tiny_bundle, tmp_path, capsys, extra, words) -> None:
    from mirasol.runtime.cli.run import main

    clip = _npz_clip(shared_pipeline, tmp_path / "clip.npz")
    if extra == ["--chunks-missing"]:
        clip, extra = tmp_path / "missing.npz", []
    assert main([str(tiny_bundle), "--chunks", str(clip), "--question", QUESTION, *extra]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    for word in words:
        assert word in lines[0]


def test_run_cli_works(shared_pipeline, tiny_bundle, tmp_path, capsys) -> None:
    from mirasol.runtime.cli.run import main

    clip = _npz_clip(shared_pipeline, tmp_path / "clip.npz")
    assert main([str(tiny_bundle), "--chunks", str(clip), "--question", QUESTION, "--max-new-tokens", "4",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["chunks"] == 2


@pytest.mark.parametrize("args, words", [
    (["--checkpoint", "/no/such/checkpoint"], ["--checkpoint", "does not exist"]),
    (["--preset", "huge"], ["--preset", "invalid choice: 'huge'"]),
    (["--precision", "int9"], ["--precision", "invalid choice: 'int9'"]),
    (["--preset", "tiny", "--max-batch", "four"], ["--max-batch", "expected an integer in [1, 1024], got 'four'"]),
])
def test_export_cli_bad_argument(args, words) -> None:
    result = _export_cli(args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for word in words:
        assert word in result.stderr


def test_export_out_is_a_file(tmp_path) -> None:
    from mirasol.runtime.files.atomic import atomic_directory

    target = tmp_path / "not-a-dir"
    target.write_text("keep me")
    result = _export_cli(["--preset", "tiny", "--no-validate", "--out", str(target)])  # refused before any work
    assert result.exit_code == 1 and result.stderr.splitlines() == [
        f"error: {target} exists and is not a directory; choose another output path"]
    with pytest.raises(OutputError, match=f"{target} exists and is not a directory"):  # the API: an OutputError
        with atomic_directory(target):
            pass
    assert target.read_text() == "keep me"


def test_export_cli_failure_is_one_line_and_traceback_with_debug(tmp_path) -> None:
    (tmp_path / "parent").write_text("a file where the bundle's parent directory should be")
    out = tmp_path / "parent" / "bundle"
    result = _export_cli(["--preset", "tiny", "--no-validate", "--out", str(out)])
    assert result.exit_code == 1, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot create the parent directory of {out}"), lines
    with pytest.raises(OutputError):  # --debug: raised, with its traceback
        _export_cli(["--preset", "tiny", "--no-validate", "--out", str(out), "--debug"])


def test_export_cli_empty_calibration_directory_one_line(tmp_path) -> None:
    try:
        import mirasol.calibration.quantize  # noqa: F401
    except ImportError as missing:
        pytest.skip(f"calibration/quantize.py is not available yet: {missing}")
    (tmp_path / "calib").mkdir()
    result = _export_cli(["--preset", "tiny", "--precision", "int8", "--calibration-data", str(tmp_path / "calib"),
                          "--out", str(tmp_path / "out")])
    assert result.exit_code == 1, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and f"calibration directory {tmp_path / 'calib'} is empty" in lines[0]
    assert not (tmp_path / "out").exists()
