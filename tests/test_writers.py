"""Every writer goes through the ownership rule and the one writing mechanism (issue 25: close the classes).

1. The code is read (its syntax tree, not grepped) for every call that writes, replaces, renames, copies or removes a
   file or folder: open for writing, Path.write_*, os/shutil/numpy/torch/onnx/safetensors writers, unlink, rmdir,
   mkdir... Outside runtime/files/ each must be one of ALLOWED below, with why it needs no rule of its own (it writes
   into a temporary or work directory of its own, or into a temporary `atomic_file` gave it). A new one fails here.
2. Every function that calls the mechanism (atomic_file, write_file, atomic_directory, prepare_output_dir,
   write_marker, remove_file, open_pipe) must have a race scenario: a new writer fails here until it has one.
3. The race harness (tests/race_harness.py): each writer runs in a process of its own, paused (the PAUSE_HOOK of
   runtime/files/atomic.py, set in that process) between its last check and putting its work in place; this test, a
   second process, then does what a user might: puts a file where a new one was to go, swaps our file for a symlink,
   adds a file and a link into a directory being replaced, swaps a file about to be removed (or a named pipe about to
   be written) for the user's own. Every writer must stop at its pause, and every time the user's file and link are
   there afterwards, unchanged; the write is refused, or, for a removal, skips the user's file.
"""
from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

from .conftest import chunk, copy_bundle
from .race_harness import DIRECTORY, FILE, PIPE, REMOVE, Scenario, run_harness
from .race_harness import scenario_code as _code

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("model", "export", "calibration", "runtime")
MECHANISM = {"atomic_file", "write_file", "atomic_directory", "prepare_output_dir", "write_marker", "remove_file",
             "open_pipe"}
MAKES_ONLY = {"make_directories", "copy_listed"}  # create new folders / files only: nothing to race
_MODULE_WRITES = {
    "os": {"replace", "rename", "renames", "remove", "unlink", "rmdir", "removedirs", "mkdir", "makedirs", "link",
           "symlink", "mkfifo", "truncate"},
    "shutil": {"rmtree", "copy", "copy2", "copyfile", "copytree", "move"},
    "np": {"save", "savez", "savez_compressed"}, "numpy": {"save", "savez", "savez_compressed"},
    "torch": {"save"}, "onnx": {"save", "save_model"}}
_PATH_WRITES = {"write_text", "write_bytes", "unlink", "rmdir", "mkdir", "touch", "symlink_to", "hardlink_to", "tofile"}
_OPEN_FLAGS = {"O_CREAT", "O_WRONLY", "O_RDWR", "O_TRUNC", "O_APPEND"}

