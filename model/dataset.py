"""Your own labelled clips (`mirasol-train --data`): media files and a JSON Lines file of questions and answers.

    {"media": "videos/belt-01.mp4", "questions": [{"q": "is the conveyor running?", "a": "yes"}]}
    {"media": "videos/door-07.mp4", "split": "validation", "questions": [{"q": "did someone enter?", "a": "no", "end": 6}]}

One line per clip, keys:
- "media": the video file (mp4, mkv, webm, avi, ... with or without audio), relative to the folder of the JSON
  Lines file (or absolute). `--data` names the file, or a folder holding `clips.jsonl`.
- "questions": a list of {"q": question, "a": answer}, each optionally with "start" and/or "end" in seconds:
  the part of the clip the question is about. The model is shown the chunks from the one holding "start" to the
  one holding "end" (streamed from "start", as if the clip began there) and asked after the last of them, in
  training, in the held-out score and through a bundle alike; without them, the whole clip. A chunk is
  `frames_per_chunk / fps` seconds (1 s in every preset).
- "split" (optional): "train" or "validation" (held out: never trained on, scored at the end). Lines without one
  are split by the run's seed: a fraction (`--val-fraction`) of their media files go to validation; all lines of
  one media file land in the same split.
Blank lines are skipped; any other key is refused (a misspelt key would otherwise be ignored).

`read_dataset` checks the whole file before any training and reports every problem (`DatasetError.problems`),
each naming the line: bad JSON, missing or misspelt keys, a missing, empty or unreadable media file, a question
and answer longer than the model's context, a time range outside the clip; `split_dataset` refuses an empty
split. Reading decodes each media file once, through the runtime's own media path, into the chunk cache
(`chunk_cache.py`); a later run, or a resumed one, reads the cache.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mirasol.runtime.bundle.tokenizer import ByteTokenizer
from mirasol.runtime.errors import MirasolError

from .chunk_cache import ChunkCache
from .config import MirasolConfig

DATASET_FILE = "clips.jsonl"
SPLITS = ("train", "validation")
LINE_KEYS = ("media", "questions", "split")
QUESTION_KEYS = ("q", "a", "start", "end")
MAX_LINE_BYTES = 1 << 20
_EPS = 1e-6  # seconds: a time this close to a chunk boundary is on it


class DatasetError(MirasolError, ValueError):
    """A dataset with problems; `problems` holds one line per problem, each naming the file and line."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        more = f" (and {len(self.problems) - 1} more problems)" if len(self.problems) > 1 else ""
        super().__init__(self.problems[0] + more)


@dataclass(frozen=True)
class Question:
    question: str
    answer: str
    start: float | None = None
    end: float | None = None

    @property
    def kind(self) -> str:
        """What evaluation groups accuracy by (`evaluate_detailed`'s per-kind scores): the question itself."""
        return self.question

    def span(self, chunk_seconds: float, chunks: int) -> tuple[int, int]:
        """The chunks [first, last) the question is about, of a clip of `chunks` chunks."""
        first = math.floor((self.start or 0.0) / chunk_seconds + _EPS)
        last = chunks if self.end is None else math.ceil(self.end / chunk_seconds - _EPS)
        return first, max(last, first + 1)


@dataclass(frozen=True)
class Clip:
    """One line of the dataset, its media decoded: `entry` is its chunks file in the cache, of `chunks` chunks."""

    line: int
    media: Path
    questions: tuple[Question, ...]
    split: str | None
    entry: Path
    chunks: int


@dataclass
class Dataset:
    path: Path
    clips: list[Clip]
    chunk_seconds: float


@dataclass(frozen=True)
class HeldOut:
    """The questions of one clip about one span, for `evaluate_detailed`: `video` and `audio` are the span's
    arrays (read from the cache when asked for), exactly what a bundle is given to answer them."""

    clip: Clip
    first: int
    last: int
    questions: tuple[Question, ...]
    cache: ChunkCache

    @property
    def label(self) -> str:
        return f"line {self.clip.line}" + (f" (chunks {self.first}-{self.last - 1})" if self.first or
                                           self.last != self.clip.chunks else "")

    @property
    def video(self) -> np.ndarray:
        return self.cache.span(self.clip.entry, self.first, self.last)[0]

    @property
    def audio(self) -> np.ndarray:
        return self.cache.span(self.clip.entry, self.first, self.last)[1]


def dataset_file(path: str | os.PathLike[str]) -> Path:
    """The JSON Lines file `--data` names: the file itself, or `clips.jsonl` in a folder."""
    path = Path(path)
    if path.is_dir():
        path = path / DATASET_FILE
    if not path.is_file():
        raise DatasetError([f"{path} does not exist" if not path.exists() else f"{path} is not a file"])
    return path


