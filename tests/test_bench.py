"""mirasol-bench: the report's structure (keys, types, every section), not its timings."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mirasol.export.bench.cli import main
from mirasol.export.bench.cuda import NO_CUDA
from mirasol.export.bench.flops import chunk_step_flops, step_costs, token_step_flops
from mirasol.export.bench.markdown import to_markdown
from mirasol.export.bench.run import SECTIONS, jsonable, run_benchmark
from mirasol.export.bench.stats import stats_ms
from mirasol.model import get_preset

TARGET_KEYS = {"name", "value", "op", "threshold", "pass", "note"}
STAT_KEYS = {"n", "median_ms", "p95_ms", "mean_ms", "min_ms"}


def _cpu_attention(query, key, value, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query, key, value)  # torch's table lacks the CPU kernel of scaled_dot_product_attention


CPU_SDPA = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention}


def carried_state_bytes(config: dict, chunks: int) -> int:
    """fp32 bytes a stream carries after `chunks` chunks: the TTM memory, the AV KV cache (at most W-1 chunks of
    m tokens per layer, keys and values) and the AV memory the text decoder reads (at most K chunks)."""
    m, d = config["latents_per_chunk"], config["d_model"]
    memory = config["memory_size"] * d if config["combiner"] == "ttm" else 0
    kv = config["av_layers"] * 2 * min(chunks, config["av_window_chunks"] - 1) * m * d
    av_memory = min(chunks, config["text_memory_chunks"]) * m * d
    return 4 * (memory + kv + av_memory)


def check_report(report: dict) -> None:
    """Every section is there with the keys and types readers rely on."""
    assert report["format"] == "mirasol-bench" and report["version"] == 1
    assert set(SECTIONS) <= set(report)
    meta = report["meta"]
    for key, kind in (("threads", int), ("chunks", int), ("repeats", int), ("wall_seconds", float),
                      ("load_average_start", list), ("new_tokens", int), ("source", str)):
        assert isinstance(meta[key], kind), key

    streaming = report["streaming"]
    engines = streaming["engines"]
    assert {"runtime_fp32", "pytorch_eager_step", "pytorch_naive_rerun", "runtime_fp16", "runtime_int8"} <= set(engines)
    for name in ("runtime_fp32", "pytorch_eager_step", "pytorch_naive_rerun"):
        assert engines[name]["status"] == "ok"
        assert STAT_KEYS <= set(engines[name])
        assert engines[name]["median_ms"] > 0 and engines[name]["p95_ms"] >= engines[name]["median_ms"]
    assert engines["runtime_int8"]["status"] in ("ok", "not available", "not measured", "failed")
    assert isinstance(streaming["speedup_vs_primary"]["pytorch_eager_step"], float)

    flatness = report["flatness"]
    assert flatness["chunks"] and all(STAT_KEYS | {"state_bytes"} <= set(e) for e in flatness["chunks"].values())
    assert {"1", "8"} <= set(flatness["chunks"])
    # bounded state: at each chunk exactly what the config's windows imply (full once they are)
    for chunk, entry in flatness["chunks"].items():
        assert entry["state_bytes"] == carried_state_bytes(report["meta"]["config"], int(chunk)), chunk

    text = report["text"]
    assert 0 <= text["measured_tokens"] <= text["requested_new_tokens"] and text["baseline_tokens"] >= 1
    for name, entry in text["engines"].items():
        assert STAT_KEYS <= set(entry), name
        assert (entry["tokens_per_second"] > 0) if entry["tokens"] else entry["tokens_per_second"] is None, name
    assert {"runtime_fp32_cached", "pytorch_eager_cached", "onnx_fp32_uncached", "pytorch_eager_uncached"} \
        <= set(text["engines"])
    assert {"runtime_fp32", "pytorch_eager"} <= set(text["time_to_first_token"])
    assert all(isinstance(v, float) for v in text["speedup"].values())
    assert isinstance(text["tokens_match_pytorch"], bool)

    overhead = report["overhead"]
    assert 0 <= overhead["fraction_outside_run_calls"] <= 1
    assert overhead["graph_seconds"] <= overhead["wall_seconds"]

    memory = report["memory"]
    for name in ("runtime_process_fp32", "pytorch_process"):
        assert memory[name]["status"] == "ok", memory[name]
        assert memory[name]["peak_rss_mb"] > 0 and memory[name]["load_s"] >= 0
    assert memory["runtime_process_fp32"]["torch_imported"] is False  # the runtime never imports torch
    assert isinstance(memory["rss_ratio_runtime_vs_pytorch"], float)

    ceiling = report["ceiling"]
    assert ceiling["flops_per_chunk"]["total"] > 0
    if ceiling["status"] == "ok":
        assert ceiling["gemm_flops_per_second"] > 0 and 0 < ceiling["fraction_of_gemm"]

    floors = report["floors"]
    if floors["status"] == "ok":
        for graph in ("av_autoregressor", "text_decoder"):
            entry = floors["graphs"][graph]
            assert entry["matmuls"] > 0 and entry["weight_bytes"] > 0 and entry["floor_ms"] > 0
            if entry["graph_ms"]:
                assert 0 < entry["floor_share_of_graph"]

    costs = report["costs"]
    assert {"tiny", "small", "base", "mirasol3b"} <= set(costs["presets"])
    for entry in costs["presets"].values():
        assert entry["fp16"]["chunk"]["io_device_bytes"] < entry["fp16"]["chunk"]["io_host_bytes"]
        assert all(est["int8"]["chunk_ms"] <= est["fp16"]["chunk_ms"] for est in entry["jetson_estimate"].values())
    assert set(costs["jetson_fit"]) == set(costs["presets"])

    cuda = report["cuda"]
    assert isinstance(cuda["available"], bool)
    if not cuda["available"]:
        assert cuda["note"] == NO_CUDA

    batched = report["batched"]
    if batched["status"] == "ok":
        assert {"1", "2", "4"} <= set(batched["streams"]) and batched["bundles"]
        for entry in batched["streams"].values():
            assert STAT_KEYS <= set(entry["alone"])
            for size, together in entry["together"].items():
                assert size in batched["bundles"] and together["speedup"] > 0 and together["runs_per_call"] >= 1
        assert set(batched["matmul_bound"]["speedup"]) == set(batched["streams"])
        assert batched["matmul_bound"]["speedup"]["1"] == 1.0
    if floors["status"] == "ok":
        for entry in floors["graphs"].values():
            assert str(report["meta"]["threads"]) in entry["by_threads"] and "1" in entry["by_threads"]
            assert all(0 < t["ratio"] for t in entry["by_threads"].values())
    cpu = report["meta"]["machine"]["cpu"]
    assert cpu["model"] and isinstance(cpu["vector_extensions"], list)

    assert len(report["targets"]) == 13
    for target in report["targets"]:
        assert TARGET_KEYS <= set(target)
        assert target["pass"] in (True, False, None)
        assert target["op"] in (">=", "<=")


@pytest.fixture(scope="module")
def quick_report(tiny_bundles: dict[str, Path]) -> dict:
    """A quick run on the session's tiny TTM bundle (no export of its own)."""
    return run_benchmark(bundle=tiny_bundles["ttm"], quick=True, repeats=3, chunks=4, flat_chunks=16,
                         new_tokens=8)