# (file, function, call): why it needs no ownership check of its own
ALLOWED = {
    ("model/checkpoint.py", "save_checkpoint", "save_file"): "writes the temporary atomic_file gave it",
    ("model/demo_task.py", "DemoTask.write", "open"): "writes the path it is given: an atomic_file temporary "
                                                      "(mirasol-demo, make_clip)",
    ("model/demo_task.py", "DemoTask.make_clip", "unlink"): "its own mkdtemp folder",
    ("model/demo_task.py", "DemoTask.make_clip", "rmdir"): "its own mkdtemp folder",
    ("model/demo_task.py", "DemoTask.make_clips", "unlink"): "its own mkdtemp folder",
    ("model/demo_task.py", "DemoTask.make_clips", "rmdir"): "its own mkdtemp folder",
    ("model/demo_task.py", "DemoTask.make_clips", "savez"): "writes the temporary atomic_file gave it",
    ("model/training_state.py", "save_state", "save_file"): "writes the temporary atomic_file gave it",
    ("calibration/external_data.py", "write_graph", "save"): "the path its caller gives: a file in atomic_directory's "
                                                              "work directory (save_graph) or in a TemporaryDirectory "
                                                              "of its caller's (candidate_error, weightless_session)",
    ("calibration/external_data.py", "write_graph", "open"): "the weights beside that path (same callers)",
    ("calibration/quantize.py", "candidate_error", "unlink"): "its candidate in the sweep's TemporaryDirectory",
    ("calibration/samples.py", "SampleStore.add", "open"): "into the TemporaryDirectory its owner made for it "
                                                           "(export/int8.py, calibration/report.py)",
    ("calibration/samples.py", "SampleStore.add", "savez"): "into that TemporaryDirectory",
    ("calibration/samples.py", "SampleStore.add", "unlink"): "its own samples in that TemporaryDirectory",
    ("export/kv_cache.py", "apply", "replace"): "a graph of the bundle in atomic_directory's work directory "
                                                "(write_bundle)",
    ("export/kv_cache.py", "apply", "save"): "into atomic_directory's work directory (write_bundle)",
    ("export/kv_cache.py", "apply", "unlink"): "its float copy in atomic_directory's work directory (write_bundle)",
    ("export/kv_cache.py", "check_graph", "savez"): "into its own TemporaryDirectory",
    ("export/onnx_export.py", "export_graph", "save"): "into atomic_directory's work directory (write_bundle)",
    ("export/validate.py", "record_references", "savez"): "into a TemporaryDirectory of its caller's",
    ("runtime/bundle/manifest.py", "Manifest.write", "write_text"): "into atomic_directory's work directory "
                                                                    "(write_bundle; record_engine uses write_file)",
    ("runtime/cli/commandline.py", "run_command", "os.open"): "opens /dev/null",
    ("runtime/cli/commandline.py", "_closed_streams", "open"): "opens /dev/null",
    ("runtime/media/chunks_file.py", "save_chunks", "open"): "writes the temporary atomic_file gave it",
    ("runtime/media/sender.py", "send", "open"): "muxes into a loopback udp:// socket or the named pipe open_pipe "
                                                 "opened (pipe:FD; raced below)",
    ("runtime/media/sender.py", "write_test_clip", "open"): "writes the temporary atomic_file gave it",
    ("runtime/media/chunks_file.py", "save_chunks", "savez"): "writes the temporary atomic_file gave it",
    ("runtime/pipeline.py", "Stream.save", "open"): "writes the temporary atomic_file gave it",
    ("runtime/pipeline.py", "Stream.save", "savez"): "writes the temporary atomic_file gave it",
    ("runtime/serve/service.py", "Service._snapshot", "save"): "Stream.save (atomic_file, raced below) into its own "
                                                               "TemporaryDirectory",
    ("runtime/serve/service.py", "Service._read_state", "write_bytes"): "an uploaded state into its own "
                                                                        "TemporaryDirectory (new, 0700, removed after)",
    ("runtime/triton/sequences.py", "Sequences._save", "save"): "Stream.save (atomic_file, raced below)",
    ("runtime/triton/server.py", "LocalServer.start", "copytree"): "into its own mkdtemp folder",
    ("runtime/triton/server.py", "LocalServer.start", "copy2"): "into its own mkdtemp folder",
    ("runtime/triton/server.py", "LocalServer.start", "open"): "appends to the server log its caller names (never "
                                                               "truncates: a log of the user's loses nothing)",
    ("runtime/triton/server.py", "LocalServer.stop", "rmtree"): "its own mkdtemp folder",
}


def _call_name(call: ast.Call) -> str | None:
    """The name of a writing call, or None."""
    func = call.func
    if isinstance(func, ast.Name):
        if func.id == "save_file" or (func.id == "open" and _write_mode(call)):
            return func.id
        return None
    if not isinstance(func, ast.Attribute):
        return None
    owner = func.value.id if isinstance(func.value, ast.Name) else None
    if owner in _MODULE_WRITES:
        if func.attr in _MODULE_WRITES[owner]:
            return func.attr
        if owner == "os" and func.attr == "open":
            flags = {n.attr for n in ast.walk(call) if isinstance(n, ast.Attribute)}
            return "os.open" if flags & _OPEN_FLAGS else None
        return None
    if func.attr in _PATH_WRITES:
        return func.attr
    if func.attr in ("rename", "replace") and len(call.args) == 1 and not call.keywords:
        return None if isinstance(call.args[0], ast.Constant) else func.attr  # Path.rename / Path.replace
    if func.attr == "save" and call.args:
        return "save"
    if func.attr == "open" and _write_mode(call):
        return "open"
    return None


def _write_mode(call: ast.Call) -> bool:
    mode = call.args[1] if len(call.args) > 1 else next((k.value for k in call.keywords if k.arg == "mode"), None)
    return isinstance(mode, ast.Constant) and isinstance(mode.value, str) and bool(set(mode.value) & set("wax+"))


