"""`mirasol-demo` (write a demo clip and its questions) and `mirasol-train` (train the demo model).

Only the standard library and the runtime are imported here: PyTorch (train) and PyAV (demo) load when the command
runs, so that where they are missing the command names the extra that brings them.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from mirasol.runtime.cli.commandline import COUNT, SEED, THREADS, bounded, command_parser, run_command

from .demo_task import DEMO_CHECKPOINT, TEST_SEED, TRAIN_OUTPUT


# ---------------------------------------------------------------- mirasol-demo
def demo(argv: Sequence[str] | None = None) -> int:
    parser = command_parser(
        "mirasol-demo",
        "Write a synthetic demo clip (a real mp4: moving coloured shapes and tones, one event per 1-second chunk) "
        "that the shipped demo model never saw, and print the questions it answers with their expected answers.",
        epilog="Examples:\n"
               "  mirasol-demo clip.mp4\n"
               "  mirasol-run bundles/demo --video clip.mp4 --question 'which colour appeared first?'\n"
               "  mirasol-demo clip3.mp4 --index 3          # another held-out clip")
    parser.add_argument("out", type=Path, help="the video file to write (.mp4); an existing file is replaced only "
                                               "if it is a clip mirasol-demo wrote")
    parser.add_argument("--index", type=SEED, default=0, metavar="N", help="which clip of the family")
    parser.add_argument("--seed", type=SEED, default=TEST_SEED, metavar="N",
                        help=f"clip family ({TEST_SEED}: held out from the demo model's training)")
    return run_command(parser, _demo, argv)


def _demo(args: argparse.Namespace) -> None:
    from mirasol.runtime.files.atomic import atomic_file

    from .demo_task import DemoTask, is_demo_clip

    config = json.loads((DEMO_CHECKPOINT / "config.json").read_text())
    task = DemoTask(config)
    clip = task.clip(args.seed, args.index)
    with atomic_file(args.out, is_demo_clip, "demo clip") as tmp:
        task.write(clip, tmp)
    print(f"wrote {args.out}: {len(clip.events)} chunks")
    width = max(len(qa.question) for qa in clip.questions)
    for qa in clip.questions:
        print(f"  Q: {qa.question:<{width}}  A: {qa.answer}")


# ---------------------------------------------------------------- mirasol-train
def train(argv: Sequence[str] | None = None) -> int:
    parser = command_parser(
        "mirasol-train",
        "Train the demo model (the tiny preset's sizes) on the synthetic audio-video question task of mirasol-demo "
        "and test it on held-out clips; writes config.json, model.safetensors and training.json.",
        epilog="Examples:\n"
               "  mirasol-train                                # -> checkpoints/demo (~16 min on 2 CPU cores)\n"
               "  mirasol-export --checkpoint checkpoints/demo --out bundles/my-demo\n"
               "  mirasol-train --output runs/demo --seed 1 --cache-dir ~/.cache/mirasol-demo\n"
               f"The shipped model ({DEMO_CHECKPOINT}) is never written: train elsewhere, then export that.",
        quiet=True)
    count = COUNT
    parser.add_argument("--output", type=Path, default=TRAIN_OUTPUT, metavar="DIR",
                        help="checkpoint directory to write (new, empty, or a checkpoint mirasol wrote)")
    parser.add_argument("--seed", type=SEED, default=0, help="seed of the clips, the initialisation and the batches")
    parser.add_argument("--train-clips", type=count, default=1500, metavar="N", help="training clips")
    parser.add_argument("--val-clips", type=count, default=100, metavar="N",
                        help="validation clips (progress and early stop)")
    parser.add_argument("--test-clips", type=count, default=200, metavar="N",
                        help="held-out clips of the reported accuracy")
    parser.add_argument("--questions-per-clip", type=count, default=5, metavar="N",
                        help="questions asked per validation / test clip")
    parser.add_argument("--steps", type=count, default=1500, metavar="N", help="most optimiser steps")
    parser.add_argument("--clips-per-step", type=count, default=16, metavar="N", help="clips in a training step")
    parser.add_argument("--questions-per-step", type=count, default=8, metavar="N",
                        help="questions per clip in a training step")
    parser.add_argument("--lr", type=bounded(float, 0, 10, open_low=True), default=3e-3, help="peak learning rate")
    parser.add_argument("--probe-weight", type=bounded(float, 0, 1e3), default=1.0, metavar="W",
                        help="weight of the training-only attribute probes (0 disables them)")
    parser.add_argument("--threads", type=THREADS, default=1, metavar="N",
                        help="torch CPU threads (1 is fastest on a shared 2-core machine)")
    parser.add_argument("--target", type=bounded(float, 0, 1), default=0.985, metavar="ACCURACY",
                        help="stop early once validation accuracy reaches this (0 disables)")
    parser.add_argument("--cache-dir", type=Path, metavar="DIR",
                        help="keep decoded clips here to skip making them next time (default: none kept)")
    return run_command(parser, _train, argv)


def _train(args: argparse.Namespace) -> None:
    from .train import run_training

    def log(line: str) -> None:
        if not args.quiet:
            print(line, file=sys.stderr, flush=True)

    report = run_training(output=args.output, seed=args.seed, train_clips=args.train_clips,
                          val_clips=args.val_clips, test_clips=args.test_clips,
                          questions_per_clip=args.questions_per_clip, steps=args.steps,
                          clips_per_step=args.clips_per_step, questions_per_step=args.questions_per_step, lr=args.lr,
                          probe_weight=args.probe_weight, threads=args.threads,
                          target=args.target if args.target > 0 else None, cache_dir=args.cache_dir,
                          progress=not args.quiet, log=log)
    print(json.dumps({k: report[k] for k in ("test_accuracy", "test_questions", "steps", "total_seconds")}))
