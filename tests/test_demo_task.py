"""The demo task (model/demo_task.py), the training helpers and the shipped demo checkpoint."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from mirasol.model import Mirasol, get_preset, load_checkpoint
from mirasol.model.demo_task import ANSWERS, COLOURS, PITCHES, SHAPES, DemoTask, all_questions
from mirasol.model.train import (DEMO_CHECKPOINT, DEMO_CONFIG, collate_text, encode_example, evaluate,
                                 evaluate_detailed, qa_loss, teacher_forced_scores,
                                 train_model)
from mirasol.runtime.bundle.tokenizer import ByteTokenizer

pytest.importorskip("av")

TINY = get_preset("tiny")


def expected_answer(question: str, events) -> str:
    """An independent reading of each question template against the events."""
    def only(matches):
        assert len(matches) == 1, (question, events)
        return matches[0]

    colours = [e.colour for e in events]
    if m := re.fullmatch(r"what colour was the (\w+)\?", question):
        return only([e.colour for e in events if e.shape == m[1]])
    if m := re.fullmatch(r"what shape was the (\w+) one\?", question):
        return only([e.shape for e in events if e.colour == m[1]])
    if m := re.fullmatch(r"what did you hear when the (\w+) (\w+) appeared\?", question):
        return only([e.pitch for e in events if e.colour == m[1] and e.shape == m[2]])
    if m := re.fullmatch(r"what did you hear when the (\w+) appeared\?", question):
        return only([e.pitch for e in events if e.shape == m[1]])
    if m := re.fullmatch(r"which colour appeared with the (\w+) tone\?", question):
        return only([e.colour for e in events if e.pitch == m[1]])
    if m := re.fullmatch(r"which colour came after the (\w+) one\?", question):
        return events[only([i for i, c in enumerate(colours) if c == m[1]]) + 1].colour
    if m := re.fullmatch(r"what did you hear after the (\w+) one\?", question):
        return events[only([i for i, c in enumerate(colours) if c == m[1]]) + 1].pitch
    if m := re.fullmatch(r"which colour came before the (\w+) one\?", question):
        index = only([i for i, c in enumerate(colours) if c == m[1]])
        assert index > 0
        return events[index - 1].colour
    first = events[0]
    return {"which colour appeared first?": first.colour, "which shape appeared first?": first.shape,
            "what did you hear first?": first.pitch}[question]


def test_clips_are_reproducible_from_the_seed():
    task = DemoTask(TINY)
    a, b = task.clip(7, 3), task.clip(7, 3)
    assert a.events == b.events and a.questions == b.questions and a.background == b.background
    np.testing.assert_array_equal(task.render_video(a), task.render_video(b))
    np.testing.assert_array_equal(task.render_audio(a), task.render_audio(b))
    assert task.clip(7, 4).events != a.events and task.clip(8, 3).events != a.events
    # a clip does not depend on how many others are made, and decoding is deterministic
    first = task.make_clips(2, seed=7, start=2)
    again = task.make_clip(7, 3)
    assert first[1].events == again.events
    np.testing.assert_array_equal(first[1].video, again.video)
    np.testing.assert_array_equal(first[1].audio, again.audio)


def test_questions_are_consistent_with_the_events():
    task = DemoTask(TINY)
    kinds = set()
    for index in range(200):
        clip = task.clip(0, index)
        assert len({e.colour for e in clip.events}) == len(clip.events)  # colours differ within a clip
        assert clip.questions and len({qa.question for qa in clip.questions}) == len(clip.questions)
        for qa in clip.questions:
            assert qa.answer in ANSWERS
            assert expected_answer(qa.question, clip.events) == qa.answer
            assert len(ByteTokenizer().prompt(qa.question)) + len(qa.answer) + 1 <= DEMO_CONFIG.max_text_len
            kinds.add(qa.kind)
    assert len(kinds) == 11
    sample = task.clip(0, 0, questions_per_clip=5)
    assert len(sample.questions) == 5 and set(sample.questions) <= set(all_questions(sample.events))


def test_rendered_content_matches_the_events():
    task = DemoTask(TINY)
    clip = task.clip(3, 1)
    video = task.render_video(clip).astype(np.float64)  # [32, 64, 64, 3] at 8 fps
    wave = task.render_audio(clip)
    per_chunk = task.render_fps
    rate = task.audio_rate
    for i, event in enumerate(clip.events):
        frame = video[i * per_chunk + per_chunk // 2]
        mask = np.abs(frame - np.array(clip.background)).sum(axis=2) > 60
        assert mask.any()
        colour = frame[mask].mean(axis=0)
        nearest = min(COLOURS, key=lambda name: np.abs(np.array(COLOURS[name]) - colour).sum())
        assert nearest == event.colour
        # covered area relative to the radius tells the shapes apart (square > circle > triangle)
        area = mask.mean() / (event.radius ** 2)
        assert {"square": 3.6 < area < 4.4, "circle": 2.9 < area < 3.4, "triangle": 1.5 < area < 1.95}[event.shape]
        # centre moves from start to end
        ys, xs = np.nonzero(mask)
        assert abs(xs.mean() / 64 - (event.start[0] + event.end[0]) / 2) < 0.06
        piece = wave[i * rate + rate // 4:i * rate + 3 * rate // 4]
        spectrum = np.abs(np.fft.rfft(piece))
        peak = spectrum.argmax() * rate / piece.size
        assert abs(peak - PITCHES[event.pitch]) < 5
    assert set(SHAPES) >= {e.shape for e in clip.events}


def test_teacher_forcing_targets():
    inputs, targets = encode_example("what shape was the red one?", "circle")
    tok = ByteTokenizer()
    prompt = tok.prompt("what shape was the red one?")
    assert inputs == [*prompt, *tok.encode("circle")]
    assert targets[:len(prompt) - 1] == [tok.PAD] * (len(prompt) - 1)
    assert targets[len(prompt) - 1:] == [*tok.encode("circle"), tok.EOS]
    ids, tgt = collate_text([("a?", "red"), ("longer question?", "triangle")], 96)
    assert ids.shape == tgt.shape and ids[0, -1] == tok.PAD and tgt[0, -1] == tok.PAD


def test_qa_loss_equals_the_models_text_loss():
    torch.manual_seed(0)
    model = Mirasol(DEMO_CONFIG.replace(num_frames=8))
    video = torch.rand(2, 8, 3, 32, 32)
    audio = torch.randn(2, 32, 200)
    rows = torch.tensor([0, 0, 1])
    inputs, targets = collate_text([("which colour appeared first?", "red"), ("what did you hear first?", "low"),
                                    ("what shape was the blue one?", "triangle")], 96)
    expected = model.loss(video[rows], audio[rows], inputs, targets)["text"]
    got = qa_loss(model, video, audio, rows, inputs, targets)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_training_is_reproducible_from_the_seed():
    clips = DemoTask(TINY, num_chunks=2).make_clips(4, seed=21)
    config = DEMO_CONFIG.replace(num_frames=8)
    runs = [train_model(config, clips, steps=3, clips_per_step=2, questions_per_step=2, warmup=1, seed=5,
                        log=lambda line: None)[0].state_dict() for _ in range(2)]
    other = train_model(config, clips, steps=3, clips_per_step=2, questions_per_step=2, warmup=1, seed=6,
                        log=lambda line: None)[0].state_dict()
    assert all(torch.equal(runs[0][name], runs[1][name]) for name in runs[0])
    assert not all(torch.equal(runs[0][name], other[name]) for name in runs[0])


def test_evaluate_with_an_answer_function():
    task = DemoTask(TINY, num_chunks=2)
    clips = task.make_clips(3, seed=11, questions_per_clip=4)
    answers = [qa.answer for clip in clips for qa in clip.questions]
    assert evaluate(lambda video, audio, question: "red", clips) == pytest.approx(answers.count("red") / len(answers))
    lookup = {(id(c.video), qa.question): qa.answer for c in clips for qa in c.questions}
    assert evaluate(lambda video, audio, question: lookup[(id(video), question)], clips) == 1.0
    detailed = evaluate_detailed(lambda video, audio, question: "nothing", clips)
    assert detailed["accuracy"] == 0.0 and len(detailed["mistakes"]) == len(answers)


@pytest.fixture(scope="module")
def demo_model() -> Mirasol:
    if not (DEMO_CHECKPOINT / "model.safetensors").is_file():
        pytest.fail(f"the shipped demo checkpoint is missing from {DEMO_CHECKPOINT}; run mirasol-train")
    return load_checkpoint(DEMO_CHECKPOINT)


def test_shipped_checkpoint_loads(demo_model):
    assert demo_model.config == DEMO_CONFIG
    assert sum(p.numel() for p in demo_model.parameters()) < 1_000_000
    assert (DEMO_CHECKPOINT / "model.safetensors").stat().st_size < 5_000_000
    report = json.loads((DEMO_CHECKPOINT / "training.json").read_text())
    assert report["test_accuracy"] >= 0.95 and report["test_questions"] >= 500


def test_shipped_checkpoint_answers_held_out_clips(demo_model):
    """Fresh clips (indices the training run never made), greedy generation through PyTorch."""
    report = json.loads((DEMO_CHECKPOINT / "training.json").read_text())
    task = DemoTask(demo_model.config, num_chunks=report["task"]["num_chunks"])
    clips = task.make_clips(40, seed=report["splits"]["test"], start=100_000, questions_per_clip=5)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # batch-1 generation: extra threads only cost time on a busy machine
    try:
        accuracy = evaluate(demo_model, clips)
        assert accuracy >= 0.95
        # teacher-forced exact match is the same measure, computed batched
        assert teacher_forced_scores(demo_model, clips)[0] == pytest.approx(accuracy, abs=0.011)
    finally:
        torch.set_num_threads(threads)
