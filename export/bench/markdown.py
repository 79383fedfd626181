"""The report as Markdown: a header, then one renderer per section (a function of the report: its lines)."""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from .fit import fit_markdown
from .machine import describe
from .stats import median, ratio


def _f(value: Any, digits: int = 2, suffix: str = "") -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
            return "–"
        return f"{value:,.{digits}f}{suffix}" if isinstance(value, float) else f"{value:,}{suffix}"
    return str(value)


def _pct(fraction: float | None) -> float | None:
    return None if fraction is None else 100.0 * fraction


def _header(report: dict[str, Any]) -> list[str]:
    meta = report["meta"]
    load = meta.get("load_average_start", [None])[0], meta.get("load_average_end", [None])[0]
    return [
        f"# mirasol-bench: {meta['source']}",
        "",
        f"{meta['threads']} threads on {meta['machine']['cpus']} CPUs; 1-min load average {_f(load[0])} at the "
        f"start, {_f(load[1])} at the end; clip of {meta['chunks']} chunks; {meta['repeats']} timed chunks per "
        f"engine after {meta['warmup_chunks']} warm-up chunks; run took {_f(meta.get('wall_seconds'), 0)} s"
        + (" (quick smoke run)" if meta["quick"] else "") + ".",
        f"Model: {meta['model_note']}. {meta['note']}.",
    ]


def _targets(report: dict[str, Any]) -> list[str]:
    meta = report["meta"]
    lines = ["", "## Targets", "", f"CPU: {describe(meta['machine'].get('cpu', {}))}; {meta['threads']} threads.", "",
             "| target | measured | needs | result |", "|---|---:|---:|---|"]
    for t in report["targets"]:
        result = "n/a" if t["pass"] is None else ("PASS" if t["pass"] else "FAIL")
        note = f" ({t['note']})" if t["note"] else ""
        lines.append(f"| {t['name']}{note} | {_f(t['value'], 3)} | {t['op']} {t['threshold']} | {result} |")
    return lines


def _export(report: dict[str, Any]) -> list[str]:
    lines = ["", "## Export", "", "| precision | status | seconds | detail |", "|---|---|---:|---|"]
    for precision, entry in report["export"].items():
        lines.append(f"| {precision} | {entry['status']} | {_f(entry.get('seconds'), 1)} | "
                     f"{entry.get('reason') or entry['source'] + '; ' + entry['checks']} |")
    return lines


def _streaming(report: dict[str, Any]) -> list[str]:
    s = report["streaming"]
    lines = ["", "## Streaming (per chunk, steady state: carried state at its full size)", "",
             f"| engine | median ms | p95 ms | n | {s['primary']} is x faster |", "|---|---:|---:|---:|---:|"]
    for name, entry in s["engines"].items():
        if entry.get("status", "ok") != "ok":
            lines.append(f"| {name} | {entry['status']} | | | {entry.get('reason', '')} |")
            continue
        label = name + (f" (all {entry['chunks_so_far']} chunks so far)" if "chunks_so_far" in entry else "")
        lines.append(f"| {label} | {_f(entry['median_ms'])} | {_f(entry['p95_ms'])} | {entry['n']} | "
                     f"{_f(s['speedup_vs_primary'].get(name))} |")
    single = {name[: -len("_1thread")]: entry for name, entry in s["engines"].items() if name.endswith("_1thread")}
    if not single:
        return lines
    rt = next((name for name in single if name.startswith("runtime_")), None)
    one = ratio(median(single.get("pytorch_eager_step")), median(single.get(rt))) if rt else None
    lines.append(f"\nat 1 thread each, {rt} is {_f(one)}x faster than pytorch_eager_step.")
    slowdown = ratio(median(s["engines"].get(rt)), median(single.get(rt))) if rt else None
    for spin, words in (("nospin", "off"), ("spin", "on")):
        flipped = ratio(median(s["engines"].get(rt)), median(s["engines"].get(f"{rt}_{spin}"))) if rt else None
        if flipped is not None:
            lines.append(f"with ONNX Runtime's spin-waiting {words}, {rt} is {_f(flipped)}x as fast as loaded by "
                         f"default.")
    arena = ratio(median(s["engines"].get(rt)), median(s["engines"].get(f"{rt}_arena"))) if rt else None
    if arena is not None:
        lines.append(f"with ONNX Runtime's CPU memory arena on, {rt} is {_f(arena)}x as fast as loaded by default "
                     f"(arena off).")
    if slowdown is not None and slowdown > 1.5:
        lines.append(f"**The CPUs are contended**: {rt} on {report['meta']['threads']} threads is {_f(slowdown)}x "
                     f"slower than on 1. Multi-threaded timings here are dominated by waiting for descheduled "
                     f"threads (other work is running); read the ratios with that in mind, or re-run when "
                     f"the machine is quiet.")
    return lines


