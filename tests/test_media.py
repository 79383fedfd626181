"""Media decoding (runtime/media/video_files.py) and the numpy log-mel (runtime/media/spectrogram.py)."""
from __future__ import annotations

import json
import tracemalloc
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mirasol.model import clip_log_mel as torch_clip_log_mel
from mirasol.model import get_preset
from mirasol.model import log_mel as torch_log_mel
from mirasol.model.demo_task import COLOURS, PITCHES, DemoTask
from mirasol.runtime.media import spectrogram as features
from mirasol.runtime.errors import InputError
from mirasol.runtime.media.video_files import iter_chunks, load_clip
from mirasol.runtime.media.chunking import iter_live
from mirasol.runtime.media.frames import resize_frame

av = pytest.importorskip("av")

TINY = get_preset("tiny")
CONFIG = TINY.to_dict()  # what the runtime sees: the manifest's config dict


def write_video(path, frames: np.ndarray, fps: int, wave: np.ndarray | None = None, rate: int = 16000,
                video_codec: str = "h264", audio_codec: str = "pcm_s16le") -> None:
    """frames uint8 [T, H, W, 3]; wave float32 mono (None: no audio track)."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(video_codec, rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        if video_codec == "h264":
            stream.options = {"crf": "0"}
        audio = None
        if wave is not None:
            audio = container.add_stream(audio_codec, rate=rate)
            audio.layout = "mono"
        for i, picture in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
        if audio is not None:
            samples = np.round(np.clip(wave, -1, 1) * 32767).astype(np.int16)
            for start in range(0, samples.size, 1024):
                frame = av.AudioFrame.from_ndarray(samples[None, start:start + 1024], format="s16", layout="mono")
                frame.sample_rate, frame.pts, frame.time_base = rate, start, Fraction(1, rate)
                container.mux(audio.encode(frame))
            container.mux(audio.encode(None))


def silence_log_mel(num_chunks: int) -> np.ndarray:
    """The log-mel of silence in CONFIG's chunks: every value log(1e-6)."""
    params = features.audio_params(CONFIG)
    return np.full((params.n_mels, num_chunks * params.audio_frames_per_chunk), np.log(1e-6), dtype=np.float32)


def grey_frames(count: int, size: int = 32) -> np.ndarray:
    """Frame i is flat grey at level 8 * i + 4 (tells frames apart after decoding)."""
    levels = (8 * np.arange(count) + 4).astype(np.uint8)
    return np.broadcast_to(levels[:, None, None, None], (count, size, size, 3)).copy()


@pytest.fixture(scope="module")
def demo_file(tmp_path_factory):
    """A demo clip written as mp4 (H.264 + AAC, 64x64 at 8 fps, 22.05 kHz audio), and its spec."""
    task = DemoTask(TINY)
    clip = task.clip(seed=123, index=4)
    path = task.write(clip, tmp_path_factory.mktemp("media") / "clip.mp4")
    return task, clip, path


# ---------------------------------------------------------------- log-mel: numpy == torch
def tone_waves(config, chunks: int = 3) -> np.ndarray:
    """Tones with little noise (like the demo's audio): many mel bands far below the loudest one."""
    rng = np.random.default_rng(0)
    samples = chunks * config.samples_per_chunk
    t = np.arange(samples) / config.sample_rate
    return np.stack([
        0.5 * np.sin(2 * np.pi * 440 * t) + 0.003 * rng.standard_normal(samples),
        0.2 * np.sin(2 * np.pi * 3000 * t) * (t % 1 < 0.5),
        0.4 * np.sin(2 * np.pi * 330 * t + 1.0) + 0.3 * np.sin(2 * np.pi * 2350 * t),
    ]).astype(np.float32)


