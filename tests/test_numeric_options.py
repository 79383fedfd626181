"""Every numeric option of every command goes through one bounded, finite type (issue 25, cases 9 and 10).

The commands are found, not listed: the console scripts of pyproject.toml and every `python -m` tool of the package
(a module with a `main` and an argument parser). Each one's parser is taken from its own `main` and every option is
read from it: a numeric option must have the bounded type of runtime/cli/commandline.py (its range is in `-h`), and
an option whose metavar names a number must be numeric. Each numeric option is then driven with nan, inf, -1, 0,
2**31, 2**64 and 1e308 (and hypothesis's numbers): a refused value is a usage error (exit 2, one `error:` line naming
the option, no traceback); an accepted one runs the command for real where that is quick (mirasol-run,
mirasol-triton, mirasol-demo, mirasol-build-engines on the fake TensorRT) and ends in exit 0 or one `error:` line,
and elsewhere it must be the option's default or a value its help gives a meaning.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import math
import re
import subprocess
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import VENV_BIN, chunk

ROOT = Path(__file__).resolve().parent.parent
PROBES = ("nan", "inf", "-1", "0", str(2**31), str(2**64), "1e308")
# metavars that name a number: an option showing one must have a numeric type
NUMERIC_METAVARS = re.compile(r"N|K|P|W|MB|SECONDS|CHUNKS|ATTEMPTS|ACCURACY|\w+=N|[0-9]+-[0-9]+")
# commands whose accepted values are run for real here (quick ones); the others' must be documented
RUN_FOR_REAL = {"mirasol-run", "mirasol-triton", "mirasol-demo", "mirasol-build-engines"}


class _Parsed(BaseException):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser


@dataclass(frozen=True)
class Command:
    name: str
    main: Callable[..., Any]


def _commands() -> list[Command]:
    """The console scripts (pyproject.toml) and the `python -m` tools (modules with a main and a parser)."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    found = {}
    for name, target in scripts.items():
        module, _, function = target.partition(":")
        found[name] = Command(name, getattr(importlib.import_module(module), function))
    package = [path for folder in ("model", "export", "calibration", "runtime")
               for path in (ROOT / folder).rglob("*.py")]
    for path in sorted(package):
        text = path.read_text()
        if "def main(" not in text or "__main__" not in text:
            continue
        if "ArgumentParser(" not in text and "command_parser(" not in text:
            continue
        module = "mirasol." + ".".join(path.relative_to(ROOT).with_suffix("").parts)
        main = importlib.import_module(module).main
        if not any(command.main is main for command in found.values()):
            found[f"python -m {module}"] = Command(f"python -m {module}", main)
    return list(found.values())


