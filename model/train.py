"""Train the built-in demo model: a small Mirasol that answers the demo task's questions.

    mirasol-train                               # -> checkpoints/demo (config.json, model.safetensors,
                                                #    training.json with the held-out accuracy and timings)
    mirasol-train --output runs/demo --seed 1 --cache-dir ~/.cache/mirasol-demo

The shipped checkpoint (model/assets/demo) is never an output: nothing is written inside the installed package.

Everything is seeded: the clips (`mirasol.model.demo_task`), the initialisation, the batch order.
The same seed, thread count and library versions give the same checkpoint.

Data splits (clips are indexed by (seed, index), see demo_task):
- train: `--train-clips` clips of seed `--seed`;
- validation (progress logs, early stop once it reaches `--target`): seed `--seed + 1000`;
- held-out test (the accuracy reported and saved in training.json): seed `--seed + 2000`.

How it trains fast enough on two busy CPU cores (about 1300 steps, ~11 min, plus ~5 min making clips):
- each step takes 16 clips and 8 of each clip's questions (question kinds equally likely); `qa_loss`
  is `Mirasol.loss`'s text term with each clip's encoders / combiner / AV autoregressor run once for
  its 8 questions (the tests hold it equal to `Mirasol.loss`); the next-chunk latent term is left out,
  since the chunks of a demo clip are independent by construction;
- training-only linear probes (`AttributeProbes`) on the chunk latents and the av_context predict each
  chunk's colour, shape and pitch, and those of the chunk before: a dense signal for the encoders,
  which learn from the answers alone far more slowly. The probes are dropped; the checkpoint is the
  plain model, and its answers come from the text decoder only;
- one torch thread by default: with a second process on the machine, two threads made steps many
  times slower (spinning workers), one thread keeps a steady ~0.5 s per step.

`evaluate(model_or_answer_fn, clips)` gives the exact-match answer accuracy of a PyTorch model (greedy
`Mirasol.generate`) or of any answer function `(video, audio, question) -> str` (a runtime bundle's
pipeline, for instance), on clips from `DemoTask.make_clips`.
"""
from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import mirasol
from mirasol.runtime.errors import OutputError
from mirasol.runtime.files.atomic import write_file
from mirasol.runtime.files.ownership import check_output_dir
from mirasol.runtime.bundle.tokenizer import ByteTokenizer

from .checkpoint import save_checkpoint
from .config import MirasolConfig, get_preset
from .demo_task import COLOURS, DEMO_CHECKPOINT, PITCHES, SHAPES, TRAIN_OUTPUT, DemoClip, DemoTask
from .mirasol import Mirasol, count_parameters

# The demo model: the tiny preset's sizes (about 0.45M parameters, under 2 MB of weights), for clips of
# four one-second chunks (4 frames of 32x32 at 4 fps + 1 s of 16 kHz audio each).
DEMO_CONFIG: MirasolConfig = get_preset("tiny").replace(preset="demo", num_frames=16, max_text_len=96)
REPORT_FILE = "training.json"  # beside a trained checkpoint (run_training, mirasol-train --data)

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


