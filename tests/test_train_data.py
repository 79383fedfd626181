"""`mirasol-train --data` (issue 29): a dataset of the user's labelled clips, checked up front; training that learns,
resumes exactly after a kill or Ctrl-C, and exports to a bundle that answers as PyTorch does.

The dataset is written here as a person would: real mp4 files (rendered by the demo task's generator) and a JSON
Lines file with questions the demo never asks, some about a time range of the clip.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from mirasol.model.cli import train
from mirasol.model.demo_task import COLOURS, DEMO_CHECKPOINT, DemoTask

from .conftest import run_cli, run_export_cli, snapshot
from .race_harness import paused_command

pytest.importorskip("av")

CLIPS = 64  # two chunks (2 s) each
FINE_TUNE = ["--init", str(DEMO_CHECKPOINT), "--steps", "60", "--warmup", "10", "--clips-per-step", "8",
             "--questions-per-step", "3", "--val-fraction", "0.25", "--eval-every", "1000", "--seed", "0"]
FRESH = ["--preset", "tiny", "--steps", "6", "--warmup", "2", "--clips-per-step", "4", "--questions-per-step", "2",
         "--checkpoint-every", "2", "--eval-every", "3", "--seed", "3"]


def _questions(clip, rng: np.random.Generator) -> list[dict]:
    """Three questions in the dataset's own words: two about one chunk (a time range), one about the whole clip."""
    colours = [event.colour for event in clip.events]
    chunk = int(rng.integers(len(clip.events)))
    asked = str(rng.choice(list(COLOURS)))
    return [{"q": "what colour is showing?", "a": colours[chunk], "start": chunk, "end": chunk + 1},
            {"q": "which tone is playing?", "a": clip.events[chunk].pitch, "start": chunk + 0.25, "end": chunk + 1},
            {"q": f"is there a {asked} shape?", "a": "yes" if asked in colours else "no"}]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dataset")
    (folder / "videos").mkdir()
    task = DemoTask({"fps": 4.0, "frames_per_chunk": 4, "image_size": 32, "sample_rate": 16000, "n_fft": 400,
                     "hop_length": 160, "n_mels": 32}, num_chunks=2)
    lines = []
    for index in range(CLIPS):
        clip = task.clip(77, index)
        media = f"videos/clip-{index:03d}.mp4"
        task.write(clip, folder / media)
        lines.append(json.dumps({"media": media, "questions": _questions(clip, np.random.default_rng([77, index]))}))
    (folder / "clips.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache") / "chunks"


def _train(dataset: Path, cache: Path, output: Path, *args: str):
    return run_cli(train, ["--data", str(dataset), "--cache-dir", str(cache), "--output", str(output), *args])


PAUSED_TRAINING = paused_command("mirasol.model.cli:train")


def _kill_after_saving(step: int, dataset: Path, cache: Path, output: Path, *args: str) -> None:
    """Run mirasol-train in a process of its own and SIGKILL it right after it saved `step`."""
    command = [sys.executable, "-c", PAUSED_TRAINING, f"saved step {step}",
               "--data", str(dataset), "--cache-dir", str(cache), "--output", str(output), *args]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    for line in process.stderr:  # type: ignore[union-attr]
        if line.startswith(f"paused at saved step {step}"):
            break
    process.kill()
    assert process.wait(timeout=60) == -signal.SIGKILL


def _weights(checkpoint: Path) -> dict[str, np.ndarray]:
    return load_file(str(checkpoint / "model.safetensors"))


