"""Plain-text tables of what a bundle's manifest reports: validation against PyTorch, the int8 accuracy report.

Per-layer outputs (`present_key_0`, `present_key_1`, ...) are folded into one row (`present_key_*`).
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any


def fold_layers(values: Mapping[str, Any]) -> dict[str, list[Any]]:
    """Group values keyed `name_<layer>` under `name_*` (others stay as they are), in first-seen order."""
    folded: dict[str, list[Any]] = {}
    for name, value in values.items():
        folded.setdefault(re.sub(r"_\d+$", "_*", name), []).append(value)
    return folded


def layer_label(name: str, count: int) -> str:
    return f"{name} ({count})" if count > 1 else name


def format_rows(rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned columns, two spaces apart."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]


def format_validation(validation: Mapping[str, Mapping[str, Any]]) -> str:
    """Graph, output, max abs and rel error against PyTorch."""
    rows = [("graph", "output", "max abs err", "max rel err")]
    for graph, result in validation.items():
        for name, errors in fold_layers(result["outputs"]).items():
            rows.append((graph, layer_label(name, len(errors)), f"{max(e['max_abs'] for e in errors):.2e}",
                         f"{max(e['max_rel'] for e in errors):.2e}"))
    return "\n".join(format_rows(rows))


def format_fp16(reports: Mapping[str, Mapping[str, Any]]) -> str:
    """An fp16 bundle's report: per graph, the error of the conversion and the groups measurement kept in fp32."""
    rows = [("graph", "rel error, groups in fp32", "as converted", "groups kept in fp32")]
    for graph, report in reports.items():
        kept = [name for name, decision in report["groups"].items() if decision["kept_fp32"]]
        rows.append((graph, f"{report['baseline_error']:.2e}", f"{report['final_error']:.2e}", ", ".join(kept) or "-"))
    return "fp16 conversion against the fp32 graphs:\n" + "\n".join(format_rows(rows))


def format_quantization(report: Mapping[str, Any]) -> str:
    """A quantized bundle's report (int8, int4): per-graph and end-to-end agreement with the fp32 bundle, the int8
    sweep's choices."""
    data = report.get("data", {})
    accuracy = report["accuracy"]
    recipe = report.get("recipe") or report.get("flavour") or {}  # "flavour": bundles written before the rename
    lines = [f"{report.get('format', 'int8')} ({recipe.get('name', '?')}, {report['method']}) vs the fp32 bundle on "
             f"{accuracy['held_out_clips']} held-out clips ({accuracy['chunks']} chunks), data: "
             f"{data.get('kind')} ({data.get('generator')}, {data.get('source')})"]
    rows = [("graph", "output", "cosine", "min cos", "max abs err", "max rel err")]
    for graph, outputs in accuracy["per_graph"].items():
        for name, group in fold_layers(outputs).items():
            rows.append((graph, layer_label(name, len(group)), f"{min(s['cosine'] for s in group):.5f}",
                         f"{min(s['min_cosine'] for s in group):.5f}",
                         f"{max(s['max_abs_error'] for s in group):.3g}",
                         f"{max(s['max_rel_error'] for s in group):.3g}"))
    lines += format_rows(rows)
    ctx = accuracy["av_context"]
    ans = accuracy["answers"]
    lines.append(f"end to end: av_context cosine {ctx['cosine']:.5f} (worst chunk {ctx['min_chunk_cosine']:.5f}), "
                 f"max abs error {ctx['max_abs_error']:.3g}")
    if ans["questions"]:
        lines.append(f"greedy answers: {ans['identical']}/{ans['questions']} identical, token agreement "
                     f"{ans['token_agreement']:.3f} (max {ans['max_new_tokens']} new tokens)"
                     + (" -- but every fp32 answer is the same repeated token (an untrained decoder?): this agreement "
                        "says little" if ans.get("degenerate") else ""))
    for graph, sweep in report.get("sweep", {}).items():
        kept = [g for g, d in sweep["groups"].items() if d["kept_fp32"] and d["quantized_nodes"]]
        already = [g for g, d in sweep["groups"].items() if not d["quantized_nodes"]]
        lines.append(f"sweep {graph}: error vs fp32 {sweep['baseline_error']:.3g} all int8 -> "
                     f"{sweep['final_error']:.3g}"
                     f"; kept fp32 by the sweep: {', '.join(kept) or 'none'}"
                     + (f" (not quantized by this recipe: {', '.join(already)})" if already else ""))
    return "\n".join(lines)