def test_quick_report_has_every_section(quick_report: dict) -> None:
    check_report(quick_report)
    assert quick_report["export"]["fp32"]["source"] == "given"
    assert quick_report["export"]["fp32"]["checks"] == "validated against PyTorch: 4 of 4 graphs passed"
    json.dumps(jsonable(quick_report), allow_nan=False)  # strict JSON


def test_markdown_shows_every_section_and_target(quick_report: dict) -> None:
    markdown = to_markdown(quick_report)
    assert "## Jetson memory" in markdown
    for heading in ("## Targets", "## Streaming", "## Flatness", "## Batched streams", "## Text", "## Overhead",
                    "## Memory", "## Ceiling", "## Floors", "## CUDA"):
        assert heading in markdown
    rows = [line for line in markdown.splitlines() if line.endswith(("| PASS |", "| FAIL |", "| n/a |"))]
    assert len(rows) == 13
    assert "CPU: " in markdown and "vector extensions" in markdown
    assert "| fp32 | ok | 0.0 | given; validated against PyTorch: 4 of 4 graphs passed |" in markdown


def test_cli_writes_json_and_markdown(tmp_path: Path, tiny_bundles: dict[str, Path], capsys) -> None:
    out_json, out_md = tmp_path / "bench.json", tmp_path / "bench.md"
    code = main(["--quick", "--bundle", str(tiny_bundles["transformer"]), "--repeats", "2", "--chunks", "2",
                 "--flat-chunks", "8", "--new-tokens", "4", "--quiet", "--json", str(out_json), "--markdown",
                 str(out_md)])
    out, err = capsys.readouterr()
    assert code == 0, err
    report = json.loads(out_json.read_text())
    check_report(report)
    assert out_md.read_text() in out and err == ""