def _clip_tensors(clips: Sequence[DemoClip], device: torch.device | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    videos, audios = [c.video for c in clips], [c.audio for c in clips]
    for clip, video, audio in zip(clips, videos, audios):
        if video is None or audio is None:
            raise ValueError(f"clip {clip.label} has no decoded arrays; use DemoTask.make_clips")
    video = torch.from_numpy(np.stack(videos)).float()
    audio = torch.from_numpy(np.stack(audios)).float()
    return video.to(device), audio.to(device)


def _batches(items: Sequence[Any], size: int, shape: Callable[[Any], Any]) -> Iterator[list[int]]:
    """Indices of `items` in lists of at most `size` whose `shape(item)` is the same, shapes in the order they
    first appear (clips of one length batch together; demo clips all have one length: plain batches in order)."""
    groups: dict[Any, list[int]] = {}
    for index, item in enumerate(items):
        groups.setdefault(shape(item), []).append(index)
    for indices in groups.values():
        for start in range(0, len(indices), size):
            yield indices[start:start + size]


# ---------------------------------------------------------------- evaluation
def _model_answers(model: Mirasol, clips: Sequence[DemoClip], max_new_tokens: int, batch: int = 32
                   ) -> list[list[str]]:
    """Greedy answers of a PyTorch model to every question of every clip."""
    tok = ByteTokenizer()
    answers: list[list[str]] = [[] for _ in clips]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        for indices in _batches(clips, batch, lambda clip: clip.video.shape):
            video, audio = _clip_tensors([clips[i] for i in indices], device)
            av_context = model.av_autoregressor.forward_clip(model.encode_chunks(video, audio))
            for row, index in enumerate(indices):
                answers[index] = [tok.decode(model.generate(av_context[row:row + 1], tok.prompt(qa.question),
                                                            max_new_tokens)) for qa in clips[index].questions]
    model.train(was_training)
    return answers


def evaluate_detailed(model_or_answer_fn: Mirasol | AnswerFn, clips: Sequence[DemoClip],
                      max_new_tokens: int = 16) -> dict[str, Any]:
    """Exact-match accuracy (after strip / lower-case) overall and per question kind, with the mistakes.

    `clips`: DemoClips, or any objects with `video`, `audio`, `label` and `questions` (each with `question`,
    `answer` and `kind`), such as a dataset's held-out questions (`mirasol.model.dataset`)."""
    if isinstance(model_or_answer_fn, Mirasol):
        answers = _model_answers(model_or_answer_fn, clips, max_new_tokens)
    else:
        answers = [[model_or_answer_fn(clip.video, clip.audio, qa.question) for qa in clip.questions]
                   for clip in clips]
    per_kind: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    mistakes = []
    for clip, clip_answers in zip(clips, answers):
        for qa, answer in zip(clip.questions, clip_answers):
            ok = answer.strip().lower() == qa.answer.strip().lower()
            per_kind[qa.kind][0] += ok
            per_kind[qa.kind][1] += 1
            if not ok:
                mistakes.append({"clip": clip.label, "question": qa.question, "expected": qa.answer,
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
    device = next(model.parameters()).device
    with torch.no_grad():
        for indices in _batches(pairs, batch, lambda pair: pair[0].video.shape):
            group = [pairs[i] for i in indices]
            video, audio = _clip_tensors([c for c, _ in group], device)
            inputs, targets = collate_text([(qa.question, qa.answer) for _, qa in group],
                                           model.config.max_text_len)
            inputs, targets = inputs.to(device), targets.to(device)
            _, logits = model(video, audio, inputs)
            hit = ((logits.argmax(-1) == targets) | (targets == ByteTokenizer.PAD)).all(dim=1)
            for (_, qa), ok in zip(group, hit.tolist()):
                per_kind[qa.kind][0] += ok
                per_kind[qa.kind][1] += 1
    model.train(was_training)
    correct = sum(c for c, _ in per_kind.values())
    return correct / len(pairs), {k: c / n for k, (c, n) in sorted(per_kind.items())}


# ---------------------------------------------------------------- training
def qa_loss(model: Mirasol, video: torch.Tensor, audio: torch.Tensor, rows: torch.Tensor,
            input_ids: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
    """The text term of `Mirasol.loss` for several questions per clip, each clip encoded once.

    video [B, N*F, 3, H, W], audio [B, n_mels, N*A]; rows [R] (long): the clip of each of the R question
    rows in input_ids / target_ids [R, T]. Equal to `model.loss(video[rows], audio[rows], input_ids,
    target_ids)["text"]` (tests hold them equal) at a fraction of the cost: the encoders, the combiner
    and the AV autoregressor, most of the compute, run once per clip instead of once per question.
    """
    return qa_losses(model, video, audio, rows, input_ids, target_ids)["text"]


# attributes of one chunk, as class indices: colour, shape, pitch
ATTRIBUTES: tuple[tuple[str, ...], ...] = (tuple(COLOURS), SHAPES, tuple(PITCHES))


def attribute_labels(clips: Sequence[DemoClip]) -> torch.Tensor:
    """[B, N, 3] class indices of each chunk's colour, shape and pitch (the generator's ground truth)."""
    return torch.tensor([[[names.index(value) for names, value in zip(ATTRIBUTES, (e.colour, e.shape, e.pitch))]
                          for e in clip.events] for clip in clips], dtype=torch.long)


class AttributeProbes(nn.Module):
    """Training-only linear probes that give the encoders a dense signal (never saved with the model).

    From a chunk's latents: its colour, shape and pitch. From its av_context: the same, and those of the
    chunk before it ("none" for the first), which the order questions need the AV autoregressor to carry.
    The answers still come only from the text decoder: the probes shape the features, not the outputs.
    """

    def __init__(self, config: MirasolConfig) -> None:
        super().__init__()
        width = config.latents_per_chunk * config.d_model
        sizes = [len(names) for names in ATTRIBUTES]
        self.sizes = sizes
        self.latents = nn.Linear(width, sum(sizes))
        self.context = nn.Linear(width, sum(sizes) + sum(size + 1 for size in sizes))

    @staticmethod
    def _ce(logits: torch.Tensor, labels: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
        losses, start = [], 0
        for k, size in enumerate(sizes):
            losses.append(F.cross_entropy(logits[..., start:start + size].flatten(0, -2), labels[..., k].flatten()))
            start += size
        return torch.stack(losses).mean()

    def forward(self, latents: torch.Tensor, av_context: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """latents, av_context [B, N, m, D]; labels [B, N, 3] -> mean cross-entropy of every probe."""
        previous = torch.cat([torch.tensor(self.sizes).expand(labels.shape[0], 1, -1), labels[:, :-1]], dim=1)
        context = self.context(av_context.flatten(2))
        now = sum(self.sizes)
        return (self._ce(self.latents(latents.flatten(2)), labels, self.sizes)
                + self._ce(context[..., :now], labels, self.sizes)
                + self._ce(context[..., now:], previous, [size + 1 for size in self.sizes])) / 3


def qa_losses(model: Mirasol, video: torch.Tensor, audio: torch.Tensor, rows: torch.Tensor,
              input_ids: torch.Tensor, target_ids: torch.Tensor, probes: AttributeProbes | None = None,
              labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """`qa_loss` ("text") and, given probes and labels, the probes' loss ("probes")."""
    latents = model.encode_chunks(video, audio)
    av_context = model.av_autoregressor.forward_clip(latents)
    cross = [(key[rows], value[rows]) for key, value in model.text_cross_kv(model.av_memory(av_context))]
    count = input_ids.shape[0]
    logits, _ = model.text_step(input_ids, torch.zeros(count, dtype=torch.long, device=input_ids.device),
                                cross, model.text_decoder.empty_cache(count, input_ids.device))
    out = {"text": F.cross_entropy(logits.flatten(0, 1), target_ids.flatten(), ignore_index=ByteTokenizer.PAD)}
    if probes is not None and labels is not None:
        out["probes"] = probes(latents, av_context, labels)
    return out


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(steps - warmup, 1)
    return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def init_model(config: MirasolConfig, seed: int) -> Mirasol:
    """A fresh model to train, seeded."""
    torch.manual_seed(seed)
    model = Mirasol(config)
    # nn.Embedding's default N(0, 1) init, tied to the output head, starts the loss near 20 (huge logits)
    torch.nn.init.normal_(model.text_decoder.embed.weight, std=0.02)
    return model


def new_optimizer(named_parameters: Sequence[tuple[str, nn.Parameter]], lr: float, weight_decay: float
                  ) -> torch.optim.AdamW:
    """AdamW with weight decay on the matrices except the embedding (none on biases, norms, the embedding)."""
    decay = [p for n, p in named_parameters if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in named_parameters if not (p.ndim >= 2 and "embed" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))


def take_step(optimizer: torch.optim.Optimizer, model: nn.Module, loss: torch.Tensor, lr: float) -> None:
    """One optimiser step on `loss` at learning rate `lr`, the model's gradients clipped to norm 1."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()


def train_model(config: MirasolConfig, train_clips: Sequence[DemoClip], steps: int, clips_per_step: int = 16,
                questions_per_step: int = 8, lr: float = 3e-3, warmup: int = 100, weight_decay: float = 0.01,
                seed: int = 0, val_clips: Sequence[DemoClip] = (), eval_every: int = 100,
                target: float | None = None, probe_weight: float = 1.0,
                log: Callable[[str], None] = print) -> tuple[Mirasol, dict[str, Any]]:
    """Train a fresh model: each step, `clips_per_step` random clips with `questions_per_step` of their
    questions each (distinct, random), loss `qa_loss` (the text term of `Mirasol.loss`, each clip encoded
    once). Returns the model (eval mode) and a history. Stops early once the validation accuracy, checked
    every `eval_every` steps, reaches `target` (teacher-forced exact match, equal to greedy exact match)."""
    model = init_model(config, seed)
    probes = AttributeProbes(config) if probe_weight > 0 else None
    model.train()
    named = list(model.named_parameters()) + (list(probes.named_parameters(prefix="probes")) if probes else [])
    optimizer = new_optimizer(named, lr, weight_decay)
    rng = np.random.default_rng([seed, 7])
    first = train_clips[0]
    assert first.video is not None and first.audio is not None
    video_all = np.empty((len(train_clips), *first.video.shape), np.float16)  # half the memory; exact
    audio_all = np.empty((len(train_clips), *first.audio.shape), np.float32)  # for cached clips
    for i, clip in enumerate(train_clips):
        video_all[i], audio_all[i] = clip.video, clip.audio
    labels_all = attribute_labels(train_clips)
    history: dict[str, Any] = {"loss": [], "val": []}
    started = time.perf_counter()
    running = 0.0
    for step in range(steps):
        picks = rng.choice(len(train_clips), clips_per_step, replace=False)
        pairs, rows = [], []
        for row, i in enumerate(picks):
            questions = train_clips[i].questions
            # every question kind equally likely (a clip has up to 3 of some kinds and 1 of others)
            kinds = [qa.kind for qa in questions]
            weights = np.array([1.0 / kinds.count(kind) for kind in kinds])
            for j in rng.choice(len(questions), min(questions_per_step, len(questions)), replace=False,
                                p=weights / weights.sum()):
                pairs.append((questions[j].question, questions[j].answer))
                rows.append(row)
        inputs, targets = collate_text(pairs, config.max_text_len)
        video = torch.from_numpy(video_all[picks]).float()
        audio = torch.from_numpy(audio_all[picks]).float()
        losses = qa_losses(model, video, audio, torch.tensor(rows), inputs, targets, probes,
                           labels_all[torch.from_numpy(picks)])
        loss = losses["text"] + probe_weight * losses["probes"] if probes is not None else losses["text"]
        take_step(optimizer, model, loss, lr_at(step, steps, lr, warmup))
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


def check_outside_package(path: str | Path) -> None:
    """Refuse an output inside the installed package (where the shipped demo checkpoint lives): in an installed
    mirasol, its whole directory; in an editable install, the model package's directory."""
    target = Path(path).resolve()
    for package in {Path(p).resolve() for p in mirasol.__path__ if Path(p).is_dir()} | {DEMO_CHECKPOINT.parents[1]}:
        if target == package or package in target.parents:
            raise OutputError(f"{path} is inside the installed package {package}; nothing is written there (the "
                              f"shipped demo checkpoint lives in it): choose another output directory")


def write_training_report(output: Path, report: dict[str, Any]) -> Path:
    """training.json in the checkpoint directory `output` (a name of ours there), atomically; returns its path."""
    return write_file(output / REPORT_FILE, json.dumps(report, indent=2) + "\n")


def run_training(output: str | Path = TRAIN_OUTPUT, seed: int = 0, train_clips: int = 1500,
                 val_clips: int = 100, test_clips: int = 200, questions_per_clip: int = 5, steps: int = 1500,
                 clips_per_step: int = 16, questions_per_step: int = 8, lr: float = 3e-3,
                 probe_weight: float = 1.0, threads: int = 1, target: float | None = 0.985,
                 cache_dir: str | Path | None = None, config: MirasolConfig = DEMO_CONFIG, progress: bool = True,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Make the clips, train, test on held-out clips, save the checkpoint and training.json. `progress`: a bar
    while the training clips are made (on a terminal)."""
    check_outside_package(output)
    check_output_dir(output, "checkpoint")  # before any work: an output holding anything not ours is refused
    torch.set_num_threads(threads)
    started = time.perf_counter()
    task = DemoTask(config, num_chunks=config.num_chunks)
    log(f"model: {count_parameters(Mirasol(config))['total']:,} parameters; making {train_clips} training clips")
    train_set = task.make_clips(train_clips, seed, cache_dir=cache_dir, progress=progress)
    val_set = task.make_clips(val_clips, seed + 1000, questions_per_clip=questions_per_clip, cache_dir=cache_dir)
    test_set = task.make_clips(test_clips, seed + 2000, questions_per_clip=questions_per_clip,
                               cache_dir=cache_dir)
    data_seconds = time.perf_counter() - started
    log(f"clips ready in {data_seconds:.0f}s")
    model, history = train_model(config, train_set, steps=steps, clips_per_step=clips_per_step,
                                 questions_per_step=questions_per_step, lr=lr, seed=seed, val_clips=val_set,
                                 target=target, probe_weight=probe_weight, log=log)
    eval_started = time.perf_counter()
    result = evaluate_detailed(model, test_set)
    eval_seconds = time.perf_counter() - eval_started
    total_seconds = time.perf_counter() - started
    log(f"held-out accuracy {result['accuracy']:.4f} ({result['correct']}/{result['questions']}); "
        f"per kind {json.dumps({k: round(v, 3) for k, v in result['per_kind'].items()})}")
    output = save_checkpoint(model, output)
    report = {
        "task": task.describe(), "seed": seed, "train_clips": train_clips, "val_clips": val_clips,
        "test_clips": test_clips, "questions_per_clip": questions_per_clip, "steps": history["steps"],
        "max_steps": steps, "clips_per_step": clips_per_step, "questions_per_step": questions_per_step,
        "lr": lr, "probe_weight": probe_weight, "threads": threads, "target": target,
        "splits": {"train": seed, "validation": seed + 1000, "test": seed + 2000},
        "test_accuracy": result["accuracy"], "test_questions": result["questions"],
        "test_per_kind": result["per_kind"], "test_mistakes": result["mistakes"][:20],
        "validation_history": history["val"], "data_seconds": round(data_seconds, 1),
        "train_seconds": round(history["train_seconds"], 1), "eval_seconds": round(eval_seconds, 1),
        "total_seconds": round(total_seconds, 1), "parameters": count_parameters(model)["total"],
        "torch": torch.__version__,
    }
    write_training_report(output, report)
    log(f"saved {output} in {total_seconds:.0f}s total")
    return report
