"""The race harness of tests/test_writers.py: each writer runs in a process of its own, paused (the PAUSE_HOOK of
runtime/files/atomic.py, set in that process) between its last check and putting its work in place; the test
process, a second process, then does what a user might (`Intruder`) and checks afterwards that the user's things
are unchanged.
"""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

def paused_command(main: str) -> str:
    """Python source for `python -c`: the command `main` ("module:function") run on argv[2:] in a process whose pause
    hook (set here, never from the environment) waits for good at the stage argv[1] names."""
    module, function = main.split(":")
    return textwrap.dedent(f"""
        import sys, time
        import mirasol.runtime.files.atomic as atomic
        from {module} import {function}

        def pause(stage, path):
            if stage == sys.argv[1]:
                print(f"paused at {{stage}}", file=sys.stderr, flush=True)
                while True:
                    time.sleep(60)

        atomic.PAUSE_HOOK = pause
        sys.exit({function}(sys.argv[2:]))
    """)


# ---- the harness process -----------------------------------------------------------------------------------------

HARNESS = textwrap.dedent('''
    import fnmatch, json, sys, traceback
    import mirasol.runtime.files.atomic as atomic
    from mirasol.runtime.errors import MirasolError

    current = {}

    def pause(stage, path):
        if current.get("paused") or stage != current["stage"] or path is None:
            return
        if not fnmatch.fnmatch(str(path), current["pattern"]):
            return
        if current["skip"]:
            current["skip"] -= 1
            return
        current["paused"] = True
        print(json.dumps({"event": "paused", "path": str(path)}), flush=True)
        sys.stdin.readline()

    atomic.PAUSE_HOOK = pause
    for scenario in json.loads(sys.argv[1]):
        current.clear()
        current.update(scenario, paused=False)
        try:
            exec(scenario["code"], {"__name__": "scenario"})
            outcome, message = "finished", ""
        except MirasolError as error:
            outcome, message = "refused", str(error)
        except BaseException:
            outcome, message = "crashed", traceback.format_exc()
        print(json.dumps({"event": "done", "outcome": outcome, "message": message, "paused": current["paused"]}),
              flush=True)
''')
FILE = "file written, before it is put in place"
USERS = b"the user's file"
DIRECTORY = "checked, before the swap"
REMOVE = "file to remove"
PIPE = "pipe checked, before it is opened"


@dataclass
class Scenario:
    """One writer raced: `code` runs it (in the harness process); it pauses at `stage` for a path matching
    `pattern` (after `skip` earlier matches), where `intrusion` acts and later checks the user's things."""

    name: str
    covers: tuple[str, ...]  # the writer functions ("file:function") it races
    code: str
    stage: str
    pattern: str
    intrusion: str  # "new file", "our file", "our directory", "new directory", "removal", "pipe"
    skip: int = 0


class Intruder:
    """The second process's side: what the user does at the pause, and what must hold afterwards."""

    def __init__(self, tmp_path: Path) -> None:
        self.secret = tmp_path / "secret.txt"
        self.secret.write_text("the user's secret")
        self.checks: list[Callable[[], str | None]] = []

    def act(self, kind: str, path: Path) -> None:
        if kind == "new file":
            assert not os.path.lexists(path), path
            path.write_bytes(USERS)
            self.checks.append(lambda: None if path.read_bytes() == USERS else f"{path}: the user's file changed")
        elif kind == "our file":
            assert path.is_file(), path
            path.unlink()
            path.symlink_to(self.secret)
            self.checks.append(lambda: None if path.is_symlink() and os.readlink(path) == str(self.secret)
                               else f"{path}: the user's link was replaced")
        elif kind in ("our directory", "new directory"):
            if kind == "new directory":
                assert not os.path.lexists(path), path
                path.mkdir()
            (path / "intruder.txt").write_bytes(USERS)
            (path / "intruder-link").symlink_to(self.secret)
            self.checks.append(lambda: None if (path / "intruder.txt").read_bytes() == USERS
                               and os.readlink(path / "intruder-link") == str(self.secret)
                               else f"{path}: the user's file or link was lost")
        elif kind == "pipe":
            assert stat.S_ISFIFO(os.lstat(path).st_mode), path
            path.unlink()
            path.write_bytes(USERS)
            self.checks.append(lambda: None if path.read_bytes() == USERS else f"{path}: the user's file was written")
        elif kind == "removal":
            assert path.is_file(), path
            path.unlink()
            path.write_bytes(USERS)
            self.checks.append(lambda: None if path.read_bytes() == USERS else f"{path}: the user's file was removed")
        else:
            raise AssertionError(kind)
        self.checks.append(lambda: None if self.secret.read_bytes() == b"the user's secret" else "the secret changed")

    def check(self, first: int) -> list[str]:
        """What went wrong, by the checks of the scenario that began at `first`."""
        found = []
        for check in self.checks[first:]:
            try:
                found.append(check())
            except Exception as error:  # noqa: BLE001 - a lost or replaced file is what is checked for
                found.append(f"{type(error).__name__}: {error}")
        return [f for f in found if f]


def run_harness(scenarios: list[Scenario], tmp_path: Path, timeout: float = 600) -> dict[str, str]:
    """Run the scenarios in one harness process, acting at each pause; scenario name -> what went wrong ("": all
    well)."""
    intruder = Intruder(tmp_path)
    plan = [{"name": s.name, "code": s.code, "stage": s.stage, "pattern": s.pattern, "skip": s.skip}
            for s in scenarios]
    process = subprocess.Popen([sys.executable, "-c", HARNESS, json.dumps(plan)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    problems: dict[str, str] = {}
    try:
        for scenario in scenarios:
            first = len(intruder.checks)
            while True:
                line = process.stdout.readline()  # type: ignore[union-attr]
                if not line:
                    pytest.fail(f"the harness ended early: {process.stderr.read()}")  # type: ignore[union-attr]
                if not line.startswith('{"event"'):
                    continue  # what a writer printed
                event = json.loads(line)
                if event["event"] == "paused":
                    intruder.act(scenario.intrusion, Path(event["path"]))
                    process.stdin.write("\n")  # type: ignore[union-attr]
                    process.stdin.flush()  # type: ignore[union-attr]
                    continue
                wanted = "finished" if scenario.intrusion == "removal" else "refused"
                wrong = intruder.check(first)
                if not event["paused"]:
                    wrong.append(f"never paused at {scenario.stage!r} for {scenario.pattern}: it does not go "
                                 f"through the mechanism there ({event['outcome']}: {event['message'][-300:]})")
                elif event["outcome"] != wanted:
                    wrong.append(f"{event['outcome']} instead of {wanted}: {event['message'][-600:]}")
                problems[scenario.name] = "; ".join(wrong)
                break
    finally:
        process.stdin.close()  # type: ignore[union-attr]
        process.wait(timeout)
    return problems


def scenario_code(*parts: str, **values: object) -> str:
    """The scenario's code: its parts (each indented as written) joined, with `values` as string literals."""
    text = "\n".join(textwrap.dedent(part) for part in parts)
    return text.format(**{k: repr(str(v)) for k, v in values.items()})
