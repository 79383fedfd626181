"""Train or fine-tune a Mirasol on your own labelled clips (`mirasol-train --data`), resumably.

    mirasol-train --data data/belt --output checkpoints/belt                   # the tiny preset, from scratch
    mirasol-train --data data/belt --init checkpoints/demo --output runs/belt  # fine-tune a checkpoint
    mirasol-train --data data/belt --output checkpoints/belt --resume          # continue after a kill or Ctrl-C

The dataset (`dataset.py`) is read and checked first, every media file decoded once into the chunk cache
(`chunk_cache.py`). Each step then takes `clips_per_step` training clips, in the order of a shuffle of the
training clips redrawn every epoch from the seed, and up to `questions_per_step` of each clip's questions (drawn
from the seed and the step); the loss is `qa_loss` (the text term of `Mirasol.loss`, each clip span encoded
once) averaged over answer tokens, stepped with the demo training's AdamW and learning-rate schedule. What a step
trains on is a function of (seed, step) alone (`batch_at`), so a run resumed at a step continues the same order.

The output directory holds, as the demo training writes: config.json and model.safetensors (the model, every
`checkpoint_every` steps and at the end: `mirasol-export --checkpoint DIR` exports it) and, at the end,
training.json (the held-out exact-match accuracy on the validation split, greedy generation, with the
majority-answer baseline beside it); while the run is unfinished also resume.safetensors (`training_state.py`:
weights, optimiser, RNG states and step, written atomically with each checkpoint). Ctrl-C (or SIGTERM) finishes
the current step, saves, and exits; `--resume` continues from the last save and ends with the weights an
uninterrupted run would have (same seed, device and thread count).
"""
from __future__ import annotations

import dataclasses
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mirasol.runtime.bundle.tokenizer import ByteTokenizer
from mirasol.runtime.files.atomic import pause_point
from mirasol.runtime.files.ownership import check_output_dir

from .checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_checkpoint, save_checkpoint
from .chunk_cache import ChunkCache, default_cache_dir
from .config import MirasolConfig
from .dataset import Clip, Dataset, HeldOut, fingerprint, held_out, read_dataset, split_dataset
from .mirasol import Mirasol, count_parameters
from .train import (check_outside_package, collate_text, evaluate_detailed, init_model, lr_at, new_optimizer,
                    qa_loss, take_step, teacher_forced_scores, write_training_report)
from .training_state import RESUME_FILE, ResumeError, RunState, read_state, remove_state, restore, save_state


@dataclasses.dataclass
class TrainSettings:
    """What decides the weights: saved with the run, and the same when it is resumed."""

    config: dict[str, Any]  # the model's MirasolConfig
    init: str | None  # the checkpoint fine-tuned from (None: a fresh init from the seed)
    seed: int
    steps: int
    clips_per_step: int
    questions_per_step: int  # at most, of each clip
    lr: float  # peak learning rate
    warmup: int  # steps of linear warmup, then a cosine decay to 5% (`lr_at`)
    val_fraction: float  # held-out share of the media files without a "split"
    weight_decay: float = 0.01


@dataclasses.dataclass
class RunOptions:
    """How a run is carried out; free to change when it is resumed."""

    device: str = "auto"
    threads: int = 1
    cache_dir: Path | None = None  # None: default_cache_dir()
    checkpoint_every: int = 100
    eval_every: int = 100
    log_seconds: float = 10.0  # at most this long between progress lines


