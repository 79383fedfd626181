"""The package's layers: imports point one way (lazy imports included), and the runtime never needs torch."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# what each subpackage may import of ours: runtime <- model <- calibration <- export <- export.bench
ALLOWED = {
    "runtime": {"runtime"},
    "model": {"model", "runtime"},
    "calibration": {"calibration", "model", "runtime"},
    "export": {"export", "calibration", "model", "runtime"},
    "export.bench": {"export.bench", "export", "calibration", "model", "runtime"},
}


def _layer(module: str) -> str:
    """'export.bench.cli' -> 'export.bench', 'runtime.backends.base' -> 'runtime'."""
    parts = module.split(".")
    return "export.bench" if parts[:2] == ["export", "bench"] else parts[0]


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module inside mirasol) of every import in the file, at any depth (function-level ones too)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                names = [".".join(base + ([node.module] if node.module else []))]
            else:
                names = [node.module or ""]
        else:
            continue
        for name in names:
            if name.startswith("mirasol."):
                found.append((node.lineno, name[len("mirasol."):]))
            elif node.__class__ is ast.ImportFrom and node.level:
                found.append((node.lineno, name))
    return found


def test_imports_point_one_way() -> None:
    wrong = []
    for layer in ("runtime", "model", "calibration", "export"):
        for path in sorted((ROOT / layer).rglob("*.py")):
            own = _layer(".".join(path.relative_to(ROOT).with_suffix("").parts))
            for line, module in _imports(path):
                if _layer(module) not in ALLOWED[own]:
                    wrong.append(f"{path.relative_to(ROOT)}:{line} ({own}) imports mirasol.{module}")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def _module_graph() -> dict[str, set[str]]:
    """module -> the modules of ours it imports (lazy and type-only imports included; `from pkg import mod`
    counts as importing `pkg.mod`)."""
    modules = {}
    for layer in ("runtime", "model", "calibration", "export"):
        for path in (ROOT / layer).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name.removeprefix("mirasol.") for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                elif (node.module or "").startswith("mirasol."):
                    target = node.module.removeprefix("mirasol.")
                else:
                    continue
                targets = [f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target
                           for alias in node.names]
            else:
                continue
            edges.update(t for t in targets if t in modules and t != module)
        graph[module] = edges
    return graph


def test_no_import_circles() -> None:
    """No module reaches itself through imports of ours, type-only and lazy ones included (Tarjan's SCCs)."""
    graph = _module_graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for other in sorted(graph[module]):
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    assert not circles, "modules that import each other (directly or around a circle):\n" + "\n".join(
        " <-> ".join(c) for c in circles)


def test_runtime_never_imports_torch() -> None:
    hits = []
    for path in sorted((ROOT / "runtime").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or ""]
            else:
                continue
            if any(m.split(".")[0] == "torch" for m in modules):
                hits.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not hits, f"runtime/ imports torch at {hits}"


def test_every_module_is_under_500_lines() -> None:
    folders = ("model", "export", "calibration", "runtime", "tests")
    sizes = {str(path.relative_to(ROOT)): len(path.read_text().splitlines())
             for folder in folders for path in (ROOT / folder).rglob("*.py")}
    assert {path: lines for path, lines in sizes.items() if lines >= 500} == {}
