"""Calibration clips: where the activations int8 ranges are measured on come from.

Three sources, one shape of result (`ClipSet`: calibration clips + held-out clips, never the same ones):
- a directory of `.npz` chunk files, each `video` [N*F, 3, H, W] float32 in [0, 1] and `audio` log-mel
  [n_mels, N*A] (what `mirasol-run --chunks` reads);
- a directory of media files (mp4, mkv, webm, avi, mov, ...) decoded with `mirasol.runtime.media.video_files.load_clip`
  (imported lazily: without it, or without PyAV, media files are skipped with a message, and a directory
  of nothing but media files is an error);
- `synthetic`: generated clips, labelled as such in the accuracy report. The demo task's clips
  (`mirasol.model.demo_task`, rendered and round-tripped through a real codec, with questions) when it is
  importable, else smooth random noise.

A directory's files are shuffled with a fixed seed, then split: the held-out clips (for the accuracy report)
are never calibrated on. Clips are loaded lazily, one at a time, so a directory of long clips is never held
whole; `digest` identifies the calibration data (file contents or generator parameters) without decoding.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mirasol.runtime.errors import ExportError, InputError
from mirasol.runtime.media.spectrogram import config_value

SYNTHETIC = "synthetic"
NPZ_SUFFIXES = (".npz",)
MEDIA_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".ts", ".flv", ".ogv")
# questions asked of clips that bring none (npz / media files): the demo task's kinds, which any AV model
# of this family is asked; their answers only matter as the decoder inputs they produce
GENERIC_QUESTIONS = ("which colour appeared first?", "what did you hear first?", "what shape was the red one?",
                     "which colour came after the red one?", "what is happening in the video?")
SPLIT_SEED = 20240


@dataclass
class Clip:
    """One clip, loaded on demand: video [N*F, 3, H, W] float32, audio log-mel [n_mels, N*A] float32."""

    name: str
    loader: Callable[[], tuple[np.ndarray, np.ndarray]] = field(repr=False)
    questions: tuple[str, ...] = ()

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        return self.loader()


@dataclass
class ClipSet:
    source: str  # "synthetic", or the directory
    kind: str  # "synthetic" or "real"
    generator: str  # how the clips were made / read: "demo_task", "smooth_noise", "npz", "media", "npz+media"
    calibration: list[Clip]
    held_out: list[Clip]
    digest: str  # identifies the calibration clips (file contents or generator parameters)
    notes: list[str] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "kind": self.kind, "generator": self.generator,
                "calibration_clips": [c.name for c in self.calibration],
                "held_out_clips": [c.name for c in self.held_out], "digest": self.digest, "notes": self.notes}


def chunk_count(config: Any) -> int:
    """Chunks per clip by default: the config's clip length (past the AV window on every preset)."""
    frames = int(config_value(config, "num_frames")) // int(config_value(config, "frames_per_chunk"))
    return max(frames, 1)


def load_clips(source: str | Path, config: Any, clips: int = 16, held_out: int = 4, max_chunks: int | None = None,
               seed: int = 0, log: Callable[[str], None] = lambda _: None) -> ClipSet:
    """Calibration and held-out clips from `source` ("synthetic" or a directory), for a model config.

    clips: calibration clips (at most); held_out: clips kept for the accuracy report (at most; a directory
    of n files holds out min(held_out, max(1, n // 4)) of them); max_chunks: chunks kept per clip
    (default: the config's clip length).
    """
    if clips < 1 or held_out < 1:
        raise ExportError(f"calibration needs at least 1 calibration clip and 1 held-out clip, got clips={clips}, "
                          f"held_out={held_out}")
    max_chunks = max_chunks or chunk_count(config)
    if str(source) == SYNTHETIC:
        return _synthetic(config, clips, held_out, max_chunks, seed, log)
    return _directory(Path(source), config, clips, held_out, max_chunks, seed, log)


