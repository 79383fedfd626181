"""Silent wrong behaviour and raw exceptions (issue 25, cases 9 to 14): each probe of the adversarial pass now ends
in one clear error naming what is wrong. The class behind each is closed where it arises: numbers at the one
bounded type (tests/test_numeric_options.py drives every option), a closed stdout in run_command, untrusted npy
headers in the bounded reader, the config and chunk shape the runtime reads in the bundle's runtime contract, OSErrors
of writes in runtime/files, and paths libraries cannot open at Bundle.load.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest

from mirasol.runtime.errors import BundleError, OutputError
from mirasol.runtime.pipeline import Pipeline

from .conftest import QUESTION, VENV_BIN, chunk, copy_bundle, read_manifest, write_manifest


def _one_error_line(result: subprocess.CompletedProcess, code: int = 1) -> str:
    assert result.returncode == code and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, result.stderr
    return errors[0]


def _run(*args: str, shell_suffix: str = "") -> subprocess.CompletedProcess:
    command = " ".join(f"'{a}'" for a in args) + shell_suffix
    return subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=180,
                          stdin=subprocess.DEVNULL)


def _clip(pipe: Pipeline, path: Path) -> Path:
    parts = [chunk(pipe, i) for i in range(2)]
    np.savez(path, video=np.concatenate([v for v, _ in parts]), audio=np.concatenate([a for _, a in parts], axis=1))
    return path


# ---- 9, 10. the issue's command lines ----------------------------------------------------------------------

@pytest.mark.parametrize("script, args, words", [
    ("mirasol-run", ["--live", "x", "--question", "q", "--ask-every", "nan"], "--ask-every: expected a number in"),
    ("mirasol-run", ["--live", "x", "--question", "q", "--ask-every", "1e308"], "got '1e308'"),
    ("mirasol-run", ["--live", "x", "--latency-bound", "inf"], "--latency-bound: expected a number in [0.01, 3600]"),
    ("mirasol-run", ["--chunks", "c.npz", "--threads", "2147483648"], "--threads: expected an integer in [1, 1024]"),
    ("mirasol-run", ["--chunks", "c.npz", "--threads", "-5"], "got '-5'"),
    ("mirasol-run", ["--chunks", "c.npz", "--graph-threads", "text_decoder=99999999999999999999"],
     "--graph-threads: expected an integer in [1, 1024], got '99999999999999999999'"),
    ("mirasol-run", ["--live", "x", "--queue-size", "1e12"], "--queue-size: expected an integer in [1, 100000]"),
    ("mirasol-run", ["--live", "x", "--reconnect", "-1"], "--reconnect: expected an integer in [0, 1000000]"),
    ("mirasol-run", ["--live", "x", "--stall-timeout", "-1"], "--stall-timeout: expected a number in [0.1, 3600]"),
    ("mirasol-triton", ["--out", "r", "--idle-timeout-s", "inf"], "--idle-timeout-s: expected a number in (0, 1e+07]"),
    ("mirasol-triton", ["--out", "r", "--idle-timeout-s", "nan"], "got 'nan'"),
    ("mirasol-triton", ["--out", "r", "--queue-delay-ms", "inf"], "--queue-delay-ms: expected a number in [0, 1e+07]"),
    ("mirasol-triton", ["--out", "r", "--instances", "1e11"], "--instances: expected an integer in [1, 1024]"),
    ("mirasol-triton", ["--out", "r", "--max-sequences", "99999999999"], "--max-sequences: expected an integer"),
])
def test_the_issues_numbers_are_usage_errors(tiny_bundle, script, args, words) -> None:
    line = _one_error_line(_run(str(VENV_BIN / script), str(tiny_bundle), *args), code=2)
    assert words in line, line


# ---- 11. stdout closed ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("source", ["--chunks", "--live"])
def test_closed_stdout_is_one_error_line(shared_pipeline, tiny_bundle, tmp_path, source) -> None:
    clip = _clip(shared_pipeline, tmp_path / "clip.npz")
    result = _run(str(VENV_BIN / "mirasol-run"), str(tiny_bundle), source, str(clip), "--question", QUESTION,
                  "--json", shell_suffix=" >&-")
    assert _one_error_line(result) == ("error: standard output is closed; give it somewhere to go (e.g. > /dev/null "
                                       "to discard the results)")


# ---- 13. npy headers, and manifests the runtime cannot use ---------------------------------------------------

def _unclosed_npy() -> bytes:
    header = b"{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4"
    header += b" " * (63 - 10 - len(header)) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + b"\0" * 48


def test_unclosed_npy_header_in_a_state_file(shared_pipeline, tmp_path) -> None:
    good = shared_pipeline.stream().save(tmp_path / "good.npz")
    bad = tmp_path / "bad.npz"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(bad, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, _unclosed_npy() if info.filename == "header.npy" else zin.read(info))
    with pytest.raises(BundleError, match=r"state file .*bad.npz: header: its .npy header is not readable: "
                                          r"TokenError"):
        shared_pipeline.restore(bad)


def test_unclosed_npy_header_in_a_chunks_file(tiny_bundle, tmp_path) -> None:
    path = tmp_path / "clip.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("video.npy", _unclosed_npy())
        archive.writestr("audio.npy", _unclosed_npy())
    line = _one_error_line(_run(str(VENV_BIN / "mirasol-run"), str(tiny_bundle), "--chunks", str(path),
                                "--question", QUESTION))
    assert line.startswith(f"error: chunks file {path}: video: its .npy header is not readable: TokenError"), line


def _symbolic_mel_axis(manifest: dict, axis: int) -> None:
    for graph in manifest["graphs"].values():
        for tensor in graph["inputs"]:
            if tensor["name"] == "audio":
                tensor["shape"][axis] = "mel_frames"
        graph["axes"]["mel_frames"] = {"min": 1, "opt": 10, "max": 100}


@pytest.mark.parametrize("change, words", [
    (lambda m: _symbolic_mel_axis(m, -1), "the push step's input 'audio' has shape ['batch', 32, 'mel_frames']; a "
                                          "chunk has the fixed shape [batch, 32, N] its config gives"),
    (lambda m: _symbolic_mel_axis(m, 1), "input 'audio' has shape ['batch', 'mel_frames', 100]"),
    (lambda m: m["config"].pop("fps"), "config.fps is missing (the runtime reads fps, frames_per_chunk"),
    (lambda m: m["config"].pop("n_mels"), "config.n_mels is missing"),
    (lambda m: m["graphs"]["combiner"]["inputs"][0].update(dtype="bfloat16"),
     "graphs.combiner.inputs[0].dtype: expected one of ('float32', 'float16'"),
])
def test_a_manifest_the_runtime_cannot_use_is_refused_at_load(tiny_bundle, shared_pipeline, tmp_path, change,
                                                              words) -> None:
    bundle = copy_bundle(tiny_bundle, tmp_path)
    manifest = read_manifest(bundle)
    change(manifest)
    write_manifest(bundle, manifest)
    with pytest.raises(BundleError) as error:
        Pipeline.load(bundle)
    assert words in str(error.value)
    clip = _clip(shared_pipeline, tmp_path / "clip.npz")
    for args in (["--info"], ["--chunks", str(clip), "--question", QUESTION]):
        line = _one_error_line(_run(str(VENV_BIN / "mirasol-run"), str(bundle), *args))
        assert words in line, line


# ---- 14. paths the OS or a library cannot take ---------------------------------------------------------------

def test_a_state_path_too_long(shared_pipeline, tmp_path) -> None:
    stream = shared_pipeline.stream()
    for path in (tmp_path / ("a" * 5000 + ".npz"), tmp_path / (("d" * 200 + "/") * 30 + "x.npz")):
        with pytest.raises(OutputError, match=r"cannot write the stream state file .*….* \(\d+ characters\): "
                                              r"File name too long$"):
            stream.save(path)
    assert list(tmp_path.iterdir()) == []


def test_a_bundle_directory_named_with_byte_ff(tiny_bundle, tmp_path) -> None:
    bundle = Path(os.fsdecode(os.fsencode(tmp_path) + b"/bundle\xff"))
    shutil.copytree(tiny_bundle, bundle)
    with pytest.raises(BundleError, match=r"its path is not UTF-8 text \(byte b'\\xff'\), and onnxruntime and "
                                          r"TensorRT open graph files by UTF-8 paths only; rename or move the bundle"):
        Pipeline.load(bundle)
    result = subprocess.run([os.fsencode(VENV_BIN / "mirasol-run"), os.fsencode(bundle), b"--info"],
                            capture_output=True, timeout=120)
    assert result.returncode == 1 and b"Traceback" not in result.stderr
    assert result.stderr.count(b"error:") == 1 and b"is not UTF-8 text" in result.stderr


def test_errors_of_the_writer_name_the_path(tmp_path) -> None:
    from mirasol.runtime.files.atomic import atomic_file, write_file

    with pytest.raises(OutputError, match=r"cannot write the report .*/missing/r.json: its directory"):
        write_file(tmp_path / "missing" / "r.json", b"{}", what="report")
    (tmp_path / "full").mkdir()
    with pytest.raises(OutputError, match=r"cannot write .*full/r.json: No space left on device"):
        with atomic_file(tmp_path / "full" / "r.json") as tmp:
            raise OSError(28, "No space left on device", str(tmp))
    assert list((tmp_path / "full").iterdir()) == [], "the temporary is removed"
