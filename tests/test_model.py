"""The PyTorch reference model: presets, streaming = whole clip, training, checkpoints."""
from __future__ import annotations

import json

import pytest
import torch

from mirasol.model import (PRESETS, Mirasol, MirasolConfig, count_parameters, get_preset, load_checkpoint,
                           save_checkpoint)
from mirasol.runtime.bundle.tokenizer import ByteTokenizer

from .conftest import make_model, random_clip, run_export_cli


def step_through(model: Mirasol, video: torch.Tensor, audio: torch.Tensor) -> tuple[list[torch.Tensor], list]:
    """Chunk by chunk with explicit carried state, the caches trimmed to the window as the runtime does."""
    c = model.config
    memory = model.initial_memory(video.shape[0])
    past = model.av_autoregressor.empty_cache(video.shape[0])
    contexts, memories = [], []
    f, a = c.frames_per_chunk, c.audio_frames_per_chunk
    for t in range(video.shape[1] // f):
        latents, memory = model.combiner_step(video[:, t * f:(t + 1) * f], audio[:, :, t * a:(t + 1) * a], memory)
        context, past = model.av_step(latents, past)  # present: already the next step's window
        contexts.append(context)
        memories.append(memory)
    return contexts, memories


def test_config_json_round_trip_and_validation() -> None:
    for config in PRESETS.values():
        assert MirasolConfig.from_json(config.to_json()) == config
    with pytest.raises(ValueError, match="combiner"):
        get_preset("tiny").replace(combiner="lstm")
    with pytest.raises(ValueError, match="unknown MirasolConfig keys"):
        MirasolConfig.from_dict({"d_model": 8, "colour": 1})


def test_tiny_shapes() -> None:
    model = make_model("ttm")
    c = model.config
    video, audio = (torch.from_numpy(x) for x in random_clip(c, chunks=3, batch=2))
    context, logits = model(video, audio, torch.randint(0, 256, (2, 5)))
    assert context.shape == (2, 3, c.latents_per_chunk, c.d_model)
    assert logits.shape == (2, 5, c.vocab_size)


def test_preset_sizes_on_meta_device() -> None:
    counts = {}
    for name, config in PRESETS.items():
        with torch.device("meta"):
            counts[name] = count_parameters(Mirasol(config))
    big = counts["mirasol3b"]
    assert abs(big["total"] - 3.0e9) <= 0.05 * 3.0e9, big
    assert big["av_autoregressor"] > big["total"] / 2
    assert counts["tiny"]["total"] < counts["small"]["total"] < counts["base"]["total"] < big["total"]
    assert PRESETS["mirasol3b"].num_frames == 128
    with torch.device("meta"):
        long_clip = count_parameters(Mirasol(PRESETS["mirasol3b"].replace(num_frames=512)))
    assert long_clip == big  # 512 frames need no new parameters


@pytest.mark.parametrize("combiner", ["transformer", "ttm"])
@pytest.mark.parametrize("chunks", [1, 2, 3, 8])  # tiny's window is 3 chunks
def test_streaming_steps_equal_whole_clip(combiner: str, chunks: int) -> None:
    model = make_model(combiner)
    assert model.config.av_window_chunks == 3
    video, audio = (torch.from_numpy(x) for x in random_clip(model.config, chunks, batch=2))
    with torch.no_grad():
        whole, _ = model(video, audio, torch.zeros(2, 1, dtype=torch.long))
        contexts, _ = step_through(model, video, audio)
    for t, context in enumerate(contexts):
        assert (context - whole[:, t]).abs().max() <= 1e-5, f"chunk {t}"


def test_window_bounds_what_a_chunk_depends_on() -> None:
    """Each AV layer looks W-1 chunks back, so chunk 0 reaches exactly layers*(W-1) chunks ahead, no further."""
    model = make_model("transformer")  # no TTM memory: the AV window alone carries information across chunks
    reach = model.config.av_layers * (model.config.av_window_chunks - 1)
    video, audio = (torch.from_numpy(x) for x in random_clip(model.config, reach + 2))
    changed = video.clone()
    changed[:, : model.config.frames_per_chunk] = 0
    with torch.no_grad():
        a, _ = model(video, audio, torch.zeros(1, 1, dtype=torch.long))
        b, _ = model(changed, audio, torch.zeros(1, 1, dtype=torch.long))
    assert (a[:, reach] - b[:, reach]).abs().max() > 1e-6
    assert (a[:, reach + 1] - b[:, reach + 1]).abs().max() == 0


def test_ttm_memory_changes_every_chunk() -> None:
    model = make_model("ttm")
    video, audio = (torch.from_numpy(x) for x in random_clip(model.config, 4))
    with torch.no_grad():
        _, memories = step_through(model, video, audio)
    previous = model.initial_memory(1)
    assert previous.abs().max() == 0
    for memory in memories:
        assert (memory - previous).abs().max() > 1e-3
        previous = memory


def test_eval_mode_is_deterministic() -> None:
    model = make_model("ttm")
    video, audio = (torch.from_numpy(x) for x in random_clip(model.config, 2))
    ids = torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        first = model(video, audio, ids)
        second = model(video, audio, ids)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_cached_generation_equals_uncached_logits() -> None:
    model = make_model("transformer")
    video, audio = (torch.from_numpy(x) for x in random_clip(model.config, 2))
    prompt = ByteTokenizer().prompt("what happened?")
    with torch.no_grad():
        context, _ = model(video, audio, torch.zeros(1, 1, dtype=torch.long))
        answer = model.generate(context, prompt, 8)
        _, logits = model(video, audio, torch.tensor([prompt + answer]))
    full = logits[0, len(prompt) - 1:].argmax(-1).tolist()
    assert answer == full[: len(answer)]


def test_training_steps_lower_the_loss() -> None:
    model = make_model("ttm").train()
    video, audio = (torch.from_numpy(x) for x in random_clip(model.config, 3, batch=2))
    ids = torch.randint(0, 256, (2, 8))
    targets = torch.roll(ids, -1, dims=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        loss = model.loss(video, audio, ids, targets)
        optimizer.zero_grad()
        loss["loss"].backward()
        optimizer.step()
        losses.append(loss["loss"].item())
        assert loss["latent"].item() > 0
    assert losses[-1] < 0.8 * losses[0], losses


def test_checkpoint_round_trip(tmp_path) -> None:
    model = make_model("ttm")
    save_checkpoint(model, tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["combiner"] == "ttm"
    loaded = load_checkpoint(tmp_path / "ckpt")
    video, audio = (torch.from_numpy(x) for x in random_clip(model.config, 2))
    ids = torch.randint(0, 256, (1, 4))
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model(video, audio, ids), loaded(video, audio, ids)))
    assert loaded.text_decoder.lm_head.weight is loaded.text_decoder.embed.weight


def test_parameter_count_command() -> None:
    result = run_export_cli(["--preset", "mirasol3b", "--params-only"])
    assert result.exit_code == 0, result.output
    assert "av_autoregressor" in result.output and "total 30" in result.output


def test_combiner_override_of_a_preset() -> None:
    assert get_preset("small", "transformer").combiner == "transformer" and get_preset("small").combiner == "ttm"
    counts = {}
    for combiner in ("transformer", "ttm"):
        result = run_export_cli(["--preset", "tiny", "--combiner", combiner, "--params-only"])
        assert result.exit_code == 0, result.output
        counts[combiner] = result.output.split("combiner ")[1].split(",")[0]
    assert counts["transformer"] != counts["ttm"]
    result = run_export_cli(["--checkpoint", ".", "--combiner", "ttm"])
    assert result.exit_code == 2 and "--combiner changes a --preset" in result.output