def _parsers(command: Command) -> list[argparse.ArgumentParser]:
    """The command's parser (and its subcommands' parsers), taken from its own main."""
    def capture(self: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> Any:
        raise _Parsed(self)

    original = argparse.ArgumentParser.parse_args
    argparse.ArgumentParser.parse_args = capture  # type: ignore[method-assign]
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            command.main([])
    except _Parsed as parsed:
        parser = parsed.parser
    else:
        pytest.fail(f"{command.name}: its main never parsed a command line")
    finally:
        argparse.ArgumentParser.parse_args = original  # type: ignore[method-assign]
    parsers = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            parsers += list(action.choices.values())
    return parsers


COMMANDS = _commands()


def _numeric(action: argparse.Action) -> bool:
    return getattr(action.type, "bounds", None) is not None


def _options() -> Iterator[tuple[Command, argparse.ArgumentParser, argparse.Action]]:
    for command in COMMANDS:
        for parser in _parsers(command):
            for action in parser._actions:
                if action.option_strings and action.nargs != 0 and not isinstance(action, argparse._HelpAction):
                    yield command, parser, action


OPTIONS = list(_options())
NUMERIC = [(c, p, a) for c, p, a in OPTIONS if _numeric(a)]


def test_the_commands_are_all_found() -> None:
    names = {c.name for c in COMMANDS}
    assert {"mirasol-export", "mirasol-run", "mirasol-build-engines", "mirasol-bench", "mirasol-train",
            "mirasol-demo", "mirasol-triton", "python -m mirasol.runtime.triton.load",
            "python -m mirasol.runtime.triton.server", "python -m mirasol.export.bench.int8_options"} <= names
    assert len(NUMERIC) >= 50, len(NUMERIC)


def test_every_numeric_option_has_the_bounded_type_and_says_its_range() -> None:
    wrong = []
    for command, parser, action in OPTIONS:
        name = f"{command.name} {action.option_strings[-1]}"
        if action.type in (int, float):
            wrong.append(f"{name}: type {action.type.__name__} is not bounded (runtime/cli/commandline.py: bounded)")
        elif not _numeric(action) and action.metavar and NUMERIC_METAVARS.fullmatch(str(action.metavar)):
            wrong.append(f"{name} {action.metavar}: names a number but its type is {action.type!r}")
        elif _numeric(action):
            bounds = action.type.bounds
            if "e+308" in bounds or "inf" in bounds:
                wrong.append(f"{name}: range {bounds} is not finite")
            helped = " ".join(parser.format_help().split())
            if f"({bounds})" not in helped:
                wrong.append(f"{name}: -h does not show its range ({bounds})")
    assert not wrong, "\n".join(wrong)


def _base_args(parser: argparse.ArgumentParser) -> list[str]:
    """A command line the parser accepts: a word for every positional and required option, the first option of a
    required group."""
    args: list[str] = []
    grouped = {id(a) for group in parser._mutually_exclusive_groups if group.required for a in group._group_actions}
    for group in parser._mutually_exclusive_groups:
        if group.required:
            first = group._group_actions[0]
            args += [first.option_strings[0]] + ([] if first.nargs == 0 else ["X"])
    for action in parser._actions:
        if not action.option_strings and not isinstance(action, argparse._SubParsersAction):
            args.append(_accepted_word(action))
        elif action.required and id(action) not in grouped:
            args += [action.option_strings[0], "X"]
    return args


def _accepted_word(action: argparse.Action) -> str:
    """A value the positional's type takes: a word, a clip's name, an existing directory."""
    for word in ("X", "clip.mp4", str(ROOT)):
        try:
            (action.type or str)(word)
            return word
        except (argparse.ArgumentTypeError, ValueError, TypeError):
            continue
    raise AssertionError(f"no probe value fits the positional {action.dest}")


def _probe_text(action: argparse.Action, value: str) -> str:
    return f"name={value}" if hasattr(action.type, "value") else value  # NAME=N options (keyed)


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[int, str, argparse.Namespace | None]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            return 0, "", parser.parse_args(argv)
        except SystemExit as done:
            return int(done.code or 0), err.getvalue(), None


ACCEPTED: list[tuple[Command, argparse.ArgumentParser, argparse.Action, str]] = []


@pytest.mark.parametrize("command, parser, action", NUMERIC,
                         ids=[f"{c.name.split()[-1]} {a.option_strings[-1]}" for c, _, a in NUMERIC])
def test_hostile_numbers_are_refused_or_in_range(command, parser, action) -> None:
    for probe in PROBES:
        text = _probe_text(action, probe)
        code, err, args = _parse(parser, [*_base_args(parser), action.option_strings[-1], text])
        if args is None:
            errors = [line for line in err.splitlines() if "error" in line.lower()]
            assert code == 2 and "Traceback" not in err and len(errors) == 1, (probe, err)
            assert f"argument {'/'.join(action.option_strings)}" in errors[0] and repr(probe) in errors[0], errors
            continue
        value = getattr(args, action.dest)
        value = value[-1] if isinstance(value, list) else value
        number = value[1] if isinstance(value, tuple) else value
        inner = getattr(action.type, "value", action.type)
        assert math.isfinite(number) and inner.low <= number <= inner.high, (probe, value)
        assert probe == "0", f"{command.name} {action.option_strings[-1]} accepts {probe}"
        if command.name not in RUN_FOR_REAL:  # a value only a slow run could try: it must be a documented one
            documented = re.search(rf"(^|\W){probe}( disables|:|\W*\(?default)|default:? {probe}\b", action.help or "")
            assert number == action.default or documented, f"{command.name} {action.option_strings[-1]} {probe}"


@pytest.mark.parametrize("command, parser, action", NUMERIC,
                         ids=[f"{c.name.split()[-1]} {a.option_strings[-1]}" for c, _, a in NUMERIC])
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(number=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-2**70, 2**70),
                        st.text(max_size=8)))
def test_any_number_is_refused_or_in_range(command, parser, action, number) -> None:
    kind = getattr(action.type, "value", action.type)
    try:
        value = kind(str(number))
    except argparse.ArgumentTypeError:
        return
    assert math.isfinite(value) and kind.low <= value <= kind.high


# ---- the accepted values, run for real -----------------------------------------------------------------------

