"""The measuring child processes: fresh interpreters, each a module of this package run with `python -m`.

A child gets its arguments as one JSON string (argv[1]) and prints one JSON line last. Stdlib only here: the
runtime's child imports this module and its peak RSS must be the runtime's alone.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from collections.abc import Sequence
from typing import Any


def run_child(module: str, args: Sequence[str], env: dict[str, str] | None = None, timeout: float = 300
              ) -> dict[str, Any]:
    """Run `python -m mirasol.export.bench.<module> ARGS` in a fresh interpreter; its last stdout line (JSON)."""
    done = subprocess.run([sys.executable, "-m", f"{__package__}.{module}", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})
    if done.returncode != 0:
        raise RuntimeError(f"child process failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def peak_rss_mb() -> float:
    """The peak RSS of this process image (VmHWM). ru_maxrss would also count the parent's RSS at fork time:
    Linux keeps the larger of the pre-exec and the current high-water mark."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def print_result(result: dict[str, Any]) -> None:
    """A process child's answer: its peak RSS, then what it measured (the last stdout line)."""
    print(json.dumps({"peak_rss_mb": peak_rss_mb(),
                      "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **result}))