# ---------------------------------------------------------------- directories
def _directory(directory: Path, config: Any, clips: int, held_out: int, max_chunks: int, seed: int,
               log: Callable[[str], None]) -> ClipSet:
    if not directory.exists():
        raise ExportError(f"calibration data {directory} does not exist (give a directory of .npz chunk files or "
                          f"media files, or 'synthetic')")
    if not directory.is_dir():
        raise ExportError(f"calibration data {directory} is not a directory (give a directory of .npz chunk files "
                          f"or media files, or 'synthetic')")
    files = sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith("."))
    npz = [p for p in files if p.suffix.lower() in NPZ_SUFFIXES]
    media = [p for p in files if p.suffix.lower() in MEDIA_SUFFIXES]
    notes: list[str] = []
    if not npz and not media:
        raise ExportError(
            f"calibration directory {directory} is empty: it holds no .npz chunk files and no media files "
            f"({', '.join(MEDIA_SUFFIXES[:5])}, ...)" + (f"; found {len(files)} other files" if files else "")
            + ". Put real clips there, or calibrate on --calibration-data synthetic")
    load_media = _media_loader()
    if media and load_media is None:
        message = (f"{len(media)} media files in {directory} skipped: media decoding "
                   f"(mirasol.runtime.media.video_files with PyAV) is not available here")
        if not npz:
            raise ExportError(message + "; convert them to .npz chunk files or install the media extra")
        notes.append(message)
        log(f"calibration: {message}")
        media = []
    usable = npz + media
    if len(usable) < 2:
        raise ExportError(f"calibration directory {directory} holds {len(usable)} usable clip; at least 2 are "
                          f"needed (calibration clips and, apart from them, held-out clips for the accuracy report)")
    order = np.random.default_rng([SPLIT_SEED, seed]).permutation(len(usable))
    shuffled = [usable[i] for i in order]
    held = min(held_out, max(1, len(shuffled) // 4))
    calibration_files = shuffled[:min(clips, len(shuffled) - held)]
    held_files = shuffled[len(shuffled) - held:]

    def clip(path: Path) -> Clip:
        if path.suffix.lower() in NPZ_SUFFIXES:
            return Clip(path.name, lambda: _read_npz(path, config, max_chunks), GENERIC_QUESTIONS[:3])
        return Clip(path.name, lambda: _read_media(load_media, path, config, max_chunks), GENERIC_QUESTIONS[:3])

    digest = hashlib.sha256()
    digest.update(json.dumps({"max_chunks": max_chunks, "questions": GENERIC_QUESTIONS[:3]}).encode())
    for path in calibration_files:
        digest.update(path.name.encode() + b"\0" + _file_digest(path).encode())
    generator = "+".join(kind for kind, present in (("npz", npz), ("media", media)) if present)
    return ClipSet(source=str(directory), kind="real", generator=generator,
                   calibration=[clip(p) for p in calibration_files], held_out=[clip(p) for p in held_files],
                   digest=digest.hexdigest(), notes=notes)


def _file_digest(path: Path) -> str:
    from mirasol.runtime.bundle.reader import sha256_file
    return sha256_file(path)


def _media_loader() -> Callable[..., tuple[np.ndarray, np.ndarray]] | None:
    """`mirasol.runtime.media.video_files.load_clip` when it and PyAV are importable, else None."""
    try:
        from mirasol.runtime.media.video_files import load_clip
        from mirasol.runtime.media import video_files as media
        getattr(media, "_import_av", lambda: None)()
    except ImportError:
        return None
    return load_clip


def _check_clip(video: np.ndarray, audio: np.ndarray, config: Any, where: str, max_chunks: int
                ) -> tuple[np.ndarray, np.ndarray]:
    frames = int(config_value(config, "frames_per_chunk"))
    size = int(config_value(config, "image_size"))
    n_mels = int(config_value(config, "n_mels"))
    mel_frames = _mel_frames_per_chunk(config)
    video = np.asarray(video)
    audio = np.asarray(audio)
    if video.ndim != 4 or video.shape[1:] != (3, size, size):
        raise ExportError(f"{where}: 'video' must be [N*{frames}, 3, {size}, {size}], got {video.shape}")
    if audio.ndim != 2 or audio.shape[0] != n_mels:
        raise ExportError(f"{where}: 'audio' must be log-mel [{n_mels}, N*{mel_frames}], got {audio.shape}")
    chunks = video.shape[0] // frames
    if chunks == 0 or video.shape[0] % frames or audio.shape[1] != chunks * mel_frames:
        raise ExportError(f"{where}: video of {video.shape[0]} frames and audio of {audio.shape[1]} mel frames do "
                          f"not form the same whole number of chunks ({frames} frames, {mel_frames} mel frames each)")
    chunks = min(chunks, max_chunks)
    video = np.ascontiguousarray(video[:chunks * frames], dtype=np.float32)
    audio = np.ascontiguousarray(audio[:, :chunks * mel_frames], dtype=np.float32)
    if not (np.isfinite(video).all() and np.isfinite(audio).all()):
        raise ExportError(f"{where}: contains NaN or inf")
    return video, audio


def _mel_frames_per_chunk(config: Any) -> int:
    from mirasol.runtime.media.spectrogram import audio_params
    return audio_params(config).audio_frames_per_chunk


def _read_npz(path: Path, config: Any, max_chunks: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            video, audio = data["video"], data["audio"]
    except (KeyError, ValueError, OSError) as bad:
        raise ExportError(f"calibration file {path}: expected an .npz with arrays 'video' [N*F, 3, H, W] and "
                          f"'audio' [n_mels, N*A] ({bad})") from None
    return _check_clip(video, audio, config, f"calibration file {path}", max_chunks)


def _read_media(load_clip: Callable[..., tuple[np.ndarray, np.ndarray]] | None, path: Path, config: Any,
                max_chunks: int) -> tuple[np.ndarray, np.ndarray]:
    assert load_clip is not None
    try:
        video, audio = load_clip(path, _as_mapping(config), max_chunks=max_chunks)
    except InputError as bad:
        raise ExportError(f"calibration media file {path}: {bad}") from None
    return _check_clip(video, audio, config, f"calibration media file {path}", max_chunks)


def _as_mapping(config: Any) -> Mapping[str, Any] | Any:
    return config.to_dict() if hasattr(config, "to_dict") else config


# ---------------------------------------------------------------- synthetic
SYNTHETIC_SEED = 7_000_000  # far from the seeds the demo task trains and evaluates on


def _synthetic(config: Any, clips: int, held_out: int, max_chunks: int, seed: int,
               log: Callable[[str], None]) -> ClipSet:
    task = _demo_task(config, max_chunks)
    data_seed = SYNTHETIC_SEED + seed
    if task is not None:
        def demo(index: int) -> Clip:
            questions = tuple(qa.question for qa in task.clip(data_seed, index).questions[:3])

            def load() -> tuple[np.ndarray, np.ndarray]:
                made = task.make_clip(data_seed, index)
                return _check_clip(made.video, made.audio, config, f"demo clip {index}", max_chunks)
            return Clip(f"demo-{data_seed}-{index}", load, questions)
        make, generator, params = demo, "demo_task", task.describe()
    else:
        def noise(index: int) -> Clip:
            return Clip(f"noise-{data_seed}-{index}", lambda: smooth_noise_clip(config, max_chunks, data_seed, index),
                        GENERIC_QUESTIONS[:3])
        make, generator, params = noise, "smooth_noise", {}
        log("calibration: model.demo_task is not available; synthetic clips are smooth random noise")
    digest = hashlib.sha256(json.dumps(
        {"generator": generator, "params": params, "config": _as_mapping(config), "seed": data_seed,
         "clips": clips, "max_chunks": max_chunks}, sort_keys=True, default=str).encode()).hexdigest()
    return ClipSet(source=SYNTHETIC, kind="synthetic", generator=generator,
                   calibration=[make(i) for i in range(clips)],
                   held_out=[make(clips + i) for i in range(held_out)], digest=digest,
                   notes=["synthetic clips: the accuracy figures describe these clips, not real media"])


def _demo_task(config: Any, chunks: int) -> Any | None:
    try:
        from mirasol.model.demo_task import DemoTask
        import av  # noqa: F401  (the demo task writes real files with PyAV)
    except ImportError:
        return None
    return DemoTask(_as_mapping(config), num_chunks=chunks)


def smooth_noise_clip(config: Any, chunks: int, seed: int, index: int) -> tuple[np.ndarray, np.ndarray]:
    """A clip of smooth random noise: video = bilinearly upsampled coarse noise drifting over time, in [0, 1];
    audio = a smooth random log-mel surface around the log-mel level of quiet audio."""
    rng = np.random.default_rng([seed, index])
    frames = chunks * int(config_value(config, "frames_per_chunk"))
    size = int(config_value(config, "image_size"))
    n_mels = int(config_value(config, "n_mels"))
    mel_frames = chunks * _mel_frames_per_chunk(config)
    coarse = rng.random((2, 3, 5, 5))
    weights = np.linspace(0.0, 1.0, frames)[:, None, None, None]
    grid = (1 - weights) * coarse[0] + weights * coarse[1]  # [frames, 3, 5, 5]
    video = _upsample(grid, size).astype(np.float32)
    base = rng.normal(-6.0, 2.0, (n_mels // 4 + 1, mel_frames // 8 + 1))
    audio = _upsample(base[None, None], max(n_mels, mel_frames))[0, 0][:n_mels, :mel_frames]
    return np.clip(video, 0.0, 1.0), (audio + rng.normal(0, 0.3, audio.shape)).astype(np.float32)


def _upsample(grid: np.ndarray, size: int) -> np.ndarray:
    """Bilinear upsampling of the last two axes to [size, size]."""
    h, w = grid.shape[-2:]
    ys, xs = np.linspace(0, h - 1, size), np.linspace(0, w - 1, size)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    top = grid[..., y0, :][..., :, x0] * (1 - fx) + grid[..., y0, :][..., :, x1] * fx
    bottom = grid[..., y1, :][..., :, x0] * (1 - fx) + grid[..., y1, :][..., :, x1] * fx
    return top * (1 - fy) + bottom * fy


def iter_loaded(clips: list[Clip], desc: str, bar: bool | None = None) -> Iterator[tuple[Clip, np.ndarray, np.ndarray]]:
    """Load clips one at a time with a progress bar (tqdm; shown on a terminal unless bar=False)."""
    from tqdm import tqdm
    for clip in tqdm(clips, desc=desc, unit="clip", disable=None if bar is None else not bar, leave=False):
        video, audio = clip.load()
        yield clip, video, audio
