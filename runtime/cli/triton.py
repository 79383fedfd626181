"""mirasol-triton BUNDLE --out DIR: a Triton Inference Server model repository serving a bundle (the library:
`mirasol.runtime.triton.repository`)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..backends import backend_entry
from ..triton.repository import ServingOptions, add_serving_options, serving_options, write_repository
from .commandline import command_parser, run_command


def _parser() -> argparse.ArgumentParser:
    parser = command_parser(
        "mirasol-triton",
        "Write a Triton Inference Server model repository serving a bundle: a Python-backend model holding one "
        "runtime stream per sequence (correlation ID), with Triton's sequence batcher.",
        epilog="Examples:\n"
               "  mirasol-triton bundles/demo --out triton-repo --state-dir triton-state\n"
               "  mirasol-triton bundles/demo --out triton-stream --decoupled     # answers streamed token by token\n"
               "  mirasol-triton bundles/demo --out triton-gpu --backend tensorrt --gpus 0,1\n"
               "  python -m mirasol.runtime.triton.server triton-repo --http-port 8000 --grpc-port 8001 "
               "--metrics-port 8002\n"
               "(docs/triton.md: requests, clients, metrics)")
    parser.add_argument("bundle", type=Path, help="bundle directory written by mirasol-export")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR",
                        help="repository directory to write (replaced only if mirasol-triton wrote it)")
    add_serving_options(parser, ServingOptions())
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_command(_parser(), _write, argv)


def _write(args: argparse.Namespace) -> None:
    model = write_repository(args.bundle, args.out, serving_options(args))
    print(f"wrote {args.out}: model {model.name!r} serving a copy of {args.bundle}")
    setup = backend_entry(args.backend).setup
    if setup:
        print(f"on the server, {setup.format(bundle=model / '1' / 'bundle')}")


if __name__ == "__main__":
    sys.exit(main())