def _scan() -> tuple[dict[tuple[str, str, str], int], dict[tuple[str, str], set[str]]]:
    """(raw writes: (file, function, call) -> line; mechanism users: (file, function) -> mechanism names)."""
    raw: dict[tuple[str, str, str], int] = {}
    users: dict[tuple[str, str], set[str]] = {}
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel.startswith("runtime/files/"):
                continue

            def visit(node: ast.AST, scope: list[str]) -> None:
                for child in ast.iter_child_nodes(node):
                    if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                        visit(child, [*scope, child.name])
                        continue
                    if isinstance(child, ast.Call):
                        where = ".".join(scope) or "<module>"
                        name = _call_name(child)
                        if name:
                            raw.setdefault((rel, where, name), child.lineno)
                        func = child.func
                        called = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
                        if called in MECHANISM | MAKES_ONLY:
                            users.setdefault((rel, where), set()).add(called)
                    visit(child, scope)

            visit(ast.parse(path.read_text(), rel), [])
    return raw, users


def test_every_write_goes_through_the_mechanism() -> None:
    raw, _ = _scan()
    unexplained = [f"{file}:{line} {function}: {call}(...)" for (file, function, call), line in sorted(raw.items())
                   if (file, function, call) not in ALLOWED]
    assert not unexplained, ("writes outside runtime/files/ (go through runtime/files/atomic.py, or, if it writes only "
                             "into a directory of its own, add it to ALLOWED with why):\n" + "\n".join(unexplained))
    stale = sorted(set(ALLOWED) - set(raw))
    assert not stale, f"ALLOWED names writes the code no longer has: {stale}"


FAKE_TENSORRT = """
    import pytest
    from pathlib import Path
    from tests.fake_tensorrt import install
    from tests.onnx_graphs import supported_model, write_bundle
    from mirasol.runtime.tensorrt.build import build_engines
    patch = pytest.MonkeyPatch()
    install(patch)
    try:
        build_engines(write_bundle(Path({bundle}), {{"good": supported_model()}}), progress=lambda line: None)
    finally:
        patch.undo()  # the scenarios after this one run with the real (or no) TensorRT
"""


