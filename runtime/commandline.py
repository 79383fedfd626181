"""What every `mirasol-*` command shares, so that none of them behaves differently from the others.

- `-h`/`--help` with every default shown, `--version`, `--debug` (tracebacks), `-q`/`--quiet` where a command
  prints progress;
- one `error: ...` line and exit status 1 for every error of ours (and for a missing file, a bad value), 2 for a
  wrong command line, 130 after Ctrl-C; a command whose output is piped into `head` stops quietly;
- a command whose extra is not installed says which one to install instead of a traceback.

    def main(argv: list[str] | None = None) -> int:
        parser = command_parser("mirasol-run", "Stream a clip through a bundle ...", quiet=True)
        parser.add_argument("bundle", type=Path, help="bundle directory")
        return run_command(parser, _run, argv)     # _run(args) -> exit status (None: 0)

Only the standard library and our error types are imported here: a command's module imports its heavy
dependencies (torch, PyAV, TensorRT) inside its body, where a missing one becomes a clear error.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from importlib import metadata

from .errors import MirasolError

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
# the distribution's extras, by the top-level module a command needs from them
EXTRAS = {"torch": "export", "onnx": "export", "onnxscript": "export", "safetensors": "export", "tqdm": "export",
          "av": "media", "tensorrt": "tensorrt", "cuda": "tensorrt", "tritonclient": "triton"}


class UsageError(Exception):
    """A command line that cannot work (options that exclude each other, a missing companion option)."""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as written; every option's default after its help (unless it has none)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("%(default)" not in text and default is not None and default is not False
                and default is not argparse.SUPPRESS and action.option_strings and action.nargs != 0):
            text += " (default: %(default)s)"
        return text


def version() -> str:
    try:
        return metadata.version("mirasol-edge")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def command_parser(prog: str, description: str, epilog: str | None = None, quiet: bool = False
                   ) -> argparse.ArgumentParser:
    """An argument parser with the options every command has."""
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog,
                                     formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s (mirasol-edge) {version()}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    if quiet:
        parser.add_argument("-q", "--quiet", action="store_true", help="print no progress, only results and errors")
    return parser


def missing_extra(error: ImportError) -> str | None:
    """The message for an ImportError of a module an extra brings (None for any other ImportError)."""
    top = (error.name or "").split(".")[0]
    extra = EXTRAS.get(top)
    if extra is None:
        return None
    return f"this needs {top!r}, which the [{extra}] extra installs: pip install \"mirasol-edge[{extra}]\""


def run_command(parser: argparse.ArgumentParser, body: Callable[[argparse.Namespace], int | None],
                argv: Sequence[str] | None = None) -> int:
    """Parse `argv` and run `body`; errors become one line on stderr and an exit status."""
    args = parser.parse_args(argv)  # exits 2 on a wrong command line, 0 after --help / --version
    debug = bool(getattr(args, "debug", False))
    try:
        return int(body(args) or 0)
    except UsageError as error:
        parser.print_usage(sys.stderr)
        _say(f"{parser.prog}: error: {error}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        if debug:
            raise
        _say("error: interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, and let the exit flush nothing
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except ImportError as error:
        message = missing_extra(error)
        if debug or message is None:
            raise
        _say(f"error: {message}")
        return EXIT_ERROR
    except (MirasolError, OSError, ValueError) as error:
        if debug:
            raise
        _say(f"error: {_describe(error)}")
        return EXIT_ERROR


def _describe(error: BaseException) -> str:
    """One line: our messages as they are; an OSError as 'what: path' without the errno prefix."""
    if isinstance(error, OSError) and not isinstance(error, MirasolError) and error.strerror:
        where = error.filename if error.filename is not None else ""
        return f"{error.strerror}: {where}" if where else error.strerror
    return " ".join(str(error).split()) or type(error).__name__


def _say(line: str) -> None:
    try:
        print(line, file=sys.stderr, flush=True)
    except (BrokenPipeError, OSError):
        pass