def _accepted(name: str) -> list[tuple[str, str]]:
    """(option, value) of every probe the command's parser accepts."""
    found = []
    for command, parser, action in NUMERIC:
        if command.name != name:
            continue
        for probe in PROBES:
            text = _probe_text(action, probe)
            if _parse(parser, [*_base_args(parser), action.option_strings[-1], text])[2] is not None:
                found.append((action.option_strings[-1], text))
    return found


def _one_line_or_success(code: int, err: str, what: str) -> None:
    assert "Traceback" not in err, (what, err)
    if code != 0:
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert code == 1 and len(errors) == 1, (what, code, err)


def _run(main: Callable[[list[str]], int], argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, err.getvalue()


LIVE_OPTIONS = {"--ask-every", "--latency-bound", "--queue-size", "--reconnect", "--stall-timeout"}


def test_accepted_values_run_mirasol_run(shared_pipeline, tiny_bundle, tmp_path) -> None:
    from mirasol.runtime.cli.run import main

    parts = [chunk(shared_pipeline, i) for i in range(2)]
    clip = tmp_path / "clip.npz"
    np.savez(clip, video=np.concatenate([v for v, _ in parts]), audio=np.concatenate([a for _, a in parts], axis=1))
    accepted = _accepted("mirasol-run")
    assert accepted, "mirasol-run accepts none of the probes"
    live = [(o, v) for o, v in accepted if o in LIVE_OPTIONS]
    for option, value in [(o, v) for o, v in accepted if o not in LIVE_OPTIONS]:
        code, err = _run(main, [str(tiny_bundle), "--chunks", str(clip), "--question", "q", "--max-new-tokens", "3",
                                option, value])
        _one_line_or_success(code, err, f"{option} {value}")
    if live:
        pytest.importorskip("av")
        from .live_tools import write_demo_clip

        video = write_demo_clip(tmp_path / "clip.mp4", 2)
        for option, value in live:
            done = subprocess.run([str(VENV_BIN / "mirasol-run"), str(tiny_bundle), "--live", str(video),
                                   "--question", "q", "--max-new-tokens", "3", option, value], capture_output=True,
                                  text=True, timeout=120, stdin=subprocess.DEVNULL)
            _one_line_or_success(done.returncode, done.stderr, f"{option} {value}")


def test_accepted_values_run_mirasol_triton_and_demo(tiny_bundle, tmp_path) -> None:
    from mirasol.model.cli import demo
    from mirasol.runtime.cli.triton import main as triton

    for i, (option, value) in enumerate(_accepted("mirasol-triton")):
        code, err = _run(triton, [str(tiny_bundle), "--out", str(tmp_path / f"repo{i}"), option, value])
        _one_line_or_success(code, err, f"{option} {value}")
        assert code == 0 and (tmp_path / f"repo{i}" / "mirasol" / "config.pbtxt").is_file()
    pytest.importorskip("av")
    for i, (option, value) in enumerate(_accepted("mirasol-demo")):
        code, err = _run(demo, [str(tmp_path / f"clip{i}.mp4"), option, value])
        _one_line_or_success(code, err, f"{option} {value}")
        assert code == 0 and (tmp_path / f"clip{i}.mp4").stat().st_size > 0


def test_accepted_values_run_mirasol_build_engines(fake_tensorrt, tmp_path) -> None:
    pytest.importorskip("onnx")
    from mirasol.runtime.cli.build_engines import main

    from .onnx_graphs import supported_model, write_bundle

    for i, (option, value) in enumerate(_accepted("mirasol-build-engines")):
        bundle = write_bundle(tmp_path / f"b{i}", {"good": supported_model()})
        code, err = _run(main, [str(bundle), "--quiet", option, value.replace("name=", "batch=")])
        _one_line_or_success(code, err, f"{option} {value}")


def test_values_reaching_libraries_fit_them() -> None:
    """Thread counts reach ONNX Runtime and torch as C ints; seeds numpy and torch; Triton's microseconds a uint64."""
    from mirasol.runtime.cli.commandline import SECONDS, SEED, THREADS

    assert THREADS.high < 2**31 and SEED.high < 2**32
    assert SECONDS.high * 1e6 < 2**63  # --idle-timeout-s in microseconds
    for command, _, action in NUMERIC:
        kind = getattr(action.type, "value", action.type)
        if "threads" in action.dest:
            assert kind.high <= THREADS.high, f"{command.name} {action.option_strings[-1]}"
