"""Every console script behaves the same (issue 16): -h/--help and --version, every default in its help, one
`error:` line and no traceback for each natural mistake (a missing directory, a missing extra, a file that is not
media, a wrong command line), quiet when its reader goes away (`| head`), one line and exit 130 on Ctrl-C."""
from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

from mirasol.runtime.bundle.reader import Bundle
from mirasol.runtime.cli.bundle_info import describe_bundle, text_limits
from mirasol.runtime.errors import InputError
from mirasol.runtime.pipeline import Pipeline

from .conftest import VENV_BIN, chunk

SCRIPTS = sorted(e.name for e in metadata.distribution("mirasol-edge").entry_points if e.group == "console_scripts")
EXTRA_MODULES = ("torch", "onnx", "onnxscript", "safetensors", "tqdm", "av", "tensorrt", "cuda", "starlette", "uvicorn",
                 "prometheus_client", "websockets")
# Runs a console script's entry point (argv from the command line) as if `modules` were not installed.
WITHOUT = """
import sys
from importlib import metadata
for name in sys.argv.pop(1).split(","):
    sys.modules[name] = None  # `import name` raises ImportError(name=name), as where it is not installed
script = sys.argv.pop(1)
main = next(e for e in metadata.distribution("mirasol-edge").entry_points if e.name == script).load()
sys.exit(main())
"""


def entry_point(script: str):
    return next(e for e in metadata.distribution("mirasol-edge").entry_points if e.name == script).load()


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


def without(modules: tuple[str, ...], script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return run(sys.executable, "-c", WITHOUT, ",".join(modules), script, *args)


def one_error_line(result: subprocess.CompletedProcess[str], code: int = 1) -> str:
    """The run's only stderr line, which must be an `error:` line; exit status `code`; no traceback."""
    assert result.returncode == code, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def parser_of(script: str) -> argparse.ArgumentParser:
    """The parser a script builds (caught as it prints its help)."""
    parsers: list[argparse.ArgumentParser] = []
    with mock.patch.object(argparse.ArgumentParser, "print_help", lambda self, file=None: parsers.append(self)):
        assert entry_point(script)(["--help"]) == 0
    return parsers[0]


def test_the_eight_commands_are_known() -> None:
    assert SCRIPTS == ["mirasol-bench", "mirasol-build-engines", "mirasol-demo", "mirasol-doctor", "mirasol-export",
                       "mirasol-run", "mirasol-serve", "mirasol-train", "mirasol-triton"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_and_version(script: str) -> None:
    for flag in ("-h", "--help"):
        shown = run(str(VENV_BIN / script), flag)
        assert shown.returncode == 0 and shown.stderr == "", shown.stderr
        assert shown.stdout.startswith(f"usage: {script} ") and "--debug" in shown.stdout
        assert "Examples:" in shown.stdout
    version = run(str(VENV_BIN / script), "--version")
    assert version.returncode == 0 and version.stdout == f"{script} (mirasol-edge) {metadata.version('mirasol-edge')}\n"


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_option_explains_itself_and_shows_its_default(script: str) -> None:
    parser = parser_of(script)
    formatter = parser._get_formatter()
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS:
            continue
        assert action.help, f"{script} {action.option_strings[0]} has no help"
        flag = action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction)  # on or off
        if not flag and action.default not in (None, "", []):
            assert "default" in formatter._get_help_string(action), f"{script} {action.option_strings[0]}"
    assert "--debug" in parser.format_help()


def test_help_examples_use_the_quick_starts_bundle() -> None:
    """The quick start writes bundles/demo; the commands that read a bundle show that one in their examples."""
    readers = ("mirasol-run", "mirasol-build-engines", "mirasol-triton", "mirasol-bench", "mirasol-demo",
               "mirasol-serve")
    named = {path for script in readers for path in re.findall(r"bundles/[\w.-]+", parser_of(script).epilog or "")}
    assert named == {"bundles/demo"}
    assert "--out bundles/demo" in parser_of("mirasol-export").epilog


# ---------------------------------------------------------------- natural mistakes, one line each
def test_demo_into_a_missing_directory(tmp_path: Path) -> None:
    line = one_error_line(run(str(VENV_BIN / "mirasol-demo"), str(tmp_path / "no" / "such" / "clip.mp4")))
    assert f"its directory {tmp_path / 'no' / 'such'} does not exist" in line


@pytest.mark.parametrize("script, args, extra", [
    ("mirasol-export", ["--preset", "tiny", "--no-validate"], "export"),
    ("mirasol-bench", ["--quick"], "export"),
    ("mirasol-train", ["--train-clips", "1"], "export"),
    ("mirasol-demo", ["clip.mp4"], "media"),
    ("mirasol-build-engines", ["BUNDLE"], None),
    ("mirasol-serve", ["BUNDLE"], "serve"),
])
def test_a_missing_extra_is_named(tmp_path: Path, tiny_bundle: Path, script: str, args: list[str],
                                  extra: str | None) -> None:
    """As in an install of the runtime alone: no torch, onnx, PyAV, TensorRT. --help still works."""
    args = [str(tiny_bundle) if a == "BUNDLE" else str(tmp_path / a) if a.endswith(".mp4") else a for a in args]
    if script == "mirasol-export":
        args += ["--out", str(tmp_path / "bundle")]
    helped = without(EXTRA_MODULES, script, "--help")
    assert helped.returncode == 0 and helped.stderr == "", helped.stderr
    line = one_error_line(without(EXTRA_MODULES, script, *args))
    if extra is None:  # TensorRT says how it is installed, on a Jetson and elsewhere
        assert "TensorRT is not installed" in line and "mirasol-edge[tensorrt-cu12]" in line
    else:
        assert f'which the [{extra}] extra installs: pip install "mirasol-edge[{extra}]"' in line
    assert list(tmp_path.iterdir()) == []


def test_video_without_pyav_names_the_media_extra(tiny_bundle: Path, tmp_path: Path) -> None:
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"whatever")
    line = one_error_line(without(("av",), "mirasol-run", str(tiny_bundle), "--video", str(clip), "--question", "q"))
    assert line == "error: this needs 'av', which the [media] extra installs: pip install \"mirasol-edge[media]\""


