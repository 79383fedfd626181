"""The demo task's held-out accuracy of bundles of the shipped demo model, through the runtime Pipeline.

    python -m mirasol.export.bench.demo_accuracy BUNDLE [BUNDLE ...] [--clips 40] [--questions 5]

Clips of the test family (`model.demo_task.TEST_SEED`) from index 100,000 on, far past those training scored and
the tests use; every bundle answers the same questions (greedy, 12 new tokens). What `tests/test_demo_bundle.py`
holds to >= 95%, as a number per bundle (precision, KV cache).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mirasol.model.demo_task import TEST_SEED, DemoTask
from mirasol.model.train import evaluate
from mirasol.runtime.bundle.manifest import Manifest
from mirasol.runtime.cli.commandline import COUNT, command_parser, existing_dir, run_command
from mirasol.runtime.pipeline import Pipeline

START = 100_000


def accuracy(bundle: Path, clips: int = 40, questions: int = 5) -> tuple[float, int]:
    """(share of correct answers, questions asked) of `bundle` on held-out demo clips."""
    with Pipeline.load(bundle) as pipe:
        made = DemoTask(pipe.config).make_clips(clips, seed=TEST_SEED, start=START, questions_per_clip=questions)
        score = evaluate(lambda video, audio, question: pipe.answer(video, audio, question, max_new_tokens=12), made)
    return score, sum(len(c.questions) for c in made)


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("python -m mirasol.export.bench.demo_accuracy", __doc__.splitlines()[0])
    parser.add_argument("bundles", type=existing_dir, nargs="+", metavar="BUNDLE", help="bundles of the demo model")
    parser.add_argument("--clips", type=COUNT, default=40, metavar="N", help="held-out clips")
    parser.add_argument("--questions", type=COUNT, default=5, metavar="N", help="questions per clip")
    return run_command(parser, _table, argv)


def _table(args: argparse.Namespace) -> None:
    print("| bundle | precision | KV cache | accuracy | correct |\n|---|---|---|---:|---:|")
    for bundle in args.bundles:
        manifest = Manifest.read(bundle)
        score, asked = accuracy(bundle, args.clips, args.questions)
        kv = manifest.quantization.get("kv_cache", {}).get("dtype", "float")
        print(f"| {bundle} | {manifest.precision} | {kv} | {score:.4f} | {round(score * asked)}/{asked} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
