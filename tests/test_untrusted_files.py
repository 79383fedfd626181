"""Files from elsewhere (issue 9): state files go through the bounded reader and never unpickle; bundle file
names and symlinks cannot leave the bundle; no code is ever loaded from a file."""
from __future__ import annotations

import ast
import json
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mirasol.runtime.bundle.reader import Bundle, sha256_file
from mirasol.runtime.errors import BundleError, InputError
from mirasol.runtime.bundle.manifest import MANIFEST_FILE
from mirasol.runtime.pipeline import STATE_FORMAT, STATE_VERSION, Pipeline

from .conftest import (chunk, copy_bundle, read_manifest,
                       write_manifest)

REPO = Path(__file__).resolve().parent.parent


# ---- state files -------------------------------------------------------------------------------------------

def _other_bundle(tiny_bundle: Path, tmp_path: Path) -> Path:
    """A valid bundle with other graphs (one graph's metadata changed, its checksum updated)."""
    import onnx

    other = copy_bundle(tiny_bundle, tmp_path, "other")
    model = onnx.load(str(other / "combiner.onnx"))
    onnx.helper.set_model_props(model, {"note": "another bundle"})
    onnx.save(model, str(other / "combiner.onnx"))
    data = read_manifest(other)
    data["graphs"]["combiner"]["sha256"] = sha256_file(other / "combiner.onnx")
    write_manifest(other, data)
    return other


def _saved_state(pipe: Pipeline, path: Path, chunks: int = 3) -> Path:
    stream = pipe.stream()
    for i in range(chunks):
        stream.push(*chunk(pipe, i))
    return stream.save(path)


def test_state_file_from_another_bundle(tiny_bundle, shared_pipeline, tmp_path) -> None:
    state = _saved_state(shared_pipeline, tmp_path / "state.npz")
    other = Pipeline.load(_other_bundle(tiny_bundle, tmp_path))
    with pytest.raises(BundleError, match=f"state file {state} was saved with another bundle"):
        other.restore(state)
    with pytest.raises(BundleError, match="saved with another bundle"):
        other.bundle.read_state(state, STATE_FORMAT, STATE_VERSION)


def _write_state(path: Path, header: Any, arrays: dict[str, np.ndarray]) -> Path:
    with open(path, "wb") as f:
        np.savez(f, header=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8), **arrays)
    return path


def _state_parts(pipe: Pipeline, tmp_path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    with np.load(_saved_state(pipe, tmp_path / "good.npz"), allow_pickle=False) as data:
        header = json.loads(bytes(data["header"]).decode())
        return header, {name: data[name] for name in data.files if name != "header"}


def test_state_file_round_trip_through_the_bounded_reader(shared_pipeline, tmp_path) -> None:
    header, arrays = _state_parts(shared_pipeline, tmp_path)
    read_header, read_arrays = shared_pipeline.bundle.read_state(tmp_path / "good.npz", STATE_FORMAT, STATE_VERSION)
    assert read_header == header and read_arrays.keys() == arrays.keys()
    assert all(np.array_equal(read_arrays[k], arrays[k]) and read_arrays[k].dtype == arrays[k].dtype for k in arrays)


def _huge_npy_member(path: Path, member: str, shape: tuple[int, ...]) -> None:
    """Replace one array of an .npz by a tiny entry whose npy header promises `shape` (a size bomb)."""
    header = {"descr": "<f4", "fortran_order": False, "shape": shape}
    import io
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, header)
    buffer.write(b"\0" * 64)
    entries = {}
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            entries[info.filename] = archive.read(info)
    entries[member] = buffer.getvalue()
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)