def test_a_file_that_is_not_media_is_said_in_words(tiny_bundle: Path, tmp_path: Path) -> None:
    pytest.importorskip("av")
    notes = tmp_path / "notes.mp4"
    notes.write_text("shopping list: milk, eggs\n" * 20)
    line = one_error_line(run(str(VENV_BIN / "mirasol-run"), str(tiny_bundle), "--video", str(notes),
                              "--question", "q"))
    assert line == (f"error: cannot read media file {notes}: Invalid data found when processing input (FFmpeg "
                    f"reads no video or audio in it)")


@pytest.mark.parametrize("script, args, words", [
    ("mirasol-run", ["BUNDLE"], "one of the arguments --video --chunks --live --info is required"),
    ("mirasol-run", ["BUNDLE", "--chunks", "c.npz"], "--question is required with --chunks"),
    ("mirasol-run", ["BUNDLE", "--info", "--save-chunks", "c.npz"], "--save-chunks goes with --video"),
    ("mirasol-run", ["BUNDLE", "--info", "--graph-threads", "text_decoder"],
     "argument --graph-threads: expected GRAPH=N, got 'text_decoder'"),
    ("mirasol-train", ["--steps", "0"], "argument --steps: expected an integer in [1, 1048576], got '0'"),
    ("mirasol-bench", ["--preset", "tiny", "--bundle", "BUNDLE"], "give --preset or --bundle, not both"),
    ("mirasol-build-engines", ["BUNDLE", "--opt-level", "9"],
     "argument --opt-level: expected an integer in [0, 5], got '9'"),
    ("mirasol-triton", ["BUNDLE"], "the following arguments are required: --out"),
    ("mirasol-export", ["--precision", "int9"], "argument --precision: invalid choice: 'int9'"),
    ("mirasol-demo", ["clip.txt"], "argument out: clip.txt: mirasol-demo writes .mp4, .mkv, .mov files"),
    ("mirasol-demo", ["clip.mp4", "--index", "-5"], "argument --index: expected an integer in [0, "),
    ("mirasol-serve", ["BUNDLE", "--host", "0.0.0.0"], "--host 0.0.0.0 is beyond loopback: give a token"),
])
def test_a_wrong_command_line_exits_2_with_one_error_line(tiny_bundle: Path, script: str, args: list[str],
                                                          words: str) -> None:
    result = run(str(VENV_BIN / script), *[str(tiny_bundle) if a == "BUNDLE" else a for a in args])
    assert result.returncode == 2 and result.stderr.startswith(f"usage: {script}"), result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith(f"{script}: error: {words}"), result.stderr