def read_dataset(path: str | os.PathLike[str], config: MirasolConfig, cache: ChunkCache,
                 progress: Callable[[Iterator[Any], int], Iterator[Any]] | None = None) -> Dataset:
    """Read and check the dataset, decoding each media file into `cache` (once: a cached file is not decoded
    again). Raises DatasetError with every problem found. `progress(iterable, total)` wraps the line loop."""
    file = dataset_file(path)
    try:
        lines = file.read_bytes().splitlines()
    except OSError as bad:
        raise DatasetError([f"{file} cannot be read: {bad.strerror or bad}"]) from None
    chunk_seconds = config.frames_per_chunk / config.fps
    problems: list[str] = []
    clips: list[Clip] = []
    decoded: dict[Path, tuple[Path, int] | str] = {}  # media file -> (cache entry, chunks), or why it cannot be read
    numbered: Iterator[Any] = iter(enumerate(lines, 1))
    if progress is not None:
        numbered = progress(numbered, len(lines))
    for number, raw in numbered:
        where = f"{file.name} line {number}"
        if not raw.strip():
            continue
        line = _Line(where)
        media, questions, split = line.parse(raw, file.parent, config)
        found: tuple[Path, int] | str | None = None
        if media is not None:  # its time ranges are checked even when the line has other problems
            if media not in decoded:
                try:
                    decoded[media] = cache.decode(media, f"{where}: {media.name}")
                except MirasolError as bad:
                    decoded[media] = str(bad)
            found = decoded[media]
            if isinstance(found, str):
                line.problem(found)
            else:
                for index, question in questions:
                    line.problem(_span_problem(question, index, found[1], chunk_seconds))
        problems.extend(line.problems)
        if not line.problems and isinstance(found, tuple):
            assert media is not None
            clips.append(Clip(number, media, tuple(q for _, q in questions), split, *found))
    if not clips and not problems:
        problems.append(f"{file} holds no clips (one JSON object per line, e.g. {_EXAMPLE})")
    problems.extend(_split_conflicts(clips, file.name))
    if problems:
        raise DatasetError(problems)
    return Dataset(file, clips, chunk_seconds)


_EXAMPLE = '{"media": "videos/a.mp4", "questions": [{"q": "is the conveyor running?", "a": "yes"}]}'


