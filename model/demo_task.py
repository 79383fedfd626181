"""The demo task: synthetic audio-video clips, written as real video files, with questions and answers.

A clip is `num_chunks` chunks of one second (at the tiny config: 4 frames at 4 fps + 1 s of audio).
In every chunk one coloured shape (red / green / blue / yellow; circle / square / triangle) moves across
a dark background while a tone plays (low / middle / high). Colours differ between the chunks of a clip
(up to four chunks); shapes and tones may repeat. The questions need both modalities and the order of
the chunks (the state the model carries from chunk to chunk):

    what colour was the triangle?            -> blue      (only asked when one triangle appeared)
    what shape was the red one?              -> circle
    what did you hear when the circle appeared? -> high
    which colour appeared with the low tone? -> green     (only asked when the low tone played once)
    which colour appeared first?             -> red
    which colour came after the red one?     -> yellow
    ...

Answers are one word. Everything is drawn from `numpy.random.default_rng([seed, index])`: clip `index`
of a seed is the same on every machine, independent of how many clips are made.

Training data goes through the same path as any user's file: the clip is rendered in numpy, encoded
with PyAV into a real file (mp4: H.264 + AAC by default) and decoded back with `mirasol.runtime.media.video_files`,
so the model is trained on exactly the arrays the runtime will give it (codec artefacts, the frame
sampling of a file whose frame rate is twice the model's, resizing from a larger picture, audio
resampling from 22.05 kHz). Rendering straight to arrays would be faster but would train on pictures
no decoder ever returns. A clip costs 60-170 ms to write and decode (idle / busy 2-core machine), so
the 1800 clips of a training run take 2-5 minutes; `make_clips(..., cache_dir=...)` keeps them on disk
(video as float16) between runs.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from mirasol.runtime.files.atomic import atomic_file, make_directories, prepare_output_dir, write_file
from mirasol.runtime.media.chunking import MediaParams
from mirasol.runtime.media.pyav import media_comment
from mirasol.runtime.media.video_files import load_clip

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "green": (35, 200, 50),
    "blue": (40, 80, 235),
    "yellow": (235, 215, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
PITCHES: dict[str, float] = {"low": 330.0, "middle": 880.0, "high": 2350.0}  # Hz
ANSWERS: tuple[str, ...] = (*COLOURS, *SHAPES, *PITCHES)
DEMO_COMMENT = "mirasol-demo clip"
CACHE_FILES = re.compile(r"demo--?\d+--?\d+-\d+-[0-9a-f]{16}(\.tmp)?\.npz")  # a clip cache written before its marker
TASK_VERSION = 2  # bump when what a (seed, index) renders changes: it keys the caches of decoded clips

QUESTION_KINDS: tuple[str, ...] = (
    "colour_of_shape", "shape_of_colour", "sound_of_colour", "sound_of_shape", "colour_of_sound",
    "first_colour", "first_shape", "first_sound", "colour_after", "colour_before", "sound_after")


@dataclass(frozen=True)
class Event:
    """What happens in one chunk: a moving shape and a tone. Positions are fractions of the picture."""

    colour: str
    shape: str
    pitch: str
    radius: float  # fraction of the picture side
    start: tuple[float, float]  # centre (x, y) at the chunk's start
    end: tuple[float, float]  # centre at the chunk's end
    volume: float  # tone amplitude


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    kind: str


@dataclass
class DemoClip:
    """One clip: what was drawn (events), its questions, and once decoded, the model's input arrays."""

    seed: int
    index: int
    events: tuple[Event, ...]
    background: tuple[int, int, int]
    questions: tuple[QA, ...]
    video: np.ndarray | None = field(default=None, repr=False)  # [N*F, 3, H, W] float32 in [0, 1]
    audio: np.ndarray | None = field(default=None, repr=False)  # [n_mels, N*A] float32 log-mel
    path: Path | None = None  # the written file, when kept

    @property
    def label(self) -> list[int]:
        """How evaluation reports name the clip: [seed, index]."""
        return [self.seed, self.index]


