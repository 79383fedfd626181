"""Decoded chunks of a dataset's media files, kept on disk so that each file is decoded once.

An entry is a chunks file (`mirasol.runtime.media.chunks_file`, what `mirasol-run --chunks` streams): float32
video and log-mel audio exactly as the runtime's media path gives them (`load_clip`, chunk by chunk through
`iter_chunks`), so training sees what the device sees. Entries are named by a key of the media file's bytes, the
model's media settings (fps, chunk length, picture size, audio settings) and the decoder's version: a file is
decoded again only when it changed or a model sees it differently, wherever the dataset moved.

The folder follows the ownership rule (`runtime/files/ownership.py`, kind "chunk cache"): an existing folder that
is not a chunk cache is refused before any work, and entries are written atomically. A new entry replaces only
another process's entry of the same media written meanwhile; an unreadable file under an entry's name in the
cache is ours by that name (`owned_name`) and is decoded again over. The folder can be deleted at any time;
nothing but speed is lost.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from mirasol.runtime.bundle.json_reader import parse_json
from mirasol.runtime.bundle.reader import BoundedNpz
from mirasol.runtime.errors import InputError, MirasolError
from mirasol.runtime.files.atomic import prepare_output_dir
from mirasol.runtime.files.ownership import check_output_dir, owned_name
from mirasol.runtime.media.chunking import MediaParams
from mirasol.runtime.media.chunks_file import (CHUNKS_FORMAT, MAX_CHUNKS_FILE_BYTES, is_chunks_file, load_chunks,
                                               save_chunks)
from mirasol.runtime.media.video_files import load_clip

CACHE_KIND = "chunk cache"
CACHE_VERSION = 1  # bump when what a media file decodes to changes


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/mirasol/chunks, else ~/.cache/mirasol/chunks."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "mirasol" / "chunks"


class ChunkCache:
    """The decoded chunks of media files for one model's media settings (`config`: a MirasolConfig or a bundle's
    config dict). `keep_bytes`: how much of the most recently read clips stays in memory."""

    def __init__(self, directory: str | os.PathLike[str], config: Any, keep_bytes: int = 512 << 20) -> None:
        self.directory = check_output_dir(directory, CACHE_KIND)  # refused now, before any work
        self.config = config
        self.params = MediaParams.from_config(config)
        self.keep_bytes = keep_bytes
        self._recent: OrderedDict[Path, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._ready = False
        import av  # the decoder's version is part of every key

        settings = {"version": CACHE_VERSION, "av": av.__version__, "libavcodec": av.library_versions["libavcodec"],
                    **asdict(self.params)}
        self._settings = json.dumps(settings, sort_keys=True).encode()

    def key(self, media: Path) -> str:
        """The entry name's stem for `media`: sha256 of its bytes and of the decoding settings."""
        digest = hashlib.sha256(self._settings)
        try:
            with open(media, "rb") as f:
                while block := f.read(1 << 20):
                    digest.update(block)
        except OSError as bad:
            raise InputError(f"media file {media} cannot be read: {bad.strerror or bad}") from None
        return digest.hexdigest()

    def decode(self, media: Path, source: str) -> tuple[Path, int]:
        """(the entry holding `media`'s chunks, how many chunks): decoded now unless an entry exists. `source`
        (where the file was named) is recorded in the entry. Raises InputError for a file that cannot be decoded."""
        entry = self.directory / f"{self.key(media)}.npz"
        chunks = self._chunks_in(entry)
        if chunks is None:
            video, audio = load_clip(media, self.config)
            if not self._ready:
                prepare_output_dir(self.directory, CACHE_KIND)
                self._ready = True
            # an unreadable entry (our name, in our folder) is replaced; a new one only by another process's entry
            save_chunks(entry, video, audio, source, owned_name if os.path.lexists(entry) else is_chunks_file)
            chunks = video.shape[0] // self.params.frames_per_chunk
        return entry, chunks

    def load(self, entry: Path) -> tuple[np.ndarray, np.ndarray]:
        """A whole clip: video [N*F, 3, H, W], audio [n_mels, N*A], float32 (read-only arrays, kept in memory
        while they are among the most recently read)."""
        if entry in self._recent:
            self._recent.move_to_end(entry)
            return self._recent[entry]
        video, audio = load_chunks(entry)
        video.setflags(write=False)
        audio.setflags(write=False)
        self._recent[entry] = (video, audio)
        while len(self._recent) > 1 and sum(v.nbytes + a.nbytes for v, a in self._recent.values()) > self.keep_bytes:
            self._recent.popitem(last=False)
        return video, audio

    def span(self, entry: Path, first: int, last: int) -> tuple[np.ndarray, np.ndarray]:
        """Chunks [first, last) of a clip."""
        video, audio = self.load(entry)
        frames, mels = self.params.frames_per_chunk, self.params.audio_frames_per_chunk
        return video[first * frames:last * frames], audio[:, first * mels:last * mels]

    def _chunks_in(self, entry: Path) -> int | None:
        """How many chunks a readable entry of these settings holds; None if there is none."""
        if not entry.is_file():
            return None
        try:
            with BoundedNpz(entry, f"chunk cache entry {entry}", max_bytes=MAX_CHUNKS_FILE_BYTES) as npz:
                header = parse_json(npz.read("header", np.uint8, ((0, 1 << 16),)).tobytes(), str(entry))
        except MirasolError:
            return None
        p = self.params
        if not isinstance(header, dict) or header.get("format") != CHUNKS_FORMAT:
            return None
        video, audio = header.get("video_shape"), header.get("audio_shape")
        size = p.image_size
        if (not isinstance(video, list) or not isinstance(audio, list) or len(video) != 4 or len(audio) != 2
                or video[1:] != [3, size, size] or not isinstance(video[0], int) or video[0] < p.frames_per_chunk
                or video[0] % p.frames_per_chunk
                or audio != [p.audio.n_mels, video[0] // p.frames_per_chunk * p.audio_frames_per_chunk]):
            return None
        return video[0] // p.frames_per_chunk
