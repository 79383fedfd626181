"""What every `mirasol-*` command shares, so that none of them behaves differently from the others.

- `-h`/`--help` with every default shown, `--version`, `--debug` (tracebacks), `-q`/`--quiet` where a command
  prints progress;
- one `error: ...` line and exit status 1 for every error of ours (and for a missing file, a bad value), 2 for a
  wrong command line, 130 after Ctrl-C; a command whose output is piped into `head` stops quietly; a warning is
  one `warning: ...` line;
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
import math
import os
import sys
import textwrap
import warnings
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from ..errors import MirasolError

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
# the distribution's extras, by the top-level module a command needs from them
EXTRAS = {"torch": "export", "onnx": "export", "onnxscript": "export", "safetensors": "export", "tqdm": "export",
          "av": "media", "tritonclient": "triton",
          "starlette": "serve", "uvicorn": "serve", "prometheus_client": "serve", "websockets": "serve"}
# modules that one extra per device brings: (the first extra, how to say the others)
DEVICE_EXTRAS = {
    "onnxruntime": ("cpu", "or [onnxruntime-cu12] / [onnxruntime-cu13] for ONNX Runtime on an NVIDIA GPU, by the "
                           "driver's CUDA major; on a Jetson see docs/tensorrt-jetson.md"),
    "tensorrt": ("tensorrt-cu12", "or [tensorrt-cu13] for a driver of CUDA 13; on a Jetson TensorRT comes with "
                                  "JetPack: see docs/tensorrt-jetson.md"),
    "cuda": ("tensorrt-cu12", "or [tensorrt-cu13] for a driver of CUDA 13; on a Jetson (JetPack 6): pip install "
                              "'cuda-python==12.6.2.post1'"),
}


class UsageError(Exception):
    """A command line that cannot work (options that exclude each other, a missing companion option)."""


class HelpFormatter(argparse.HelpFormatter):
    """Descriptions and epilogs wrapped line by line, indented lines (examples) kept as written; every option's
    default after its help, unless it has none (a flag, None) or the help already says what the default is."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n".join(line if not line.strip() or line[0].isspace()
                         else textwrap.fill(line, width, initial_indent=indent, subsequent_indent=indent)
                         for line in text.splitlines())

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        bounds = getattr(action.type, "bounds", None)
        if bounds:  # every numeric option says its range
            text += f" ({bounds})"
        if "default" in (action.help or "").lower() or not action.option_strings:
            return text
        if isinstance(action, argparse.BooleanOptionalAction):  # --name / --no-name
            return text + f" (default: {action.option_strings[0 if default else 1]})"
        if (default is not None and default is not False and default is not argparse.SUPPRESS
                and default not in ("", []) and action.nargs != 0):
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
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s (mirasol-edge) {version()}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    if quiet:
        parser.add_argument("-q", "--quiet", action="store_true", help="print no progress, only results and errors")
    return parser


