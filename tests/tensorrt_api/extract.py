"""Extract, from the real TensorRT and CUDA Python bindings, the status of every name the fake ones define.

    python -m tests.tensorrt_api.extract             # download the wheels, rewrite the two tables
    python -m tests.tensorrt_api.extract --check     # compare instead (exit 1 on a difference)

No GPU and no TensorRT install are needed: the wheels are downloaded with `pip download --no-deps` (about 10 MB)
and read, not installed.
- tensorrt-cu12-bindings 10.3.0 (JetPack 6.1 / 6.2) and 11.4.0.106: the pybind11 names are strings in
  tensorrt.so. A name is `exact` when a NUL-terminated string of the file is that name, `tail` when it is only the
  end of a longer string (the linker merges a string into another that ends with it, so whether the name exists
  cannot be told; e.g. BuilderFlag.INT8 hides in "UINT8"), `python` when __init__.py defines it, else `absent`.
  `+doc` marks a `Class.member` whose docstring symbol tensorrt::<Class>Doc::<member> is in the file, which
  confirms the owner class.
- cuda-bindings 12.9.10 and cuda-python 12.6.2.post1 (the Jetson pin: JetPack 6's CUDA 12.6) import without a
  GPU: their functions' parameter names and their enum values are read with inspect, in a subprocess; names
  written `driver.X` are read from `cuda.bindings.driver`.

The tables (tensorrt_names.tsv, cudart_names.tsv) are committed; tests/test_tensorrt.py checks the fakes
against them in CI, and re-extracts and compares when the wheels can be downloaded. The wheels themselves are not
committed: a binary in the repository cannot be reviewed, the tables can, and they are what the tests need.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

from tests import fake_cuda, fake_tensorrt

HERE = Path(__file__).resolve().parent
TENSORRT_TABLE = HERE / "tensorrt_names.tsv"
CUDART_TABLE = HERE / "cudart_names.tsv"
TENSORRT_WHEELS = {version: f"tensorrt-cu12-bindings=={version}" for version in fake_tensorrt.VERSIONS}
CUDA_WHEELS = {"cuda-bindings 12.9.10": ("cuda-bindings==12.9.10", "cuda-pathfinder==1.9.1"),
               "cuda-python 12.6.2.post1": ("cuda-python==12.6.2.post1",)}
_IDENTIFIER = re.compile(rb"[A-Za-z_][A-Za-z0-9_]*")


def download(requirements: list[str], directory: Path, timeout: float = 300) -> list[Path]:
    """`pip download --no-deps` each requirement into `directory` (skipped when already there)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for requirement in requirements:
        name, version = requirement.split("==")
        prefix = f"{name.replace('-', '_')}-{version}-"
        found = sorted(directory.glob(prefix + "*.whl"))
        if not found:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--only-binary=:all:",
                            "-d", str(directory), requirement], check=True, timeout=timeout)
            found = sorted(directory.glob(prefix + "*.whl"))
        if not found:
            raise FileNotFoundError(f"pip downloaded no wheel for {requirement} into {directory}")
        paths.append(found[0])
    return paths


class BindingsStrings:
    """The strings of one tensorrt-cu12-bindings wheel: tensorrt.so's string table and __init__.py's names."""

    def __init__(self, wheel: Path) -> None:
        with zipfile.ZipFile(wheel) as archive:
            binary = archive.read("tensorrt_bindings/tensorrt.so")
            init = archive.read("tensorrt_bindings/__init__.py").decode()
        self.strings = {re.search(rb"[\x20-\x7e]*$", chunk).group(0) for chunk in binary.split(b"\x00")}
        self.strings.discard(b"")
        self.exact = {s for s in self.strings if _IDENTIFIER.fullmatch(s)}
        self.python = set(re.findall(r"^(?:def |)([A-Za-z_]\w*)(?:\(| = )", init, re.M))
        self.doc = set()
        for s in self.exact:
            parts = _demangle(s)
            if parts and len(parts) == 2 and parts[0].endswith("Doc"):
                self.doc.add(f"{parts[0][:-3]}.{parts[1]}")

    def status(self, name: str) -> str:
        member = name.rsplit(".", 1)[-1].encode()
        if "." not in name and name in self.python:
            found = "python"
        elif member in self.exact:
            found = "exact"
        elif any(s.endswith(member) for s in self.strings):
            found = "tail"
        else:
            found = "absent"
        return found + ("+doc" if name in self.doc else "")


def _demangle(symbol: bytes) -> list[str] | None:
    """`_ZN8tensorrt20IExecutionContextDocL17set_device_memoryE` -> ["IExecutionContextDoc", "set_device_memory"]."""
    if not (symbol.startswith(b"_ZN8tensorrt") and symbol.endswith(b"E")):
        return None
    rest, parts = symbol[len(b"_ZN8tensorrt"):-1].decode(), []
    while rest:
        rest = rest.removeprefix("L")
        length = re.match(r"\d+", rest)
        if not length:
            return None
        start = len(length.group(0))
        parts.append(rest[start:start + int(length.group(0))])
        rest = rest[start + int(length.group(0)):]
    return parts


