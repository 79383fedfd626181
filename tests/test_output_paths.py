"""Outputs (issue 13, items 1 and 2): nothing of the user's is lost, and concurrent writers never collide.

Every command that writes a directory refuses, before any work, a path holding anything it did not write, and
`.`, `..`, `~`, `/`, home, the working directory and mount points; a file is replaced only if it is ours.
Temporary names are unique and locked, so writers sharing a folder (even with the same PID) keep their work.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

from mirasol.runtime.errors import ExportError, MirasolError, OutputError
from mirasol.runtime.files.atomic import atomic_file, prepare_output_dir
from mirasol.runtime.files.ownership import MARKER_FILE, check_output_dir

from .conftest import QUESTION, chunk, copy_bundle, run_export_cli as _export_cli, snapshot

BUNDLE_MANIFEST = '{"format": "mirasol-bundle", "writer": "%s"}'


def _user_folder(path: Path) -> Path:
    """A folder of the user's: a note and a subfolder with a document."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "notes.txt").write_text("my notes")
    (path / "Documents").mkdir()
    (path / "Documents" / "thesis.tex").write_text("years of work")
    return path


def _refused_before_any_work(result, where: Path | str, before: dict[str, str], folder: Path) -> None:
    assert result.exit_code == 1, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(where) in lines[0], lines
    assert "building model" not in result.stdout  # refused before the model was even built
    assert snapshot(folder) == before


# ---- 1. --out is refused unless it is ours (or new, or empty) ------------------------------------------------

def test_export_refuses_a_directory_of_user_files(tmp_path) -> None:
    folder = _user_folder(tmp_path / "mine")
    before = snapshot(folder)
    result = _export_cli(["--preset", "tiny", "--no-validate", "--out", str(folder)])
    _refused_before_any_work(result, folder, before, folder)
    assert "is not a mirasol bundle" in result.stderr and "'Documents', 'notes.txt'" in result.stderr


def test_export_refuses_the_working_directory(tmp_path, monkeypatch) -> None:
    scratch = _user_folder(tmp_path / "scratch")
    before = snapshot(scratch)
    monkeypatch.chdir(scratch)
    for out in (".", str(scratch)):
        result = _export_cli(["--preset", "tiny", "--no-validate", "--out", out])
        _refused_before_any_work(result, out, before, scratch)
    result = _export_cli(["--preset", "tiny", "--no-validate", "--out", ".."])
    _refused_before_any_work(result, "..", before, scratch)


def test_export_refuses_home_even_when_told_to(tmp_path, monkeypatch) -> None:
    home = _user_folder(tmp_path / "home")
    (home / ".bashrc").write_text("export PATH=...")
    monkeypatch.setenv("HOME", str(home))
    before = snapshot(home)
    result = _export_cli(["--preset", "tiny", "--no-validate", "--out", str(home)])
    _refused_before_any_work(result, home, before, home)
    assert "home directory" in result.stderr


def test_export_refuses_root_and_mount_points(tmp_path) -> None:
    result = _export_cli(["--preset", "tiny", "--no-validate", "--out", "/"])
    assert result.exit_code == 1 and "'/' is not an output directory" in result.stderr, result.output
    mount = next((p for p in ("/proc", "/sys", "/dev") if os.path.ismount(p)), None)
    if mount is None:
        pytest.skip("no mount point to try here")
    result = _export_cli(["--preset", "tiny", "--no-validate", "--out", mount])
    assert result.exit_code == 1 and f"error: {mount} is a mount point" in result.stderr, result.output
    assert "building model" not in result.stdout


def test_a_bundle_holding_a_user_file_is_not_replaced(tiny_bundle, tmp_path) -> None:
    from mirasol.runtime.files.atomic import atomic_directory

    bundle = copy_bundle(tiny_bundle, tmp_path)
    (bundle / "README.txt").write_text("what I learned about this bundle")
    before = snapshot(bundle)
    with pytest.raises(OutputError, match=r"is a mirasol bundle that also holds 'README.txt', which mirasol did not "
                                          r"write"):
        with atomic_directory(bundle):
            pytest.fail("the block must not run")
    assert snapshot(bundle) == before