def bounded(kind: type[int] | type[float], low: float, high: float, *, open_low: bool = False
            ) -> Callable[[str], Any]:
    """The argparse type of every numeric option: `kind(text)` (int or float), finite, within [low, high] (or
    (low, high] with `open_low`); `-h` shows the range after the option's help. Anything else is a usage error
    naming the option: nan, inf, 1e308, 2**64 and negative counts never reach the command."""
    if not (math.isfinite(low) and math.isfinite(high) and low <= high):
        raise ValueError(f"bounded: the range [{low}, {high}] must be finite")
    noun = "an integer" if kind is int else "a number"
    span = f"{'(' if open_low else '['}{low:g}, {high:g}]" if kind is float else f"[{low}, {high}]"

    def parse(text: str) -> Any:
        try:
            value = kind(text.strip())
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"expected {noun} in {span}, got {text!r}") from None
        if not math.isfinite(value) or value < low or value > high or (open_low and value == low):
            raise argparse.ArgumentTypeError(f"expected {noun} in {span}, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    parse.bounds = f"{noun} in {span}"  # type: ignore[attr-defined]
    parse.low, parse.high, parse.kind = low, high, kind  # type: ignore[attr-defined]
    return parse


def keyed(key: str, value: Callable[[str], Any]) -> Callable[[str], tuple[str, Any]]:
    """The argparse type of a NAME=VALUE option (e.g. --graph-threads text_decoder=1): (name, value(VALUE)), the
    value through its own (bounded) type."""
    def parse(text: str) -> tuple[str, Any]:
        name, sep, rest = text.partition("=")
        if not sep or not name.strip():
            raise argparse.ArgumentTypeError(f"expected {key}=N, got {text!r}")
        return name.strip(), value(rest)

    parse.__name__ = f"{key}=N"
    parse.bounds = f"N: {getattr(value, 'bounds', 'text')}"  # type: ignore[attr-defined]
    parse.value = value  # type: ignore[attr-defined]
    return parse


def or_word(number: Callable[[str], Any], word: str) -> Callable[[str], Any]:
    """The argparse type of a number option that also takes one word (e.g. --reconnect 5 or forever): the number
    through its own (bounded) type, None for the word; a refusal names both."""
    def parse(text: str) -> Any:
        if text.strip() == word:
            return None
        try:
            return number(text)
        except argparse.ArgumentTypeError:
            bounds = parse.bounds  # type: ignore[attr-defined]
            raise argparse.ArgumentTypeError(f"expected {bounds}, got {text!r}") from None

    parse.__name__ = number.__name__
    parse.bounds = f"{number.bounds}, or {word!r}"  # type: ignore[attr-defined]
    parse.low, parse.high, parse.kind = number.low, number.high, number.kind  # type: ignore[attr-defined]
    return parse


# ranges shared by the commands' options
SEED = bounded(int, 0, 2**31 - 1)  # numpy, torch and our clip families all take these
THREADS = bounded(int, 1, 1024)  # onnxruntime / torch intra-op threads (a C int where they arrive)
COUNT = bounded(int, 1, 1 << 20)  # clips, chunks, steps, repeats, tokens, ...
SECONDS = bounded(float, 0, 1e7, open_low=True)  # a time span (about 115 days at most)
BATCH = bounded(int, 1, 1024)  # the largest batch a bundle, an engine profile or a server takes
WORKSPACE_MB = bounded(int, 1, 1 << 20)  # TensorRT's builder workspace, up to 1 TiB


def existing_dir(text: str) -> Path:
    """An argparse type: a directory that exists (a wrong one is a wrong command line)."""
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} {'is not a directory' if path.exists() else 'does not exist'}")
    return path


def missing_extra(error: ImportError) -> str | None:
    """The message for an ImportError of a module an extra brings (None for any other ImportError)."""
    top = (error.name or "").split(".")[0]
    if top in DEVICE_EXTRAS:
        extra, others = DEVICE_EXTRAS[top]
        return (f"this needs {top!r}, which the [{extra}] extra installs ({others}): "
                f"pip install \"mirasol-edge[{extra}]\"")
    extra = EXTRAS.get(top)
    if extra is None:
        return None
    return f"this needs {top!r}, which the [{extra}] extra installs: pip install \"mirasol-edge[{extra}]\""


def run_command(parser: argparse.ArgumentParser, body: Callable[[argparse.Namespace], int | None],
                argv: Sequence[str] | None = None) -> int:
    """Parse `argv` and run `body`; errors become one line on stderr and an exit status, which is returned (also
    after --help, --version and a wrong command line: `main(argv)` returns, it never exits)."""
    debug = False
    closed = _closed_streams()
    if closed:
        _say(f"error: {closed}")
        return EXIT_ERROR
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as done:  # --help / --version (0), a wrong command line (2: usage and error printed)
            code = done.code if isinstance(done.code, int) else EXIT_USAGE
        else:
            debug = bool(getattr(args, "debug", False))
            with warnings.catch_warnings():
                if not debug:
                    warnings.showwarning = _show_warning
                code = int(body(args) or 0)
        sys.stdout.flush()  # here, where a reader that went away is seen, not at exit
        return code
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
        _say(f"error: {describe(error)}")
        return EXIT_ERROR


def _closed_streams() -> str | None:
    """What is wrong when the command was started with stdout (or stderr) closed (`>&-`): Python then has None
    for it. A closed stderr is replaced by /dev/null (errors are lost, the exit status stays); a closed stdout,
    where results go, is an error."""
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - for the rest of the process
    if sys.stdout is None:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - so that nothing else trips over None
        return "standard output is closed; give it somewhere to go (e.g. > /dev/null to discard the results)"
    return None


def describe(error: BaseException) -> str:
    """One line: our messages as they are; an OSError as 'what: path' without the errno prefix."""
    if isinstance(error, OSError) and not isinstance(error, MirasolError) and error.strerror:
        where = error.filename if error.filename is not None else ""
        return f"{error.strerror}: {where}" if where else error.strerror
    return " ".join(str(error).split()) or type(error).__name__


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    _say(f"warning: {' '.join(str(message).split())}")


def _say(line: str) -> None:
    try:
        print(line, file=sys.stderr, flush=True)
    except (BrokenPipeError, OSError):
        pass
