"""The runtime: streaming equals the PyTorch whole clip, greedy answers match, streams are isolated."""
from __future__ import annotations

import json
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from mirasol.runtime.errors import BackendError, BundleError, InputError
from mirasol.runtime.pipeline import Pipeline

from .conftest import chunk as make_chunk
from .conftest import random_clip

QUESTION = "what is the man holding?"


def chunks_of(config, video: np.ndarray, audio: np.ndarray):
    f, a = config["frames_per_chunk"], audio.shape[-1] // (video.shape[1] // config["frames_per_chunk"])
    return [(video[:, i * f:(i + 1) * f], audio[:, :, i * a:(i + 1) * a]) for i in range(video.shape[1] // f)]


@pytest.mark.parametrize("combiner", ["transformer", "ttm"])
@pytest.mark.parametrize("chunks", [1, 2, 3, 10])  # tiny's AV window is 3 chunks
def test_streaming_equals_pytorch_whole_clip(tiny_bundles, tiny_models, combiner, chunks) -> None:
    model = tiny_models[combiner]
    pipe = Pipeline.load(tiny_bundles[combiner])
    video, audio = random_clip(model.config, chunks, seed=chunks)
    with torch.no_grad():
        whole, _ = model(torch.from_numpy(video), torch.from_numpy(audio), torch.zeros(1, 1, dtype=torch.long))
    stream = pipe.stream()
    for t, (chunk_video, chunk_audio) in enumerate(chunks_of(pipe.config, video, audio)):
        context = stream.push(chunk_video, chunk_audio)
        assert np.abs(context - whole[:, t].numpy()).max() <= 1e-4, f"chunk {t}"
    prompt = pipe.tokenizer.prompt(QUESTION)
    expected = model.generate(whole, prompt, 24)
    assert stream.token_ids(QUESTION, 24) == [expected]
    assert stream.token_ids(QUESTION, 24, kv_cache=False) == [expected]  # the whole sequence at every token
    assert len(set(expected)) > 2, "the test model should answer with varied tokens"


def test_unbatched_chunks_and_whole_clip_answer(tiny_bundles, tiny_models) -> None:
    model = tiny_models["ttm"]
    pipe = Pipeline.load(tiny_bundles["ttm"])
    video, audio = random_clip(model.config, 4, seed=3)
    stream = pipe.stream()
    for chunk_video, chunk_audio in chunks_of(pipe.config, video, audio):
        context = stream.push(chunk_video[0], chunk_audio[0])
        assert context.shape == (model.config.latents_per_chunk, model.config.d_model)
    assert pipe.answer(video[0], audio[0], QUESTION, max_new_tokens=16) == stream.ask(QUESTION, max_new_tokens=16)
    assert "".join(stream.ask_iter(QUESTION, max_new_tokens=16)) == stream.ask(QUESTION, max_new_tokens=16)


def test_fp16_bundle_streams_close_to_fp32(tiny_bundles, tiny_models) -> None:
    config = tiny_models["ttm"].config
    video, audio = random_clip(config, 6, seed=5)
    streams = [Pipeline.load(tiny_bundles[name]).stream() for name in ("ttm", "ttm-fp16")]
    for chunk_video, chunk_audio in chunks_of(streams[0].pipeline.config, video, audio):
        fp32, fp16 = (s.push(chunk_video, chunk_audio) for s in streams)
        assert fp16.dtype == np.float32
        assert np.abs(fp32 - fp16).max() <= 3e-2 * np.abs(fp32).max()


def test_sampling_is_seeded(tiny_bundles, tiny_models) -> None:
    pipe = Pipeline.load(tiny_bundles["transformer"])
    video, audio = random_clip(tiny_models["transformer"].config, 2)
    stream = pipe.stream()
    for chunk in chunks_of(pipe.config, video, audio):
        stream.push(*chunk)
    sampled = [stream.token_ids(QUESTION, 20, temperature=1.0, top_k=50, top_p=0.9, seed=s) for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]


def test_runtime_works_where_torch_cannot_be_imported(tiny_bundles, tiny_models, tmp_path) -> None:
    video, audio = random_clip(tiny_models["ttm"].config, 2)
    np.savez(tmp_path / "clip.npz", video=video[0], audio=audio[0])
    script = f"""
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is forbidden in the runtime")
sys.meta_path.insert(0, NoTorch())
from mirasol.runtime.pipeline import Pipeline
from mirasol.runtime.cli import run as cli
import numpy as np
pipe = Pipeline.load({str(tiny_bundles['ttm'])!r})
clip = np.load({str(tmp_path / 'clip.npz')!r})
print(pipe.answer(clip["video"], clip["audio"], "what?", max_new_tokens=4) is not None)
assert cli.main([{str(tiny_bundles['ttm'])!r}, "--chunks", {str(tmp_path / 'clip.npz')!r},
                 "--question", "what?", "--json"]) == 0
assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("True")
    assert json.loads(result.stdout.split("\n", 1)[1])["chunks"] == 2


def _run_alone(pipe, clip, pushes):
    stream = pipe.stream()
    contexts = [stream.push(*chunk) for chunk in clip[:pushes]]
    return contexts, stream.token_ids(QUESTION, 12)


def test_streams_are_isolated_interleaved_and_threaded(tiny_bundles, tiny_models) -> None:
    pipe = Pipeline.load(tiny_bundles["ttm"])
    clips = [chunks_of(pipe.config, *random_clip(tiny_models["ttm"].config, 5, seed=s)) for s in (10, 11)]
    alone = [_run_alone(pipe, clip, 5) for clip in clips]
    streams = [pipe.stream(), pipe.stream()]
    interleaved = [[], []]
    for t in range(5):
        for i in (0, 1):
            interleaved[i].append(streams[i].push(*clips[i][t]))
    for i in (0, 1):
        assert all(np.array_equal(a, b) for a, b in zip(alone[i][0], interleaved[i]))
        assert streams[i].token_ids(QUESTION, 12) == alone[i][1]
    results: dict[int, tuple] = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, _run_alone(pipe, clips[i], 5)))
               for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    for i in (0, 1):
        assert all(np.array_equal(a, b) for a, b in zip(alone[i][0], results[i][0]))
        assert results[i][1] == alone[i][1]


def test_saved_stream_continues_exactly(tiny_bundles, tiny_models, tmp_path) -> None:
    pipe = Pipeline.load(tiny_bundles["ttm"])
    clip = chunks_of(pipe.config, *random_clip(tiny_models["ttm"].config, 7, seed=4))
    original = pipe.stream()
    for chunk in clip[:4]:
        original.push(*chunk)
    original.save(tmp_path / "state.npz")
    restored = Pipeline.load(tiny_bundles["ttm"]).restore(tmp_path / "state.npz")
    for chunk in clip[4:]:
        assert np.array_equal(original.push(*chunk), restored.push(*chunk))
    assert original.token_ids(QUESTION, 12) == restored.token_ids(QUESTION, 12)
    with pytest.raises(BundleError, match="another bundle"):
        Pipeline.load(tiny_bundles["transformer"]).restore(tmp_path / "state.npz")


@pytest.mark.parametrize("change, message", [
    (lambda v, a: (v[0, 0], a), "rank"),
    (lambda v, a: (v[:, :3], a), "shape"),
    (lambda v, a: (v.astype(np.float64), a), "dtype"),
    (lambda v, a: (v, np.where(np.arange(a.shape[-1]) == 3, np.nan, a).astype(np.float32)), "NaN"),
    (lambda v, a: (v[:0], a[:0]), "empty"),
    (lambda v, a: (list(v), a), "numpy array"),
])
def test_bad_chunks_are_refused_with_names(tiny_bundles, tiny_models, change, message) -> None:
    pipe = Pipeline.load(tiny_bundles["ttm"])
    chunk = chunks_of(pipe.config, *random_clip(tiny_models["ttm"].config, 1))[0]
    stream = pipe.stream()
    with pytest.raises(InputError, match=message) as error:
        stream.push(*change(*chunk))
    assert "combiner" in str(error.value)
    assert stream.chunks == 0 and stream.state == {}


def test_bad_questions_and_batch_are_refused(tiny_bundles, tiny_models) -> None:
    pipe = Pipeline.load(tiny_bundles["ttm"])
    stream = pipe.stream()
    with pytest.raises(InputError, match="push at least one chunk"):
        stream.ask(QUESTION)
    video, audio = random_clip(tiny_models["ttm"].config, 1, batch=2)
    stream.push(video, audio)
    with pytest.raises(InputError, match="batch 2"):
        stream.push(video[:1], audio[:1])
    with pytest.raises(InputError, match="empty"):
        stream.ask("   ")
    with pytest.raises(InputError, match="context holds"):
        stream.ask("x" * 500)
    with pytest.raises(InputError, match="max_new_tokens"):
        stream.ask(QUESTION, max_new_tokens=0)
    assert len(stream.ask(QUESTION, max_new_tokens=4)) == 2  # batch 2: one answer per row


def test_graph_threads_give_one_graph_its_own_thread_count(tiny_bundle, shared_pipeline) -> None:
    from mirasol.runtime.backends.onnxruntime import OnnxRuntimeBackend

    pipe = Pipeline.load(tiny_bundle, threads=2, graph_threads={"text_decoder": 1})
    threads = {name: session.session.get_session_options().intra_op_num_threads
               for name, session in pipe.sessions.items()}
    assert threads["text_decoder"] == 1 and {t for g, t in threads.items() if g != "text_decoder"} == {2}
    expected, answered = shared_pipeline.stream(), pipe.stream()
    for stream in (expected, answered):
        stream.push(*make_chunk(pipe, seed=3))
    assert answered.token_ids(QUESTION, 6) == expected.token_ids(QUESTION, 6)
    with pytest.raises(BackendError, match=r"graph_threads names \['text_decoderr'\], not graphs of this bundle"):
        Pipeline.load(tiny_bundle, graph_threads={"text_decoderr": 1})
    with pytest.raises(BackendError, match=r"graph_threads\['text_decoder'\] must be a positive int, got 0"):
        OnnxRuntimeBackend(graph_threads={"text_decoder": 0})