def all_questions(events: Sequence[Event]) -> list[QA]:
    """Every question this clip answers unambiguously (each referenced thing occurs exactly once)."""
    colours = [e.colour for e in events]
    shapes = [e.shape for e in events]
    pitches = [e.pitch for e in events]
    qas: list[QA] = []
    for i, e in enumerate(events):
        unique_colour = colours.count(e.colour) == 1
        unique_shape = shapes.count(e.shape) == 1
        unique_pitch = pitches.count(e.pitch) == 1
        if unique_shape:
            qas.append(QA(f"what colour was the {e.shape}?", e.colour, "colour_of_shape"))
            qas.append(QA(f"what did you hear when the {e.shape} appeared?", e.pitch, "sound_of_shape"))
        if unique_colour:
            qas.append(QA(f"what shape was the {e.colour} one?", e.shape, "shape_of_colour"))
            qas.append(QA(f"what did you hear when the {e.colour} {e.shape} appeared?", e.pitch,
                          "sound_of_colour"))
            if i + 1 < len(events):
                qas.append(QA(f"which colour came after the {e.colour} one?", events[i + 1].colour,
                              "colour_after"))
                qas.append(QA(f"what did you hear after the {e.colour} one?", events[i + 1].pitch,
                              "sound_after"))
            if i > 0:
                qas.append(QA(f"which colour came before the {e.colour} one?", events[i - 1].colour,
                              "colour_before"))
        if unique_pitch:
            qas.append(QA(f"which colour appeared with the {e.pitch} tone?", e.colour, "colour_of_sound"))
    first = events[0]
    qas.append(QA("which colour appeared first?", first.colour, "first_colour"))
    qas.append(QA("which shape appeared first?", first.shape, "first_shape"))
    qas.append(QA("what did you hear first?", first.pitch, "first_sound"))
    return qas