def test_cli_refuses_preset_with_checkpoint(tmp_path: Path, capsys) -> None:
    assert main(["--preset", "tiny", "--checkpoint", str(tmp_path)]) == 2
    assert "mirasol-bench: error: give --preset or --checkpoint, not both" in capsys.readouterr().err


def test_runtime_child_imports_nothing_heavy() -> None:
    """The runtime's measuring child loads mirasol.export and mirasol.export.bench on its way: the packages and
    the child's own module import neither torch nor anything else of weight (its peak RSS is the runtime's)."""
    code = ("import sys, mirasol.export.bench.child_runtime; "
            "print([m for m in ('torch', 'numpy', 'onnx', 'onnxruntime', 'click') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout


def test_stats_ms() -> None:
    stats = stats_ms([0.001, 0.002, 0.003])
    assert stats["n"] == 3 and stats["median_ms"] == pytest.approx(2.0) and stats["min_ms"] == pytest.approx(1.0)
    assert stats_ms([])["median_ms"] is None


@pytest.mark.parametrize("combiner", ["ttm", "transformer"])
@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_chunk_flops_match_torch_flop_counter(preset: str, combiner: str) -> None:
    """The FLOPs counted from the config equal what torch's FlopCounterMode sees in one steady-state step."""
    from torch.utils.flop_counter import FlopCounterMode

    from mirasol.model import Mirasol

    config = get_preset(preset).replace(combiner=combiner)
    torch.manual_seed(0)
    model = Mirasol(config).eval()
    c = config
    video = torch.rand(1, c.frames_per_chunk, 3, c.image_size, c.image_size)
    audio = torch.randn(1, c.n_mels, c.audio_frames_per_chunk)
    past = [(torch.randn(1, c.av_heads, c.av_cache_len, c.av_head_dim),) * 2 for _ in range(c.av_layers)]
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=CPU_SDPA) as counter:
        latents, _ = model.combiner_step(video, audio, model.initial_memory(1))
        model.av_step(latents, past)
    assert chunk_step_flops(config)["total"] == counter.get_total_flops()


def test_cost_model_counts_what_the_graphs_hold_and_compute(tiny_bundles, tiny_models) -> None:
    """Weights a step reads (the initializers of its graphs) and the FLOPs of one token (torch's flop counter)."""
    import onnx
    from onnx import numpy_helper
    from torch.utils.flop_counter import FlopCounterMode

    from mirasol.runtime.bundle.manifest import Manifest

    model, path = tiny_models["ttm"], tiny_bundles["ttm"]
    costs = step_costs(model.config, 4, 4, past_tokens=32)
    manifest = Manifest.read(path)

    def initializer_bytes(step: str) -> int:
        return sum(numpy_helper.to_array(t).nbytes for g in manifest.steps[step].graphs
                   for t in onnx.load(str(path / manifest.graphs[g].file)).graph.initializer)

    for step, cost in (("push", costs["chunk"]), ("generate", costs["token"])):
        assert abs(initializer_bytes(step) - cost["weight_bytes"]) <= 0.01 * cost["weight_bytes"], step
    c = model.config
    cross = model.text_cross_kv(torch.randn(1, c.text_memory_len, c.d_model))
    past = [(torch.randn(1, c.text_heads, 32, c.text_head_dim),) * 2 for _ in range(c.text_layers)]
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=CPU_SDPA) as counter:
        model.text_step(torch.tensor([[5]]), torch.tensor([32]), cross, past)
    assert costs["token"]["flops"] == token_step_flops(c, 32)["total"] == counter.get_total_flops()


