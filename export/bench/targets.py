"""The targets section: the pass/fail lines (set for the small preset on 2 CPU cores), from the report so far."""
from __future__ import annotations

from typing import Any

from .context import Run
from .stats import median, ratio


def _target(name: str, value: float | None, op: str, threshold: float, note: str = "") -> dict[str, Any]:
    passed = None if value is None else (value >= threshold if op == ">=" else value <= threshold)
    return {"name": name, "value": value, "op": op, "threshold": threshold, "pass": passed, "note": note}


def targets(run: Run) -> list[dict[str, Any]]:
    """One line per target: the measured value, the threshold, pass (None where not measurable) and why not."""
    report = run.report
    s = report["streaming"]
    engines = s["engines"]
    primary = s["primary"]
    fp32 = median(engines.get("runtime_fp32"))
    int8 = engines.get("runtime_int8", {})
    flat = report["flatness"]["compare"]
    text = report["text"]
    n = text["measured_tokens"]
    tokens_note = (f"at {n} new tokens" if n == text["requested_new_tokens"]
                   else f"at {n} new tokens (the answer ended at EOS; {text['requested_new_tokens']} requested)")
    memory = report["memory"]
    ceiling = report.get("ceiling", {})
    decode = ceiling.get("decode", {})
    rates = {name: entry.get("tokens_per_second") for name, entry in text["engines"].items()}
    int8_note = "" if median(int8) else f"int8 {int8.get('status', 'not measured')}: {int8.get('reason', '')}"
    ceiling_note = "" if ceiling.get("status") == "ok" else f"ceiling {ceiling.get('status')}: {ceiling.get('reason')}"
    return [
        _target("runtime fp32 per chunk vs PyTorch eager stepping (x faster)",
                ratio(median(engines.get("pytorch_eager_step")), fp32), ">=", 2.5,
                "" if fp32 else "no fp32 bundle"),
        _target("runtime fp32 per chunk, fraction of the measured GEMM rate", ceiling.get("fraction_of_gemm"), ">=",
                0.5, ceiling_note),
        _target("runtime int8 (CPU) per chunk vs runtime fp32 (x faster)", ratio(fp32, median(int8)), ">=", 1.5,
                int8_note),
        _target(f"chunk {flat['at']} vs chunk 8 per-chunk latency (ratio)",
                flat["ratio"] if flat["at"] == 128 else None, "<=", 1.15,
                "" if flat["at"] == 128 else f"stream of {report['flatness']['stream_chunks']} chunks: "
                f"chunk {flat['at']}/8 = {flat['ratio'] if flat['ratio'] is None else round(flat['ratio'], 3)}"),
        _target("runtime fp32 decode, fraction of the memory-bandwidth bound (batch 1)",
                decode.get("fraction_of_bound"), ">=", 0.6, ceiling_note),
        _target("cached text tokens/s vs uncached (ONNX, x)", text["speedup"]["cached_vs_onnx_uncached"], ">=", 5.0,
                tokens_note),
        _target("runtime cached text tokens/s vs PyTorch eager cached (x)",
                text["speedup"]["cached_vs_pytorch_cached"], ">=", 3.0, tokens_note),
        _target("runtime int8 cached text tokens/s vs runtime fp32 (x)",
                ratio(rates.get("runtime_int8_cached"), rates.get("runtime_fp32_cached")), ">=", 1.8,
                int8_note or tokens_note),
        _target(f"{primary} overhead outside backend run calls (fraction of stream wall time)",
                report["overhead"]["fraction_outside_run_calls"], "<=", 0.03),
        *_graph_targets(report),
        _target("runtime-only process peak RSS vs PyTorch process (ratio)",
                memory["rss_ratio_runtime_vs_pytorch"], "<=", 0.5),
    ]


def _graph_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Batched streams (8 through push_streams, one run of a bundle of max batch 8) and each graph against its
    weight-MatMul floor (per call, same threads)."""
    batched = report.get("batched", {})
    eight = batched.get("streams", {}).get("8", {}).get("together", {}).get("8")
    floors = report.get("floors", {})
    lines = [_target("8 streams through push_streams vs one by one (x chunks/s; bundle of max batch 8)",
                     eight and eight["speedup"], ">=", 3.0,
                     "" if eight else batched.get("reason") or "not measured: no 8-stream row with a bundle of max "
                     "batch 8 (a --quick run, or a given bundle)")]
    for graph, words in (("av_autoregressor", "AV step"), ("text_decoder", "text decoder token")):
        entry = floors.get("graphs", {}).get(graph, {})
        lines.append(_target(f"{words}: its weight MatMuls alone / the whole graph (per call, "
                             f"{floors.get('threads', '?')} threads)", entry.get("floor_share_of_graph"), ">=", 0.8,
                             "" if entry else f"floors {floors.get('status')}: {floors.get('reason')}"))
    return lines
