"""The memory and start-up section: peak RSS and start-up time of a fresh process that runs only the runtime,
against a fresh PyTorch process doing the same work; warm `Pipeline.load` times."""
from __future__ import annotations

import json
from typing import Any

from .children import run_child
from .context import Run
from .stats import ratio


def memory(run: Run) -> dict[str, Any]:
    """Each bundle's runtime child and the PyTorch child stream the clip and answer; their peak RSS and times."""
    run.log("memory: runtime-only and PyTorch subprocesses")
    args = {"chunks": run.chunks, "new_tokens": run.new_tokens, "threads": run.threads, "question": run.question,
            "source": run.source.spec}
    env = {"OMP_NUM_THREADS": str(run.threads)}
    section: dict[str, Any] = {"chunks": run.chunks, "new_tokens": run.new_tokens, "warm_load_ms": run.load_times,
                               "primary": f"runtime_process_{run.primary}",
                               "note": "peak RSS = VmHWM of a fresh interpreter doing the work, then exiting"}
    children = [(f"runtime_process_{p}", "child_runtime", {**args, "bundle": str(path)})
                for p, path in run.paths.items()]
    if run.primary in run.paths and not run.quick:  # ONNX Runtime's arena, which the backend turns off
        children.append((f"runtime_process_{run.primary}_arena", "child_runtime",
                         {**args, "bundle": str(run.paths[run.primary]), "arena": True}))
    children.append(("pytorch_process", "child_pytorch", args))
    for name, module, child_args in children:
        try:
            section[name] = {"status": "ok", **run_child(module, [json.dumps(child_args)], env=env)}
        except Exception as failure:  # noqa: BLE001 - a failed child is reported, the others still run
            section[name] = {"status": "failed", "reason": str(failure)[:1000]}
    runtime, pytorch = section[f"runtime_process_{run.primary}"], section["pytorch_process"]
    section["rss_ratio_runtime_vs_pytorch"] = ratio(runtime.get("peak_rss_mb"), pytorch.get("peak_rss_mb"))
    section["startup_ratio_runtime_vs_pytorch"] = ratio(runtime.get("start_to_ready_s"),
                                                        pytorch.get("start_to_ready_s"))
    return section
