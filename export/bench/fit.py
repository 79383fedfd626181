"""Which presets, precisions and KV caches fit each Jetson module, and how many streams: a memory budget.

A Jetson's memory is shared by the CPU and the GPU. What one process serving streams needs of it:

    reserve      the OS and the inference runtime (CUDA context, TensorRT and its kernel libraries): RESERVE_BYTES,
                 an ASSUMPTION to replace with a measurement on the module (tegrastats before and after loading)
    weights      parameters x the precision's bytes per weight (`runtime/bundle/precisions.py`: fp16 2, int8 1,
                 int4 0.5 + a float32 scale per 128)
    activations  one step at a time (streams take turns): its output buffers (the next KV window, which exists
                 beside the carried one while the step runs; the context; the TTM memory) + twice the largest
                 intermediate tensor (the input and output of the widest layer) + TENSORRT_SCRATCH_BYTES (another
                 ASSUMPTION: an engine's `device_memory_size_v2` gives the real figure)
    per stream   the carried state: TTM memory, the AV KV window (at the KV cache's bytes: fp16 2, int8 1),
                 av_memory, and a question's text caches (cross K/V and the decoder's own, at their longest)

A preset fits when reserve + weights + activations + one stream's state <= the module's memory; the streams are
as many as the rest holds. Activations and state are in fp16 (what a TensorRT engine of these bundles carries).
`mirasol-bench` reports it (costs section); `python -m mirasol.export.bench.fit` prints it alone.
"""
from __future__ import annotations

from typing import Any

from mirasol.runtime.bundle.precisions import PRECISIONS

from .flops import step_parameters
from .jetsons import JETSONS

RESERVE_BYTES = 2.5e9  # JetPack (headless) ~1 GB + CUDA context, TensorRT, cuBLAS/cuDNN ~1.5 GB: an assumption
TENSORRT_SCRATCH_BYTES = 256 * 2 ** 20  # per execution context: an assumption
ACTIVATION_BYTES = 2  # fp16 activations and state
KV_BYTES = {"fp16": 2, "int8": 1}  # the AV KV cache, per element
PRECISIONS_ON_DEVICE = ("fp16", "int8", "int4")


def state_per_stream(config: Any, kv_bytes: float, state_bytes: float = ACTIVATION_BYTES) -> dict[str, float]:
    """Bytes of one stream's carried state, by part, at full windows and a question of the longest text."""
    c = config
    return {
        "ttm_memory": state_bytes * (c.memory_size * c.d_model if c.combiner == "ttm" else 0),
        "av_kv_window": kv_bytes * 2 * c.av_layers * c.av_cache_len * c.d_model,
        "av_memory": state_bytes * c.text_memory_len * c.d_model,
        "text_caches": state_bytes * 2 * c.text_layers * (c.text_memory_len + c.max_text_len) * c.d_model,
    }


def largest_intermediate(config: Any) -> int:
    """Elements of the largest tensor inside a step (batch 1): an MLP's hidden layer or an attention's scores."""
    c = config
    video, audio, m = c.video_tokens, c.audio_tokens, c.latents_per_chunk
    reads = (c.memory_size if c.combiner == "ttm" else 0) + video + audio
    return max(
        video * c.encoder_dim * c.mlp_ratio, c.encoder_heads * video * video,  # the video encoder
        reads * c.d_model * c.mlp_ratio, (reads + m) * c.d_model,  # the combiner
        m * c.d_model * c.mlp_ratio, c.av_heads * m * (c.av_cache_len + m), (c.av_cache_len + m) * c.d_model,  # AV
        c.max_text_len * c.d_model * c.mlp_ratio, c.text_heads * c.max_text_len * c.text_memory_len,  # text
        c.max_text_len * c.vocab_size)  # a prompt's logits


def activations(config: Any, kv_bytes: float) -> dict[str, float]:
    c = config
    outputs = (kv_bytes * 2 * c.av_layers * c.av_cache_len * c.d_model
               + ACTIVATION_BYTES * (c.latents_per_chunk + (c.memory_size if c.combiner == "ttm" else 0)) * c.d_model)
    return {"step_outputs": outputs, "intermediates": 2 * ACTIVATION_BYTES * largest_intermediate(c),
            "tensorrt_scratch": TENSORRT_SCRATCH_BYTES}


