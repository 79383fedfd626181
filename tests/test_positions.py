"""Endless streams (issue 12): the AV autoregressor's output depends on the window's contents, never on how far
into the stream the window is.

A periodic input of period P, once the receptive field is full (layers * (W - 1) chunks with the Transformer
Combiner, which carries no memory), gives outputs that repeat with period P: thousands of chunks in, the same
window gives the av_context it gave near the start (an absolute float32 chunk position would have drifted by
then). A stream restored at chunk 10^9 or past 2^31 continues exactly like the one it was saved from at chunk 10.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from mirasol.runtime.bundle.reader import sha256_file
from mirasol.runtime.errors import BundleError
from mirasol.runtime.pipeline import STATE_FORMAT, STATE_VERSION, Pipeline

from .conftest import make_model, random_clip

PERIOD = 7  # chunks; coprime to tiny's window (3) and receptive field (4)
FAR_CHUNKS = 3000  # through the bundle
TORCH_CHUNKS = 1000  # through PyTorch eager steps (slower)
TOLERANCE = 1e-6
SHARPEN = 16.0  # AV query/key weights x16: attention sharp enough for a position error to show in av_context


@pytest.fixture(scope="module")
def sharp_model():
    """The tiny Transformer-Combiner model (no memory: only the AV window carries information) with sharp AV
    attention. Random init attends almost uniformly, which hides position errors: with the absolute float32
    chunk positions used before issue 12, the same window gave this model av_contexts 4.8e-6 apart at chunks 4
    and 998 and 4.0e-5 apart at chunks 4 and 2993 (7e-7 at most without sharpening); now they are equal."""
    model = make_model("transformer")
    with torch.no_grad():
        for block in model.av_autoregressor.blocks:
            block.self_attn.q_proj.weight.mul_(SHARPEN)
            block.self_attn.k_proj.weight.mul_(SHARPEN)
    return model


@pytest.fixture(scope="module")
def sharp_bundle(sharp_model, tmp_path_factory) -> Path:
    from mirasol.export.bundle import export_bundle

    path = tmp_path_factory.mktemp("positions") / "sharp"
    export_bundle(sharp_model, path, precision="fp32")
    return path


def receptive_field(config) -> int:
    """Chunks back an av_context depends on: each AV layer looks W - 1 chunks further back."""
    return config.av_layers * (config.av_window_chunks - 1)


def periodic_chunks(config) -> list[tuple[np.ndarray, np.ndarray]]:
    """PERIOD distinct chunks (video [F, 3, H, W], audio [n_mels, A]) to cycle through."""
    video, audio = random_clip(config, PERIOD, seed=3)
    f, a = config.frames_per_chunk, config.audio_frames_per_chunk
    return [(video[0, i * f:(i + 1) * f], audio[0, :, i * a:(i + 1) * a]) for i in range(PERIOD)]


def assert_periodic(contexts: list[np.ndarray], start: int) -> None:
    """contexts[t] == contexts[t + k * PERIOD] for every t >= start, within TOLERANCE."""
    first = contexts[start:start + PERIOD]
    worst = max(float(np.abs(contexts[t] - first[(t - start) % PERIOD]).max()) for t in range(start, len(contexts)))
    assert worst <= TOLERANCE, f"av_context of the same window differs by {worst:.3g} later in the stream"


def test_pytorch_steps_repeat_with_the_input_period(sharp_model) -> None:
    model = sharp_model
    c = model.config
    with torch.no_grad():
        latents = [model.combiner_step(torch.from_numpy(v[None]), torch.from_numpy(a[None]), None)[0]
                   for v, a in periodic_chunks(c)]
        past = model.av_autoregressor.empty_cache(1)
        contexts = []
        for t in range(TORCH_CHUNKS):
            context, past = model.av_step(latents[t % PERIOD], past)
            contexts.append(context.numpy())
    assert_periodic(contexts, receptive_field(c))


def test_bundle_stream_repeats_with_the_input_period(sharp_bundle, sharp_model) -> None:
    c = sharp_model.config
    stream = Pipeline.load(sharp_bundle).stream()
    chunks = periodic_chunks(c)
    contexts = [stream.push(*chunks[t % PERIOD]) for t in range(FAR_CHUNKS)]
    assert_periodic(contexts, receptive_field(c))
    assert stream.state["av_key_0"].shape[2] == c.av_cache_len and not stream.counters


def _rewritten(state: Path, out: Path, header: dict | None = None, arrays: dict | None = None) -> Path:
    """A copy of a saved stream state with some header fields and arrays replaced."""
    with np.load(state, allow_pickle=False) as data:
        content = {name: data[name] for name in data.files}
    new_header = {**json.loads(content.pop("header").tobytes()), **(header or {})}
    content.update(arrays or {})
    with open(out, "wb") as f:
        np.savez(f, header=np.frombuffer(json.dumps(new_header).encode(), dtype=np.uint8), **content)
    return out


@pytest.mark.parametrize("combiner", ["transformer", "ttm"])
def test_restored_stream_far_into_the_stream_continues_like_at_chunk_10(tiny_bundles, tiny_models, tmp_path,
                                                                         combiner) -> None:
    pipe = Pipeline.load(tiny_bundles[combiner])
    chunks = periodic_chunks(tiny_models[combiner].config)
    stream = pipe.stream()
    for t in range(10):
        stream.push(*chunks[t % PERIOD])
    saved = stream.save(tmp_path / "at10.npz")
    expected = [stream.push(*chunks[t % PERIOD]) for t in range(10, 20)]
    per_chunk = {c.name: c.step for c in pipe.bundle.manifest.counters if c.scope == "stream" and c.step}
    for far in (10**9, 2**31 + 10):
        at_far = _rewritten(saved, tmp_path / f"at{far}.npz", header={"chunks": far},
                            arrays={f"counter/{name}": np.array([far * step]) for name, step in per_chunk.items()})
        restored = pipe.restore(at_far)
        assert restored.chunks == far
        got = [restored.push(*chunks[t % PERIOD]) for t in range(10, 20)]
        assert restored.chunks == far + 10
        assert max(float(np.abs(g - e).max()) for g, e in zip(got, expected)) <= TOLERANCE
        assert restored.ask("what happened?", max_new_tokens=4) == stream.ask("what happened?", max_new_tokens=4)
        assert {k: v.shape for k, v in restored.state.items()} == {k: v.shape for k, v in stream.state.items()}


# ---------------------------------------------------------------------------------------------------------------
# Bundles written before issue 12 fed the AV graph an absolute chunk index from a stream counter. The wiring is
# data: the runtime still runs them, carries the counter, saves and restores it, and refuses a bad one.
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def counter_bundle(tiny_bundles, tmp_path_factory) -> Path:
    """The tiny bundle rewired the pre-issue-12 way: av_autoregressor takes `chunk_index` i64[batch] from a
    stream-scope counter (the graph here ignores it; the runtime's side is what is tested)."""
    path = tmp_path_factory.mktemp("counter") / "bundle"
    shutil.copytree(tiny_bundles["transformer"], path)
    graph_file = path / "av_autoregressor.onnx"
    graph = onnx.load(str(graph_file))
    graph.graph.input.insert(1, onnx.helper.make_tensor_value_info("chunk_index", onnx.TensorProto.INT64, ["batch"]))
    onnx.save(graph, str(graph_file))
    manifest = json.loads((path / "manifest.json").read_text())
    entry = manifest["graphs"]["av_autoregressor"]
    entry["inputs"].insert(1, {"name": "chunk_index", "dtype": "int64", "shape": ["batch"]})
    entry["sha256"] = sha256_file(graph_file)
    manifest["counters"].insert(0, {"name": "chunk_index", "graph": "av_autoregressor", "input": "chunk_index",
                                    "step": 1, "length_of": None, "scope": "stream"})
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def test_bundle_with_a_chunk_counter_still_runs(counter_bundle, tiny_bundles, tiny_models, tmp_path) -> None:
    pipe = Pipeline.load(counter_bundle)
    reference = Pipeline.load(tiny_bundles["transformer"]).stream()
    stream = pipe.stream()
    chunks = periodic_chunks(tiny_models["transformer"].config)
    for t in range(5):
        assert np.array_equal(stream.push(*chunks[t % PERIOD]), reference.push(*chunks[t % PERIOD]))
    assert stream.counters["chunk_index"].tolist() == [5]
    restored = pipe.restore(stream.save(tmp_path / "state.npz"))
    assert restored.counters["chunk_index"].tolist() == [5] and restored.chunks == 5


def test_bundle_with_a_chunk_counter_refuses_a_negative_one(counter_bundle, tiny_models, tmp_path) -> None:
    pipe = Pipeline.load(counter_bundle)
    stream = pipe.stream()
    stream.push(*periodic_chunks(tiny_models["transformer"].config)[0])
    bad = _rewritten(stream.save(tmp_path / "state.npz"), tmp_path / "bad.npz",
                     arrays={"counter/chunk_index": np.array([-5])})
    with pytest.raises(BundleError, match="counter/chunk_index holds negative values"):
        pipe.bundle.read_state(bad, STATE_FORMAT, STATE_VERSION)
    with pytest.raises(BundleError, match="state file"):
        pipe.restore(bad)