def test_jetson_memory_budget_adds_up() -> None:
    """mirasol3b on the 8 GB Orin Nano: fp16 weights do not fit; int8 and int4 do, int4 and an int8 KV cache leave
    room for more streams; every plan adds up to at most the module's memory."""
    from mirasol.export.bench.fit import fit_table
    from mirasol.model import PRESETS

    table = fit_table({"mirasol3b": PRESETS["mirasol3b"]}, {"nano": 8e9, "nx": 16e9})["mirasol3b"]
    nano = table["nano"]
    assert nano["fp16+kv-fp16"]["streams"] == 0 and not nano["fp16+kv-fp16"]["fits"]
    assert 1 <= nano["int8+kv-fp16"]["streams"] < nano["int8+kv-int8"]["streams"] < nano["int4+kv-int8"]["streams"]
    assert nano["int4+kv-fp16"]["weight_bytes"] < 0.55 * nano["int8+kv-fp16"]["weight_bytes"]
    window = nano["int8+kv-int8"]["state_bytes"]["av_kv_window"]
    assert nano["int8+kv-fp16"]["state_bytes"]["av_kv_window"] == 2 * window == 2 * 2 * 44 * 992 * 2048
    for device in table.values():
        for plan in device.values():
            fixed = plan["reserve_bytes"] + plan["weight_bytes"] + sum(plan["activation_bytes"].values())
            per_stream = plan["state_bytes_per_stream"]
            assert fixed + plan["streams"] * per_stream <= plan["memory_bytes"] < fixed + (plan["streams"] + 1) * \
                per_stream or plan["streams"] == 0


@pytest.mark.slow
def test_small_preset_benchmark(tmp_path: Path) -> None:
    """The reference run: `mirasol-bench --preset small --json out.json` in under 10 minutes on 2 cores."""
    out = tmp_path / "out.json"
    assert main(["--preset", "small", "--json", str(out), "--quiet"]) == 0
    report = json.loads(out.read_text())
    check_report(report)
    assert report["meta"]["wall_seconds"] < 600
    assert report["text"]["measured_tokens"] == 64


@pytest.mark.slow
def test_quick_preset_run_exports_its_own_bundle() -> None:
    """`mirasol-bench --quick` as a user runs it: tiny preset exported in the run, in under a minute."""
    report = run_benchmark(quick=True)
    check_report(report)
    assert report["export"]["fp32"]["source"] == "exported"
    assert report["export"]["fp32"]["checks"].startswith("validated against PyTorch")
    assert report["meta"]["wall_seconds"] < 60


@pytest.mark.slow
def test_checkpoint_run(tmp_path: Path) -> None:
    """--checkpoint: the bundles are exported from the checkpoint and the PyTorch baselines run its weights."""
    from mirasol.model import save_checkpoint

    from .conftest import make_model

    save_checkpoint(make_model("ttm"), tmp_path / "ckpt")
    report = run_benchmark(checkpoint=tmp_path / "ckpt", quick=True, repeats=2, chunks=2, flat_chunks=8,
                           new_tokens=4)
    check_report(report)
    assert report["meta"]["source"].startswith("checkpoint") and not report["meta"]["eos_logit_zeroed"]


def test_cpu_info_reads_model_and_vector_extensions(tmp_path: Path) -> None:
    from mirasol.export.bench.machine import cpu_info, describe

    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu sse4_2 avx avx2 fma avx512f "
                   "avx512_vnni\n\nprocessor\t: 1\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nBogoMIPS\t: 62.50\nFeatures\t: fp asimd asimddp i8mm bf16\n")
    assert cpu_info(x86)["model"] == "AMD EPYC 9R14"
    assert cpu_info(x86)["vector_extensions"] == ["sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_vnni"]
    assert cpu_info(arm)["vector_extensions"] == ["asimd", "asimddp", "i8mm", "bf16"]
    assert "vector extensions: avx2" not in describe(cpu_info(arm))
    assert cpu_info(tmp_path / "absent")["model"]  # no /proc/cpuinfo: the platform's name