def float64_recipe(waves: np.ndarray, config) -> np.ndarray:
    """model/spectrogram.py's recipe step by step in torch, in float64 (the exact value of the recipe)."""
    c = config
    x = torch.from_numpy(waves).double().unflatten(-1, (-1, c.samples_per_chunk))
    frames = torch.nn.functional.pad(x, (0, c.n_fft - c.hop_length)).unfold(-1, c.n_fft, c.hop_length)
    window = 0.5 - 0.5 * torch.cos(2 * np.pi * torch.arange(c.n_fft, dtype=torch.float64) / c.n_fft)
    power = torch.fft.rfft(frames * window, dim=-1).abs() ** 2
    mel = torch.log(power @ torch.from_numpy(features.mel_filterbank(c.sample_rate, c.n_fft, c.n_mels).copy())
                    + 1e-6)  # [B, N, A, n_mels]
    return mel.permute(0, 3, 1, 2).flatten(2).float().numpy()


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_numpy_log_mel_equals_torch(preset):
    config = get_preset(preset)
    rng = np.random.default_rng(0)
    samples = 3 * config.samples_per_chunk
    t = np.arange(samples) / config.sample_rate
    waves = np.stack([
        0.3 * rng.standard_normal(samples),
        0.5 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(samples),
        np.zeros(samples),
    ]).astype(np.float32)
    expected = torch_clip_log_mel(torch.from_numpy(waves), config).numpy()
    got = features.clip_log_mel(waves, config.to_dict())
    assert got.shape == expected.shape == (3, config.n_mels, 3 * config.audio_frames_per_chunk)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    # one chunk, sizes as plain ints
    one = features.log_mel(waves[:, :config.samples_per_chunk], sample_rate=config.sample_rate,
                           n_fft=config.n_fft, hop_length=config.hop_length, n_mels=config.n_mels)
    np.testing.assert_allclose(one, torch_log_mel(torch.from_numpy(waves[:, :config.samples_per_chunk]),
                                                  config).numpy(), atol=1e-4, rtol=0)
    # the filterbanks agree
    from mirasol.model.spectrogram import mel_filterbank
    np.testing.assert_allclose(features.mel_filterbank(config.sample_rate, config.n_fft, config.n_mels),
                               mel_filterbank(config).numpy(), atol=1e-6)


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_numpy_log_mel_is_the_exact_recipe_on_tones(preset):
    config = get_preset(preset)
    waves = tone_waves(config)
    np.testing.assert_allclose(features.clip_log_mel(waves, config.to_dict()), float64_recipe(waves, config),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_numpy_log_mel_equals_torch_on_tones(preset):
    config = get_preset(preset)
    waves = tone_waves(config)
    expected = torch_clip_log_mel(torch.from_numpy(waves), config).numpy()
    np.testing.assert_allclose(features.clip_log_mel(waves, config.to_dict()), expected, atol=1e-4, rtol=0)


def test_filterbank_and_window_are_cached():
    a = features.mel_filterbank(16000, 400, 32)
    assert features.mel_filterbank(16000, 400, 32) is a
    assert features.hann_window(400) is features.hann_window(400)
    assert features.mel_filterbank(16000, 400, 64) is not a
    assert features.audio_params(CONFIG).audio_frames_per_chunk == TINY.audio_frames_per_chunk


# ---------------------------------------------------------------- decoding a real file
def test_decoded_shapes_and_chunks(demo_file):
    task, clip, path = demo_file
    chunks = list(iter_chunks(path, CONFIG))
    assert len(chunks) == task.num_chunks == 4
    for video, audio in chunks:
        assert video.shape == (TINY.frames_per_chunk, 3, TINY.image_size, TINY.image_size)
        assert audio.shape == (TINY.n_mels, TINY.audio_frames_per_chunk)
        assert video.dtype == np.float32 and audio.dtype == np.float32
        assert 0.0 <= video.min() and video.max() <= 1.0
    video, audio = load_clip(path, CONFIG)
    assert video.shape == (16, 3, 32, 32) and audio.shape == (32, 400)
    np.testing.assert_array_equal(video, np.concatenate([v for v, _ in chunks]))
    np.testing.assert_array_equal(audio, np.concatenate([a for _, a in chunks], axis=1))
    first_two = load_clip(path, CONFIG, max_chunks=2)
    np.testing.assert_array_equal(first_two[0], video[:8])


def test_decoded_content_matches_what_was_drawn(demo_file):
    task, clip, path = demo_file
    video, audio = load_clip(path, CONFIG)
    rendered = task.render_video(clip)  # 8 fps: model frame k (4 fps) is rendered frame 2k
    expected = np.stack([resize_frame(rendered[2 * k], TINY.image_size) for k in range(16)])
    assert np.abs(video - expected).mean() < 0.01  # codec error only
    # a wrong frame alignment would be visibly further off
    shifted = np.stack([resize_frame(rendered[min(2 * k + 1, 31)], TINY.image_size) for k in range(16)])
    assert np.abs(video - expected).mean() < np.abs(video - shifted).mean()
    background = np.array(clip.background) / 255
    names = list(COLOURS)
    palette = np.array([COLOURS[n] for n in names]) / 255
    filterbank = features.mel_filterbank(TINY.sample_rate, TINY.n_fft, TINY.n_mels)
    for chunk, event in enumerate(clip.events):
        for frame in video[chunk * 4:(chunk + 1) * 4]:
            pixels = frame.reshape(3, -1).T
            shape_pixels = pixels[np.abs(pixels - background).sum(axis=1) > 0.3]
            assert len(shape_pixels) > 25
            dominant = names[int(np.argmin(np.abs(palette - shape_pixels.mean(axis=0)).sum(axis=1)))]
            assert dominant == event.colour
        # the loudest mel band in the middle of the chunk is the one the tone's frequency falls in
        frames = audio[:, chunk * 100 + 20:chunk * 100 + 80]
        tone_bin = int(round(PITCHES[event.pitch] * TINY.n_fft / TINY.sample_rate))
        assert int(frames.mean(axis=1).argmax()) == int(filterbank[tone_bin].argmax())


@pytest.mark.parametrize("container,video_codec,audio_codec,rate", [
    ("mkv", "h264", "pcm_s16le", 16000),
    ("webm", "libvpx-vp9", "libopus", 48000),
    ("avi", "mpeg4", "pcm_s16le", 22050),
])
def test_other_containers(tmp_path, container, video_codec, audio_codec, rate):
    if any(name not in av.codecs_available for name in (video_codec, audio_codec)):
        pytest.skip(f"{video_codec} / {audio_codec} not in this PyAV")
    task = DemoTask(TINY, num_chunks=2, container=container, video_codec=video_codec,
                    audio_codec=audio_codec, audio_rate=rate)
    clip = task.make_clip(seed=5, index=0)
    assert clip.video.shape == (8, 3, 32, 32) and clip.audio.shape == (32, 200)
    reference = DemoTask(TINY, num_chunks=2).make_clip(seed=5, index=0)  # the mp4 of the same clip
    assert np.abs(clip.video - reference.video).mean() < 0.03
    loud = reference.audio > 0  # the tones' bands: every codec keeps them
    assert np.abs(clip.audio - reference.audio)[loud].mean() < 0.1


def test_frame_sampling_from_a_faster_file(tmp_path):
    path = tmp_path / "grey.mkv"
    # 12 fps for 2.5 s: model frame k (4 fps) is source frame 3k; the half chunk at the end is dropped
    write_video(path, grey_frames(30), fps=12, wave=np.zeros(40000, np.float32))
    video, audio = load_clip(path, CONFIG)
    assert video.shape[0] == 8 and audio.shape[1] == 200
    levels = np.round(video[:, 0, 16, 16] * 255)
    np.testing.assert_allclose(levels, 8 * 3 * np.arange(8) + 4, atol=2)


def test_frame_sampling_from_a_slower_file(tmp_path):
    path = tmp_path / "slow.mkv"
    write_video(path, grey_frames(4), fps=2, wave=np.zeros(32000, np.float32))  # 2 s at 2 fps
    video, _ = load_clip(path, CONFIG)
    levels = np.round(video[:, 0, 16, 16] * 255)
    np.testing.assert_allclose(levels, 8 * (np.arange(8) // 2) + 4, atol=2)  # each shown twice


def test_no_audio_track_gives_silence_and_a_warning(tmp_path):
    path = tmp_path / "silent.mp4"
    write_video(path, grey_frames(8), fps=4)  # 2 s, no audio stream
    with pytest.warns(UserWarning, match="no audio track"):
        video, audio = load_clip(path, CONFIG)
    assert video.shape == (8, 3, 32, 32)
    np.testing.assert_array_equal(audio, silence_log_mel(2))
    np.testing.assert_allclose(audio, np.log(1e-6), rtol=1e-6)


def test_short_clip_is_padded_with_a_warning(tmp_path):
    path = tmp_path / "short.mkv"
    t = np.arange(8000) / 16000
    write_video(path, grey_frames(2), fps=4, wave=(0.5 * np.sin(2 * np.pi * 880 * t)).astype(np.float32))
    with pytest.warns(UserWarning, match="shorter than one chunk"):
        chunks = list(iter_chunks(path, CONFIG))
    assert len(chunks) == 1
    video, audio = chunks[0]
    np.testing.assert_array_equal(video[2], video[1])
    np.testing.assert_array_equal(video[3], video[1])
    assert not np.array_equal(video[0], video[1])
    assert audio[:, 10:40].max() > 0  # the tone in the first half second
    np.testing.assert_allclose(audio[:, 55:], np.log(1e-6), rtol=1e-5)  # zeros after it


@pytest.mark.parametrize("content", ["missing", "empty", "garbage", "truncated", "directory"])
def test_unreadable_files_raise_input_error(tmp_path, demo_file, content):
    path = tmp_path / "bad.mp4"
    if content == "empty":
        path.write_bytes(b"")
    elif content == "garbage":
        path.write_bytes(np.random.default_rng(0).bytes(20000))
    elif content == "truncated":
        path.write_bytes(demo_file[2].read_bytes()[:3000])
    elif content == "directory":
        path.mkdir()
    with pytest.raises(InputError, match="bad.mp4"):
        load_clip(path, CONFIG)


LONG_SECONDS = 120
LONG_CLIP_BYTES = LONG_SECONDS * (4 * 3 * 32 * 32 * 4 + 32 * 100 * 4 + 16000 * 4)  # decoded, and its waveform


def write_noise_video(path: Path, seconds: int) -> Path:
    """`seconds` of 16x16 video at 4 fps with noise for audio."""
    frames = np.zeros((seconds * 4, 16, 16, 3), np.uint8)
    frames[:, :, :, 0] = (np.arange(seconds * 4) % 200)[:, None, None]
    rng = np.random.default_rng(0)
    write_video(path, frames, fps=4, wave=(0.1 * rng.standard_normal(seconds * 16000)).astype(np.float32))
    return path


@pytest.fixture(scope="module")
def long_file(tmp_path_factory) -> Path:
    return write_noise_video(tmp_path_factory.mktemp("long") / "long.mkv", LONG_SECONDS)


def traced_peak(work: Callable[[], Any]) -> tuple[Any, int]:
    """work()'s result and the peak of Python and numpy allocations while it ran."""
    tracemalloc.start()
    try:
        result = work()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_streaming_keeps_memory_bounded(long_file):
    """Decoding holds a chunk at a time, not the file."""
    count, peak = traced_peak(lambda: sum(1 for _ in iter_chunks(long_file, CONFIG)))
    assert count == LONG_SECONDS
    assert peak < LONG_CLIP_BYTES / 5, (peak, LONG_CLIP_BYTES)


def test_run_video_streams_chunks_from_the_decoder(long_file, tiny_bundle, tmp_path, capsys, monkeypatch):
    """mirasol-run --video pushes each chunk as it is decoded: after the bundle is loaded, its memory is the same
    for 10 s and for 120 s of video."""
    from mirasol.runtime.cli import run as cli

    load = cli.Pipeline.load

    def load_then_reset_peak(*args: Any, **kwargs: Any) -> Any:
        pipeline = load(*args, **kwargs)
        tracemalloc.reset_peak()  # what loading the bundle costs is not the clip's
        return pipeline

    monkeypatch.setattr(cli.Pipeline, "load", load_then_reset_peak)

    def run(path: Path, seconds: int) -> int:
        code, peak = traced_peak(lambda: cli.main([str(tiny_bundle), "--video", str(path), "--question", "what?",
                                                   "--max-new-tokens", "2", "--json"]))
        assert code == 0 and json.loads(capsys.readouterr().out)["chunks"] == seconds
        return peak

    short = run(write_noise_video(tmp_path / "short.mkv", 10), 10)
    long = run(long_file, LONG_SECONDS)
    assert long - short < LONG_CLIP_BYTES / 10, (short, long, LONG_CLIP_BYTES)


# ---------------------------------------------------------------- live sources
def test_iter_live_matches_the_recipe():
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, (9, 48, 40, 3), dtype=np.uint8)  # 2.25 s at 4 fps, not square
    wave = (0.2 * rng.standard_normal(9 * 4000)).astype(np.float32)
    pieces = [wave[i * 4000:(i + 1) * 4000] for i in range(9)]
    chunks = list(iter_live(zip(frames, pieces), CONFIG))
    assert len(chunks) == 2  # the ninth frame is a partial chunk
    for n, (video, audio) in enumerate(chunks):
        expected_video = np.stack([resize_frame(f, 32) for f in frames[4 * n:4 * n + 4]])
        np.testing.assert_array_equal(video, expected_video)
        np.testing.assert_array_equal(audio, features.log_mel(wave[16000 * n:16000 * (n + 1)], CONFIG))
    # stereo pieces are averaged; frames without audio are silence
    stereo = [np.stack([p, p]) for p in pieces[:4]]
    np.testing.assert_allclose(next(iter_live(zip(frames[:4], stereo), CONFIG))[1], chunks[0][1], atol=1e-5)
    silent = next(iter_live(((f, None) for f in frames[:4]), CONFIG))[1]
    np.testing.assert_array_equal(silent, silence_log_mel(1))


def test_resize_frame_area_filter():
    frame = np.zeros((64, 64, 3), np.uint8)
    frame[:32, :, 0] = 255  # top half red
    out = resize_frame(frame, 32)
    assert out.shape == (3, 32, 32)
    np.testing.assert_allclose(out[0, :16], 1.0)
    np.testing.assert_allclose(out[0, 16:], 0.0)
    checker = (np.indices((64, 64)).sum(axis=0) % 2 * 255).astype(np.uint8)
    np.testing.assert_allclose(resize_frame(np.repeat(checker[..., None], 3, axis=2), 32), 0.5, atol=1e-6)