def test_fine_tuning_learns_and_the_bundle_answers_as_pytorch(dataset, cache, tmp_path) -> None:
    import torch

    from mirasol.model import load_checkpoint
    from mirasol.model.chunk_cache import ChunkCache
    from mirasol.model.dataset import held_out, read_dataset, split_dataset
    from mirasol.model.train import evaluate_detailed
    from mirasol.runtime.pipeline import Pipeline

    before = snapshot(dataset)
    out = tmp_path / "run"
    result = _train(dataset, cache, out, *FINE_TUNE)
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert "ETA" in result.stderr and "saved step 60" in result.stderr
    report = json.loads((out / "training.json").read_text())
    assert report["validation_accuracy"] == summary["validation_accuracy"]
    assert report["validation_questions"] == 48 and report["train_clips"] == 48
    assert {p.name for p in out.iterdir()} == {".mirasol-output", "config.json", "model.safetensors", "training.json"}
    assert snapshot(dataset) == before  # the user's files: read, never written

    # it learned: well above always giving the most common answer, and above the model it started from
    model = load_checkpoint(out)
    config = model.config
    held = held_out(split_dataset(read_dataset(dataset, config, ChunkCache(cache, config)), 0, 0.25)[1], 1.0,
                    ChunkCache(cache, config))
    torch.set_num_threads(1)
    start = evaluate_detailed(load_checkpoint(DEMO_CHECKPOINT), held, max_new_tokens=7)["accuracy"]
    trained = evaluate_detailed(model, held, max_new_tokens=7)
    assert trained["accuracy"] == report["validation_accuracy"]
    assert report["majority_baseline"] < 0.5
    assert trained["accuracy"] >= 0.75 and trained["accuracy"] >= report["majority_baseline"] + 0.3, report
    assert trained["accuracy"] >= start + 0.3, (start, trained["accuracy"])

    # exported with validation on, the bundle answers every held-out question as PyTorch does
    bundle = tmp_path / "bundle"
    exported = run_export_cli(["--checkpoint", str(out), "--out", str(bundle), "-q"])
    assert exported.exit_code == 0, exported.stderr
    with Pipeline.load(bundle) as pipe:
        through = evaluate_detailed(lambda video, audio, q: pipe.answer(video, audio, q, max_new_tokens=7), held)
    assert through == trained


def test_resume_after_a_kill_or_ctrl_c_equals_an_uninterrupted_run(dataset, cache, tmp_path) -> None:
    from mirasol.model.dataset_training import RunOptions, TrainSettings, train_on_dataset

    whole = tmp_path / "whole"
    assert _train(dataset, cache, whole, *FRESH).exit_code == 0
    expected = _weights(whole)

    # killed (SIGKILL) right after saving step 2
    killed = tmp_path / "killed"
    _kill_after_saving(2, dataset, cache, killed, *FRESH)
    assert (killed / "resume.safetensors").is_file() and not (killed / "training.json").exists()
    refused = _train(dataset, cache, killed, *FRESH)  # a new run over an unfinished one
    assert refused.exit_code == 1 and "holds an unfinished run; continue it with --resume" in refused.stderr
    assert _train(dataset, cache, killed, "--resume", "--steps", "7").exit_code == 2  # the run's settings are fixed
    resumed = _train(dataset, cache, killed, "--resume", "--threads", "1")
    assert resumed.exit_code == 0, resumed.stderr
    assert "resuming at step 2 of 6" in resumed.stderr
    assert not (killed / "resume.safetensors").exists()

    # Ctrl-C after step 3: the step finishes, is saved, and the run stops
    stopped = tmp_path / "stopped"

    def log(line: str) -> None:
        if line.startswith("step 3:"):
            os.kill(os.getpid(), signal.SIGINT)

    settings = TrainSettings(**json.loads((whole / "training.json").read_text())["settings"])
    with pytest.raises(KeyboardInterrupt):
        train_on_dataset(dataset, stopped, settings, options=RunOptions(cache_dir=cache, checkpoint_every=2,
                                                                        eval_every=3), log=log)
    assert json.loads(_metadata(stopped)["state"])["step"] == 3
    assert _train(dataset, cache, stopped, "--resume").exit_code == 0

    for run in (killed, stopped):
        weights = _weights(run)
        assert weights.keys() == expected.keys()
        assert all(np.array_equal(weights[name], expected[name]) for name in expected), run
        assert (json.loads((run / "training.json").read_text())["validation_accuracy"]
                == json.loads((whole / "training.json").read_text())["validation_accuracy"])
    assert json.loads((killed / "training.json").read_text())["history"]["resumed_at"] == [2]