@pytest.mark.parametrize("script, args", [("mirasol-demo", ["--help"]), ("mirasol-run", ["BUNDLE", "--info"]),
                                          ("mirasol-triton", ["--help"])])
def test_a_reader_that_goes_away_is_not_an_error(tiny_bundle: Path, script: str, args: list[str]) -> None:
    """`mirasol-run BUNDLE --info | head -1`: the reader has gone before the output is written."""
    process = subprocess.Popen([str(VENV_BIN / script), *[str(tiny_bundle) if a == "BUNDLE" else a for a in args]],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process.stdout.close()  # type: ignore[union-attr]
    _, err = process.communicate(timeout=120)
    assert process.returncode == 0 and err == "", err


def test_ctrl_c_is_one_line_and_exit_130(tmp_path: Path) -> None:
    out = tmp_path / "checkpoint"
    # Ctrl-C as a terminal gives it: SIGINT at its default (a background job of a non-interactive shell, as pytest
    # may be, inherits it ignored, and Python then leaves it ignored, as it should)
    process = subprocess.Popen([str(VENV_BIN / "mirasol-train"), "--output", str(out), "--train-clips", "500"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    first = process.stderr.readline()  # type: ignore[union-attr]
    assert "making 500 training clips" in first, first  # the command is at work: interrupt it
    process.send_signal(signal.SIGINT)
    out_text, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert err.strip().splitlines() == ["error: interrupted"] and out_text == ""
    assert not out.exists()


# ---------------------------------------------------------------- what a bundle is; the chunks file
def test_info_describes_the_bundle_and_its_limits_hold(shared_pipeline: Pipeline, tiny_bundle: Path, capsys) -> None:
    from mirasol.runtime.cli.run import main

    assert main([str(tiny_bundle), "--info"]) == 0
    info = capsys.readouterr().out
    assert info == describe_bundle(Bundle.load(tiny_bundle), tiny_bundle) + "\n"
    context = int(shared_pipeline.config["max_text_len"])
    longest, together = text_limits(context, len(shared_pipeline.tokenizer.prompt("")))
    words = " ".join(info.split())  # as wrapped to the terminal
    assert f"at most {longest} bytes (UTF-8); question bytes + answer tokens at most {together}" in words
    assert f"the text context holds {context} tokens" in words
    for part in ("precision fp32; batch 1 to", "combiner.onnx", "text_decoder.onnx", "total",
                 "TensorRT engines: none", "none (exported with --no-validate)", "config: preset tiny"):
        assert part in words, part
    stream = shared_pipeline.stream()  # the limits printed are exact: at them a question is answered, past them not
    stream.push(*chunk(shared_pipeline, 0))
    stream.token_ids("x" * longest, 1)
    stream.token_ids("x" * 10, together - 10)
    with pytest.raises(InputError, match="context holds"):
        stream.token_ids("x" * (longest + 1), 1)
    with pytest.raises(InputError, match="max_new_tokens must be an int in"):
        stream.token_ids("x" * 10, together - 10 + 1)


def test_save_chunks_then_stream_them(demo_fp32_bundle: Path, tmp_path: Path, capsys) -> None:
    """--video X --save-chunks Y decodes once; --chunks Y answers as --video X does; only our file is replaced."""
    pytest.importorskip("av")
    from mirasol.model.cli import demo
    from mirasol.runtime.media.chunks_file import load_chunks
    from mirasol.runtime.cli.run import main

    clip, npz = tmp_path / "clip.mp4", tmp_path / "clip.npz"
    assert demo([str(clip), "--index", "5"]) == 0
    expected = {line.split("Q: ")[1].split(" A: ")[0].strip(): line.split(" A: ")[1].strip()
                for line in capsys.readouterr().out.splitlines() if "Q: " in line}
    question = "which colour appeared first?"
    assert main([str(demo_fp32_bundle), "--video", str(clip), "--save-chunks", str(npz)]) == 0
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"wrote {npz}: 4 chunks")
    video, audio = load_chunks(npz)
    assert video.shape == (16, 3, 32, 32) and audio.shape == (32, 400) and video.dtype == np.float32
    assert main([str(demo_fp32_bundle), "--chunks", str(npz), "--question", question, "--json"]) == 0
    from_npz = json.loads(capsys.readouterr().out)
    assert main([str(demo_fp32_bundle), "--video", str(clip), "--question", question, "--json"]) == 0
    from_video = json.loads(capsys.readouterr().out)
    assert from_npz["tokens"] == from_video["tokens"] and from_npz["answer"] == expected[question]
    assert main([str(demo_fp32_bundle), "--video", str(clip), "--save-chunks", str(npz)]) == 0  # ours: replaced
    mine = tmp_path / "mine.npz"
    np.savez(mine, video=video, audio=audio)  # a chunks file made by hand: read, never replaced
    assert main([str(demo_fp32_bundle), "--chunks", str(mine), "--question", question]) == 0
    assert capsys.readouterr().out.strip() == expected[question]
    before = mine.read_bytes()
    assert main([str(demo_fp32_bundle), "--video", str(clip), "--save-chunks", str(mine)]) == 1
    assert "is not a chunks file written by mirasol" in capsys.readouterr().err and mine.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4", "clip.npz", "mine.npz"]


def test_warnings_are_one_line(tiny_bundle: Path, tmp_path: Path) -> None:
    """A clip without an audio track streams with a warning: one `warning:` line, not Python's two."""
    av = pytest.importorskip("av")
    clip = tmp_path / "silent.mp4"
    with av.open(str(clip), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        for i in range(8):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 30 * i, np.uint8), format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    result = run(str(VENV_BIN / "mirasol-run"), str(tiny_bundle), "--video", str(clip), "--question", "q",
                 "--max-new-tokens", "2")
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [f"warning: {clip} has no audio track; using silence"]



def test_a_blank_answer_says_why(tmp_path: Path, capsys) -> None:
    """A random-init preset answers whitespace; mirasol-run prints it, and one warning line saying why."""
    from mirasol.export.bundle import export_bundle
    from mirasol.model import build_model
    from mirasol.runtime.cli.run import main

    bundle = tmp_path / "tiny"
    export_bundle(build_model("tiny", seed=0), bundle, precision="fp32", validate=False)
    pipe = Pipeline.load(bundle)
    video, audio = chunk(pipe, 0)
    np.savez(tmp_path / "clip.npz", video=video, audio=audio)
    assert main([str(bundle), "--chunks", str(tmp_path / "clip.npz"), "--question", "which colour?"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == "" and len(out) > 1
    assert err.splitlines() == [f"warning: the answer is blank ({len(out) - 1} tokens of whitespace or none): a "
                                f"bundle of a random-init preset answers nothing meaningful; the demo model "
                                f"(mirasol-export's default) or a trained checkpoint does"]