class DemoTask:
    """Makes demo clips for a model config (a MirasolConfig, or the config dict of a bundle).

    render_size / render_fps / audio_rate: how the file is written (bigger, faster and at another sample
    rate than the model's input, so decoding resizes, samples frames and resamples audio as for real
    media). container / video_codec / audio_codec: what PyAV writes (mp4 + h264 + aac by default).
    """

    def __init__(self, config: Any, num_chunks: int = 4, render_size: int = 64, render_fps: int = 8,
                 audio_rate: int = 22050, container: str = "mp4", video_codec: str = "h264",
                 audio_codec: str = "aac") -> None:
        self.config = config
        self.params = MediaParams.from_config(config)
        self.num_chunks = num_chunks
        self.render_size = render_size
        self.render_fps = render_fps
        self.audio_rate = audio_rate
        self.container = container
        self.video_codec = video_codec
        self.audio_codec = audio_codec
        self.chunk_seconds = self.params.frames_per_chunk / self.params.fps
        if num_chunks < 1:
            raise ValueError("num_chunks must be >= 1")

    def describe(self) -> dict[str, Any]:
        """The task's parameters (saved next to a trained checkpoint)."""
        return {"version": TASK_VERSION, "num_chunks": self.num_chunks, "render_size": self.render_size,
                "render_fps": self.render_fps, "audio_rate": self.audio_rate, "container": self.container,
                "video_codec": self.video_codec, "audio_codec": self.audio_codec, "chunk_seconds": self.chunk_seconds,
                "colours": list(COLOURS), "shapes": list(SHAPES), "pitches": list(PITCHES)}

    # ------------------------------------------------------------ content
    def clip(self, seed: int, index: int, questions_per_clip: int | None = None) -> DemoClip:
        """Clip `index` of `seed` (no arrays yet): events, background and questions."""
        rng = np.random.default_rng([seed, index])
        n = self.num_chunks
        colour_names = list(COLOURS)
        if n <= len(colour_names):
            colours = [colour_names[i] for i in rng.permutation(len(colour_names))[:n]]
        else:
            colours = [colour_names[i] for i in rng.integers(0, len(colour_names), n)]
        events = []
        for i in range(n):
            radius = float(rng.uniform(0.18, 0.21))
            margin = radius + 0.03
            start = rng.uniform(margin, 1 - margin, 2)
            direction = rng.uniform(0, 2 * np.pi)
            speed = float(rng.uniform(0.1, 0.3))
            end = np.clip(start + speed * np.array([np.cos(direction), np.sin(direction)]), margin, 1 - margin)
            events.append(Event(
                colour=colours[i], shape=SHAPES[int(rng.integers(len(SHAPES)))],
                pitch=list(PITCHES)[int(rng.integers(len(PITCHES)))], radius=radius,
                start=(float(start[0]), float(start[1])), end=(float(end[0]), float(end[1])),
                volume=float(rng.uniform(0.25, 0.6))))
        background = tuple(int(v) for v in rng.integers(0, 21, 3))
        qas = all_questions(events)
        if questions_per_clip is not None and questions_per_clip < len(qas):
            qas = [qas[i] for i in sorted(rng.choice(len(qas), questions_per_clip, replace=False))]
        return DemoClip(seed=seed, index=index, events=tuple(events), background=background,  # type: ignore[arg-type]
                        questions=tuple(qas))

    # ------------------------------------------------------------ rendering
    def _shape_mask(self, event: Event, centre: np.ndarray, size: int, supersample: int = 3) -> np.ndarray:
        """[size, size] float coverage of the shape (supersampled edges)."""
        s = size * supersample
        coords = (np.arange(s) + 0.5) / s
        x, y = coords[None, :], coords[:, None]
        cx, cy = centre
        r = event.radius
        if event.shape == "circle":
            inside = (x - cx) ** 2 + (y - cy) ** 2 <= r * r
        elif event.shape == "square":
            half = r
            inside = (np.abs(x - cx) <= half) & (np.abs(y - cy) <= half)
        else:  # triangle pointing up, circumradius 1.15 r
            big = 1.15 * r
            top, bottom = cy - big, cy + big / 2
            half_width = (y - top) / (bottom - top) * big * np.sqrt(3) / 2
            inside = (y >= top) & (y <= bottom) & (np.abs(x - cx) <= half_width)
        return inside.reshape(size, supersample, size, supersample).mean(axis=(1, 3))

    def render_video(self, clip: DemoClip) -> np.ndarray:
        """uint8 [num_chunks * chunk_seconds * render_fps, size, size, 3]: the pictures written to the file."""
        frames_per_chunk = round(self.chunk_seconds * self.render_fps)
        size = self.render_size
        out = np.empty((self.num_chunks * frames_per_chunk, size, size, 3), np.uint8)
        background = np.array(clip.background, np.float32)
        for i, event in enumerate(clip.events):
            colour = np.array(COLOURS[event.colour], np.float32)
            for j in range(frames_per_chunk):
                progress = j / max(frames_per_chunk - 1, 1)
                centre = np.array(event.start) + progress * (np.array(event.end) - np.array(event.start))
                mask = self._shape_mask(event, centre, size)[..., None]
                picture = background * (1 - mask) + colour * mask
                out[i * frames_per_chunk + j] = np.round(picture).astype(np.uint8)
        return out

    def render_audio(self, clip: DemoClip) -> np.ndarray:
        """float32 [num_chunks * chunk_seconds * audio_rate] mono waveform written to the file."""
        rate = self.audio_rate
        chunk = round(self.chunk_seconds * rate)
        t = np.arange(chunk) / rate
        # the tone plays from 5% to 95% of the chunk, with 20 ms fades
        on, off, fade = 0.05 * self.chunk_seconds, 0.95 * self.chunk_seconds, 0.02
        envelope = np.clip(np.minimum(t - on, off - t) / fade, 0.0, 1.0)
        rng = np.random.default_rng([clip.seed, clip.index, 1])
        pieces = []
        for event in clip.events:
            phase = rng.uniform(0, 2 * np.pi)
            pieces.append(event.volume * envelope * np.sin(2 * np.pi * PITCHES[event.pitch] * t + phase))
        wave = np.concatenate(pieces) + rng.normal(0.0, 0.003, chunk * len(clip.events))
        return wave.astype(np.float32)

    # ------------------------------------------------------------ files
    def write(self, clip: DemoClip, path: str | os.PathLike[str]) -> Path:
        """Encode the clip into a real video file with PyAV; returns the path."""
        import av

        path = Path(path)
        frames = self.render_video(clip)
        wave = self.render_audio(clip)
        with av.open(str(path), mode="w", format=None) as container:
            container.metadata["comment"] = DEMO_COMMENT  # how mirasol-demo knows its own clips (is_demo_clip)
            video = container.add_stream(self.video_codec, rate=self.render_fps)
            video.width = video.height = self.render_size
            video.pix_fmt = "yuv420p"
            video.thread_count = 1  # deterministic output, and the machine may be shared
            if self.video_codec in ("h264", "libx264"):
                video.options = {"crf": "18", "preset": "veryfast"}
            elif self.video_codec == "mpeg4":
                video.options = {"qscale": "3"}
                video.codec_context.qscale = 3
            audio = container.add_stream(self.audio_codec, rate=self.audio_rate)
            audio.layout = "mono"
            if self.audio_codec == "aac":
                audio.options = {"aac_coder": "fast"}
            audio_format = audio.codec_context.format.name
            for i, picture in enumerate(frames):
                frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
                frame.pts = i
                frame.time_base = Fraction(1, self.render_fps)
                container.mux(video.encode(frame))
            container.mux(video.encode(None))
            step = audio.codec_context.frame_size or 1024
            for start in range(0, wave.size, step):
                piece = wave[start:start + step]
                if audio_format in ("fltp", "flt"):
                    data = piece[None]
                elif audio_format in ("s16", "s16p"):
                    data = np.round(np.clip(piece, -1, 1) * 32767).astype(np.int16)[None]
                else:
                    raise ValueError(f"audio codec {self.audio_codec} wants sample format {audio_format}")
                frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(data), format=audio_format, layout="mono")
                frame.sample_rate = self.audio_rate
                frame.pts = start
                frame.time_base = Fraction(1, self.audio_rate)
                container.mux(audio.encode(frame))
            container.mux(audio.encode(None))
        return path

    def write_dataset(self, directory: str | os.PathLike[str], count: int, seed: int) -> Path:
        """Clips 0..count-1 of `seed` as video files in `directory`/videos, with every question each answers, in
        the format of `mirasol-train --data` (`mirasol.model.dataset`); returns the clips.jsonl written last.
        `directory` must be new, empty, or a demo dataset written before."""
        folder = prepare_output_dir(directory, "demo dataset")
        make_directories(folder / "videos", "demo dataset's video folder")
        lines = []
        for index in range(count):
            clip = self.clip(seed, index)
            media = f"videos/demo-{seed}-{index}{self.suffix()}"
            with atomic_file(folder / media, is_demo_clip, "demo clip") as tmp:  # replaces only a clip of ours
                self.write(clip, tmp)
            lines.append(json.dumps({"media": media, "questions": [{"q": qa.question, "a": qa.answer}
                                                                   for qa in clip.questions]}))
        return write_file(folder / "clips.jsonl", "\n".join(lines) + "\n")

    def decode(self, path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
        """The model's input arrays for a written clip, through the runtime's decoder."""
        return load_clip(path, self.config, max_chunks=self.num_chunks)

    def suffix(self) -> str:
        return {"matroska": ".mkv"}.get(self.container, "." + self.container)

    def make_clip(self, seed: int, index: int, questions_per_clip: int | None = None,
                  directory: str | os.PathLike[str] | None = None) -> DemoClip:
        """One clip with its decoded arrays; the file is kept in `directory` if given, else deleted."""
        clip = self.clip(seed, index, questions_per_clip)
        keep = directory is not None
        folder = make_directories(directory) if keep else Path(tempfile.mkdtemp(prefix="mirasol-demo-"))
        path = folder / f"demo-{seed}-{index}{self.suffix()}"
        try:
            with atomic_file(path, is_demo_clip, "demo clip") as tmp:  # replaces only a clip of ours
                self.write(clip, tmp)
            clip.video, clip.audio = self.decode(path)
        finally:
            if not keep:
                path.unlink(missing_ok=True)
                folder.rmdir()
        clip.path = path if keep else None
        return clip

    def make_clips(self, count: int, seed: int, start: int = 0, questions_per_clip: int | None = None,
                   directory: str | os.PathLike[str] | None = None,
                   cache_dir: str | os.PathLike[str] | None = None, progress: bool = False) -> list[DemoClip]:
        """Clips start..start+count-1 of `seed`, decoded. With cache_dir, decoded arrays are stored there
        (float16 video, float32 audio) and reused when the same clips of the same task are asked again."""
        cache = None
        if cache_dir is not None:
            key = hashlib.sha256(json.dumps(
                [self.describe(), _config_key(self.config), count, seed, start, questions_per_clip],
                sort_keys=True).encode()).hexdigest()[:16]
            cache = Path(cache_dir) / f"demo-{seed}-{start}-{count}-{key}.npz"
            if not cache.is_file():
                prepare_output_dir(cache_dir, "clip cache", CACHE_FILES)  # refused before the clips are made
            else:
                with np.load(cache, allow_pickle=False) as data:  # each data[key] reads the whole array: read each once
                    videos, audios = data["video"], data["audio"]
                clips = [self.clip(seed, start + i, questions_per_clip) for i in range(count)]
                for clip, video, audio in zip(clips, videos, audios):
                    clip.video = video.astype(np.float32)
                    clip.audio = audio.copy()  # not a view that would keep the whole stack alive
                return clips
        work = Path(tempfile.mkdtemp(prefix="mirasol-demo-")) if directory is None else Path(directory)
        clips = []
        try:
            indices = range(start, start + count)
            if progress:
                from tqdm import tqdm
                indices = tqdm(indices, desc=f"clips (seed {seed})", unit="clip", disable=None)  # None: TTY only
            for index in indices:
                clip = self.make_clip(seed, index, questions_per_clip, work)
                if directory is None:
                    assert clip.path is not None
                    clip.path.unlink()
                    clip.path = None
                clips.append(clip)
        finally:
            if directory is None:
                for leftover in work.iterdir():
                    leftover.unlink()
                work.rmdir()
        if cache is not None:
            with atomic_file(cache) as tmp:  # a name of ours in a clip cache of ours
                np.savez(tmp, video=np.stack([c.video for c in clips]).astype(np.float16),
                         audio=np.stack([c.audio for c in clips]))
            for clip in clips:  # the same values a cache hit gives
                clip.video = clip.video.astype(np.float16).astype(np.float32)
        return clips


def _config_key(config: Any) -> dict[str, Any]:
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    return asdict(config)


def is_demo_clip(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is a video file `DemoTask.write` wrote (its container's comment tag says so)."""
    return media_comment(path) == DEMO_COMMENT


DEMO_CHECKPOINT = Path(__file__).resolve().parent / "assets" / "demo"  # the shipped model, never written
TRAIN_OUTPUT = Path("checkpoints") / "demo"  # where mirasol-train writes by default
TEST_SEED = 2000  # the held-out test split of the shipped model's training (train.py: train 0, validation 1000)
