"""Reads outside, disk fill, hooks (issue 25, cases 6 and 8): a bundle is copied file by file, only what its manifest
lists, regular files only, no link followed, each checked against the manifest; no test hook is reachable from the
environment of a user's shell.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mirasol.runtime.errors import BundleError
from mirasol.runtime.triton.repository import write_repository

from .conftest import VENV_BIN, copy_bundle, finishes_within, read_manifest, snapshot

ROOT = Path(__file__).resolve().parent.parent


# ---- 6. links in a bundle are never followed by the copy -----------------------------------------------------

def test_links_in_a_bundle_subfolder_are_not_copied(tiny_bundle, tmp_path) -> None:
    bundle = copy_bundle(tiny_bundle, tmp_path)
    secret = tmp_path / "secret"
    secret.write_text("the user's secret")
    extras = bundle / "extras"
    extras.mkdir()
    (extras / "readme.txt").symlink_to("../../secret")
    (extras / "up").symlink_to("..")
    (extras / "zero").symlink_to("/dev/zero")
    (bundle / "notes.txt").write_text("a file the manifest does not list")
    model = finishes_within(120, lambda: write_repository(bundle, tmp_path / "repo"))
    copied = model / "1" / "bundle"
    manifest = read_manifest(bundle)
    listed = {"manifest.json", *(g["file"] for g in manifest["graphs"].values())}
    assert {p.name for p in copied.iterdir()} == listed and all(p.is_file() for p in copied.iterdir())
    assert snapshot(copied) == {name: digest for name, digest in snapshot(bundle).items() if name in listed}
    assert not any("secret" in p.read_text(errors="replace") for p in model.rglob("*") if p.is_file())


@pytest.mark.parametrize("kind", ["link inside", "link outside", "fifo", "changed"])
def test_a_listed_file_that_is_not_a_plain_copy_of_the_bundles_is_refused(tiny_bundle, tmp_path, kind) -> None:
    from mirasol.runtime.bundle.reader import Bundle
    from mirasol.runtime.files.copying import Expected, copy_listed

    bundle = copy_bundle(tiny_bundle, tmp_path)
    graph = bundle / "combiner.onnx"
    if kind in ("link inside", "link outside"):
        target = bundle / "real.onnx" if kind == "link inside" else tmp_path / "real.onnx"
        graph.rename(target)
        graph.symlink_to(target)
        words = "it is a symlink"
    elif kind == "fifo":
        graph.unlink()
        os.mkfifo(graph)
        words = "is not a regular file"
    else:
        graph.write_bytes(graph.read_bytes() + b"\0" * 4096)
        words = "the manifest says"
    expected = {g.file: Expected(g.sha256) for g in Bundle.load(tiny_bundle).graphs.values()}
    with pytest.raises(BundleError, match=words):
        finishes_within(60, lambda: copy_listed(bundle, tmp_path / "copy", expected, "bundle file"))
    with pytest.raises(BundleError):
        finishes_within(60, lambda: write_repository(bundle, tmp_path / "repo"))
    assert not (tmp_path / "repo" / "mirasol").exists()


# ---- 8. no test hook in production --------------------------------------------------------------------------

def test_the_old_pause_variable_does_nothing(tiny_bundle, tmp_path) -> None:
    result = subprocess.run([str(VENV_BIN / "mirasol-triton"), str(tiny_bundle), "--out", str(tmp_path / "repo")],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "MIRASOL_PAUSE_AT": "temporary directory made"})
    assert result.returncode == 0 and "paused" not in result.stderr, result.stderr
    assert (tmp_path / "repo" / "mirasol" / "config.pbtxt").is_file()


def test_no_environment_variable_reaches_a_test_hook() -> None:
    """Product code reads no environment variable named like a test hook (PAUSE, TEST, DEBUG_HOOK, HOOK)."""
    found = []
    for folder in ("model", "export", "calibration", "runtime"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and ast.unparse(node.func).endswith(("environ.get", "getenv",
                                                                                    "environ.setdefault")):
                    keys = node.args[:1]
                elif isinstance(node, ast.Subscript) and ast.unparse(node.value).endswith("environ"):
                    keys = [node.slice]
                else:
                    continue
                names = [n.value for k in keys for n in ast.walk(k) if isinstance(n, ast.Constant)]
                if not all(isinstance(n, str) for n in names) or not names:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: an environment variable named at run time")
                elif any(word in str(n).upper() for n in names for word in ("PAUSE", "TEST", "HOOK")):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {names}")
    assert found == []
    import mirasol.runtime.files.atomic as atomic
    assert atomic.PAUSE_HOOK is None, "set only by tests, in their own process"
    assert sys.modules["mirasol.runtime.files.atomic"] is atomic