def _metadata(run: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(run / "resume.safetensors"), "np") as f:
        return f.metadata()


def test_a_malformed_dataset_gets_one_error_line_per_problem(dataset, cache, tmp_path) -> None:
    folder = tmp_path / "data"
    (folder / "videos").mkdir(parents=True)
    for name in ("clip-000.mp4", "clip-001.mp4"):
        (folder / "videos" / name).write_bytes((dataset / "videos" / name).read_bytes())
    (folder / "videos" / "notes.mp4").write_text("not a video at all\n")
    ok = {"q": "what colour is showing?", "a": "red"}
    lines = [
        {"media": "videos/clip-000.mp4", "questions": [ok]},
        '{"media": "videos/clip-001.mp4", "questions": [',  # 2: cut short
        {"media": "videos/gone.mp4", "questions": [ok]},  # 3: no such file
        {"media": "videos/notes.mp4", "questions": [ok]},  # 4: not media
        {"media": "videos/clip-001.mp4", "questions": [ok, {"q": "why? " * 20, "a": "because"}]},  # 5: too long
        {"media": "videos/clip-001.mp4", "questions": [ok], "spilt": "train"},  # 6: a misspelt key
        {"media": "videos/clip-001.mp4", "questions": [{**ok, "start": 5}]},  # 7: past the clip's 2 s
        {"media": "videos/clip-001.mp4", "questions": [ok], "split": "test"},  # 8: no such split
        {"media": "videos/clip-001.mp4", "questions": []},  # 9: nothing asked
        "",  # 10: blank lines are fine
        {"media": "videos/clip-001.mp4", "questions": [{**ok, "start": 1.5, "end": 1}]},  # 11: ends before it starts
        {"media": "videos/clip-001.mp4", "questions": [{"q": "what colour is showing?", "a": ""}]},  # 12: no answer
        [1, 2],  # 13: not an object
        {"media": "videos/clip-000.mp4", "question": [ok]},  # 14: a misspelt key, reported once
    ]
    (folder / "clips.jsonl").write_text("\n".join(line if isinstance(line, str) else json.dumps(line)
                                                  for line in lines) + "\n")
    out = tmp_path / "run"
    result = _train(folder, cache, out, "--steps", "1")
    assert result.exit_code == 1 and result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [line for line in result.stderr.splitlines() if "line" in line and "clips.jsonl" in line]
    named = [int(line.split("clips.jsonl line ")[1].split(" ")[0].rstrip(":")) for line in errors]
    assert named == [2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 14], result.stderr
    for number, words in ((2, "not valid JSON"), (3, "gone.mp4 does not exist"), (4, "notes.mp4"),
                          (5, "more than the model's context of 96"), (6, "unknown key 'spilt'"),
                          (7, '"start" is 5 s, but the clip decodes to 2 s'), (8, '"split" must be one of'),
                          (9, '"questions" must be a non-empty list'), (11, '"end" (1 s) must be after'),
                          (12, '"a" must be the answer'), (13, "expected a JSON object"),
                          (14, 'unknown key \'question\': did you mean "questions"?')):
        assert words in errors[named.index(number)], errors[named.index(number)]
    assert not out.exists()

    # an empty split, named as such
    (folder / "clips.jsonl").write_text(json.dumps(lines[0]) + "\n" + json.dumps({**lines[0], "split": "train"}) + "\n")
    result = _train(folder, cache, out, "--steps", "1", "-q")
    assert result.exit_code == 1 and len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith("error: clips.jsonl: the validation split is empty (2 clips: 2 train, 0 validation)")
    assert not out.exists()