def scenarios(tmp_path: Path, tiny_bundle: Path, shared_pipeline) -> list[Scenario]:
    """One or more scenarios per writer; the files and folders they start from are made here."""
    import torch

    from mirasol.model import build_model
    from mirasol.model.checkpoint import save_checkpoint
    from mirasol.model.training_state import RunState, save_state
    from mirasol.runtime.triton.repository import write_repository

    t = tmp_path
    shared_pipeline.stream().save(t / "ours.npz")
    model = build_model("tiny")
    save_checkpoint(model, t / "checkpoint")
    for run in ("run1", "run2"):
        save_state(t / run, model, torch.optim.AdamW(model.parameters()), RunState(1, {}, "dataset"))
    (t / "trained").mkdir()
    write_repository(tiny_bundle, t / "repo")
    copy_bundle(tiny_bundle, t, "bundle")
    video, audio = chunk(shared_pipeline, 0)
    np_chunk = f"(np.zeros({list(video.shape)}, np.float32), np.zeros({list(audio.shape)}, np.float32))"
    state = """
        import numpy as np
        from mirasol.runtime.pipeline import Pipeline
        Pipeline.load({bundle}).stream().save({target})
    """
    demo_task = """
        import json
        from mirasol.model.demo_task import DEMO_CHECKPOINT, DemoTask
        task = DemoTask(json.loads((DEMO_CHECKPOINT / "config.json").read_text()))
    """
    sequences = """
        import numpy as np
        from mirasol.runtime.pipeline import Pipeline
        from mirasol.runtime.triton.sequences import Request, Sequences
        sequences = Sequences(Pipeline.load({bundle}), 60, state_dir={state})
        reply = sequences.serve([Request(1, start=True, chunk=%s)])[0]
    """ % np_chunk
    training = """
        import torch
        from pathlib import Path
        from mirasol.model import build_model
        from mirasol.model.training_state import RunState, remove_state, save_state
        model = build_model("tiny")
    """
    tensors = ("TensorsData(CalibrationMethod.MinMax, {{'x': TensorData(lowest=np.float32(0), "
               "highest=np.float32(1))}})")
    found = [
        Scenario("stream state, new", ("runtime/pipeline.py:Stream.save",),
                 _code(state, bundle=tiny_bundle, target=t / "state.npz"), FILE, str(t / "state.npz"), "new file"),
        Scenario("stream state, ours", ("runtime/pipeline.py:Stream.save",),
                 _code(state, bundle=tiny_bundle, target=t / "ours.npz"), FILE, str(t / "ours.npz"), "our file"),
        Scenario("chunks file", ("runtime/media/chunks_file.py:save_chunks",), _code("""
            import numpy as np
            from mirasol.runtime.media.chunks_file import save_chunks
            save_chunks({target}, np.zeros((4, 3, 8, 8), np.float32), np.zeros((8, 10), np.float32), "clip.mp4")
        """, target=t / "clip.npz"), FILE, str(t / "clip.npz"), "new file"),
        Scenario("benchmark reports", ("export/bench/report_files.py:write_reports",), _code("""
            from pathlib import Path
            from mirasol.export.bench.report_files import write_reports
            write_reports(Path({target}), '{{"format": "mirasol-bench"}}', None, "")
        """, target=t / "bench.json"), FILE, str(t / "bench.json"), "new file"),
        Scenario("benchmark export directory", ("export/bench/run.py:run_benchmark",), _code("""
            from mirasol.export.bench.run import run_benchmark
            run_benchmark(quick=True, export_dir={target})
        """, target=t / "exports"), FILE, str(t / "exports" / ".mirasol-output"), "new file"),
        Scenario("Triton load report", ("runtime/triton/load.py:write_report",), _code("""
            from pathlib import Path
            from mirasol.runtime.triton.load import write_report
            write_report(Path({target}), {{}})
        """, target=t / "load.json"), FILE, str(t / "load.json"), "new file"),
        Scenario("checkpoint, ours", ("model/checkpoint.py:save_checkpoint",), _code("""
            from mirasol.model import build_model
            from mirasol.model.checkpoint import save_checkpoint
            save_checkpoint(build_model("tiny"), {target})
        """, target=t / "checkpoint"), FILE, str(t / "checkpoint" / "config.json"), "our file"),
        Scenario("calibration cache", ("calibration/quantize.py:CalibrationCache.__init__",), _code("""
            from mirasol.calibration.quantize import CalibrationCache
            CalibrationCache({target})
        """, target=t / "calib1"), FILE, str(t / "calib1" / ".mirasol-output"), "new file"),
        Scenario("ONNX Runtime TensorRT provider cache folder",
                 ("runtime/backends/onnxruntime_device.py:OnnxRuntimeDeviceBackend._cache",), _code("""
            from mirasol.runtime.backends.onnxruntime_device import OnnxRuntimeDeviceBackend
            from mirasol.runtime.bundle.reader import Bundle
            OnnxRuntimeDeviceBackend("cpu", cache_dir={target})._cache(Bundle.load({bundle}))
        """, target=t / "provider-cache", bundle=tiny_bundle), FILE, str(t / "provider-cache" / ".mirasol-output"),
                 "new file"),
        Scenario("calibration sweep", ("calibration/quantize.py:CalibrationCache.save_sweep",), _code("""
            from mirasol.calibration.quantize import CalibrationCache
            CalibrationCache({target}).save_sweep("a" * 24, {{"exclude": []}})
        """, target=t / "calib2"), FILE, str(t / "calib2" / "*.sweep.json"), "new file"),
        Scenario("calibration ranges", ("calibration/quantize.py:CalibrationCache.save_ranges",), _code("""
            import numpy as np
            from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData
            from mirasol.calibration.quantize import CalibrationCache
            CalibrationCache({target}).save_ranges("b" * 24, %s)
        """ % tensors, target=t / "calib3"), FILE, str(t / "calib3" / "*.ranges.json"), "new file"),
        Scenario("TensorRT engine", ("runtime/tensorrt/build.py:build_engines",),
                 _code(FAKE_TENSORRT, bundle=t / "trt1"), FILE, str(t / "trt1" / "good.fp32.engine"), "new file"),
        Scenario("TensorRT timing cache", ("runtime/tensorrt/build.py:_Builder.save_timing_cache",),
                 _code(FAKE_TENSORRT, bundle=t / "trt2"), FILE, str(t / "trt2" / "timing.cache"), "new file"),
        Scenario("engine record in the manifest", ("runtime/tensorrt/plan.py:record_engine",),
                 _code(FAKE_TENSORRT, bundle=t / "trt3"), FILE, str(t / "trt3" / "manifest.json"), "our file"),
        Scenario("Triton state file (Stream.save, from Sequences._save)", (), _code(sequences, """
            if isinstance(reply, Exception):
                raise reply
        """, bundle=tiny_bundle, state=t / "states1"), FILE, str(t / "states1" / "*.npz"), "new file"),
        Scenario("Triton state removed at END", ("runtime/triton/sequences.py:Sequences._close",), _code(sequences, """
            sequences.serve([Request(1, end=True)])
        """, bundle=tiny_bundle, state=t / "states2"), REMOVE, str(t / "states2" / "*.npz"), "removal",
                 skip=1),  # START removes a state left from before (none here) too
        Scenario("Triton model folder, ours", ("runtime/triton/repository.py:write_repository",), _code("""
            from mirasol.runtime.triton.repository import write_repository
            write_repository({bundle}, {repo})
        """, bundle=tiny_bundle, repo=t / "repo"), DIRECTORY, str(t / "repo" / "mirasol"), "our directory"),
        Scenario("Triton model folder, new", ("runtime/triton/repository.py:write_repository",), _code("""
            from mirasol.runtime.triton.repository import write_repository
            write_repository({bundle}, {repo})
        """, bundle=tiny_bundle, repo=t / "repo2"), DIRECTORY, str(t / "repo2" / "mirasol"), "new directory"),
        Scenario("training state, ours", ("model/training_state.py:save_state",), _code(training, """
            save_state(Path({target}), model, torch.optim.AdamW(model.parameters()), RunState(2, dict(), "dataset"))
        """, target=t / "run1"), FILE, str(t / "run1" / "resume.safetensors"), "our file"),
        Scenario("training state removed at the end", ("model/training_state.py:remove_state",), _code(training, """
            remove_state(Path({target}))
        """, target=t / "run2"), REMOVE, str(t / "run2" / "resume.safetensors"), "removal"),
        Scenario("training report", ("model/train.py:write_training_report",), _code("""
            from pathlib import Path
            from mirasol.model.train import write_training_report
            write_training_report(Path({target}), dict(steps=1))
        """, target=t / "trained"), FILE, str(t / "trained" / "training.json"), "new file"),
        Scenario("mirasol-serve load report", ("runtime/serve/load.py:write_report",), _code("""
            from pathlib import Path
            from mirasol.runtime.serve.load import write_report
            write_report(Path({target}), dict(rows=[]))
        """, target=t / "serve-load.json"), FILE, str(t / "serve-load.json"), "new file"),
        Scenario("bundle directory, ours", (), _code("""
            import json
            from mirasol.runtime.files.atomic import atomic_directory
            with atomic_directory({target}) as work:
                (work / "manifest.json").write_text(json.dumps({{"format": "mirasol-bundle"}}))
        """, target=t / "bundle"), DIRECTORY, str(t / "bundle"), "our directory"),
    ]
    if _has_av():
        from mirasol.model.chunk_cache import CACHE_KIND, ChunkCache
        from mirasol.model.config import get_preset
        from mirasol.runtime.files.atomic import prepare_output_dir
        from mirasol.runtime.media.sender import write_test_clip

        media = write_test_clip(t / "media.mp4", seconds=1.0, width=64, height=64, fps=8)
        unreadable = ChunkCache(t / "cache2", get_preset("tiny"))
        prepare_output_dir(t / "cache2", CACHE_KIND)
        (unreadable.directory / f"{unreadable.key(media)}.npz").write_bytes(b"not a chunks file")
        os.mkfifo(t / "live.ts")
        cache = """
            from pathlib import Path
            from mirasol.model.chunk_cache import ChunkCache
            from mirasol.model.config import get_preset
            ChunkCache({cache}, get_preset("tiny")).decode(Path({media}), "media.mp4")
        """
        found += [
            Scenario("chunk cache entry, new", ("model/chunk_cache.py:ChunkCache.decode",),
                     _code(cache, cache=t / "cache1", media=media), FILE, str(t / "cache1" / "*.npz"), "new file"),
            Scenario("chunk cache entry, unreadable (ours by its name)", ("model/chunk_cache.py:ChunkCache.decode",),
                     _code(cache, cache=t / "cache2", media=media), FILE, str(t / "cache2" / "*.npz"), "our file"),
            Scenario("demo dataset", ("model/demo_task.py:DemoTask.write_dataset",), _code(demo_task, """
                task.write_dataset({target}, 1, 0)
            """, target=t / "dataset"), FILE, str(t / "dataset" / "videos" / "demo-*"), "new file"),
            Scenario("named pipe target of the sender", ("runtime/media/sender.py:_open_target",), _code("""
                import os
                from mirasol.runtime.media.sender import send
                reader = os.open({pipe}, os.O_RDONLY | os.O_NONBLOCK)  # a writer bypassing the check cannot hang
                send({media}, {pipe}, wait_s=5)
            """, pipe=t / "live.ts", media=media), PIPE, str(t / "live.ts"), "pipe"),
            Scenario("test clip", ("runtime/media/sender.py:write_test_clip",), _code("""
                from mirasol.runtime.media.sender import write_test_clip
                write_test_clip({target}, seconds=0.5, width=64, height=64, fps=8)
            """, target=t / "camera.mp4"), FILE, str(t / "camera.mp4"), "new file"),
            Scenario("mirasol-demo clip", ("model/cli.py:_demo",), _code("""
                from mirasol.model.cli import demo
                from mirasol.runtime.errors import MirasolError
                if demo([{target}]):
                    raise MirasolError("mirasol-demo failed")
            """, target=t / "clip.mp4"), FILE, str(t / "clip.mp4"), "new file"),
            Scenario("demo clip kept in a folder", ("model/demo_task.py:DemoTask.make_clip",), _code(demo_task, """
                task.make_clip(2000, 0, directory={target})
            """, target=t / "clips"), FILE, str(t / "clips" / "demo-*"), "new file"),
            Scenario("demo clip cache", ("model/demo_task.py:DemoTask.make_clips",), _code(demo_task, """
                task.make_clips(1, 2000, cache_dir={target})
            """, target=t / "cache"), FILE, str(t / "cache" / "demo-*.npz"), "new file"),
        ]
    return found