BAD_STATE_FILES = {
    # name: (how to make it, words of the message of the bounded reader)
    "not a zip": (lambda p, h, a: p.write_bytes(b"PK\x03\x04 garbage"), ["is not a readable .npz"]),
    "size bomb header": (lambda p, h, a: (_write_state(p, h, a), _huge_npy_member(p, "state/av_key_0.npy", (1 << 40,))),
                         ["state/av_key_0", "expected shape within [1, 4, '0..8', 16]", "[1099511627776]"]),
    "wrong heads": (lambda p, h, a: _write_state(p, h, {**a, "state/av_key_0": np.zeros((1, 3, 8, 16), np.float32)}),
                    ["state/av_key_0", "expected shape within [1, 4, '0..8', 16], got [1, 3, 8, 16]"]),
    "past the window": (lambda p, h, a: _write_state(p, h, {**a, "state/av_memory": np.zeros((1, 40, 64), np.float32)}),
                        ["state/av_memory", "'0..32'", "got [1, 40, 64]"]),
    "wrong dtype": (lambda p, h, a: _write_state(p, h, {**a, "state/av_memory": a["state/av_memory"].astype("f8")}),
                    ["state/av_memory", "expected dtype float32, got float64"]),
    "object array": (lambda p, h, a: _write_state(p, h, {**a, "state/av_memory": np.array([object()])}),
                     ["state/av_memory", "expected dtype float32"]),
    "missing array": (lambda p, h, a: _write_state(p, h, {k: v for k, v in a.items() if k != "state/av_value_1"}),
                      ["state/av_value_1 is missing"]),
    "extra array": (lambda p, h, a: _write_state(p, h, {**a, "state/extra": np.zeros(3, np.float32)}),
                    ["unexpected entries ['state/extra.npy']"]),
    "batch not an int": (lambda p, h, a: _write_state(p, {**h, "batch": "abc"}, a), ["batch must be an integer"]),
    "batch too large": (lambda p, h, a: _write_state(p, {**h, "batch": 5}, a), ["batch must be an integer in [1, 4]"]),
    "negative chunks": (lambda p, h, a: _write_state(p, {**h, "chunks": -1}, a), ["chunks must be a non-negative"]),
    "header not an object": (lambda p, h, a: _write_state(p, [1, 2], a), ["header is not a JSON object"]),
    "unknown format": (lambda p, h, a: _write_state(p, {**h, "version": 99}, a), ["unknown format", "v99"]),
    "NaN in the cache": (lambda p, h, a: _write_state(p, h, {**a, "state/av_memory": a["state/av_memory"] * np.nan}),
                         ["state/av_memory holds NaN or inf"]),
}


@pytest.mark.parametrize("case", list(BAD_STATE_FILES))
def test_bad_state_file_is_refused_by_the_bounded_reader(shared_pipeline, tmp_path, case) -> None:
    make, words = BAD_STATE_FILES[case]
    header, arrays = _state_parts(shared_pipeline, tmp_path)
    path = tmp_path / "bad.npz"
    make(path, header, arrays)
    with pytest.raises(BundleError) as error:
        shared_pipeline.bundle.read_state(path, STATE_FORMAT, STATE_VERSION)
    assert str(path) in str(error.value)
    for word in words:
        assert word in str(error.value), str(error.value)


@pytest.mark.parametrize("case", list(BAD_STATE_FILES))
def test_bad_state_file_is_refused_by_restore(shared_pipeline, tmp_path, case) -> None:
    make, _ = BAD_STATE_FILES[case]
    header, arrays = _state_parts(shared_pipeline, tmp_path)
    path = tmp_path / "bad.npz"
    make(path, header, arrays)
    with pytest.raises(BundleError, match="state file"):
        shared_pipeline.restore(path)