def test_a_bundle_and_an_empty_directory_are_written(tiny_bundle, tmp_path) -> None:
    from mirasol.runtime.files.atomic import atomic_directory

    bundle = copy_bundle(tiny_bundle, tmp_path)
    (bundle / "combiner.fp16.engine").write_bytes(b"an engine built earlier, no longer recorded")
    empty = tmp_path / "empty"
    empty.mkdir()
    for target in (bundle, empty):
        with atomic_directory(target) as work:
            (work / "manifest.json").write_text(BUNDLE_MANIFEST % "new")
        assert sorted(p.name for p in target.iterdir()) == ["manifest.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "empty"]


def test_user_files_moved_in_during_an_export_are_kept(tmp_path) -> None:
    from mirasol.runtime.files.atomic import atomic_directory

    target = tmp_path / "out"
    with pytest.raises(OutputError, match="notes.txt"):
        with atomic_directory(target) as work:
            (work / "manifest.json").write_text(BUNDLE_MANIFEST % "new")
            _user_folder(target)  # the user put something there while the export ran
    assert (target / "notes.txt").read_text() == "my notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_other_kinds_are_not_mistaken_for_each_other(tmp_path) -> None:
    checkpoint = prepare_output_dir(tmp_path / "ckpt", "checkpoint")
    assert (checkpoint / MARKER_FILE).is_file()
    assert prepare_output_dir(checkpoint, "checkpoint") == checkpoint  # ours: written into again
    with pytest.raises(OutputError, match="is a mirasol checkpoint, not a bundle|is not a mirasol bundle"):
        check_output_dir(checkpoint, "bundle")
    with pytest.raises(OutputError, match="is a mirasol checkpoint, not a calibration cache"):
        prepare_output_dir(checkpoint, "calibration cache")
    with pytest.raises(OutputError, match="not a directory"):
        (tmp_path / "file").write_text("x")
        check_output_dir(tmp_path / "file", "bundle")
    (tmp_path / "link").symlink_to(checkpoint)
    with pytest.raises(OutputError, match="is a symlink"):
        check_output_dir(tmp_path / "link", "checkpoint")
    with pytest.raises(OutputError, match="must be a str or an os.PathLike, got bytes"):
        check_output_dir(os.fsencode(tmp_path / "new"), "bundle")


# ---- the same rule for every other writer of a directory -------------------------------------------------------

def test_training_output_is_refused_before_training(tmp_path, capsys) -> None:
    from mirasol.model.cli import train
    from mirasol.model.train import run_training

    folder = _user_folder(tmp_path / "mine")
    before = snapshot(folder)
    with pytest.raises(OutputError, match="is not a checkpoint written by mirasol"):
        run_training(output=folder, train_clips=1, val_clips=1, test_clips=1, steps=1, log=pytest.fail)
    assert train(["--output", str(folder), "--train-clips", "1"]) == 1
    assert capsys.readouterr().err.startswith(f"error: {folder} exists and is not a checkpoint written by mirasol")
    assert snapshot(folder) == before


def test_training_never_writes_into_the_package(tmp_path, capsys) -> None:
    """The shipped demo checkpoint is not the default output, and is refused as any output (issue 16)."""
    from mirasol.model.cli import train
    from mirasol.model.demo_task import DEMO_CHECKPOINT, TRAIN_OUTPUT
    from mirasol.model.train import run_training

    assert not TRAIN_OUTPUT.is_absolute() and TRAIN_OUTPUT.resolve() != DEMO_CHECKPOINT
    before = snapshot(DEMO_CHECKPOINT)
    for inside in (DEMO_CHECKPOINT, DEMO_CHECKPOINT.parent / "other", DEMO_CHECKPOINT.parent.parent):
        with pytest.raises(OutputError, match="is inside the installed package"):
            run_training(output=inside, train_clips=1, val_clips=1, test_clips=1, steps=1, log=pytest.fail)
    assert train(["--output", str(DEMO_CHECKPOINT), "--train-clips", "1"]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "is inside the installed package" in lines[0]
    assert snapshot(DEMO_CHECKPOINT) == before


def test_checkpoint_is_written_only_where_ours(tmp_path) -> None:
    from mirasol.model import build_model, load_checkpoint
    from mirasol.model.checkpoint import save_checkpoint
    from mirasol.model.demo_task import DEMO_CHECKPOINT

    model = build_model("tiny")
    folder = _user_folder(tmp_path / "mine")
    with pytest.raises(OutputError):
        save_checkpoint(model, folder)
    assert sorted(p.name for p in folder.iterdir()) == ["Documents", "notes.txt"]
    saved = save_checkpoint(model, tmp_path / "ckpt")
    save_checkpoint(model, saved)  # our own checkpoint: replaced
    assert load_checkpoint(saved).config == model.config
    check_output_dir(DEMO_CHECKPOINT, "checkpoint")  # the shipped demo checkpoint carries the marker


def test_benchmark_export_dir_is_refused_before_any_work(tmp_path) -> None:
    from mirasol.export.bench.run import run_benchmark

    folder = _user_folder(tmp_path / "mine")
    before = snapshot(folder)
    messages: list[str] = []
    with pytest.raises(OutputError, match="is not a benchmark export directory written by mirasol"):
        run_benchmark(quick=True, export_dir=folder, progress=messages.append)
    assert messages == [] and snapshot(folder) == before


def test_calibration_cache_directory(tmp_path) -> None:
    from mirasol.calibration.quantize import CalibrationCache

    folder = _user_folder(tmp_path / "mine")
    with pytest.raises(OutputError, match="is not a calibration cache written by mirasol"):
        CalibrationCache(folder)
    legacy = tmp_path / "legacy"  # a cache written before the marker: only our file names
    legacy.mkdir()
    (legacy / f"{'a' * 24}.ranges.json").write_text("{}")
    (legacy / f"{'b' * 24}.sweep.json").write_text("{}")
    cache = CalibrationCache(legacy)
    cache.save_sweep("c" * 24, {"exclude": []})
    assert cache.sweep("c" * 24) == {"exclude": []} and (legacy / MARKER_FILE).is_file()
    assert CalibrationCache(tmp_path / "new").directory == tmp_path / "new"


def test_demo_clip_replaces_only_its_own_clips(tmp_path, capsys) -> None:
    pytest.importorskip("av")
    from mirasol.model.cli import demo
    from mirasol.model.demo_task import is_demo_clip

    mine = tmp_path / "holiday.mp4"
    mine.write_bytes(b"not really a video, but mine")
    assert demo([str(mine)]) == 1
    assert "error: " in capsys.readouterr().err and mine.read_bytes() == b"not really a video, but mine"
    clip = tmp_path / "clip.mp4"
    assert demo([str(clip)]) == 0
    assert is_demo_clip(clip) and not is_demo_clip(mine)
    assert demo([str(clip), "--index", "1"]) == 0  # a clip mirasol-demo wrote: replaced
    assert is_demo_clip(clip) and sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4", "holiday.mp4"]


# ---- 2. unique temporary names -------------------------------------------------------------------------------

SAME_PID_WRITER = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    os.getpid = lambda: int(sys.argv[2])  # a second container: the same PID as the other writer
    import mirasol.runtime.files.atomic as atomic

    with atomic.atomic_directory(Path(sys.argv[1])) as work:
        (work / "manifest.json").write_text('{"format": "mirasol-bundle", "writer": "other"}')
        print("writing", flush=True)
        sys.stdin.readline()  # meanwhile the other writer exports to the same target
        (work / "graph.onnx").write_bytes(b"the other writer's graph")
    print("finished", flush=True)
""")


def test_two_writers_with_the_same_pid_keep_each_others_work(tmp_path) -> None:
    from mirasol.runtime.files.atomic import atomic_directory

    target = tmp_path / "bundle"
    other = subprocess.Popen([sys.executable, "-c", SAME_PID_WRITER, str(target), str(os.getpid())],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "writing", other.stderr.read()
        with atomic_directory(target) as work:  # cleans up stale leftovers: the live writer's are not stale
            (work / "manifest.json").write_text(BUNDLE_MANIFEST % "this")
        assert '"this"' in (target / "manifest.json").read_text()
        out, err = other.communicate("go\n", timeout=60)
    finally:
        other.kill()
    assert other.returncode == 0 and "finished" in out, err
    assert '"other"' in (target / "manifest.json").read_text()  # the last complete export wins
    assert (target / "graph.onnx").read_bytes() == b"the other writer's graph"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_many_streams_saving_to_one_path(shared_pipeline, tmp_path) -> None:
    path = tmp_path / "state.npz"
    streams = [shared_pipeline.stream() for _ in range(8)]
    for n, stream in enumerate(streams):
        for i in range(n + 1):
            stream.push(*chunk(shared_pipeline, i))
    failures: list[BaseException] = []

    def save(stream) -> None:
        for _ in range(20):
            try:
                stream.save(path)
            except BaseException as error:  # noqa: BLE001 - every failure is one
                failures.append(error)

    threads = [threading.Thread(target=save, args=(s,)) for s in streams]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(t.is_alive() for t in threads) and failures == []
    restored = shared_pipeline.restore(path)  # one complete save: CRC fine, a state of one of the streams
    original = streams[restored.chunks - 1]
    assert all(np.array_equal(restored.state[k], original.state[k]) for k in original.state)
    assert restored.ask(QUESTION, max_new_tokens=6) == original.ask(QUESTION, max_new_tokens=6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.npz"]


def test_save_errors_are_one_clear_error_and_leave_nothing(shared_pipeline, tmp_path) -> None:
    stream = shared_pipeline.stream()
    stream.push(*chunk(shared_pipeline, 0))
    with pytest.raises(OutputError, match="its directory .*missing.* does not exist"):
        stream.save(tmp_path / "missing" / "state.npz")
    (tmp_path / "adir").mkdir()
    with pytest.raises(OutputError, match="adir: it is a directory"):
        stream.save(tmp_path / "adir")
    mine = tmp_path / "photo.jpg"
    mine.write_bytes(b"\xff\xd8 a photo")
    with pytest.raises(OutputError, match="photo.jpg exists and is not a stream state file written by mirasol"):
        stream.save(mine)
    assert mine.read_bytes() == b"\xff\xd8 a photo"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "photo.jpg"]  # no .tmp left behind
    with pytest.raises(OutputError, match="cannot write /sys/state.npz"):
        stream.save("/sys/state.npz")  # a read-only folder, even for root
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(OutputError, match="Permission denied"):
            stream.save(locked / "state.npz")


def test_disk_full_during_export_is_one_line(tmp_path) -> None:
    """A real write failure (a file-size limit: the kernel refuses the write, as on a full disk)."""
    script = textwrap.dedent("""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
        from mirasol.export.cli import main
        sys.exit(main(sys.argv[1:]))
    """)
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-c", script, "--preset", "tiny", "--no-validate", "--out", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: writing {out} failed: File too large"), lines
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no target, no temporary directory


def test_atomic_file_error_names_the_path(tmp_path) -> None:
    with pytest.raises(OutputError, match="cannot write .*x.bin: No space left on device"):
        with atomic_file(tmp_path / "x.bin"):
            raise OSError(28, "No space left on device")
    assert list(tmp_path.iterdir()) == []
    assert issubclass(OutputError, MirasolError) and not issubclass(OutputError, ExportError)
