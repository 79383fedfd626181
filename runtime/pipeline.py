"""Pipeline and Stream: chain the bundle's graphs, carry the state, generate answers.

Everything the loops do is read from the manifest: which graphs a step runs, where each graph input
comes from (the caller, an earlier graph of the step, a carried state tensor or a counter) and how the
state is updated. The plan is resolved once at load; the per-chunk and per-token paths only look it up.
"""
from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .backends import Backend, get_backend
from .bundle.reader import Bundle, state_file_format
from .errors import BundleError, InputError
from .files.atomic import atomic_file
from .questions import TextPieces, checked_question
from .sampling import Sampler
from .stacked import StackedState, Stacking
from .step_plan import Carried, StepPlan, fresh_state, is_finite, plan_step
from .steps import Timings, apply, changes, execute

STATE_FORMAT = "mirasol-stream-state"
STATE_VERSION = 1


class Pipeline:
    """The graphs of a bundle, loaded once; shared by any number of streams and threads."""

    def __init__(self, bundle: Bundle, backend: Backend) -> None:
        self.bundle = bundle
        self.backend = backend
        self.tokenizer = bundle.tokenizer
        manifest = bundle.manifest
        self.config = manifest.config
        self.sessions = {name: backend.load(g, bundle) for name, g in manifest.graphs.items()}
        self._plans = {name: plan_step(manifest, self.sessions, name, backend.keeps_on_device)
                       for name in manifest.steps}
        located = {name: manifest.step_tensor("push", name) for name in manifest.steps["push"].inputs}
        self.chunk_inputs = {name: info for name, (_, info) in located.items()}
        self._chunk_where = {name: f"push: input {name!r} of graph {graph!r}" for name, (graph, _) in located.items()}
        self.max_text_len = int(self.config["max_text_len"])
        self.max_batch = manifest.max_batch
        self.default_max_new_tokens = manifest.generation["max_new_tokens"]
        self._stacking_rules: Stacking | None = None  # push_streams' (made at its first call)

    @classmethod
    def load(cls, path: str | Path, backend: str | Backend = "onnxruntime", verify: bool = True,
             **backend_options: Any) -> "Pipeline":
        """Load a bundle directory with a backend ("onnxruntime" or "tensorrt") and its options."""
        return cls(Bundle.load(path, verify=verify), get_backend(backend, **backend_options))

    def close(self) -> None:
        """Close every graph session (their memory, contexts and streams); idempotent."""
        for session in self.sessions.values():
            session.close()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def stream(self) -> "Stream":
        """A fresh stream: TTM memory zeros, empty caches, counters at 0."""
        return Stream(self)

    def restore(self, path: str | Path) -> "Stream":
        """A stream continued from a file written by `Stream.save` with this bundle."""
        if not isinstance(path, (str, os.PathLike)):
            raise InputError(f"restore: a path must be a str or an os.PathLike, got {type(path).__name__}")
        stream = Stream(self)
        stream._load(Path(path))
        return stream

    def push_streams(self, streams: Sequence["Stream"], chunks: Sequence[tuple[np.ndarray, np.ndarray]]
                     ) -> list[np.ndarray]:
        """Push one chunk (video, audio) into each stream in as few runs of the push step as their state allows.

        Streams whose state that the push step reads has the same shape are stacked along the batch axis (at most
        `max_batch` rows a run); streams of other shapes run in further groups. The stacked state stays stacked
        after the call, so the same streams pushed together again (in the same order) run without copying it;
        reading a stream's state, or pushing it otherwise, takes its rows out. Returns each stream's av_context as
        `stream.push` would (equal up to float rounding). No stream changes unless every run succeeded.
        """
        if len(streams) != len(chunks):
            raise InputError(f"push_streams: {len(streams)} streams but {len(chunks)} chunks")
        if len({id(stream) for stream in streams}) != len(streams):
            raise InputError("push_streams: a stream appears twice; push its chunks in separate calls")
        if any(stream.pipeline is not self for stream in streams):
            raise InputError("push_streams: every stream must come from this Pipeline")
        prepared = [stream._chunk_feeds(video, audio) for stream, (video, audio) in zip(streams, chunks)]
        rows = [batch for _, batch, _ in prepared]
        stacking = self._stacking()
        contexts: list[np.ndarray] = [np.empty(0)] * len(streams)
        with contextlib.ExitStack() as held:
            for stream in sorted(streams, key=id):  # one order for every caller: no deadlock between them
                held.enter_context(stream._lock)
            # each stream's own state, or None while it is a member of a stacked group (left as it is)
            own = [None if s._rows is not None and s._check_batch(b) else s._carried_for(b)
                   for s, b in zip(streams, rows)]
            groups: dict[tuple, list[int]] = {}
            for i, (stream, mine) in enumerate(zip(streams, own)):
                key = stacking.key(mine) if mine is not None else stream._rows[0].key  # type: ignore[index]
                groups.setdefault(key, []).append(i)
            runs = []
            for members in groups.values():
                for part in self._parts(members, [rows[i] for i in members]):
                    group = stacking.group_of([streams[i]._rows for i in part], [rows[i] for i in part])
                    if group is None:
                        for i in part:
                            own[i] = own[i] or streams[i]._carried  # out of the group it was in
                    stacked = group.carried if group else stacking.stack([own[i] for i in part])  # type: ignore[misc]
                    feeds = {n: np.concatenate([prepared[i][0][n] for i in part]) for n in self.chunk_inputs}
                    new, returned, apart = stacking.run(stacked, feeds, [rows[i] for i in part],
                                                        [(own[i] or streams[i]._own).state for i in part])
                    for i, context in zip(part, returned):
                        contexts[i] = context
                    runs.append((part, new, apart))
            for part, new, apart in runs:  # every run succeeded: commit
                for k, (i, changed) in enumerate(zip(part, apart)):
                    streams[i]._join(new, k, own[i], changed, rows[i])
        return [context[0] if unbatched else context for context, (_, _, unbatched) in zip(contexts, prepared)]

    def _stacking(self) -> Stacking:
        if self._stacking_rules is None:
            self._stacking_rules = Stacking(self.bundle.manifest, self._plans["push"], self.backend)
        return self._stacking_rules

    def _parts(self, members: list[int], rows: list[int]) -> list[list[int]]:
        """Consecutive runs of `members` whose rows add up to at most max_batch each."""
        parts: list[list[int]] = [[]]
        total = 0
        for member, count in zip(members, rows):
            if parts[-1] and total + count > self.max_batch:
                parts.append([])
                total = 0
            parts[-1].append(member)
            total += count
        return parts

    def split_clip(self, video: np.ndarray, audio: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """Whole clip: video [N*F, 3, H, W], audio log-mel [n_mels, N*A] -> N (video, audio) chunks."""
        frames = int(self.config["frames_per_chunk"])
        mel_frames = int(self.chunk_inputs["audio"].shape[-1])
        if video.ndim != 4 or audio.ndim != 2:
            raise InputError(f"clip: expected video [frames, 3, H, W] and audio [n_mels, mel_frames], got "
                             f"video {video.shape} and audio {audio.shape}")
        chunks = video.shape[0] // frames
        if chunks == 0 or video.shape[0] % frames or audio.shape[1] != chunks * mel_frames:
            raise InputError(f"clip: video of {video.shape[0]} frames and audio of {audio.shape[1]} mel frames "
                             f"must form the same whole number of chunks ({frames} frames and {mel_frames} "
                             f"mel frames each)")
        return [(video[i * frames:(i + 1) * frames], audio[:, i * mel_frames:(i + 1) * mel_frames])
                for i in range(chunks)]

    def answer(self, video: np.ndarray, audio: np.ndarray, question: str, **generation: Any) -> str:
        """Whole clip: chunk it, stream it, ask `question` about it."""
        stream = self.stream()
        for chunk_video, chunk_audio in self.split_clip(video, audio):
            stream.push(chunk_video, chunk_audio)
        return stream.ask(question, **generation)  # type: ignore[return-value]


class Stream:
    """One video stream's state; many streams share one Pipeline.

    Threads: every call runs whole graph steps under the stream's lock, so a stream may be used from several
    threads (calls are serialised step by step). An unfinished `ask_iter` generator holds no lock between its
    tokens and keeps its own question state: while it is suspended, any other call on the stream (push, ask,
    another ask_iter, save) proceeds at once, and the generator can be resumed later (its answer is about the
    chunks pushed before it was asked) or dropped.
    """

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.batch: int | None = None
        self.chunks = 0
        self.dropped_chunks = 0  # chunks a live source captured but never pushed (see `skip`)
        self.timings = Timings()
        self._lock = threading.Lock()
        # stream-scope state and counters (a question's live with the question): the stream's own, or, while it is
        # a member of a group that push_streams keeps stacked, its rows there plus the rest in _own
        self._own = Carried()
        self._rows: tuple[StackedState, int] | None = None

    @property
    def _carried(self) -> Carried:
        """The stream's state and counters (under the lock); a member of a stacked group leaves it, its rows copied."""
        if self._rows is not None:
            group, member = self._rows
            mine = group.rows(member, self.pipeline.backend)
            self._own = Carried(self._own.state | mine.state, self._own.counters | mine.counters)
            self._rows = None
        return self._own

    @_carried.setter
    def _carried(self, carried: Carried) -> None:
        self._own, self._rows = carried, None

    @property
    def state(self) -> dict[str, np.ndarray]:
        """The carried stream-scope tensors by name (read them; the stream replaces them at each step)."""
        with self._lock:
            return self._carried.state

    @property
    def counters(self) -> dict[str, np.ndarray]:
        with self._lock:
            return self._carried.counters

    # ---- state ----
    def _fresh(self, scope: str, batch: int, produced_by: StepPlan | None = None) -> Carried:
        """The initial state and counters of `scope` ("stream" or "question") for `batch` rows (only those the
        step `produced_by` produces, if given)."""
        return fresh_state(self.pipeline.bundle.manifest, scope, batch, produced_by)

    def _run(self, step_name: str, inputs: Mapping[str, np.ndarray], batch: int, stream: Carried,
             question: Carried | None = None) -> np.ndarray | None:
        """Run a step's graphs (under the stream's lock); returns the step's returned output on the host (None for
        a step that returns nothing). State and counters change only once every graph has succeeded, every output
        that is carried, returned or fed to a later graph has the manifest's dtype and shape, and what the step
        commits or returns holds no NaN or inf (outputs the backend keeps on its device are checked for dtype and
        shape, and through what they lead to: the returned output); otherwise nothing changes and the error names
        the graph and output."""
        start = time.perf_counter()
        plan, backend = self.pipeline._plans[step_name], self.pipeline.backend
        returned, produced = execute(plan, backend, inputs, batch, stream, question, self.timings)
        scopes = {"stream": stream, "question": question}
        apply(changes(plan, inputs, produced, scopes, backend))  # type: ignore[arg-type]
        self.timings.add(self.timings.step_seconds, step_name, time.perf_counter() - start)
        return returned

    # ---- streaming ----
    def push(self, video: np.ndarray, audio: np.ndarray) -> np.ndarray:
        """Add one chunk: video [B, F, 3, H, W], audio log-mel [B, n_mels, A] (or both without the batch
        axis, for batch 1). Returns the chunk's av_context [B, m, D] (no batch axis if none was given).

        A chunk whose graphs give NaN or inf (e.g. inputs of extreme magnitude) raises InputError naming the
        graph and output, and the stream stays as it was."""
        feeds, batch, unbatched = self._chunk_feeds(video, audio)
        with self._lock:
            carried = self._carried_for(batch)
            context = self._run("push", feeds, batch, carried)
            self._carried, self.batch = carried, batch
            self.chunks += 1
        return context[0] if unbatched else context  # type: ignore[index]

    def _chunk_feeds(self, video: np.ndarray, audio: np.ndarray) -> tuple[dict[str, np.ndarray], int, bool]:
        """The chunk as the push step's feeds with a batch axis, its batch size, and whether it came without one."""
        feeds = {"video": video, "audio": audio}
        for name, value in feeds.items():
            if not isinstance(value, np.ndarray):
                raise InputError(f"{self.pipeline._chunk_where[name]}: expected a numpy array, "
                                 f"got {type(value).__name__}")
        feeds = {name: np.asarray(value) for name, value in feeds.items()}  # a masked array's hidden values too
        unbatched = feeds["video"].ndim == len(self.pipeline.chunk_inputs["video"].shape) - 1
        if unbatched:
            feeds = {name: value[None] for name, value in feeds.items()}
        return feeds, self._check_chunk(feeds), unbatched

    def _carried_for(self, batch: int) -> Carried:
        """The stream-scope state a push of `batch` rows starts from (under the lock): the stream's, or fresh."""
        if self.batch is None:
            return self._fresh("stream", batch)
        self._check_batch(batch)
        return self._carried

    def _join(self, group: StackedState, member: int, own: Carried | None, changed: dict[str, Any], batch: int
              ) -> None:
        """Commit a push_streams step (under the lock): the stream's rows in `group` (its state itself where it is the
        only member), and apart, its other tensors with `changed` (from `own`, or while a member, its own apart)."""
        mine = own or self._own
        rest = Carried({n: v for n, v in mine.state.items() if n not in group.carried.state} | changed,
                       {n: v for n, v in mine.counters.items() if n not in group.carried.counters})
        if len(group.bounds) == 1:
            self._carried = Carried(rest.state | group.carried.state, rest.counters | group.carried.counters)
        else:
            self._own, self._rows = rest, (group, member)
        self.batch = batch
        self.chunks += 1

    def _check_batch(self, batch: int) -> bool:
        if batch != self.batch:
            raise InputError(f"push: the stream carries state for batch {self.batch}, the chunk has batch {batch}")
        return True

    def skip(self, count: int = 1) -> None:
        """Note `count` chunks of the source that were dropped, not pushed: the carried state only ever
        sees the chunks pushed, in order; the gap is counted in `dropped_chunks`."""
        with self._lock:
            self.dropped_chunks += count

    def _check_chunk(self, feeds: Mapping[str, Any]) -> int:
        """Refuse at the boundary what the graphs cannot take; returns the batch size."""
        batch = None
        for name, info in self.pipeline.chunk_inputs.items():
            value = feeds[name]
            where = self.pipeline._chunk_where[name]
            if value.ndim != len(info.shape):
                raise InputError(f"{where}: expected rank {len(info.shape)} {list(info.shape)} (or without the "
                                 f"batch axis), got shape {value.shape}")
            if value.size == 0:
                raise InputError(f"{where}: the chunk is empty (shape {value.shape})")
            expected = [value.shape[0] if d == "batch" else d for d in info.shape]
            if list(value.shape) != expected:
                raise InputError(f"{where}: expected shape {list(info.shape)} = {expected}, got {list(value.shape)}")
            if value.dtype != np.dtype(info.dtype):
                raise InputError(f"{where}: expected dtype {info.dtype}, got {value.dtype}")
            if not is_finite(value):
                raise InputError(f"{where}: contains NaN or inf")
            if batch is None:
                batch = value.shape[0]
            elif value.shape[0] != batch:
                raise InputError(f"{where}: batch {value.shape[0]} differs from the other input's {batch}")
        if batch > self.pipeline.max_batch:
            raise InputError(f"push: batch {batch} is over the bundle's maximum {self.pipeline.max_batch} "
                             f"(re-export with --max-batch {batch})")
        return batch  # type: ignore[return-value]

    # ---- questions ----
    def ask(self, question: str, max_new_tokens: int | None = None, temperature: float = 0.0, top_k: int = 0,
            top_p: float = 1.0, seed: int | None = None) -> str | list[str]:
        """Answer about the chunks pushed so far; greedy unless temperature > 0. Batch 1 gives a str.

        `max_new_tokens`: most answer tokens; None: the bundle's default (`manifest.generation`), or what the
        question leaves of the text context where that is less."""
        rows = self.token_ids(question, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        answers = [self.pipeline.tokenizer.decode(ids) for ids in rows]
        return answers[0] if len(answers) == 1 else answers

    def ask_iter(self, question: str, max_new_tokens: int | None = None, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None) -> Iterator[str]:
        """Yield the answer's text as it is generated (batch 1), whole UTF-8 characters at a time.

        The generator holds no lock while suspended: other calls on the stream go ahead meanwhile (see the class
        docstring), and an abandoned generator costs nothing but its own question state."""
        if (self.batch or 1) != 1:
            raise InputError(f"ask_iter: streams text for batch 1; this stream has batch {self.batch}")
        pieces = TextPieces()
        for (token,) in self._generate(question, max_new_tokens, Sampler(temperature, top_k, top_p, seed)):
            text = pieces.add(token)
            if text:
                yield text
        tail = pieces.end()
        if tail:
            yield tail

    def token_ids(self, question: str, max_new_tokens: int | None = None, kv_cache: bool = True, **sampling: Any
                  ) -> list[list[int]]:
        """The generated token ids per batch row (EOS excluded). `kv_cache=False` recomputes the whole sequence
        at every token instead of carrying the decoder's own cache (a baseline and a check: same tokens, slower)."""
        rows: list[list[int]] = [[] for _ in range(self.batch or 1)]
        for tokens in self._generate(question, max_new_tokens, Sampler(**sampling), kv_cache):
            for row, token in enumerate(tokens):
                if token is not None:
                    rows[row].append(token)
        return rows

    def _generate(self, question: str, max_new_tokens: int | None, sampler: Sampler, kv_cache: bool = True
                  ) -> Iterator[list[int | None]]:
        """Per generated position, the token of each batch row (None once that row has ended). The question's
        state lives here, not on the stream; the stream's lock is held for each graph step only."""
        p = self.pipeline
        tokenizer = p.tokenizer
        checked = checked_question(tokenizer, p.max_text_len, p.default_max_new_tokens, question, max_new_tokens)
        prompt, count = checked.prompt, checked.max_new_tokens
        with self._lock:
            if self.chunks == 0:
                raise InputError("ask: push at least one chunk before asking")
            batch = self.batch or 1
            asked = self._fresh("question", batch)
            self._run("ask", {}, batch, self._carried, asked)
        ids = sequence = np.tile(np.asarray(prompt, dtype=np.int64), (batch, 1))
        generate = self.pipeline._plans["generate"]
        alive = [True] * batch
        for _ in range(count):
            if not kv_cache:  # the decoder's own state starts afresh and reads the whole sequence
                restart = self._fresh("question", batch, produced_by=generate)
                asked.state.update(restart.state)
                asked.counters.update(restart.counters)
                ids = sequence
            with self._lock:
                logits = self._run("generate", {"input_ids": ids}, batch, self._carried, asked)[:, -1]  # type: ignore[index]
            tokens = sampler(logits)
            values = tokens.tolist()
            alive = [a and t != tokenizer.EOS for t, a in zip(values, alive)]
            if not any(alive):
                break
            yield [t if a else None for t, a in zip(values, alive)]
            ids = np.asarray(tokens, dtype=np.int64).reshape(batch, 1)
            if not kv_cache:
                sequence = np.concatenate([sequence, ids], axis=1)

    # ---- persistence ----
    def save(self, path: str | Path) -> Path:
        """Write the stream's state (numpy arrays + JSON header; no pickle) to `path` (.npz), atomically.

        An existing `path` is replaced only if it is a stream state file; when several streams save to one path,
        the last complete save wins. A path that cannot be written raises OutputError (nothing is left behind).
        """
        with self._lock:  # one consistent snapshot (carried arrays are replaced by each step, never changed)
            header = {"format": STATE_FORMAT, "version": STATE_VERSION, "bundle": self.pipeline.bundle.fingerprint,
                      "batch": self.batch, "chunks": self.chunks}
            arrays = {f"state/{k}": v for k, v in self._carried.state.items()}
            arrays.update({f"counter/{k}": v for k, v in self._carried.counters.items()})
        with atomic_file(path, is_state_file, "stream state file") as tmp, open(tmp, "wb") as f:
            np.savez(f, header=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8), **arrays)
        return Path(path)

    def _load(self, path: Path) -> None:
        """Read a state file through the bundle's bounded reader (no pickle, sizes checked first)."""
        header, arrays = self.pipeline.bundle.read_state(path, STATE_FORMAT, STATE_VERSION)
        batch = header["batch"]
        if batch is not None:
            fresh = self._fresh("stream", batch)
            self._carried = Carried({name: arrays[f"state/{name}"] for name in fresh.state},
                                     {name: arrays[f"counter/{name}"] for name in fresh.counters})
        self.batch = batch
        self.chunks = header["chunks"]


def is_state_file(path: Path) -> bool:
    """Whether `path` is a stream state file (its header names the format); never raises."""
    return state_file_format(path) == STATE_FORMAT