def test_bounded_npz_bounds_sizes_before_reading(shared_pipeline, tmp_path) -> None:
    from mirasol.runtime.bundle.reader import BoundedNpz

    state = _saved_state(shared_pipeline, tmp_path / "state.npz")
    with pytest.raises(BundleError, match=r"state.npz is \d+ bytes, over the 1000-byte limit"):
        BoundedNpz(state, str(state), max_bytes=1000).__enter__()
    bomb = tmp_path / "bomb.npz"
    np.savez_compressed(bomb, video=np.zeros((64, 3, 64, 64), np.float32))  # 3 MB of zeros in a few KB
    assert bomb.stat().st_size < 100_000
    with pytest.raises(InputError, match=r"bomb.npz: its entries declare \d+ bytes, over the 1000000-byte limit"):
        with BoundedNpz(bomb, str(bomb), max_bytes=1_000_000, error=InputError):
            pass
    with BoundedNpz(bomb, "clip", max_bytes=10_000_000, error=InputError) as npz:
        assert npz.names == {"video"}
        assert npz.read("video", np.float32, ((1, 100), (3, 3), (1, 64), (1, 64))).shape == (64, 3, 64, 64)
        with pytest.raises(InputError, match=r"clip: video: expected shape within \['1..32', 3, 64, 64\], got "
                                             r"\[64, 3, 64, 64\]"):
            npz.read("video", np.float32, ((1, 32), (3, 3), (64, 64), (64, 64)))
        with pytest.raises(InputError, match="clip: audio is missing"):
            npz.read("audio", np.float32, ((1, 10),))
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    with pytest.raises(BundleError, match=f"state file {truncated}"):
        shared_pipeline.bundle.read_state(truncated, STATE_FORMAT, STATE_VERSION)


def test_state_file_never_unpickles(shared_pipeline, tmp_path) -> None:
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    header, arrays = _state_parts(shared_pipeline, tmp_path)
    path = tmp_path / "evil.npz"
    with open(path, "wb") as f:  # np.save pickles object arrays: the payload would run on an unpickling load
        np.savez(f, header=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8),
                 **{**arrays, "state/av_memory": np.array([Payload()], dtype=object)})
    with pytest.raises(BundleError):
        shared_pipeline.bundle.read_state(path, STATE_FORMAT, STATE_VERSION)
    with pytest.raises(BundleError):
        shared_pipeline.restore(path)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------------
# 3. Security
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../combiner.onnx", "../../etc/passwd", "/etc/passwd", "sub/combiner.onnx",
                                  "..", ".", "", "..\\combiner.onnx", "C:combiner.onnx", "combiner.onnx\x00.txt"])
def test_manifest_file_names_cannot_leave_the_bundle(tiny_bundle, tmp_path, name) -> None:
    bundle = copy_bundle(tiny_bundle, tmp_path)
    shutil.copy(bundle / "combiner.onnx", tmp_path / "combiner.onnx")  # what '../combiner.onnx' would reach
    data = read_manifest(bundle)
    data["graphs"]["combiner"]["file"] = name
    write_manifest(bundle, data)
    with pytest.raises(BundleError, match="is not a plain file name inside the bundle" if name
                       else "graphs.combiner.file: expected a non-empty string, got ''"):
        Bundle.load(bundle)


@pytest.mark.parametrize("field", ["external_data", "engine"])
def test_other_manifest_file_names_cannot_leave_the_bundle(tiny_bundle, tmp_path, field) -> None:
    bundle = copy_bundle(tiny_bundle, tmp_path)
    data = read_manifest(bundle)
    data["graphs"]["combiner"][field] = ["../weights.data"] if field == "external_data" else {"file": "../x.engine"}
    write_manifest(bundle, data)
    with pytest.raises(BundleError, match="'../.*' is not a plain file name inside the bundle"):
        Bundle.load(bundle)


def test_symlinks_pointing_out_of_the_bundle_are_refused(tiny_bundle, tmp_path) -> None:
    bundle = copy_bundle(tiny_bundle, tmp_path)
    outside = tmp_path / "outside.onnx"
    shutil.move(bundle / "combiner.onnx", outside)
    (bundle / "combiner.onnx").symlink_to(outside)  # same bytes, same checksum: only the link is wrong
    with pytest.raises(BundleError, match="'combiner.onnx' is a symlink to .*outside.onnx, outside the bundle"):
        Pipeline.load(bundle)
    # a file the manifest does not name (e.g. external data a graph refers to itself) is checked too
    bundle2 = copy_bundle(tiny_bundle, tmp_path, "b2")
    (bundle2 / "weights.data").symlink_to("/etc/hostname")
    with pytest.raises(BundleError, match="'weights.data' is a symlink to /etc/hostname, outside the bundle"):
        Bundle.load(bundle2)
    bundle3 = copy_bundle(tiny_bundle, tmp_path, "b3")
    (bundle3 / "subdir").symlink_to(tmp_path)  # a link to a directory outside
    with pytest.raises(BundleError, match="'subdir' is a symlink"):
        Bundle.load(bundle3)


