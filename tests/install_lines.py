"""The install lines of pyproject.toml and the docs, read for tests/test_install_pins.py and
tests/test_install_resolution.py."""
from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
EXTRAS: dict[str, list[str]] = PROJECT["optional-dependencies"]
DOCS = ROOT / "docs" / "tensorrt-jetson.md"
WHEEL = f"dist/mirasol_edge-{PROJECT['version']}-py3-none-any.whl"


def expanded(extra: str) -> list[Requirement]:
    """An extra's requirements with its `mirasol-edge[...]` references expanded."""
    found = []
    for text in EXTRAS[extra]:
        requirement = Requirement(text)
        if requirement.name == PROJECT["name"]:
            found += [r for other in sorted(requirement.extras) for r in expanded(other)]
        else:
            found.append(requirement)
    return found


def doc_block(path: Path, name: str) -> list[str]:
    """The `pip install` lines of the block marked `<!-- tested: NAME ... -->` (comments dropped)."""
    found = re.findall(rf"<!-- tested: {name}\b[^>]*-->\n```\w+\n(.*?)```", path.read_text(), re.S)
    assert len(found) == 1, f"{path.name} has {len(found)} blocks marked 'tested: {name}'"
    return [shlex.join(shlex.split(line, comments=True)) for line in found[0].splitlines() if line.strip()]


def requirements_of(line: str) -> list[str]:
    """The requirement arguments of a `pip install` line (options and their values dropped)."""
    words = shlex.split(line)
    assert words[:2] == ["pip", "install"], line
    found, skip = [], False
    for word in words[2:]:
        if skip:
            skip = False
        elif word.startswith("-"):
            skip = word in ("--extra-index-url", "--index-url")
        else:
            found.append(word)
    return found
