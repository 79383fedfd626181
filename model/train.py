"""Train the built-in demo model: a small Mirasol that answers the demo task's questions.

    mirasol-train                               # -> model/assets/demo (config.json, model.safetensors)
    mirasol-train --output runs/demo --seed 1 --steps 3000

Everything is seeded: the clips (`mirasol.model.demo_task`), the initialisation, the batch order.
The same seed, thread count and library versions give the same checkpoint.

Data splits (clips are indexed by (seed, index), see demo_task):
- train: `--train-clips` clips of seed `--seed`;
- validation (progress logs, early stop when it reaches `--target`): seed `--seed + 1000`;
- held-out test (the accuracy reported and saved in training.json): seed `--seed + 2000`.

`evaluate(model_or_answer_fn, clips)` gives the exact-match answer accuracy of a PyTorch model (greedy
`Mirasol.generate`) or of any answer function `(video, audio, question) -> str` (a runtime bundle's
pipeline, for instance), on clips from `DemoTask.make_clips`.
"""
from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mirasol.runtime.tokenizer import ByteTokenizer

from .checkpoint import save_checkpoint
from .config import MirasolConfig, get_preset
from .demo_task import DemoClip, DemoTask
from .mirasol import Mirasol, count_parameters

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "assets" / "demo"

# The demo model: the tiny preset's sizes (about 0.45M parameters, under 2 MB of weights), for clips of
# four one-second chunks (4 frames of 32x32 at 4 fps + 1 s of 16 kHz audio each).
DEMO_CONFIG: MirasolConfig = get_preset("tiny").replace(preset="demo", num_frames=16, max_text_len=96)

AnswerFn = Callable[[np.ndarray, np.ndarray, str], str]


# ---------------------------------------------------------------- text
def encode_example(question: str, answer: str, tokenizer: ByteTokenizer | None = None
                   ) -> tuple[list[int], list[int]]:
    """Teacher forcing: input_ids = prompt + answer; target_ids = the next token, PAD on the prompt."""
    tok = tokenizer or ByteTokenizer()
    prompt = tok.prompt(question)
    ids = [*prompt, *tok.encode(answer), tok.EOS]
    inputs, targets = ids[:-1], ids[1:]
    targets = [tok.PAD] * (len(prompt) - 1) + targets[len(prompt) - 1:]
    return inputs, targets