SLOW_SCENARIOS = {"export/bundle.py:write_bundle": "bundle export"}
AV_WRITERS = {"model/cli.py:_demo", "model/demo_task.py:DemoTask.make_clip", "model/demo_task.py:DemoTask.make_clips",
              "model/demo_task.py:DemoTask.write_dataset", "model/chunk_cache.py:ChunkCache.decode",
              "runtime/media/sender.py:_open_target", "runtime/media/sender.py:write_test_clip"}  # race them with PyAV


def slow_scenarios(tmp_path: Path, tiny_bundle: Path) -> list[Scenario]:
    copy_bundle(tiny_bundle, tmp_path, "exported")
    return [
        Scenario("bundle export", ("export/bundle.py:write_bundle",), _code("""
            from mirasol.export.bundle import export_bundle
            from mirasol.model import build_model
            export_bundle(build_model("tiny", seed=3), {target}, validate=False)
        """, target=tmp_path / "exported"), DIRECTORY, str(tmp_path / "exported"), "our directory"),
        Scenario("training report of a whole run", (), _code("""
            from mirasol.model.train import run_training
            run_training(output={target}, train_clips=1, val_clips=1, test_clips=1, questions_per_clip=1, steps=1,
                         clips_per_step=1, questions_per_step=1, progress=False, log=lambda line: None)
        """, target=tmp_path / "trained"), FILE, str(tmp_path / "trained" / "training.json"), "new file"),
    ]


