"""The shipped demo model answers real video files correctly through exported bundles (no PyTorch in the loop)."""
from __future__ import annotations

import json

import pytest

from mirasol.calibration.quantize import CalibrationOptions
from mirasol.export.bundle import export_bundle
from mirasol.model import load_checkpoint
from mirasol.model.cli import demo as demo_main
from mirasol.model.demo_task import DEMO_CHECKPOINT, TEST_SEED, DemoTask
from mirasol.model.train import evaluate
from mirasol.runtime.cli.run import main as run_main
from mirasol.runtime.pipeline import Pipeline

HELD_OUT_START = 500  # clips of the test family beyond those train.py scored, never seen in training


@pytest.fixture(scope="module")
def demo_bundles(tmp_path_factory, demo_fp32_bundle):
    root = tmp_path_factory.mktemp("demo")
    model = load_checkpoint(DEMO_CHECKPOINT)
    export_bundle(model, root / "fp16", precision="fp16")
    # int4 weights, and int4 with the AV KV cache in int8 (its scales calibrated on the demo task's clips)
    export_bundle(model, root / "int4", "int4", reference=demo_fp32_bundle, validate=False)
    export_bundle(model, root / "int4-kv8", "int4", reference=demo_fp32_bundle, validate=False, kv="int8",
                  calibration=CalibrationOptions("synthetic", clips=4, held_out=1, bar=False, use_cache=False))
    return {"fp32": demo_fp32_bundle, "fp16": root / "fp16", "int4": root / "int4", "int4-kv8": root / "int4-kv8"}


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int4", "int4-kv8"])
def test_shipped_model_answers_held_out_clips_through_the_bundle(demo_bundles, precision) -> None:
    pipe = Pipeline.load(demo_bundles[precision])
    clips = DemoTask(pipe.config).make_clips(20, seed=TEST_SEED, start=HELD_OUT_START, questions_per_clip=8)
    accuracy = evaluate(lambda video, audio, question: pipe.answer(video, audio, question, max_new_tokens=12),
                        clips)
    assert accuracy >= 0.95, f"{precision}: {accuracy:.3f} of {sum(len(c.questions) for c in clips)} questions"


def test_readme_main_job_answers_a_demo_file(demo_bundles, tmp_path, capsys) -> None:
    """mirasol-demo writes an mp4; mirasol-run --video answers about it from the bundle, correctly."""
    video = tmp_path / "clip.mp4"
    assert demo_main([str(video), "--index", "3"]) == 0
    expected = {line.split("Q: ")[1].split(" A: ")[0].strip(): line.split(" A: ")[1].strip()
                for line in capsys.readouterr().out.splitlines() if "Q: " in line}
    question = "which colour appeared first?"
    assert run_main([str(demo_bundles["fp32"]), "--video", str(video), "--question", question, "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)["answer"]
    assert answer == expected[question]
