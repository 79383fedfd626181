"""`mirasol-demo` (write a demo clip and its questions, or a dataset of them) and `mirasol-train` (train the demo
model, or a model on a dataset of labelled clips).

Only the standard library and the runtime are imported here: PyTorch (train) and PyAV (demo) load when the command
runs, so that where they are missing the command names the extra that brings them.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mirasol.runtime.cli.commandline import (COUNT, SEED, THREADS, UsageError, bounded, command_parser, existing_dir,
                                               run_command)

from .demo_task import DEMO_CHECKPOINT, TEST_SEED, TRAIN_OUTPUT


# ---------------------------------------------------------------- mirasol-demo
def demo(argv: Sequence[str] | None = None) -> int:
    parser = command_parser(
        "mirasol-demo",
        "Write a synthetic demo clip (a real mp4: moving coloured shapes and tones, one event per 1-second chunk) "
        "that the shipped demo model never saw, and print the questions it answers with their expected answers; "
        "or, with --dataset, a folder of such clips with their questions in mirasol-train --data's format.",
        epilog="Examples:\n"
               "  mirasol-demo clip.mp4\n"
               "  mirasol-run bundles/demo --video clip.mp4 --question 'which colour appeared first?'\n"
               "  mirasol-demo clip3.mp4 --index 3          # another held-out clip\n"
               "  mirasol-demo --dataset data/shapes --clips 200 && mirasol-train --data data/shapes")
    parser.add_argument("out", type=_clip_path, nargs="?",
                        help=f"the video file to write ({', '.join(CLIP_SUFFIXES)}); an existing file is replaced "
                             f"only if it is a clip mirasol-demo wrote")
    parser.add_argument("--index", type=SEED, default=0, metavar="N",
                        help="which clip of the family (0 or more)")
    parser.add_argument("--seed", type=SEED, default=TEST_SEED, metavar="N",
                        help=f"clip family, 0 or more ({TEST_SEED}: held out from the demo model's training)")
    parser.add_argument("--dataset", type=Path, metavar="DIR",
                        help="instead: write clips 0..N-1 of the family and their clips.jsonl into this folder (new, "
                             "empty, or one mirasol-demo wrote)")
    parser.add_argument("--clips", type=COUNT, default=100, metavar="N", help="with --dataset: how many")
    return run_command(parser, _demo, argv)


CLIP_SUFFIXES = (".mp4", ".mkv", ".mov")  # containers that take the demo's H.264 video and AAC audio


def _clip_path(text: str) -> Path:
    path = Path(text)
    if path.suffix.lower() not in CLIP_SUFFIXES:
        raise argparse.ArgumentTypeError(f"{text}: mirasol-demo writes {', '.join(CLIP_SUFFIXES)} files (the name's "
                                         f"suffix says which)")
    return path


def _demo(args: argparse.Namespace) -> None:
    from mirasol.runtime.files.atomic import atomic_file

    from .demo_task import DemoTask, is_demo_clip

    if (args.out is None) == (args.dataset is None):
        raise UsageError("give the clip to write, or --dataset DIR")
    config = json.loads((DEMO_CHECKPOINT / "config.json").read_text())
    task = DemoTask(config)
    if args.dataset is not None:
        file = task.write_dataset(args.dataset, args.clips, args.seed)
        print(f"wrote {file}: {args.clips} clips of {task.num_chunks} chunks, with their questions")
        return
    clip = task.clip(args.seed, args.index)
    with atomic_file(args.out, is_demo_clip, "demo clip") as tmp:
        task.write(clip, tmp)
    print(f"wrote {args.out}: {len(clip.events)} chunks")
    width = max(len(qa.question) for qa in clip.questions)
    for qa in clip.questions:
        print(f"  Q: {qa.question:<{width}}  A: {qa.answer}")


# ---------------------------------------------------------------- mirasol-train
PRESETS = ("tiny", "small", "base", "mirasol3b")
# options of the demo task only, and of --data only (dest names)
DEMO_ONLY = ("train_clips", "val_clips", "test_clips", "questions_per_clip", "probe_weight", "target")
DATA_ONLY = ("data", "preset", "config", "init", "resume", "val_fraction", "warmup", "checkpoint_every", "eval_every",
             "device")
# what decides the weights of a --data run: (dest, default); the saved run's values on --resume
LEARNING = (("seed", 0), ("steps", 1000), ("clips_per_step", 8), ("questions_per_step", 4), ("lr", 1e-3),
            ("warmup", 50), ("val_fraction", 0.2))
DEMO_DEFAULTS = {"steps": 1500, "clips_per_step": 16, "questions_per_step": 8, "lr": 3e-3, "train_clips": 1500,
                 "val_clips": 100, "test_clips": 200, "questions_per_clip": 5, "probe_weight": 1.0,
                 "target": 0.985, "seed": 0}
MAX_PROBLEM_LINES = 200


def train(argv: Sequence[str] | None = None) -> int:
    parser = command_parser(
        "mirasol-train",
        "Train a Mirasol. With --data: on your own labelled clips (a JSON Lines file of media files with questions "
        "and answers, see docs/training.md), from a preset, a config or a checkpoint (--init), resumable "
        "(--resume); writes config.json, model.safetensors and training.json (the held-out accuracy). Without "
        "--data: the demo model (the tiny preset's sizes) on the synthetic audio-video question task of "
        "mirasol-demo, tested on held-out clips.",
        epilog="Examples:\n"
               "  mirasol-train --data data/belt                        # -> checkpoints/belt (tiny preset)\n"
               "  mirasol-train --data data/belt --init checkpoints/demo --steps 300 --output runs/belt\n"
               "  mirasol-train --data data/belt --output runs/belt --resume   # after Ctrl-C or a kill\n"
               "  mirasol-export --checkpoint runs/belt --out bundles/belt\n"
               "  mirasol-train                                # the demo -> checkpoints/demo (~16 min on 2 CPU cores)\n"
               "  mirasol-train --output runs/demo --seed 1 --cache-dir ~/.cache/mirasol-demo\n"
               f"The shipped model ({DEMO_CHECKPOINT}) is never written: train elsewhere, then export that.",
        quiet=True)
    count = COUNT
    parser.add_argument("--data", type=Path, metavar="DATASET",
                        help="train on this JSON Lines file of labelled clips, or the clips.jsonl in this folder "
                             "(default: the demo task)")
    parser.add_argument("--output", type=Path, metavar="DIR",
                        help=f"checkpoint directory to write (new, empty, or a checkpoint mirasol wrote) (default: "
                             f"{TRAIN_OUTPUT}; with --data: checkpoints/<the dataset's name>)")
    parser.add_argument("--seed", type=SEED, help="seed of the initialisation, the split and the batches (and of the "
                                                 "demo's clips) (default: 0)")
    parser.add_argument("--steps", type=count, metavar="N", help="optimiser steps (the demo: at most) (default: 1500; "
                                                                  "with --data: 1000)")
    parser.add_argument("--clips-per-step", type=count, metavar="N",
                        help="clips in a training step (default: 16; with --data: 8)")
    parser.add_argument("--questions-per-step", type=count, metavar="N",
                        help="questions per clip in a training step (default: 8; with --data: 4)")
    parser.add_argument("--lr", type=bounded(float, 0, 10, open_low=True),
                        help="peak learning rate (default: 3e-3; with --data: 1e-3)")
    parser.add_argument("--threads", type=THREADS, default=1, metavar="N",
                        help="torch CPU threads (1 is fastest on a shared 2-core machine)")
    parser.add_argument("--cache-dir", type=Path, metavar="DIR",
                        help="keep decoded clips here (default: the demo keeps none; with --data: "
                             "~/.cache/mirasol/chunks, or $XDG_CACHE_HOME/mirasol/chunks)")
    data = parser.add_argument_group("with --data")
    data.add_argument("--preset", choices=PRESETS, help="size of a fresh model (default: tiny)")
    data.add_argument("--config", type=Path, metavar="FILE",
                      help='a JSON file of model config fields over the preset\'s, e.g. {"max_text_len": 128}, or a '
                           "checkpoint's config.json")
    data.add_argument("--init", type=existing_dir, metavar="DIR",
                      help="fine-tune this checkpoint (its config) instead of a fresh model")
    data.add_argument("--resume", action="store_true",
                      help="continue the unfinished run in --output with its settings (same result as a run that "
                           "never stopped, on the same device and thread count)")
    data.add_argument("--val-fraction", type=bounded(float, 0, 0.9, open_low=True), metavar="F",
                      help='held-out share of the media files without a "split" (default: 0.2)')
    data.add_argument("--warmup", type=bounded(int, 0, 1 << 20), metavar="N",
                      help="learning-rate warmup steps (0: none) (default: 50)")
    data.add_argument("--checkpoint-every", type=count, metavar="N",
                      help="save the model and the resumable state every N steps (default: 100)")
    data.add_argument("--eval-every", type=count, metavar="N",
                      help="log the validation accuracy every N steps (default: 100)")
    data.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: auto, the GPU when PyTorch has one)")
    demo = parser.add_argument_group("without --data (the demo task)")
    demo.add_argument("--train-clips", type=count, metavar="N", help="training clips (default: 1500)")
    demo.add_argument("--val-clips", type=count, metavar="N",
                      help="validation clips (progress and early stop) (default: 100)")
    demo.add_argument("--test-clips", type=count, metavar="N", help="held-out clips of the reported accuracy "
                                                                   "(default: 200)")
    demo.add_argument("--questions-per-clip", type=count, metavar="N",
                      help="questions asked per validation / test clip (default: 5)")
    demo.add_argument("--probe-weight", type=bounded(float, 0, 1e3), metavar="W",
                      help="weight of the training-only attribute probes (0 disables them) (default: 1.0)")
    demo.add_argument("--target", type=bounded(float, 0, 1), metavar="ACCURACY",
                      help="stop early once validation accuracy reaches this (0 disables) (default: 0.985)")
    return run_command(parser, _train, argv)


def _given(args: argparse.Namespace, names: Sequence[str]) -> list[str]:
    return ["--" + name.replace("_", "-") for name in names if getattr(args, name) not in (None, False)]


def _train(args: argparse.Namespace) -> int | None:
    def log(line: str) -> None:
        if not args.quiet:
            print(line, file=sys.stderr, flush=True)

    if args.data is not None:
        return _train_data(args, log)
    wrong = _given(args, DATA_ONLY)
    if wrong:
        raise UsageError(f"{', '.join(wrong)} need --data (without it, mirasol-train trains the demo model)")
    from .train import run_training

    values = {name: getattr(args, name) if getattr(args, name) is not None else default
              for name, default in DEMO_DEFAULTS.items()}
    report = run_training(output=args.output or TRAIN_OUTPUT, seed=values["seed"], train_clips=values["train_clips"],
                          val_clips=values["val_clips"], test_clips=values["test_clips"],
                          questions_per_clip=values["questions_per_clip"], steps=values["steps"],
                          clips_per_step=values["clips_per_step"], questions_per_step=values["questions_per_step"],
                          lr=values["lr"], probe_weight=values["probe_weight"], threads=args.threads,
                          target=values["target"] if values["target"] > 0 else None, cache_dir=args.cache_dir,
                          progress=not args.quiet, log=log)
    print(json.dumps({k: report[k] for k in ("test_accuracy", "test_questions", "steps", "total_seconds")}))
    return None


def _train_data(args: argparse.Namespace, log: Callable[[str], None]) -> int | None:
    wrong = _given(args, DEMO_ONLY)
    if wrong:
        raise UsageError(f"{', '.join(wrong)} belong to the demo task, not to --data")
    from .dataset import DatasetError
    from .dataset_training import RunOptions, train_on_dataset

    output = args.output or Path("checkpoints") / _dataset_name(args.data)
    settings = _resumed_settings(args, output) if args.resume else _new_settings(args)
    options = RunOptions(device=args.device or "auto", threads=args.threads, cache_dir=args.cache_dir,
                         checkpoint_every=args.checkpoint_every or 100, eval_every=args.eval_every or 100)
    try:
        report = train_on_dataset(args.data, output, settings, resume=args.resume, options=options, log=log,
                                  progress=not args.quiet)
    except DatasetError as bad:
        for problem in bad.problems[:MAX_PROBLEM_LINES]:
            print(f"error: {problem}", file=sys.stderr)
        if len(bad.problems) > MAX_PROBLEM_LINES:
            print(f"error: {len(bad.problems) - MAX_PROBLEM_LINES} more problems not shown", file=sys.stderr)
        return 1
    print(json.dumps({"output": str(output), **{k: report[k] for k in (
        "validation_accuracy", "validation_questions", "majority_baseline", "steps", "seconds_per_step")}}))
    return None


def _dataset_name(data: Path) -> str:
    path = data.absolute()
    if path.suffix == ".jsonl" and path.stem != "clips":
        return path.stem
    folder = path.parent if path.suffix == ".jsonl" else path
    return folder.resolve().name or "dataset"


def _new_settings(args: argparse.Namespace) -> Any:
    from .config import MirasolConfig, get_preset
    from .dataset_training import TrainSettings

    if args.init is not None:
        if args.preset or args.config:
            raise UsageError("--init fine-tunes a checkpoint with its own config; leave out --preset and --config")
        config_file = args.init / "config.json"
        try:
            config = MirasolConfig.from_json(config_file.read_text())
        except FileNotFoundError:
            raise ValueError(f"--init {args.init} is not a checkpoint: it has no config.json") from None
    else:
        config = get_preset(args.preset or "tiny")
        if args.config is not None:
            config = _config_over(config, args.config)
    values = {name: getattr(args, name) if getattr(args, name) is not None else default for name, default in LEARNING}
    return TrainSettings(config=config.to_dict(), init=str(args.init) if args.init else None, **values)


def _config_over(config: Any, path: Path) -> Any:
    from mirasol.runtime.bundle.json_reader import parse_json

    try:
        fields = parse_json(path.read_bytes(), f"--config {path}")
    except OSError as bad:
        raise ValueError(f"--config {path} cannot be read: {bad.strerror or bad}") from None
    if not isinstance(fields, dict):
        raise ValueError(f"--config {path} must hold a JSON object of model config fields")
    try:
        return type(config).from_dict({**config.to_dict(), **fields})
    except (TypeError, ValueError) as bad:
        raise ValueError(f"--config {path}: {bad}") from None


def _resumed_settings(args: argparse.Namespace, output: Path) -> Any:
    from .dataset_training import saved_settings

    if args.preset or args.config or args.init:
        raise UsageError("--resume continues the saved run with its model; leave out --preset, --config and --init")
    settings = saved_settings(output)
    differ = [f"--{name.replace('_', '-')} {getattr(args, name)} (the run has {getattr(settings, name)})"
              for name, _ in LEARNING if getattr(args, name) is not None and getattr(args, name) != getattr(settings,
                                                                                                               name)]
    if differ:
        raise UsageError(f"--resume continues the run with its own settings: {'; '.join(differ)}; leave them out")
    return settings
