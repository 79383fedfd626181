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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .backends import Backend, get_backend
from .bundle.reader import Bundle, state_file_format
from .errors import BackendError, BundleError, InputError
from .files.atomic import atomic_file
from .questions import TextPieces, checked_question
from .sampling import Sampler
from .step_plan import Carried, StepPlan, check_output, plan_step

STATE_FORMAT = "mirasol-stream-state"
STATE_VERSION = 1


@dataclass
class Timings:
    """Seconds spent per graph in backend run calls, and in whole steps (for overhead accounting)."""

    graph_seconds: dict[str, float] = field(default_factory=dict)
    graph_calls: dict[str, int] = field(default_factory=dict)
    step_seconds: dict[str, float] = field(default_factory=dict)

    def add(self, table: dict[str, float], key: str, seconds: float) -> None:
        table[key] = table.get(key, 0.0) + seconds

    def to_dict(self) -> dict[str, Any]:
        return {"graph_seconds": self.graph_seconds, "graph_calls": self.graph_calls,
                "step_seconds": self.step_seconds}


class Pipeline:
    """The graphs of a bundle, loaded once; shared by any number of streams and threads."""

    def __init__(self, bundle: Bundle, backend: Backend) -> None:
        self.bundle = bundle
        self.backend = backend
        self.tokenizer = bundle.tokenizer
        manifest = bundle.manifest
        self.config = manifest.config
        self.sessions = {name: backend.load(g, bundle) for name, g in manifest.graphs.items()}
        self._state = {s.name: s for s in manifest.state}
        self._counters = {c.name: c for c in manifest.counters}
        self._plans = {name: plan_step(manifest, self.sessions, name, backend.keeps_on_device)
                       for name in manifest.steps}
        located = {name: manifest.step_tensor("push", name) for name in manifest.steps["push"].inputs}
        self.chunk_inputs = {name: info for name, (_, info) in located.items()}
        self._chunk_where = {name: f"push: input {name!r} of graph {graph!r}" for name, (graph, _) in located.items()}
        self.max_text_len = int(self.config["max_text_len"])
        self.max_batch = manifest.max_batch
        self.default_max_new_tokens = manifest.generation["max_new_tokens"]

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

        Streams whose carried state has the same shape are stacked along the batch axis (at most `max_batch`
        rows a run); streams of other shapes run in further groups. Returns each stream's av_context as
        `stream.push` would (equal up to float rounding). No stream changes unless every run succeeded.
        """
        if len(streams) != len(chunks):
            raise InputError(f"push_streams: {len(streams)} streams but {len(chunks)} chunks")
        if len({id(stream) for stream in streams}) != len(streams):
            raise InputError("push_streams: a stream appears twice; push its chunks in separate calls")
        if any(stream.pipeline is not self for stream in streams):
            raise InputError("push_streams: every stream must come from this Pipeline")
        prepared = [stream._chunk_feeds(video, audio) for stream, (video, audio) in zip(streams, chunks)]
        graphs = self.bundle.graphs
        axes = {s.name: graphs[s.graph].input(s.input).shape.index("batch")
                for s in self._state.values() if s.scope == "stream"}
        plan = self._plans["push"]
        returns_axis = self.bundle.manifest.step_tensor("push", plan.returns, output=True)[1].shape.index("batch")
        with contextlib.ExitStack() as held:
            for stream in sorted(streams, key=id):  # one order for every caller: no deadlock between them
                held.enter_context(stream._lock)
            carried = [stream._carried_for(batch) for stream, (_, batch, _) in zip(streams, prepared)]
            groups: dict[tuple, list[int]] = {}
            for i, values in enumerate(carried):
                key = tuple(v.shape[:axes[n]] + v.shape[axes[n] + 1:] for n, v in values.state.items())
                groups.setdefault(key, []).append(i)
            updated = [Carried() for _ in streams]
            contexts: list[np.ndarray] = [np.empty(0)] * len(streams)
            runner = Stream(self)  # runs the stacked step; its own state stays unused
            for members in groups.values():
                for part in self._parts(members, [prepared[i][1] for i in members]):
                    rows = [prepared[i][1] for i in part]
                    stacked = Carried(
                        {n: self.backend.concatenate([carried[i].state[n] for i in part], axes[n]) for n in axes},
                        {n: np.concatenate([carried[i].counters[n] for i in part]) for n in carried[part[0]].counters})
                    feeds = {n: np.concatenate([prepared[i][0][n] for i in part]) for n in self.chunk_inputs}
                    context = runner._run("push", feeds, sum(rows), stacked)
                    offsets = np.cumsum(rows)[:-1]
                    bounds = list(zip([0, *offsets], [*offsets, sum(rows)]))
                    for n, value in stacked.state.items():
                        for i, (begin, end) in zip(part, bounds):
                            updated[i].state[n] = self.backend.slice(value, axes[n], begin, end)
                    for n, value in stacked.counters.items():
                        for i, piece in zip(part, np.split(value, offsets)):
                            updated[i].counters[n] = piece.copy()
                    for i, piece in zip(part, np.split(context, offsets, axis=returns_axis)):
                        contexts[i] = piece
            for stream, new, (_, batch, _) in zip(streams, updated, prepared):
                stream._carried, stream.batch = new, batch
                stream.chunks += 1
        return [context[0] if unbatched else context for context, (_, _, unbatched) in zip(contexts, prepared)]

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
        self._carried = Carried()  # stream-scope state and counters (a question's live with the question)
        self._lock = threading.Lock()

    @property
    def state(self) -> dict[str, np.ndarray]:
        """The carried stream-scope tensors by name (read them; the stream replaces them at each step)."""
        return self._carried.state

    @property
    def counters(self) -> dict[str, np.ndarray]:
        return self._carried.counters

    # ---- state ----
    def _fresh(self, scope: str, batch: int, produced_by: StepPlan | None = None) -> Carried:
        """The initial state and counters of `scope` ("stream" or "question") for `batch` rows (only those the
        step `produced_by` produces, if given)."""
        p = self.pipeline
        graphs = p.bundle.graphs
        carried = Carried()
        for spec in p._state.values():
            if spec.scope == scope and (produced_by is None or spec in produced_by.state):
                info = graphs[spec.graph].input(spec.input)
                shape = [batch if d == "batch" else (0 if i == spec.axis and spec.init == "empty" else d)
                         for i, d in enumerate(info.shape)]
                if any(isinstance(d, str) for d in shape):
                    raise BundleError(f"state {spec.name}: cannot size axes {info.shape} of {spec.graph}.{spec.input}")
                carried.state[spec.name] = np.zeros(shape, dtype=info.dtype)
        for counter in p._counters.values():
            if counter.scope == scope and (produced_by is None or counter in produced_by.counters):
                carried.counters[counter.name] = np.zeros(batch, dtype=np.int64)
        return carried

    def _run(self, step_name: str, inputs: Mapping[str, np.ndarray], batch: int, stream: Carried,
             question: Carried | None = None) -> np.ndarray | None:
        """Run a step's graphs (under the stream's lock); returns the step's returned output on the host (None for
        a step that returns nothing). State and counters change only once every graph has succeeded and every output
        that is carried, returned or fed to a later graph has the manifest's dtype and shape and holds no NaN or inf
        (outputs the backend keeps on its device are checked for dtype and shape, and through what they lead to:
        the returned output); otherwise nothing changes and the error names the graph and output."""
        plan = self.pipeline._plans[step_name]
        backend = self.pipeline.backend
        scopes = {"stream": stream, "question": question}
        produced: dict[str, Any] = {}
        returned = None
        start = time.perf_counter()
        for session, feeds in plan.graphs:
            values = {}
            for feed in feeds:
                if feed.kind == "input":
                    values[feed.input] = inputs[feed.key]
                elif feed.kind == "step":
                    values[feed.input] = produced[feed.key]
                elif feed.kind == "state":
                    values[feed.input] = scopes[feed.scope].state[feed.key]  # type: ignore[union-attr]
                else:
                    values[feed.input] = scopes[feed.scope].counters[feed.key]  # type: ignore[union-attr]
            keep = plan.keep[session.name]
            t0 = time.perf_counter()
            outputs = session.run(values, keep_on_device=keep) if keep else session.run(values)
            self.timings.add(self.timings.graph_seconds, session.name, time.perf_counter() - t0)
            self.timings.graph_calls[session.name] = self.timings.graph_calls.get(session.name, 0) + 1
            if plan.returns in outputs:
                returned = backend.to_host(outputs[plan.returns])
            for checked in plan.checked[session.name]:
                name = checked.info.name
                check_output(returned if name == plan.returns else outputs[name], checked, batch, step_name,
                              InputError if step_name == "push" else BackendError)
            produced.update(outputs)
        updates: list[tuple[dict[str, np.ndarray], str, np.ndarray]] = []
        for spec in plan.state:
            table = scopes[spec.scope].state  # type: ignore[union-attr]
            value = produced[spec.output]
            try:
                if spec.update == "append":
                    value = backend.concatenate([table[spec.name], value], spec.axis)  # type: ignore[arg-type]
                if spec.window is not None and value.shape[spec.axis] > spec.window:
                    value = backend.slice(value, spec.axis, value.shape[spec.axis] - spec.window)  # type: ignore[arg-type]
            except (ValueError, InputError):
                raise BackendError(f"state {spec.name}: output {spec.source_graph}.{spec.output} of shape "
                                   f"{value.shape} does not fit the carried {table[spec.name].shape}") from None
            updates.append((table, spec.name, value))
        for counter in plan.counters:
            table = scopes[counter.scope].counters  # type: ignore[union-attr]
            length_of = counter.length_of
            step = counter.step if length_of is None else inputs[length_of[0]].shape[length_of[1]]
            updates.append((table, counter.name, table[counter.name] + step))
        for table, name, value in updates:
            table[name] = value
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
        if batch != self.batch:
            raise InputError(f"push: the stream carries state for batch {self.batch}, the chunk has batch {batch}")
        return self._carried

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
            if not np.isfinite(value).all():
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
        alive = np.ones(batch, dtype=bool)
        for _ in range(count):
            if not kv_cache:  # the decoder's own state starts afresh and reads the whole sequence
                restart = self._fresh("question", batch, produced_by=generate)
                asked.state.update(restart.state)
                asked.counters.update(restart.counters)
                ids = sequence
            with self._lock:
                logits = self._run("generate", {"input_ids": ids}, batch, self._carried, asked)[:, -1]  # type: ignore[index]
            tokens = sampler(logits)
            ended = tokens == tokenizer.EOS
            row_tokens: list[int | None] = [int(t) if a and not e else None for t, a, e in zip(tokens, alive, ended)]
            alive &= ~ended
            if not alive.any():
                break
            yield row_tokens
            ids = tokens[:, None].astype(np.int64)
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