def collate_text(pairs: Sequence[tuple[str, str]], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded [B, T] input and target ids (PAD = 258, ignored by the loss)."""
    encoded = [encode_example(q, a) for q, a in pairs]
    length = max(len(i) for i, _ in encoded)
    if length > max_len:
        raise ValueError(f"a question + answer of {length} tokens exceeds max_text_len {max_len}")
    inputs = torch.full((len(encoded), length), ByteTokenizer.PAD, dtype=torch.long)
    targets = torch.full((len(encoded), length), ByteTokenizer.PAD, dtype=torch.long)
    for row, (i, t) in enumerate(encoded):
        inputs[row, :len(i)] = torch.tensor(i)
        targets[row, :len(t)] = torch.tensor(t)
    return inputs, targets


def _clip_tensors(clips: Sequence[DemoClip]) -> tuple[torch.Tensor, torch.Tensor]:
    for clip in clips:
        if clip.video is None or clip.audio is None:
            raise ValueError(f"clip ({clip.seed}, {clip.index}) has no decoded arrays; use DemoTask.make_clips")
    video = torch.from_numpy(np.stack([c.video for c in clips])).float()
    audio = torch.from_numpy(np.stack([c.audio for c in clips])).float()
    return video, audio


# ---------------------------------------------------------------- evaluation
def _model_answers(model: Mirasol, clips: Sequence[DemoClip], max_new_tokens: int, batch: int = 32
                   ) -> list[list[str]]:
    """Greedy answers of a PyTorch model to every question of every clip."""
    tok = ByteTokenizer()
    answers: list[list[str]] = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(clips), batch):
            group = clips[start:start + batch]
            video, audio = _clip_tensors(group)
            av_context = model.av_autoregressor.forward_clip(model.encode_chunks(video, audio))
            for row, clip in enumerate(group):
                answers.append([tok.decode(model.generate(av_context[row:row + 1], tok.prompt(qa.question),
                                                          max_new_tokens)) for qa in clip.questions])
    model.train(was_training)
    return answers


def evaluate_detailed(model_or_answer_fn: Mirasol | AnswerFn, clips: Sequence[DemoClip],
                      max_new_tokens: int = 16) -> dict[str, Any]:
    """Exact-match accuracy (after strip / lower-case) overall and per question kind, with the mistakes."""
    if isinstance(model_or_answer_fn, Mirasol):
        answers = _model_answers(model_or_answer_fn, clips, max_new_tokens)
    else:
        answers = [[model_or_answer_fn(clip.video, clip.audio, qa.question) for qa in clip.questions]
                   for clip in clips]
    per_kind: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    mistakes = []
    for clip, clip_answers in zip(clips, answers):
        for qa, answer in zip(clip.questions, clip_answers):
            ok = answer.strip().lower() == qa.answer
            per_kind[qa.kind][0] += ok
            per_kind[qa.kind][1] += 1
            if not ok:
                mistakes.append({"clip": [clip.seed, clip.index], "question": qa.question, "expected": qa.answer,
                                 "got": answer})
    correct = sum(c for c, _ in per_kind.values())
    total = sum(n for _, n in per_kind.values())
    if total == 0:
        raise ValueError("no questions to evaluate")
    return {"accuracy": correct / total, "correct": correct, "questions": total,
            "per_kind": {k: c / n for k, (c, n) in sorted(per_kind.items())}, "mistakes": mistakes}


def evaluate(model_or_answer_fn: Mirasol | AnswerFn, clips: Sequence[DemoClip], max_new_tokens: int = 16
             ) -> float:
    """Answer accuracy in [0, 1] over every question of `clips`.

    `model_or_answer_fn`: a `Mirasol` (greedy generation), or a function (video [N*F, 3, H, W],
    audio [n_mels, N*A], question) -> answer text, given unbatched float32 numpy arrays.
    """
    return evaluate_detailed(model_or_answer_fn, clips, max_new_tokens)["accuracy"]


def teacher_forced_scores(model: Mirasol, clips: Sequence[DemoClip], batch: int = 64
                          ) -> tuple[float, dict[str, float]]:
    """Fraction of questions whose every answer token (and EOS) is the argmax given the true prefix, overall
    and per question kind: the same as greedy-generation exact match, computed in a few batched
    forwards (for progress logs and early stopping)."""
    pairs = [(clip, qa) for clip in clips for qa in clip.questions]
    per_kind: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(pairs), batch):
            group = pairs[start:start + batch]
            video, audio = _clip_tensors([c for c, _ in group])
            inputs, targets = collate_text([(qa.question, qa.answer) for _, qa in group],
                                           model.config.max_text_len)
            _, logits = model(video, audio, inputs)
            hit = ((logits.argmax(-1) == targets) | (targets == ByteTokenizer.PAD)).all(dim=1)
            for (_, qa), ok in zip(group, hit.tolist()):
                per_kind[qa.kind][0] += ok
                per_kind[qa.kind][1] += 1
    model.train(was_training)
    correct = sum(c for c, _ in per_kind.values())
    return correct / len(pairs), {k: c / n for k, (c, n) in sorted(per_kind.items())}


def teacher_forced_accuracy(model: Mirasol, clips: Sequence[DemoClip], batch: int = 64) -> float:
    return teacher_forced_scores(model, clips, batch)[0]


# ---------------------------------------------------------------- training
def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(steps - warmup, 1)
    return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def train_model(config: MirasolConfig, train_clips: Sequence[DemoClip], steps: int, batch_size: int = 64,
                lr: float = 2e-3, warmup: int = 100, weight_decay: float = 0.01, seed: int = 0,
                val_clips: Sequence[DemoClip] = (), eval_every: int = 250, target: float | None = None,
                latent_weight: float = 0.1, log: Callable[[str], None] = print) -> tuple[Mirasol, dict[str, Any]]:
    """Train a fresh model on (clip, random question) pairs with `Mirasol.loss`; returns it (eval mode)
    and a history. Stops early once the validation accuracy (checked every `eval_every` steps) reaches
    `target` (teacher-forced exact match, equal to greedy exact match)."""
    torch.manual_seed(seed)
    model = Mirasol(config)
    # nn.Embedding's default N(0, 1) init, tied to the output head, starts the loss near 20 (huge logits)
    torch.nn.init.normal_(model.text_decoder.embed.weight, std=0.02)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))
    rng = np.random.default_rng([seed, 7])
    video_all = np.stack([c.video for c in train_clips])  # type: ignore[misc]
    audio_all = np.stack([c.audio for c in train_clips])  # type: ignore[misc]
    history: dict[str, Any] = {"loss": [], "val": []}
    started = time.perf_counter()
    running = 0.0
    for step in range(steps):
        picks = rng.integers(0, len(train_clips), batch_size)
        pairs = []
        for i in picks:
            questions = train_clips[i].questions
            qa = questions[int(rng.integers(len(questions)))]
            pairs.append((qa.question, qa.answer))
        inputs, targets = collate_text(pairs, config.max_text_len)
        video = torch.from_numpy(video_all[picks]).float()
        audio = torch.from_numpy(audio_all[picks]).float()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        losses = model.loss(video, audio, inputs, targets, latent_weight=latent_weight)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        running += float(losses["text"].detach())
        if (step + 1) % 50 == 0:
            history["loss"].append([step + 1, running / 50])
            log(f"step {step + 1}/{steps}  text loss {running / 50:.4f}  "
                f"lr {optimizer.param_groups[0]['lr']:.2e}  {time.perf_counter() - started:.0f}s")
            running = 0.0
        if val_clips and ((step + 1) % eval_every == 0 or step + 1 == steps):
            accuracy, per_kind = teacher_forced_scores(model, val_clips)
            history["val"].append([step + 1, accuracy])
            log(f"step {step + 1}: validation accuracy {accuracy:.3f} "
                + " ".join(f"{k}={v:.2f}" for k, v in per_kind.items()))
            if target is not None and accuracy >= target:
                log(f"validation accuracy reached {target}; stopping")
                break
    history["steps"] = step + 1
    history["train_seconds"] = time.perf_counter() - started
    return model.eval(), history


def run_training(output: str | Path = DEFAULT_OUTPUT, seed: int = 0, train_clips: int = 3000,
                 val_clips: int = 100, test_clips: int = 200, questions_per_clip: int = 5, steps: int = 3000,
                 batch_size: int = 64, lr: float = 2e-3, threads: int = 2, target: float | None = 0.985,
                 cache_dir: str | Path | None = None, config: MirasolConfig = DEMO_CONFIG,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Make the clips, train, test on held-out clips, save the checkpoint and training.json."""
    torch.set_num_threads(threads)
    started = time.perf_counter()
    task = DemoTask(config, num_chunks=config.num_chunks)
    log(f"model: {count_parameters(Mirasol(config))['total']:,} parameters; making {train_clips} training clips")
    train_set = task.make_clips(train_clips, seed, cache_dir=cache_dir, progress=True)
    val_set = task.make_clips(val_clips, seed + 1000, questions_per_clip=questions_per_clip, cache_dir=cache_dir)
    test_set = task.make_clips(test_clips, seed + 2000, questions_per_clip=questions_per_clip,
                               cache_dir=cache_dir)
    data_seconds = time.perf_counter() - started
    log(f"clips ready in {data_seconds:.0f}s")
    model, history = train_model(config, train_set, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                                 val_clips=val_set, target=target, log=log)
    result = evaluate_detailed(model, test_set)
    total_seconds = time.perf_counter() - started
    log(f"held-out accuracy {result['accuracy']:.4f} ({result['correct']}/{result['questions']}); "
        f"per kind {json.dumps({k: round(v, 3) for k, v in result['per_kind'].items()})}")
    output = Path(output)
    save_checkpoint(model, output)
    report = {
        "task": task.describe(), "seed": seed, "train_clips": train_clips, "val_clips": val_clips,
        "test_clips": test_clips, "questions_per_clip": questions_per_clip, "steps": history["steps"],
        "max_steps": steps, "batch_size": batch_size, "lr": lr, "threads": threads,
        "splits": {"train": seed, "validation": seed + 1000, "test": seed + 2000},
        "test_accuracy": result["accuracy"], "test_questions": result["questions"],
        "test_per_kind": result["per_kind"], "test_mistakes": result["mistakes"][:20],
        "validation_history": history["val"], "data_seconds": round(data_seconds, 1),
        "train_seconds": round(history["train_seconds"], 1), "total_seconds": round(total_seconds, 1),
        "parameters": count_parameters(model)["total"], "torch": torch.__version__,
    }
    (output / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"saved {output} in {total_seconds:.0f}s total")
    return report


def main(argv: Sequence[str] | None = None) -> None:
    import click

    @click.command(help="Train the built-in demo model on the synthetic audio-video question task.")
    @click.option("--output", type=click.Path(file_okay=False), default=str(DEFAULT_OUTPUT), show_default=True,
                  help="checkpoint directory to write")
    @click.option("--seed", type=int, default=0, show_default=True)
    @click.option("--train-clips", type=int, default=3000, show_default=True)
    @click.option("--val-clips", type=int, default=100, show_default=True)
    @click.option("--test-clips", type=int, default=200, show_default=True)
    @click.option("--questions-per-clip", type=int, default=5, show_default=True,
                  help="questions asked per validation / test clip")
    @click.option("--steps", type=int, default=3000, show_default=True, help="most optimiser steps")
    @click.option("--batch-size", type=int, default=64, show_default=True)
    @click.option("--lr", type=float, default=2e-3, show_default=True)
    @click.option("--threads", type=int, default=2, show_default=True, help="torch CPU threads")
    @click.option("--target", type=float, default=0.985, show_default=True,
                  help="stop early once validation accuracy reaches this (<= 0 disables)")
    @click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
                  help="keep decoded clips here to skip making them next time")
    def command(output: str, seed: int, train_clips: int, val_clips: int, test_clips: int,
                questions_per_clip: int, steps: int, batch_size: int, lr: float, threads: int, target: float,
                cache_dir: str | None) -> None:
        report = run_training(output=output, seed=seed, train_clips=train_clips, val_clips=val_clips,
                              test_clips=test_clips, questions_per_clip=questions_per_clip, steps=steps,
                              batch_size=batch_size, lr=lr, threads=threads,
                              target=target if target > 0 else None, cache_dir=cache_dir,
                              log=lambda line: click.echo(line, err=True))
        click.echo(json.dumps({k: report[k] for k in ("test_accuracy", "test_questions", "steps",
                                                      "total_seconds")}))

    command.main(args=list(argv) if argv is not None else None, standalone_mode=True)


if __name__ == "__main__":
    main()
