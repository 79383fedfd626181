"""The scripts in examples/ run as their docstrings say, on the demo bundle and demo clips, and answer right."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mirasol.model.demo_task import DEMO_CHECKPOINT, TEST_SEED, DemoTask

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
pytest.importorskip("av")


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[Path, dict[str, str]]:
    """Two held-out demo clips and their questions' expected answers."""
    import json

    task = DemoTask(json.loads((DEMO_CHECKPOINT / "config.json").read_text()))
    folder = tmp_path_factory.mktemp("examples")
    written = {}
    for index in (0, 1):
        clip = task.clip(TEST_SEED, index)
        path = task.write(clip, folder / f"clip{index}.mp4")
        written[path] = {qa.question: qa.answer for qa in clip.questions}
    return written


def run(script: str, *args: object) -> list[str]:
    done = subprocess.run([sys.executable, str(EXAMPLES / script), *map(str, args)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def first_questions(answers: dict[str, str], count: int) -> list[str]:
    return list(answers)[:count]


def test_every_example_is_run_here() -> None:
    tested = {"mp4_to_answers.py", "many_streams.py", "save_restore.py", "frames_from_your_decoder.py"}
    assert {path.name for path in EXAMPLES.glob("*.py")} == tested


def test_mp4_to_answers(demo_fp32_bundle: Path, clips: dict[Path, dict[str, str]]) -> None:
    path, answers = next(iter(clips.items()))
    questions = first_questions(answers, 3)
    assert run("mp4_to_answers.py", demo_fp32_bundle, path, *questions) == [f"{q} {answers[q]}" for q in questions]


def test_many_streams(demo_fp32_bundle: Path, clips: dict[Path, dict[str, str]]) -> None:
    common = [q for q in next(iter(clips.values())) if all(q in answers for answers in clips.values())]
    question = common[0]
    printed = run("many_streams.py", demo_fp32_bundle, *clips, "--question", question)
    assert printed == [f"{path}: {answers[question]}" for path, answers in clips.items()]


def test_save_restore(demo_fp32_bundle: Path, clips: dict[Path, dict[str, str]], tmp_path: Path) -> None:
    path, answers = next(iter(clips.items()))
    question = first_questions(answers, 1)[0]
    printed = run("save_restore.py", demo_fp32_bundle, path, tmp_path / "state.npz", question)
    assert printed == [f"after restoring at chunk 2 of 4: {answers[question]}"]


def test_frames_from_your_decoder(demo_fp32_bundle: Path, clips: dict[Path, dict[str, str]]) -> None:
    path, answers = next(iter(clips.items()))
    question = first_questions(answers, 1)[0]
    assert run("frames_from_your_decoder.py", demo_fp32_bundle, path, question) == [f"{question} {answers[question]}"]
