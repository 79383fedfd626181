"""The text section: tokens/s of `Stream.token_ids` with the KV cache against PyTorch eager with a cache and
against re-running the decoder on the whole sequence at every token (ONNX and PyTorch); time to first token."""
from __future__ import annotations

from typing import Any

import numpy as np

from .baselines import TorchStepper, torch_generate
from .context import Run, extra_note
from .stats import Engine, interleave, ratio, sampled_every, seconds_between, snapshot, stats_ms, timed


def text(run: Run) -> dict[str, Any]:
    """Every runtime pipeline and the PyTorch baselines answer the question after the same clip, in turn."""
    model, pool, torch_pool, primary = run.model, run.pool, run.torch_pool, run.primary
    question, prompt, new_tokens = run.question, run.prompt, run.new_tokens
    streams = {p: pipe.stream() for p, pipe in {**run.pipes, **run.extras}.items()}
    for stream in streams.values():
        for i in range(run.chunks):
            stream.push(*pool[i % len(pool)])
    stepper = TorchStepper(model)
    for i in range(run.chunks):
        stepper.push(*torch_pool[i % len(pool)])
    av_memory = stepper.av_memory()
    counted = {p: len(s.token_ids(question, new_tokens)[0]) for p, s in streams.items()}  # also the warm-up
    n = counted[primary] or new_tokens  # an answer of EOS alone: the baselines still generate new_tokens
    engines: dict[str, Engine] = {}
    for p, stream in streams.items():
        engines[f"runtime_{p}_cached"] = Engine((lambda s: lambda _: s.token_ids(question, new_tokens))(stream))
    engines["pytorch_eager_cached"] = Engine(lambda _: torch_generate(model, av_memory, prompt, n, cached=True))
    if run.extras:
        engines["pytorch_eager_cached_1thread"] = Engine(
            lambda _: torch_generate(model, av_memory, prompt, n, cached=True),
            before=run.with_threads(1), after=run.with_threads(run.threads))
    engines[f"onnx_{primary}_uncached"] = Engine(lambda _: streams[primary].token_ids(question, n, kv_cache=False))
    engines["pytorch_eager_uncached"] = Engine(lambda _: torch_generate(model, av_memory, prompt, n, cached=False),
                                               budget=30.0, least=1)
    first: dict[str, Engine] = {
        f"runtime_{p}": Engine((lambda s: lambda _: s.token_ids(question, 1))(s)) for p, s in streams.items()}
    first["pytorch_eager"] = Engine(lambda _: torch_generate(model, av_memory, prompt, 1, cached=True))
    # warm-up: every engine once (PyTorch shapes need no planning: a short run is enough)
    cost = {}
    for name, engine in engines.items():
        if name.startswith("pytorch"):
            if engine.before:
                engine.before()
            seconds, _ = timed(lambda: torch_generate(model, av_memory, prompt, min(n, 4),
                                                      cached="uncached" not in name))
            cost[name] = seconds * n / min(n, 4)
            if engine.after:
                engine.after()
        else:
            cost[name], _ = timed(lambda: engine.run(0))
    rounds = 2 if run.quick else 4
    engines["pytorch_eager_uncached"].every = sampled_every(rounds, cost["pytorch_eager_uncached"], 30.0, rounds,
                                                            least=1)
    run.log(f"text: {rounds} rounds of {n} new tokens per engine")
    # the runtime's greedy tokens against PyTorch's (same weights, fp32: identical unless near-ties)
    runtime_tokens = streams[primary].token_ids(question, new_tokens)[0]
    torch_tokens = torch_generate(model, av_memory, prompt, n)
    times = interleave(engines, rounds)
    ttft = interleave(first, max(rounds, 3))
    section: dict[str, Any] = {
        "requested_new_tokens": new_tokens, "generated_tokens": counted, "measured_tokens": counted[primary],
        "baseline_tokens": n, "rounds": rounds,
        "note": ("tokens/s = tokens / wall time of the whole answer (question prefill and the cross-attention "
                 "projection included); baselines generate exactly the runtime's counted tokens, ignoring EOS"),
        "tokens_match_pytorch": runtime_tokens == torch_tokens[:len(runtime_tokens)],
        "engines": {}, "time_to_first_token": {name: stats_ms(s) for name, s in ttft.items()}}
    for name, samples in times.items():
        key = name[len("runtime_"):-len("_cached")] if name.startswith("runtime_") else None
        tokens = counted[key] if key else n
        median = float(np.median(samples))
        section["engines"][name] = {"tokens": tokens,
                                    "tokens_per_second": tokens / median if tokens and median > 0 else None,
                                    "tokens_per_second_p95": (tokens / float(np.percentile(samples, 95))
                                                              if tokens else None),
                                    **stats_ms(samples)}
        note = extra_note(name.removesuffix("_cached")) if name.endswith("_cached") else None
        if note:
            section["engines"][name]["note"] = note
    engine_rates = {name: entry["tokens_per_second"] for name, entry in section["engines"].items()}
    cached = engine_rates[f"runtime_{primary}_cached"]
    first_ms = section["time_to_first_token"][f"runtime_{primary}"]["median_ms"]
    whole_ms = section["engines"][f"runtime_{primary}_cached"]["median_ms"]
    if n > 1 and whole_ms and first_ms is not None and whole_ms > first_ms:
        section["runtime_decode_tokens_per_second"] = (n - 1) / ((whole_ms - first_ms) / 1e3)
    section["speedup"] = {
        "cached_vs_onnx_uncached": ratio(cached, engine_rates[f"onnx_{primary}_uncached"]),
        "cached_vs_pytorch_uncached": ratio(cached, engine_rates["pytorch_eager_uncached"]),
        "cached_vs_pytorch_cached": ratio(cached, engine_rates["pytorch_eager_cached"])}
    section["primary"] = f"runtime_{primary}_cached"
    section["overhead_fraction_outside_run_calls"] = _loop_overhead(run, streams[primary])
    return section


def _loop_overhead(run: Run, stream: Any) -> float | None:
    """The generation loop's share of an answer's wall time outside the text graphs' run calls (a fresh answer)."""
    before = snapshot(stream.timings)
    wall, _ = timed(lambda: stream.token_ids(run.question, run.new_tokens))
    after = snapshot(stream.timings)
    graphs = [g for s in ("ask", "generate") for g in run.pipes[run.primary].bundle.manifest.steps[s].graphs]
    return ratio(wall - sum(seconds_between(before, after, "graph_seconds", graphs).values()), wall)