def pick_device(name: str) -> torch.device:
    """"auto": the GPU when PyTorch has one, else the CPU; otherwise what `name` says, if PyTorch has it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device PyTorch knows (auto, cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this PyTorch ({torch.__version__}) sees no CUDA GPU; use --device cpu")
    return device


# ---------------------------------------------------------------- the data order
@lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, count: int) -> np.ndarray:
    return np.random.default_rng([seed, 12, epoch]).permutation(count)


def batch_at(step: int, settings: TrainSettings, clips: Sequence[Clip]) -> list[tuple[int, int]]:
    """The (clip index, question index) pairs step `step` trains on: positions step * clips_per_step onwards of
    the clips' epoch-by-epoch shuffles, and of each clip up to questions_per_step distinct questions."""
    size = settings.clips_per_step
    picks = [int(_epoch_order(settings.seed, position // len(clips), len(clips))[position % len(clips)])
             for position in range(step * size, (step + 1) * size)]
    rng = np.random.default_rng([settings.seed, 13, step])
    pairs = []
    for clip in picks:
        count = len(clips[clip].questions)
        chosen = rng.choice(count, min(settings.questions_per_step, count), replace=False)
        pairs.extend((clip, int(j)) for j in sorted(chosen))
    return pairs


def batch_loss(model: Mirasol, pairs: Sequence[tuple[int, int]], clips: Sequence[Clip], cache: ChunkCache,
               chunk_seconds: float, device: torch.device) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens of `pairs`: `qa_loss` per group of spans of one length (the
    spans of a group are batched; each span is encoded once for all its questions)."""
    groups: dict[int, tuple[dict[tuple[int, int, int], int], list[int], list[tuple[str, str]]]] = {}
    for clip_index, question_index in pairs:
        clip = clips[clip_index]
        question = clip.questions[question_index]
        first, last = question.span(chunk_seconds, clip.chunks)
        spans, rows, text = groups.setdefault(last - first, ({}, [], []))
        rows.append(spans.setdefault((clip_index, first, last), len(spans)))
        text.append((question.question, question.answer))
    total, tokens = torch.zeros((), device=device), 0
    for length in sorted(groups):
        spans, rows, text = groups[length]
        arrays = [cache.span(clips[c].entry, first, last) for c, first, last in spans]
        video = torch.from_numpy(np.stack([v for v, _ in arrays])).to(device)
        audio = torch.from_numpy(np.stack([a for _, a in arrays])).to(device)
        inputs, targets = collate_text(text, model.config.max_text_len)
        count = int((targets != ByteTokenizer.PAD).sum())
        loss = qa_loss(model, video, audio, torch.tensor(rows, device=device), inputs.to(device), targets.to(device))
        total = total + loss * count
        tokens += count
    return total / tokens


# ---------------------------------------------------------------- stopping on request
class StopRequests:
    """While active (main thread only), SIGINT and SIGTERM ask the run to stop after its current step; a second
    SIGINT stops at once (KeyboardInterrupt)."""

    def __init__(self) -> None:
        self.requested: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signum

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *_: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


# ---------------------------------------------------------------- the run
def train_on_dataset(data: str | Path, output: str | Path, settings: TrainSettings, resume: bool = False,
                     options: RunOptions | None = None, log: Callable[[str], None] = print,
                     progress: bool = False) -> dict[str, Any]:
    """Check the dataset, train (or continue the run in `output` with `resume`), score the held-out split and
    write the checkpoint and training.json into `output`; returns the report. With `resume`, `settings` must be
    the saved run's (`saved_settings`). `progress`: a bar while the media files are decoded (on a terminal)."""
    options = options or RunOptions()
    output = Path(output)
    check_outside_package(output)
    check_output_dir(output, "checkpoint")  # before any work: an output holding anything not ours is refused
    saved = read_state(output) if resume else None
    if not resume and (output / RESUME_FILE).is_file():
        raise ResumeError(f"{output} holds an unfinished run; continue it with --resume, or choose another --output")
    if settings.init and saved is None:
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (Path(settings.init) / name).is_file():
                raise FileNotFoundError(f"--init {settings.init} is not a checkpoint: it has no {name}")
    device = pick_device(options.device)
    torch.set_num_threads(options.threads)
    config = MirasolConfig.from_dict(settings.config)
    started = time.perf_counter()
    cache = ChunkCache(options.cache_dir or default_cache_dir(), config)
    log(f"reading {data}; decoded chunks cached in {cache.directory}")
    dataset = read_dataset(data, config, cache, progress=_bar("media files") if progress else None)
    train, validation = split_dataset(dataset, settings.seed, settings.val_fraction)
    data_print = fingerprint(train, validation)
    if saved is not None and saved.dataset != data_print:
        raise ResumeError(f"the dataset differs from the one the run in {output} trained on (a line, a question, "
                          f"a split or a media file changed); resume with the same dataset, or start a new run")
    held = held_out(validation, dataset.chunk_seconds, cache)
    data_seconds = time.perf_counter() - started
    log(f"{len(train)} training clips ({sum(len(c.questions) for c in train)} questions), {len(validation)} "
        f"validation clips ({sum(len(h.questions) for h in held)} questions); ready in {data_seconds:.0f}s")

    model = load_checkpoint(settings.init) if settings.init and saved is None else init_model(config, settings.seed)
    if model.config != config:
        raise ValueError(f"checkpoint {settings.init} has another config than the run's")
    model.to(device).train()
    optimizer = new_optimizer(list(model.named_parameters()), settings.lr, settings.weight_decay)
    state = saved or RunState(step=0, settings=dataclasses.asdict(settings), dataset=data_print,
                              history={"loss": [], "validation": [], "resumed_at": []})
    if saved is not None:
        restore(output, model, optimizer)
        state.history["resumed_at"].append(saved.step)
        log(f"resuming at step {saved.step} of {settings.steps}")
    log(f"model: {count_parameters(model)['total']:,} parameters on {device}, {options.threads} thread(s)")
    run = _Run(model, optimizer, state, settings, options, dataset, cache, train, held, output, device, log)
    run.loop()
    return run.finish(data_seconds)


@dataclasses.dataclass
class _Run:
    model: Mirasol
    optimizer: torch.optim.Optimizer
    state: RunState
    settings: TrainSettings
    options: RunOptions
    dataset: Dataset
    cache: ChunkCache
    train: Sequence[Clip]
    held: Sequence[HeldOut]
    output: Path
    device: torch.device
    log: Callable[[str], None]

    def loop(self) -> None:
        """Steps until the last, with progress, validation and checkpoints; on SIGINT / SIGTERM, save and raise
        KeyboardInterrupt."""
        state, settings, options = self.state, self.settings, self.options
        first_step = state.step
        began = last_log = time.perf_counter()
        losses: list[float] = []
        with StopRequests() as stop:
            while state.step < settings.steps:
                step_started = time.perf_counter()
                loss = batch_loss(self.model, batch_at(state.step, settings, self.train), self.train, self.cache,
                                  self.dataset.chunk_seconds, self.device)
                take_step(self.optimizer, self.model, loss,
                          lr_at(state.step, settings.steps, settings.lr, settings.warmup))
                losses.append(float(loss.detach()))
                state.step += 1
                state.train_seconds += time.perf_counter() - step_started
                now = time.perf_counter()
                done = state.step == settings.steps
                if state.step == first_step + 1 or done or now - last_log >= options.log_seconds:
                    per_step = (now - began) / (state.step - first_step)
                    state.history["loss"].append([state.step, sum(losses) / len(losses)])
                    self.log(f"step {state.step}/{settings.steps}  loss {sum(losses) / len(losses):.4f}  "
                             f"lr {self.optimizer.param_groups[0]['lr']:.2e}  {per_step:.2f} s/step  "
                             f"ETA {_duration(per_step * (settings.steps - state.step))}")
                    losses, last_log = [], now
                if state.step % options.eval_every == 0 or done:
                    accuracy, _ = teacher_forced_scores(self.model, self.held)
                    state.history["validation"].append([state.step, accuracy])
                    self.log(f"step {state.step}: validation accuracy {accuracy:.3f} (teacher-forced exact match)")
                if stop.requested is not None:
                    self.checkpoint(f"stopped by {signal.Signals(stop.requested).name}; continue with --resume")
                    raise KeyboardInterrupt
                if state.step % options.checkpoint_every == 0 or done:
                    self.checkpoint("checkpoint" if not done else "last step")

    def checkpoint(self, reason: str) -> None:
        """The resumable state, then the model (a kill between them leaves the model one save behind)."""
        size, count = self.settings.clips_per_step, len(self.train)
        self.state.order = {"epoch": self.state.step * size // count, "position": self.state.step * size % count}
        save_state(self.output, self.model, self.optimizer, self.state)
        save_checkpoint(self.model, self.output)
        self.log(f"saved step {self.state.step} to {self.output} ({reason})")
        pause_point(f"saved step {self.state.step}")

    def finish(self, data_seconds: float) -> dict[str, Any]:
        """Score the held-out split, write the model and training.json, drop the resume state."""
        eval_started = time.perf_counter()
        longest = max(len(q.answer.encode()) for clip in self.dataset.clips for q in clip.questions)
        result = evaluate_detailed(self.model, self.held, max_new_tokens=longest + 1)
        eval_seconds = time.perf_counter() - eval_started
        baseline = majority_baseline(self.train, self.held)
        self.log(f"held-out accuracy {result['accuracy']:.4f} ({result['correct']}/{result['questions']} validation "
                 f"questions; always giving the most common training answer: {baseline:.4f})")
        most_asked = Counter(q.question for h in self.held for q in h.questions).most_common(50)
        state = self.state
        report = {
            "data": str(self.dataset.path), "settings": state.settings, "steps": state.step,
            "train_clips": len(self.train), "train_questions": sum(len(c.questions) for c in self.train),
            "validation_clips": len({h.clip.line for h in self.held}), "validation_questions": result["questions"],
            "validation_accuracy": result["accuracy"], "majority_baseline": baseline,
            "validation_per_question": {q: result["per_kind"][q] for q, _ in most_asked},
            "validation_mistakes": result["mistakes"][:20], "history": state.history,
            "data_seconds": round(data_seconds, 1), "train_seconds": round(state.train_seconds, 1),
            "seconds_per_step": round(state.train_seconds / max(state.step, 1), 4),
            "eval_seconds": round(eval_seconds, 1), "device": str(self.device), "threads": self.options.threads,
            "parameters": count_parameters(self.model)["total"], "torch": torch.__version__,
        }
        save_checkpoint(self.model, self.output)
        write_training_report(self.output, report)
        remove_state(self.output)
        self.log(f"saved {self.output}")
        return report


def majority_baseline(train: Sequence[Clip], held: Sequence[HeldOut]) -> float:
    """The held-out accuracy of always giving, to each question, its most common answer in the training split
    (for a question never asked in training, the most common answer overall): what beats chance beats this."""
    by_question: dict[str, Counter[str]] = {}
    overall: Counter[str] = Counter()
    for clip in train:
        for q in clip.questions:
            by_question.setdefault(q.question, Counter())[q.answer.lower()] += 1
            overall[q.answer.lower()] += 1
    guesses = [(by_question.get(q.question) or overall).most_common(1)[0][0] == q.answer.lower()
               for h in held for q in h.questions]
    return sum(guesses) / len(guesses)


def saved_settings(output: str | Path) -> TrainSettings:
    """The settings of the unfinished run in `output` (for --resume)."""
    return TrainSettings(**read_state(Path(output)).settings)


def _bar(what: str) -> Callable[[Any, int], Any]:
    def wrap(items: Any, total: int) -> Any:
        from tqdm import tqdm
        return tqdm(items, total=total, desc=what, unit="line", disable=None)  # None: on a terminal only
    return wrap

