"""What the TensorRT readiness check reports: findings, and a bundle's report."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .support_matrix import DEFAULT_TARGET, MATRIX_VERSION


@dataclass(frozen=True)
class Finding:
    """One problem: severity "error" (TensorRT will reject or mis-build it) or "warning" (it builds, but badly)."""

    severity: str
    graph: str
    node: str
    message: str
    code: str = ""

    def __str__(self) -> str:
        parts = [self.severity]
        if self.graph:
            parts.append(f"[{self.graph}]")
        if self.node:
            parts.append(f"node {self.node!r}")
        return " ".join(parts) + f": {self.message}"

    def to_dict(self) -> dict[str, str]:
        return {"severity": self.severity, "graph": self.graph, "node": self.node, "message": self.message,
                "code": self.code}


@dataclass
class ReadinessReport:
    """The findings of every graph of a bundle."""

    findings: list[Finding] = field(default_factory=list)
    target: str = DEFAULT_TARGET
    graphs: list[str] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def format(self) -> str:
        head = (f"TensorRT {self.target} readiness: {len(self.errors)} error(s), {len(self.warnings)} warning(s) "
                f"in {len(self.graphs)} graph(s)")
        return "\n".join([head, *(f"  {f}" for f in self.findings)])

    def to_dict(self) -> dict[str, Any]:
        return {"target_tensorrt": self.target, "matrix": MATRIX_VERSION, "ok": self.ok,
                "findings": [f.to_dict() for f in self.findings]}