def _flatness(report: dict[str, Any]) -> list[str]:
    f = report["flatness"]
    lines = ["", f"## Flatness ({f['engine']}, {f['streams']} streams of {f['stream_chunks']} chunks)", "",
             "| chunk | median ms | p95 ms | carried state KB |", "|---:|---:|---:|---:|"]
    for index, entry in f["chunks"].items():
        lines.append(f"| {index} | {_f(entry['median_ms'])} | {_f(entry['p95_ms'])} | "
                     f"{_f(entry['state_bytes'] / 1024, 1)} |")
    lines.append(f"\nchunk {f['compare']['at']} / chunk {f['compare']['against']}: {_f(f['compare']['ratio'], 3)}")
    return lines


def _text(report: dict[str, Any]) -> list[str]:
    t = report["text"]
    lines = ["", f"## Text ({t['measured_tokens']} new tokens, {t['requested_new_tokens']} requested; "
             f"generated per runtime: {t['generated_tokens']})", "",
             "| engine | tokens | tokens/s (median) | median ms | p95 ms |", "|---|---:|---:|---:|---:|"]
    for name, entry in t["engines"].items():
        lines.append(f"| {name} | {entry['tokens']} | {_f(entry['tokens_per_second'], 1)} | "
                     f"{_f(entry['median_ms'])} | {_f(entry['p95_ms'])} |")
    lines += ["", "| time to first token | median ms | p95 ms |", "|---|---:|---:|"]
    for name, entry in t["time_to_first_token"].items():
        lines.append(f"| {name} | {_f(entry['median_ms'])} | {_f(entry['p95_ms'])} |")
    lines += ["", f"cached vs ONNX uncached: {_f(t['speedup']['cached_vs_onnx_uncached'])}x; vs PyTorch uncached: "
              f"{_f(t['speedup']['cached_vs_pytorch_uncached'])}x; vs PyTorch cached: "
              f"{_f(t['speedup']['cached_vs_pytorch_cached'])}x; runtime decode-only rate "
              f"{_f(t.get('runtime_decode_tokens_per_second'), 1)} tokens/s; greedy tokens equal PyTorch's: "
              f"{_f(t['tokens_match_pytorch'])}; generation loop outside run calls: "
              f"{_f(_pct(t['overhead_fraction_outside_run_calls']))}%. {t['note']}."]
    return lines


def _overhead(report: dict[str, Any]) -> list[str]:
    o = report["overhead"]
    return ["", f"## Overhead ({o['engine']}, {o['chunks']} pushes)", "",
            f"outside the backend's run calls: {_f(_pct(o['fraction_outside_run_calls']))}% of "
            f"{_f(o['wall_seconds'], 3)} s (input checks {_f(_pct(o['fraction_in_push_checks']))}%, state "
            f"update {_f(_pct(o['fraction_in_state_update']))}%); per graph ms: "
            + ", ".join(f"{g} {_f(ms)}" for g, ms in o["per_graph_ms"].items())]