def test_manifest_symlink_pointing_out_is_refused(tiny_bundle, tmp_path) -> None:
    bundle = copy_bundle(tiny_bundle, tmp_path)
    shutil.move(bundle / MANIFEST_FILE, tmp_path / "elsewhere.json")
    (bundle / MANIFEST_FILE).symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(BundleError, match="outside the bundle directory"):
        Bundle.load(bundle)


def test_symlinks_inside_the_bundle_are_fine(tiny_bundle, tmp_path) -> None:
    bundle = copy_bundle(tiny_bundle, tmp_path)
    shutil.move(bundle / "combiner.onnx", bundle / "combiner-v1.onnx")
    (bundle / "combiner.onnx").symlink_to("combiner-v1.onnx")
    Bundle.load(bundle)
    linked = tmp_path / "linked"
    linked.symlink_to(bundle)  # the bundle directory itself reached through a link
    Bundle.load(linked)


def test_external_data_checksums_are_verified_when_recorded(tiny_bundle, tmp_path) -> None:
    bundle = copy_bundle(tiny_bundle, tmp_path)
    (bundle / "combiner.onnx.data").write_bytes(b"weights")
    data = read_manifest(bundle)
    data["graphs"]["combiner"]["external_data"] = ["combiner.onnx.data"]
    data["graphs"]["combiner"]["external_sha256"] = {"combiner.onnx.data": sha256_file(bundle / "combiner.onnx.data")}
    write_manifest(bundle, data)
    Bundle.load(bundle)
    (bundle / "combiner.onnx.data").write_bytes(b"weightz")
    with pytest.raises(BundleError, match="combiner.onnx.data: checksum of external data of graph 'combiner'"):
        Bundle.load(bundle)
    Bundle.load(bundle, verify=False)
    data["graphs"]["combiner"]["external_sha256"] = {"other.data": "0" * 64}
    write_manifest(bundle, data)
    with pytest.raises(BundleError, match="checksum for 'other.data', which is not one of its external_data"):
        Bundle.load(bundle, verify=False)


SHIPPED = ("runtime", "export", "calibration")


def _python_files(*folders: str) -> list[Path]:
    return [p for folder in folders for p in sorted((REPO / folder).rglob("*.py"))]


@pytest.mark.parametrize("folder", [*SHIPPED, "model"])
def test_no_code_is_ever_loaded_from_files(folder) -> None:
    """No pickle / marshal / eval anywhere the toolkit reads files; every np.load passes allow_pickle=False."""
    problems = []
    for path in _python_files(folder):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                if any(n and n.split(".")[0] in ("pickle", "cPickle", "dill", "marshal", "shelve", "joblib", "yaml")
                       for n in names):
                    problems.append(f"{where}: imports {names}")
            if isinstance(node, ast.Call):
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                owner = getattr(func.value, "id", "") if isinstance(func, ast.Attribute) else ""
                if isinstance(func, ast.Name) and name in ("eval", "exec", "compile", "__import__"):
                    problems.append(f"{where}: calls {name}()")
                if name == "load" and owner in ("np", "numpy"):
                    flags = {k.arg: k.value for k in node.keywords}
                    flag = flags.get("allow_pickle")
                    if not (isinstance(flag, ast.Constant) and flag.value is False):
                        problems.append(f"{where}: np.load without allow_pickle=False")
                if name == "load" and owner == "torch":
                    problems.append(f"{where}: torch.load (pickle)")
    assert not problems, "\n".join(problems)