def _has_av() -> bool:
    try:
        import av  # noqa: F401
    except ImportError:
        return False
    return True


def test_every_writer_has_a_race_scenario(tmp_path, tiny_bundle, shared_pipeline) -> None:
    _, users = _scan()
    writers = {f"{file}:{function}" for (file, function), called in users.items() if called & MECHANISM}
    covered = {c for s in scenarios(tmp_path, tiny_bundle, shared_pipeline) for c in s.covers} | set(SLOW_SCENARIOS)
    if not _has_av():
        covered |= AV_WRITERS
    assert writers - covered == set(), "writers without a race scenario (add one to scenarios())"
    assert covered - writers == set(), "race scenarios of writers that no longer use the mechanism"


def test_race_every_writer(tmp_path, tiny_bundle, shared_pipeline) -> None:
    problems = run_harness(scenarios(tmp_path, tiny_bundle, shared_pipeline), tmp_path)
    wrong = "\n".join(f"{name}: {why}" for name, why in problems.items() if why)
    assert not wrong, wrong


@pytest.mark.slow
def test_race_the_slow_writers(tmp_path, tiny_bundle) -> None:
    pytest.importorskip("av")
    problems = run_harness(slow_scenarios(tmp_path, tiny_bundle), tmp_path, timeout=1200)
    wrong = "\n".join(f"{name}: {why}" for name, why in problems.items() if why)
    assert not wrong, wrong
