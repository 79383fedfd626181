"""The README followed as a newcomer would (issue 16): its blocks marked `<!-- tested: NAME ... -->` run as written.

- quick-start: its commands after the install, in this venv (in CI, the fresh `pip install -e ".[dev]"` of .ci/run);
- wheel, device and python: the wheel built as written in a copy of the checkout, then in a fresh venv of their own
  the device block's literal `pip install "dist/mirasol_edge-...whl[media,cpu]"` (no PyTorch) and its commands, on
  the demo bundle this suite exports, as it is copied to a device;
- slow: the quick start verbatim in a fresh venv, `pip install -e ".[dev]"` included.

Each answer is checked against the one `mirasol-demo` prints for its question. A fresh venv is made from a copy of
the source (what pyproject.toml packages), so that nothing is built inside the checkout.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from .conftest import VENV_BIN, marked_block

ROOT = Path(__file__).resolve().parents[1]
# pip's words when it cannot reach a package index (offline): then the fresh-venv tests skip
OFFLINE = re.compile(r"No matching distribution found|Could not find a version|Failed to establish a new connection|"
                     r"Temporary failure in name resolution|Network is unreachable")


def readme_block(name: str) -> str:
    return marked_block(ROOT / "README.md", name)


def commands(block: str) -> list[str]:
    """The block's commands: one per line, `&&` chains split."""
    lines = [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [part.strip() for line in lines for part in line.split("&&")]


def environment(bin_dir: Path) -> dict[str, str]:
    """PATH with `bin_dir` first and no other venv of ours on it; nothing that would put a checkout on sys.path."""
    path = [bin_dir, *(p for p in os.environ.get("PATH", "").split(os.pathsep) if p and Path(p) != VENV_BIN)]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    return {**env, "PATH": os.pathsep.join(str(p) for p in path)}


def shell(command: str, cwd: Path, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def source_copy(target: Path) -> Path:
    """pyproject.toml, README.md and the package directories pyproject.toml maps, without build leftovers."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    folders = {name.split(".")[1] for name in project["tool"]["setuptools"]["packages"]}
    target.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, target / name)
    for folder in sorted(folders):
        shutil.copytree(ROOT / folder, target / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return target


def fresh_venv(path: Path) -> Path:
    """A new venv (from the interpreter behind this one); skips where none can be made."""
    made = subprocess.run([sys.executable, "-m", "venv", str(path)], capture_output=True, text=True, timeout=300)
    if made.returncode != 0 or not (path / "bin" / "pip").is_file():
        pytest.skip(f"cannot make a venv here (python -m venv: {made.stderr.strip()[-300:] or 'no pip in it'})")
    return path / "bin"


def pip_install(command: str, cwd: Path, env: dict[str, str]) -> None:
    done = shell(command, cwd, env, timeout=1200)
    output = done.stdout + done.stderr
    if done.returncode != 0 and OFFLINE.search(output):
        pytest.skip(f"pip cannot reach a package index here: {OFFLINE.search(output).group(0)}")
    assert done.returncode == 0, output[-3000:]


def demo_answers(output: str) -> dict[str, str]:
    """question -> expected answer, from what `mirasol-demo` printed."""
    return {line.split("Q: ")[1].split(" A: ")[0].strip(): line.split(" A: ")[1].strip()
            for line in output.splitlines() if "Q: " in line and " A: " in line}


def question_of(command: str) -> str | None:
    words = shlex.split(command, comments=True)
    return words[words.index("--question") + 1] if "--question" in words else None


def follow(block: str, cwd: Path, env: dict[str, str]) -> dict[str, str]:
    """Run the block's commands in order; each must succeed, and each answer must be the one mirasol-demo gives
    for its question. Returns what mirasol-demo printed, as question -> answer."""
    expected: dict[str, str] = {}
    for command in commands(block):
        done = shell(command, cwd, env)
        assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        if command.startswith("mirasol-demo "):
            expected = demo_answers(done.stdout)
        question = question_of(command)
        if question is not None:
            assert done.stdout.strip() == expected[question], (command, done.stdout, done.stderr)
    return expected


def install_command(block: str) -> tuple[str, str]:
    """The block's `pip install` of the wheel (as written: the wheel of this version) and the rest of the block."""
    first, _, rest = block.partition("\n")
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert first.startswith(f'pip install "dist/mirasol_edge-{version}-py3-none-any.whl['), first
    return first, rest


# ---------------------------------------------------------------- in CI
def test_quick_start_commands(tmp_path: Path) -> None:
    """The quick start's commands after its `pip install -e ".[dev]"` (this venv is that install)."""
    block = readme_block("quick-start")
    first, *rest = commands(block)
    assert first == 'pip install -e ".[dev]"'
    follow("\n".join(rest), tmp_path, environment(VENV_BIN))
    assert (tmp_path / "bundles" / "demo" / "manifest.json").is_file() and (tmp_path / "clip.mp4").is_file()


def test_device_install_without_pytorch(tmp_path: Path, demo_fp32_bundle: Path) -> None:
    """The wheel built as README says, then the device block verbatim in a fresh venv (the runtime, ONNX Runtime
    and PyAV only), on the bundle exported where PyTorch is."""
    bin_dir = fresh_venv(tmp_path / "venv")
    env = environment(bin_dir)
    source = source_copy(tmp_path / "source")
    work = tmp_path / "device"
    shutil.copytree(demo_fp32_bundle, work / "bundles" / "demo")
    [wheel] = commands(readme_block("wheel"))
    pip_install(wheel, source, env)  # in the checkout, as written
    shutil.copytree(source / "dist", work / "dist")  # copied to the device with the bundle
    install, rest = install_command(readme_block("device"))
    pip_install(install, work, env)
    absent = shell("python -c 'import torch'", work, env)
    assert absent.returncode != 0 and "No module named 'torch'" in absent.stderr, "the runtime install has PyTorch"
    expected = follow(rest, work, env)
    assert (work / "clip.npz").is_file()
    for command in ("mirasol-export --out bundles/again", "mirasol-train", "mirasol-bench --quick"):
        done = shell(command, work, env)
        assert done.returncode == 1 and done.stderr.splitlines() == [
            "error: this needs 'torch', which the [export] extra installs: pip install \"mirasol-edge[export]\""], \
            (command, done.stderr)
    assert not (work / "bundles" / "again").exists() and not (work / "checkpoints").exists()

    example = readme_block("python")
    (work / "example.py").write_text(example)
    ran = shell("python example.py", work, env)
    assert ran.returncode == 0, ran.stderr
    questions = re.findall(r'"([^"]+\?)"', example)
    assert ran.stdout.splitlines() == [expected[q] for q in questions]


# ---------------------------------------------------------------- slow: the whole quick start in a fresh venv
@pytest.mark.slow
def test_quick_start_verbatim_in_a_fresh_venv(tmp_path: Path) -> None:
    """`pip install -e ".[dev]" && ...` exactly as written, in a fresh venv inside a copy of the checkout."""
    bin_dir = fresh_venv(tmp_path / "venv")
    env = environment(bin_dir)
    source = source_copy(tmp_path / "source")
    install, *rest = commands(readme_block("quick-start"))
    pip_install(install, source, env)
    follow("\n".join(rest), source, env)
    assert shell("python -c 'import torch, mirasol.model'", source, env).returncode == 0