def test_nothing_of_the_users_is_written_over(dataset, cache, tmp_path) -> None:
    mine = tmp_path / "mine"
    (mine / "Documents").mkdir(parents=True)
    (mine / "notes.txt").write_text("my notes")
    (mine / "Documents" / "thesis.tex").write_text("years of work")
    before = snapshot(mine)
    for where in (["--output", str(mine)], ["--output", str(tmp_path / "new"), "--cache-dir", str(mine)]):
        result = run_cli(train, ["--data", str(dataset), "--cache-dir", str(cache), *where, "-q"])
        lines = result.stderr.splitlines()
        assert result.exit_code == 1 and len(lines) == 1, lines
        assert lines[0].startswith(f"error: {mine} exists and is not a ") and "written by mirasol" in lines[0]
        assert snapshot(mine) == before and not (tmp_path / "new").exists()
    # the options of one mode are refused in the other, as a wrong command line
    assert run_cli(train, ["--init", str(DEMO_CHECKPOINT)]).exit_code == 2
    assert run_cli(train, ["--data", str(dataset), "--train-clips", "5"]).exit_code == 2


def test_mirasol_demo_writes_a_dataset_in_this_format(cache, tmp_path) -> None:
    from mirasol.model.chunk_cache import ChunkCache
    from mirasol.model.cli import demo
    from mirasol.model.dataset import read_dataset
    from mirasol.model.demo_task import all_questions
    from mirasol.model.train import DEMO_CONFIG

    folder = tmp_path / "shapes"
    for _ in range(2):  # again into its own output
        result = run_cli(demo, ["--dataset", str(folder), "--clips", "2", "--seed", "5"])
        assert result.exit_code == 0, result.stderr
    dataset = read_dataset(folder, DEMO_CONFIG, ChunkCache(cache, DEMO_CONFIG))
    task = DemoTask(DEMO_CONFIG)
    assert [[(q.question, q.answer) for q in clip.questions] for clip in dataset.clips] == [
        [(qa.question, qa.answer) for qa in all_questions(task.clip(5, index).events)] for index in range(2)]
    assert [clip.chunks for clip in dataset.clips] == [4, 4]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    refused = run_cli(demo, ["--dataset", str(mine), "--clips", "1"])
    assert refused.exit_code == 1 and "is not a demo dataset written by mirasol" in refused.stderr
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_an_unreadable_cache_entry_is_decoded_again(dataset, tmp_path) -> None:
    """A file under an entry's name in our cache that cannot be read (a disk fault) is ours: decoded again over."""
    from mirasol.model.chunk_cache import ChunkCache
    from mirasol.model.train import DEMO_CONFIG

    cache = ChunkCache(tmp_path / "cache", DEMO_CONFIG)
    media = dataset / "videos" / "clip-000.mp4"
    entry, chunks = cache.decode(media, "clip-000.mp4")
    entry.write_bytes(b"half an entry")
    assert cache.decode(media, "clip-000.mp4") == (entry, chunks) == (entry, 2)
    assert cache.load(entry)[0].shape[0] == chunks * cache.params.frames_per_chunk


@pytest.mark.gpu
def test_training_on_the_gpu_and_resuming_there(dataset, cache, tmp_path) -> None:
    import torch

    if not torch.cuda.is_available():
        result = _train(dataset, cache, tmp_path / "run", *FRESH, "--device", "cuda", "-q")
        assert result.exit_code == 1 and result.stderr.startswith("error: --device cuda: this PyTorch")
        pytest.skip("no CUDA GPU: checked only that --device cuda says so")
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    assert _train(dataset, cache, whole, *FRESH, "--device", "cuda").exit_code == 0
    report = json.loads((whole / "training.json").read_text())
    assert report["device"].startswith("cuda")
    _kill_after_saving(2, dataset, cache, stopped, *FRESH, "--device", "cuda")
    assert _train(dataset, cache, stopped, "--resume", "--device", "cuda").exit_code == 0
    expected, weights = _weights(whole), _weights(stopped)
    assert all(np.allclose(weights[name], expected[name], atol=1e-5) for name in expected)