def tensorrt_table(wheels: dict[str, Path]) -> str:
    """The TSV of every name the fake TensorRT variants define, with its status in each real version."""
    strings = {version: BindingsStrings(path) for version, path in wheels.items()}
    device = fake_cuda.Device(1 << 30)
    names = sorted(set().union(*(fake_tensorrt.surface(fake_tensorrt.make_tensorrt(device, v)) for v in wheels)))
    lines = ["# Written by `python -m tests.tensorrt_api.extract` from the tensorrt-cu12-bindings wheels: exact = a",
             "# string of tensorrt.so, tail = only the end of a longer string (cannot tell), python = __init__.py,",
             "# +doc = the docstring symbol tensorrt::<Class>Doc::<member> confirms the owner class.",
             "name\t" + "\t".join(f"tensorrt {v}" for v in wheels)]
    lines += [name + "\t" + "\t".join(strings[v].status(name) for v in wheels) for name in names]
    return "\n".join(lines) + "\n"


_CUDART_PROBE = """
import inspect, json, sys
sys.path[:0] = sys.argv[1:]
from cuda.bindings import driver, runtime
out = {}
for name in json.load(sys.stdin):
    module = driver if name.startswith("driver.") else runtime
    owner, _, member = name.removeprefix("driver.").partition(".")
    value = getattr(module, owner, None)
    if member:
        value = getattr(value, member, None)
        out[name] = "absent" if value is None else str(int(value))
    elif value is None:
        out[name] = "absent"
    elif isinstance(value, type):
        out[name] = "class"
    else:
        out[name] = ", ".join(inspect.signature(value).parameters)
print(json.dumps(out))
"""


def cudart_table(wheels: dict[str, list[Path]], workdir: Path) -> str:
    """The TSV of every name the fake cuda runtime (and driver) defines, per cuda-python release: parameters, enum
    values, "class" or "absent"."""
    names = sorted(fake_names())
    columns = {}
    for release, paths in wheels.items():
        roots = []
        for wheel in paths:
            root = workdir / wheel.stem
            if not root.is_dir():
                with zipfile.ZipFile(wheel) as archive:
                    archive.extractall(root)
            roots.append(str(root))
        probe = subprocess.run([sys.executable, "-c", _CUDART_PROBE, *roots], input=json.dumps(names), text=True,
                               capture_output=True, check=True, timeout=120)
        columns[release] = json.loads(probe.stdout)
    lines = ["# Written by `python -m tests.tensorrt_api.extract` from cuda-python, imported without a GPU: the",
             "# parameters of each function, the value of each enum member, class, or absent.",
             "name\t" + "\t".join(columns)]
    lines += [name + "\t" + "\t".join(found[name] for found in columns.values()) for name in names]
    return "\n".join(lines) + "\n"


def fake_names() -> set[str]:
    """The names of the fake cuda runtime, and of the fake driver module as `driver.X`."""
    return (fake_tensorrt.surface(fake_cuda.make_cudart(fake_cuda.Device(1 << 30)))
            | {f"driver.{n}" for n in fake_tensorrt.surface(fake_cuda.make_cudriver())})


def fake_cudart_table() -> dict[str, str]:
    """The same columns for the fake cuda runtime (what the committed table must equal)."""
    import inspect  # noqa: PLC0415

    runtime, driver = fake_cuda.make_cudart(fake_cuda.Device(1 << 30)), fake_cuda.make_cudriver()
    table = {}
    for name in fake_names():
        module = driver if name.startswith("driver.") else runtime
        owner, _, member = name.removeprefix("driver.").partition(".")
        value = getattr(module, owner)
        if member:
            value = getattr(value, member)
            table[name] = str(int(value))
        else:
            table[name] = "class" if isinstance(value, type) else ", ".join(inspect.signature(value).parameters)
    return table


def read_table(path: Path) -> dict[str, list[str]]:
    """name -> its columns, from one of the committed TSV files (the header row under "name")."""
    rows = [line.split("\t") for line in path.read_text().splitlines() if line and not line.startswith("#")]
    return {row[0]: row[1:] for row in rows}


def extract(wheel_dir: Path) -> tuple[str, str]:
    """Both tables, from wheels downloaded into (or already in) `wheel_dir`."""
    versions = list(TENSORRT_WHEELS)
    trt_wheels = dict(zip(versions, download([TENSORRT_WHEELS[v] for v in versions], wheel_dir)))
    cuda_wheels = {release: download(list(requirements), wheel_dir) for release, requirements in CUDA_WHEELS.items()}
    return tensorrt_table(trt_wheels), cudart_table(cuda_wheels, wheel_dir / "unpacked")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--wheels", type=Path, default=Path.home() / ".cache" / "mirasol-tensorrt-wheels")
    parser.add_argument("--check", action="store_true", help="compare with the committed tables instead of writing")
    args = parser.parse_args(argv)
    tables = dict(zip((TENSORRT_TABLE, CUDART_TABLE), extract(args.wheels)))
    differ = [path.name for path, text in tables.items() if path.read_text() != text] if args.check else []
    for path, text in tables.items():
        if not args.check:
            path.write_text(text)
    if differ:
        print(f"differ from the wheels: {', '.join(differ)}; rerun without --check to rewrite them")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