class _Line:
    """The problems of one line, each as one message naming it."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.problems: list[str] = []

    def problem(self, text: str | None) -> None:
        if text:
            self.problems.append(f"{self.where}: {text}")

    def unknown_keys(self, data: dict[str, Any], known: Sequence[str], what: str) -> set[str]:
        """Report the keys not in `known`; returns the known keys they look like misspellings of (a missing key
        that a misspelling stands for is not reported again)."""
        meant = set()
        for key in sorted(set(data) - set(known)):
            close = difflib.get_close_matches(key, [k for k in known if k not in data], n=1, cutoff=0.7)
            hint = f': did you mean "{close[0]}"?' if close else ""
            self.problem(f"unknown key {key!r}{hint} ({what} has {', '.join(known)})")
            meant.update(close)
        return meant

    def parse(self, raw: bytes, folder: Path, config: MirasolConfig
              ) -> tuple[Path | None, list[tuple[int, Question]], str | None]:
        """(the media file if it exists, the (number, question) pairs that parse, the split)."""
        if len(raw) > MAX_LINE_BYTES:
            self.problem(f"the line is {len(raw)} bytes, over the {MAX_LINE_BYTES}-byte limit")
            return None, [], None
        try:
            data = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
        except UnicodeDecodeError as bad:
            self.problem(f"not UTF-8 text (byte {bad.start + 1})")
            return None, [], None
        except json.JSONDecodeError as bad:
            self.problem(f"not valid JSON: {bad.msg} at column {bad.colno}")
            return None, [], None
        except ValueError as bad:  # a key twice
            self.problem(str(bad))
            return None, [], None
        if not isinstance(data, dict):
            self.problem(f"expected a JSON object like {_EXAMPLE}, got {_short(data)}")
            return None, [], None
        meant = self.unknown_keys(data, LINE_KEYS, "a line")
        media, path = data.get("media"), None
        if not isinstance(media, str) or not media.strip():
            if "media" not in meant:
                self.problem(f'"media" must be the path of a video file, got {_short(media)}')
        else:
            path = Path(media) if os.path.isabs(media) else folder / media
            if not path.exists():
                self.problem(f"media file {media} does not exist (paths are relative to {folder})")
                path = None
            elif not path.is_file():
                self.problem(f"media file {media} is not a file")
                path = None
        split = data.get("split")
        if split is not None and split not in SPLITS:
            self.problem(f'"split" must be one of {", ".join(SPLITS)}, got {_short(split)}')
        questions = data.get("questions")
        parsed = []
        if not isinstance(questions, list) or not questions:
            if "questions" not in meant:
                self.problem(f'"questions" must be a non-empty list of {{"q": ..., "a": ...}}, got '
                             f'{_short(questions)}')
        else:
            for index, item in enumerate(questions, 1):
                question = self.question(item, index, config)
                if question is not None:
                    parsed.append((index, question))
        return (path.absolute() if path else None), parsed, split

    def question(self, item: Any, index: int, config: MirasolConfig) -> Question | None:
        before = len(self.problems)
        where = f"question {index}: "
        if not isinstance(item, dict):
            self.problem(f'{where}expected {{"q": ..., "a": ...}}, got {_short(item)}')
            return None
        meant = self.unknown_keys(item, QUESTION_KEYS, f"question {index}: a question")
        text = {}
        for key, what in (("q", "question"), ("a", "answer")):
            value = item.get(key)
            if isinstance(value, str) and value.strip():
                text[key] = value.strip()
            elif key not in meant:
                self.problem(f'{where}"{key}" must be the {what} as non-empty text, got {_short(value)}')
        times: dict[str, float | None] = {}
        for key in ("start", "end"):
            value = item.get(key)
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if value is not None and (not number or not math.isfinite(value) or value < 0):
                self.problem(f'{where}"{key}" must be a time in seconds >= 0, got {_short(value)}')
            times[key] = float(value) if number and math.isfinite(value) and value >= 0 else None
        start, end = times["start"], times["end"]
        if end is not None and end <= (start or 0.0):
            self.problem(f'{where}"end" ({end:g} s) must be after "start" ({start or 0:g} s)')
        if len(text) == 2:
            used = len(ByteTokenizer().prompt(text["q"])) + len(ByteTokenizer().encode(text["a"]))
            if used > config.max_text_len:
                self.problem(f"{where}the question and answer take {used} tokens (one per UTF-8 byte, plus 2), "
                             f"more than the model's context of {config.max_text_len} (max_text_len); shorten "
                             f"them by {used - config.max_text_len} bytes, or train a model with a longer context")
        if len(self.problems) > before:
            return None
        return Question(text["q"], text["a"], start, end)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data = dict(pairs)
    if len(data) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise ValueError(f"key {twice!r} appears twice in one object")
    return data


def _span_problem(question: Question, index: int, chunks: int, chunk_seconds: float) -> str | None:
    length = chunks * chunk_seconds
    why = None
    if question.start is not None and question.start >= length - _EPS:
        why = f'"start" is {question.start:g} s'
    elif question.end is not None and question.end > length + _EPS:
        why = f'"end" is {question.end:g} s'
    if why is None:
        return None
    return f"question {index}: {why}, but the clip decodes to {length:g} s ({chunks} chunks of {chunk_seconds:g} s)"


def _split_conflicts(clips: Sequence[Clip], name: str) -> list[str]:
    """A media file given to both splits would be scored on what it was trained on."""
    seen: dict[Path, Clip] = {}
    problems = []
    for clip in clips:
        other = seen.setdefault(clip.media, clip)
        if other.split and clip.split and other.split != clip.split:
            problems.append(f"{name} line {clip.line}: {clip.media.name} is in the {clip.split} split here but in "
                            f"the {other.split} split on line {other.line}; a clip trained on cannot be held out")
    return problems


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value) if isinstance(value, (dict, list, str)) or value is None else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def split_dataset(dataset: Dataset, seed: int, val_fraction: float) -> tuple[list[Clip], list[Clip]]:
    """(train, validation): lines keep their "split"; the media files of the others are shuffled by `seed` and
    the first round(val_fraction * count) of them go to validation. An empty split is a DatasetError."""
    given = {c.media: c.split for c in dataset.clips if c.split}
    free = sorted({c.media for c in dataset.clips if c.media not in given})
    order = np.random.default_rng([seed, 11]).permutation(len(free))
    held = {free[i] for i in order[:round(val_fraction * len(free))]}
    splits = [given.get(c.media, "validation" if c.media in held else "train") for c in dataset.clips]
    train = [c for c, split in zip(dataset.clips, splits) if split == "train"]
    validation = [c for c, split in zip(dataset.clips, splits) if split == "validation"]
    for name, clips in (("train", train), ("validation", validation)):
        if not clips:
            raise DatasetError([f"{dataset.path.name}: the {name} split is empty ({len(dataset.clips)} clips: "
                                f"{len(train)} train, {len(validation)} validation); mark some lines "
                                f'"split": "{name}"' + (" or raise --val-fraction" if name == "validation" else
                                                         " or lower --val-fraction")])
    return train, validation


def held_out(clips: Sequence[Clip], chunk_seconds: float, cache: ChunkCache) -> list[HeldOut]:
    """The questions of `clips` grouped by clip and span, in file order (`evaluate_detailed`'s clips)."""
    items = []
    for clip in clips:
        spans: dict[tuple[int, int], list[Question]] = {}
        for question in clip.questions:
            spans.setdefault(question.span(chunk_seconds, clip.chunks), []).append(question)
        items.extend(HeldOut(clip, first, last, tuple(questions), cache)
                     for (first, last), questions in spans.items())
    return items


def fingerprint(train: Sequence[Clip], validation: Sequence[Clip]) -> str:
    """What a resumed run must find again: every clip's decoded chunks (the cache key covers the media file's
    bytes and the decoding), questions and split."""
    content = [[[c.line, c.entry.name, [[q.question, q.answer, q.start, q.end] for q in c.questions]]
                for c in clips] for clips in (train, validation)]
    return hashlib.sha256(json.dumps(content).encode()).hexdigest()