def _memory(report: dict[str, Any]) -> list[str]:
    m = report["memory"]
    lines = ["", f"## Memory and start-up ({m['chunks']} chunks + {m['new_tokens']} tokens, fresh processes)", "",
             "| process | peak RSS MB | vs PyTorch | import s | load s | stream s | ask s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    pytorch_rss = m["pytorch_process"].get("peak_rss_mb")
    for name, entry in m.items():
        if not (isinstance(entry, dict) and "status" in entry):
            continue
        if entry["status"] != "ok":
            lines.append(f"| {name} | failed: {entry['reason'][:200]} | | | | | |")
            continue
        lines.append(f"| {name} | {_f(entry['peak_rss_mb'], 0)} | {_f(ratio(entry['peak_rss_mb'], pytorch_rss), 3)} | "
                     f"{_f(entry['import_s'])} | {_f(entry['load_s'])} | {_f(entry['stream_s'])} | "
                     f"{_f(entry['ask_s'])} |")
        if entry.get("torch_imported"):
            lines.append(f"\n**{name} imported torch**\n")
    lines.append(f"\nstart-up (import + load) {m['primary']} / PyTorch: "
                 f"{_f(m['startup_ratio_runtime_vs_pytorch'], 3)}; "
                 "warm `Pipeline.load` median ms: "
                 + ", ".join(f"{p} {_f(e['median_ms'], 0)}" for p, e in m["warm_load_ms"].items()))
    return lines


def _ceiling(report: dict[str, Any]) -> list[str]:
    c = report["ceiling"]
    total = c["flops_per_chunk"]["total"]
    lines = ["", "## Ceiling", "", f"one chunk step: {_f(total / 1e9, 3)} GFLOP (" + ", ".join(
        f"{k} {_f(v / 1e9, 3)}" for k, v in c["flops_per_chunk"].items() if k != "total") + ")"]
    if c.get("status") != "ok":
        lines[-1] += f"; GEMM measurement failed: {c.get('reason')}"
        return lines
    lines[-1] += (f"; fp32 GEMM ({c['gemm_size']}^2, the fastest of numpy and ONNX Runtime at 1 and "
                  f"{report['meta']['threads']} threads: {c['gemm_library']} on {c['gemm_threads']}): "
                  f"{_f(c['gemm_flops_per_second'] / 1e9, 1)} GFLOP/s; memory bandwidth (fp32 GEMV over "
                  f"{_f(c['gemv_matrix_mb'], 0)} MB): {_f(c['gemv_bytes_per_second'] / 1e9, 1)} GB/s")
    lines += ["", "| engine | GFLOP/s | fraction of GEMM | floor ms (roofline) | fraction of floor |",
              "|---|---:|---:|---:|---:|"]
    for name, entry in c["engines"].items():
        lines.append(f"| {name} | {_f(entry['flops_per_second'] / 1e9, 2)} | {_f(entry['fraction_of_gemm'], 3)} | "
                     f"{_f(entry['floor_ms'])} | {_f(entry['fraction_of_floor'], 3)} |")
    d = c["decode"]
    lines.append(f"\ntext decoding, batch 1: {_f(d['weight_bytes_per_token'] / 2 ** 20, 1)} MB of weights per "
                 f"token -> at most {_f(d['bandwidth_bound_tokens_per_second'], 0)} tokens/s at the measured "
                 f"bandwidth; {d['engine']} decodes {_f(d['runtime_decode_tokens_per_second'], 1)} tokens/s "
                 f"({_f(d['fraction_of_bound'], 3)} of that)")
    return lines


def _floors(report: dict[str, Any]) -> list[str]:
    f = report["floors"]
    lines = ["", "## Floors (each graph's weight MatMuls alone against the graph, ONNX Runtime, batch 1)", ""]
    if f.get("status") != "ok":
        return lines + [f"{f.get('status')}: {f.get('reason')}"]
    lines += ["Both sides one session run on the same step's inputs, median per call, same threads, timed in turn.",
              "", "| graph | MatMuls | rows | weights MB | threads | floor ms | graph ms | floor / graph | "
              "floor GFLOP/s | of GEMM rate | of bandwidth |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, g in f["graphs"].items():
        for threads, t in g["by_threads"].items():
            here = int(threads) == g["floor_threads"]
            lines.append(f"| {name} | {g['matmuls']} | {g['rows']} | {_f(g['weight_bytes'] / 2 ** 20, 1)} | {threads} | "
                         f"{_f(t['floor_ms'], 3)} | {_f(t['graph_ms'], 3)} | {_f(t['ratio'], 3)} | "
                         f"{_f(g['flops'] / (t['floor_ms'] / 1e3) / 1e9, 1)} | "
                         f"{_f(g['floor_fraction_of_gemm'], 3) if here else ''} | "
                         f"{_f(g['floor_fraction_of_bandwidth'], 3) if here else ''} |")
    return lines


def _batched(report: dict[str, Any]) -> list[str]:
    b = report["batched"]
    lines = ["", "## Batched streams (`push_streams` against the same streams pushed one by one)", ""]
    if b.get("status") != "ok":
        return lines + [f"{b.get('status')}: {b.get('reason')}"]
    sizes = list(b["bundles"])
    lines += [f"{b['threads']} threads; per chunk, median over {b['rounds']} rounds of {b['block']} steps; x = chunks/s "
              "together / one by one, same rounds (range over the rounds). Bundles: "
              + "; ".join(f"max batch {size}: {note}" for size, note in {**b["bundles"], **b.get("not_used", {})}.items())
              + ".", "",
              "| streams | one by one ms | " + " | ".join(f"max batch {s}: ms (runs per call) | x" for s in sizes)
              + " | AV MatMuls alone: x |", "|---:|---:|" + "---:|---:|" * len(sizes) + "---:|"]
    bound = b["matmul_bound"]["speedup"]
    for n, entry in b["streams"].items():
        cells = [f"{_f(t['median_ms'])} ({t['runs_per_call']}) | {_f(t['speedup'])} "
                 f"[{_f(t['speedup_min'])}-{_f(t['speedup_max'])}]" for t in entry["together"].values()]
        lines.append(f"| {n} | {_f(entry['alone']['median_ms'])} | " + " | ".join(cells) + f" | {_f(bound.get(n))} |")
    m = b["matmul_bound"]
    lines.append(f"\nAV MatMuls alone: the {m['matmuls']} weight MatMuls of the {m['graph']} graph at N x "
                 f"{m['rows_per_chunk']} rows, per chunk, x faster than at one chunk's rows: what batching can gain "
                 "on them at most (every other node of the step only adds time to both sides).")
    return lines


def _costs(report: dict[str, Any]) -> list[str]:
    c = report["costs"]
    mb = 2 ** 20
    lines = ["", "## Costs per step (cost model) and Jetson estimates", "",
             f"fp16 weights and state; one chunk at steady state, one token with {c['past_tokens']} tokens in the "
             "cache. host<->device: with the carried state on the device (the TensorRT backend) / through the host.",
             "",
             "| preset | chunk GFLOP | chunk weights MB | chunk state read / written MB | chunk host<->device KB |"
             " token MFLOP | token weights MB | token state read / written MB | token host<->device KB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, entry in c["presets"].items():
        k, t = entry["fp16"]["chunk"], entry["fp16"]["token"]
        lines.append(f"| {name} | {_f(k['flops'] / 1e9, 3)} | {_f(k['weight_bytes'] / mb, 1)} | "
                     f"{_f(k['state_read_bytes'] / mb, 2)} / {_f(k['state_written_bytes'] / mb, 2)} | "
                     f"{_f(k['io_device_bytes'] / 1024, 0)} / {_f(k['io_host_bytes'] / 1024, 0)} | "
                     f"{_f(t['flops'] / 1e6, 1)} | {_f(t['weight_bytes'] / mb, 1)} | "
                     f"{_f(t['state_read_bytes'] / mb, 2)} / {_f(t['state_written_bytes'] / mb, 2)} | "
                     f"{_f(t['io_device_bytes'] / 1024, 1)} / {_f(t['io_host_bytes'] / 1024, 0)} |")
    lines += ["", f"{c['note']}.", "", "| device | preset | fp16 chunk ms | fp16 tokens/s | int8 chunk ms | "
              "int8 tokens/s | int4 chunk ms | int4 tokens/s |", "|---|---|---:|---:|---:|---:|---:|---:|"]

    def fit(est: dict[str, Any]) -> str:
        return "" if est["weights_fit"] else " (does not fit)"
    for name, entry in c["presets"].items():
        for device, est in entry["jetson_estimate"].items():
            cells = [f"{_f(e['chunk_ms'], 3)}{fit(e)} | {_f(e['tokens_per_second'], 0)}"
                     for e in (est["fp16"], est["int8"], est.get("int4"))
                     if e is not None]
            lines.append(f"| {device} | {name} | " + " | ".join(cells) + " |")
    here = c["measured_here"]
    lines.append(f"\nmeasured here ({here['engine']}, preset {c['this_run']}, this CPU): "
                 f"{_f(here['chunk_ms'])} ms per chunk, {_f(here['tokens_per_second'], 1)} tokens/s")
    return lines


def _cuda(report: dict[str, Any]) -> list[str]:
    g = report["cuda"]
    if not g["available"]:
        return ["", "## CUDA", "", g["note"]]
    lines = ["", "## CUDA", "", f"device: {g['device']}", "", "| engine | median ms | p95 ms |", "|---|---:|---:|"]
    for name, entry in g["engines"].items():
        if entry.get("status", "ok") != "ok":
            lines.append(f"| {name} | {entry['status']}: {entry.get('reason', '')[:200]} | |")
        else:
            lines.append(f"| {name} | {_f(entry['median_ms'])} | {_f(entry['p95_ms'])} |")
    lines.append("\nx faster than PyTorch eager on the GPU: " + ", ".join(
        f"{k} {_f(v)}" for k, v in g["speedup_vs_pytorch_eager_cuda"].items()))
    return lines


# the document's parts in order: a header, the targets, then one part per section
RENDERERS: tuple[Callable[[dict[str, Any]], list[str]], ...] = (
    _header, _targets, _export, _streaming, _flatness, _batched, _text, _overhead, _memory, _ceiling, _floors,
    _costs, fit_markdown, _cuda)


def to_markdown(report: dict[str, Any]) -> str:
    """The report as one Markdown document (what `mirasol-bench` prints)."""
    return "\n".join(line for render in RENDERERS for line in render(report)) + "\n"