def plan(config: Any, precision: str, kv: str, memory_bytes: float, parameters: int | None = None
         ) -> dict[str, Any]:
    """The memory budget of `config` at `precision` with the `kv` cache ("fp16" or "int8") on a module of
    `memory_bytes`: every number used, whether it fits, and how many streams."""
    if parameters is None:
        counts = step_parameters(config)
        parameters = counts["chunk"] + counts["token"] + counts["question"]
    weights = PRECISIONS[precision].weight_bytes * parameters
    state = state_per_stream(config, KV_BYTES[kv])
    act = activations(config, KV_BYTES[kv])
    fixed = RESERVE_BYTES + weights + sum(act.values())
    per_stream = sum(state.values())
    streams = max(0, int((memory_bytes - fixed) // per_stream))
    return {"precision": precision, "kv_cache": kv, "memory_bytes": memory_bytes, "reserve_bytes": RESERVE_BYTES,
            "parameters": parameters, "weight_bytes": weights, "activation_bytes": act, "state_bytes": state,
            "state_bytes_per_stream": per_stream, "fits": streams >= 1, "streams": streams}


def fit_table(configs: dict[str, Any], devices: dict[str, float]) -> dict[str, Any]:
    """plan() for every preset x precision x KV cache x device (`devices`: name -> memory bytes)."""
    table: dict[str, Any] = {}
    for name, config in configs.items():
        counts = step_parameters(config)
        parameters = counts["chunk"] + counts["token"] + counts["question"]
        table[name] = {device: {f"{p}+kv-{kv}": plan(config, p, kv, memory, parameters)
                                for p in PRECISIONS_ON_DEVICE for kv in KV_BYTES}
                       for device, memory in devices.items()}
    return table


def fit_markdown(report: dict[str, Any]) -> list[str]:
    """The fit table as Markdown: per device and preset, streams per precision and KV cache (0: does not fit)."""
    fits = report.get("costs", {}).get("jetson_fit")
    if not fits:
        return []
    variants = [f"{p}+kv-{kv}" for p in PRECISIONS_ON_DEVICE for kv in KV_BYTES]
    gb, mb = 1e9, 2 ** 20
    lines = ["", "## Jetson memory: what fits, how many streams (cost model)", "",
             f"Streams that fit beside the weights (0: the preset does not fit). Reserve {RESERVE_BYTES / gb:.1f} GB "
             f"(OS + CUDA/TensorRT) and TensorRT scratch {TENSORRT_SCRATCH_BYTES / mb:.0f} MiB are ASSUMPTIONS; "
             "weights, activations (one step's outputs + its widest layer) and the state per stream come from the "
             "config (fp16 activations and state; the AV KV cache at fp16 or int8).", "",
             "| device | preset | " + " | ".join(variants) + " | weights GB fp16/int8/int4 | state per stream MiB "
             "kv fp16/int8 |", "|---|---|" + "---:|" * len(variants) + "---|---|"]
    for preset, devices in fits.items():
        for device, plans in devices.items():
            weights = "/".join(f"{plans[f'{p}+kv-fp16']['weight_bytes'] / gb:.2f}" for p in PRECISIONS_ON_DEVICE)
            state = "/".join(f"{plans[f'int8+kv-{kv}']['state_bytes_per_stream'] / mb:.1f}" for kv in KV_BYTES)
            lines.append(f"| {device} | {preset} | " + " | ".join(_streams(plans[v]["streams"]) for v in variants)
                         + f" | {weights} | {state} |")
    return lines


def _streams(count: int) -> str:
    return ">999" if count > 999 else str(count)


def main() -> None:
    from mirasol.model import PRESETS

    table = fit_table(dict(PRESETS), {device.name: device.memory_gb * 1e9 for device in JETSONS})
    print("\n".join(fit_markdown({"costs": {"jetson_fit": table}})[1:]))


if __name__ == "__main__":
    main()
