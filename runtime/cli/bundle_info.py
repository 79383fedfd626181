"""What a bundle is, in plain text (`mirasol-run BUNDLE --info`): read from its manifest and files, no graph loaded.

The model (its config), the precision and batch range, the chunk it takes, the longest question and answer, the
graphs with their sizes on disk, the TensorRT engines, the validation errors against PyTorch and, for fp16 and int8
bundles, how the precision was chosen.
"""
from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

from ..bundle.manifest import Manifest
from ..bundle.reader import Bundle
from ..bundle.reports import format_fp16, format_quantization, format_rows, format_validation
from ..media.chunking import MediaParams
from ..tensorrt.build import memory_report


def human_bytes(size: float) -> str:
    for unit in ("B", "KB", "MB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.2f} GB"


def format_graph_sizes(directory: str | Path, manifest: Manifest) -> str:
    """Per graph its file and its bytes on disk (the ONNX file and its external data), then the total."""
    rows = [("graph", "file", "size")]
    total = 0
    for name, graph in manifest.graphs.items():
        size = sum((Path(directory) / f).stat().st_size for f in (graph.file, *graph.external_data))
        total += size
        rows.append((name, graph.file + (f" (+{len(graph.external_data)} data)" if graph.external_data else ""),
                     human_bytes(size)))
    rows.append(("total", "", human_bytes(total)))
    return "\n".join(format_rows(rows))


def text_limits(max_text_len: int, prompt_tokens: int) -> tuple[int, int]:
    """(the longest question in bytes, the most question bytes + answer tokens) for a text context of
    `max_text_len` tokens whose prompt adds `prompt_tokens` markers to the question; every answer has a token."""
    room = max_text_len - prompt_tokens
    return room - 1, room


def describe_bundle(bundle: Bundle, shown_path: str | Path | None = None, width: int = 110) -> str:
    """The description, `shown_path` naming the bundle (default: its absolute path), lines wrapped at `width`."""
    manifest = bundle.manifest
    shown = shown_path if shown_path is not None else bundle.path
    config = manifest.config
    media = MediaParams.from_config(config)
    _, video = manifest.step_tensor("push", "video")
    _, audio = manifest.step_tensor("push", "audio")
    tokenizer = bundle.tokenizer
    context = int(config["max_text_len"])
    longest_question, question_and_answer = text_limits(context, len(tokenizer.prompt("")))
    state_bytes = sum(dtype.itemsize * int(np.prod([high for _, high in dims]))
                      for dtype, dims in bundle.state_limits(1).values())
    graph_bytes = sum((bundle.path / f).stat().st_size
                      for graph in manifest.graphs.values() for f in (graph.file, *graph.external_data))
    made = ", ".join(f"{k} {v}" for k, v in manifest.producer.items() if k != "python") or "unknown"
    fields = {
        "bundle": f"{shown} ({manifest.format} format {manifest.format_version})",
        "written by": made,
        "model": f"{config.get('preset', 'unnamed')}: {human_bytes(graph_bytes)} of {manifest.precision} graphs "
                 f"(its config is at the end)",
        "precision": f"{manifest.precision}; batch 1 to {manifest.max_batch}",
        "chunk": f"video {list(video.shape[1:])} {video.dtype}: {media.frames_per_chunk} frames at {media.fps:g} fps "
                 f"= {media.frames_per_chunk / media.fps:g} s, RGB in [0, 1]; audio {list(audio.shape[1:])} "
                 f"{audio.dtype}: log-mel of {media.audio.sample_rate} Hz mono",
        "question": f"at most {longest_question} bytes (UTF-8); question bytes + answer tokens at most "
                    f"{question_and_answer}: the text context holds {context} tokens = BOS + question + newline + "
                    f"answer",
        "answer": f"up to {manifest.generation['max_new_tokens']} tokens unless asked for another length (mirasol-run "
                  f"--max-new-tokens, Stream.ask max_new_tokens), fewer where the question leaves less",
        "tokenizer": f"bytes: {tokenizer.vocab_size} tokens (256 byte values + BOS, EOS, PAD)",
        "state": f"at most {human_bytes(state_bytes)} per stream carried between chunks (windowed: it stops "
                 f"growing)",
    }
    indent = max(len(name) for name in fields) + 2
    lines = [textwrap.fill(value, width, initial_indent=name.ljust(indent), subsequent_indent=" " * indent)
             for name, value in fields.items()]
    lines += ["", format_graph_sizes(bundle.path, manifest), ""]
    engines = {name: graph.engine for name, graph in manifest.graphs.items() if graph.engine}
    lines += (["TensorRT engines:", *memory_report(engines)] if engines else
              [f"TensorRT engines: none (build them on the device that runs them: mirasol-build-engines {shown})"])
    lines += ["", "validation against PyTorch (the largest error of each output):",
              format_validation(manifest.validation) if manifest.validation else "none (exported with --no-validate)"]
    if "fp16" in manifest.quantization:
        lines += ["", format_fp16(manifest.quantization["fp16"])]
    if "accuracy" in manifest.quantization:
        lines += ["", format_quantization(manifest.quantization)]
    lines += ["", textwrap.fill("config: " + ", ".join(f"{k} {v}" for k, v in config.items()), width,
                                subsequent_indent="  ")]
    return "\n".join(lines)
