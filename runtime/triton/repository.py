"""`mirasol-triton`: write a Triton Inference Server model repository that serves a bundle, one stream per sequence.

    DIR/                      the repository: any directory (other models and files in it are left as they are)
      mirasol/                the model (--model-name), the only folder written
        .mirasol-output       marks the folder as ours, listing every file in it (writer, bundle, options)
        config.pbtxt          Python backend, sequence batcher (oldest), instances, max batch, parameters
        1/
          model.py            `from mirasol.runtime.triton.model import TritonPythonModel`
          bundle/             a copy of the bundle's listed files (TensorRT engines are built here, on the server)

The model folder is written beside itself and swapped into place (runtime/files/atomic.py); an existing one is replaced
only if this tool wrote it and it holds nothing else (runtime/files/ownership.py's rule, checked before any work and
again at the swap). The bundle is copied file by file: only what its manifest lists, regular files only, no links
followed, each checked against the manifest's sha256 (runtime/files/copying.py).
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from ..backends import BACKENDS, REGISTRY, backend_entry
from ..bundle.manifest import MANIFEST_FILE, MAX_MANIFEST_BYTES, Manifest
from ..bundle.reader import Bundle
from ..cli.commandline import BATCH, SECONDS, bounded, version
from ..errors import BundleError, ExportError, InputError, OutputError
from ..files.atomic import atomic_directory, make_directories, write_file, write_marker
from ..files.copying import Expected, copy_listed
from ..files.ownership import check_output_dir, shown

KIND = "Triton model"  # the model folder's kind of output directory (runtime/files/ownership.py)
TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16"}
MODEL_PY = '''"""Written by mirasol-triton: the model is mirasol.runtime.triton.model, shipped with the package."""
from mirasol.runtime.triton.model import TritonPythonModel  # noqa: F401
'''


@dataclass(frozen=True)
class ServingOptions:
    """How the repository serves the bundle (each becomes a part of config.pbtxt)."""

    model_name: str = "mirasol"
    backend: str = "onnxruntime"
    instances: int = 1
    max_batch: int | None = None  # None: the bundle's maximum
    idle_timeout_s: float = 60.0
    queue_delay_ms: float = 5.0
    max_sequences: int = 256
    max_new_tokens: int = 0  # 0: the bundle's default (never more than a question leaves)
    threads: int = 0  # onnxruntime intra-op threads per instance; 0: ONNX Runtime's default
    state_dir: str = ""  # where streams are saved after every chunk, for RESUME; "": not saved
    decoupled: bool = False  # answers' text sent as generated (gRPC streams only)
    gpus: tuple[int, ...] = ()  # the GPUs of the instances (a GPU backend); (): every GPU Triton sees
    warmup: int = 1  # chunks Triton pushes through each instance when loading it (a stream of their own)


def check_repository(out: str | Path, model_name: str = ServingOptions.model_name) -> Path:
    """The model folder `out/<model_name>`, refused (OutputError, nothing written) unless it may be written: `out`
    a directory or new, the folder new, empty, or a model folder of ours holding nothing else."""
    out = Path(out)
    if os.path.lexists(out) and not out.is_dir():
        raise OutputError(f"{shown(out)} exists and is not a directory; give a model repository directory")
    return check_output_dir(out / model_name, KIND)


def write_repository(bundle_dir: str | Path, out: str | Path, options: ServingOptions = ServingOptions()) -> Path:
    """Write the model `options.model_name` serving `bundle_dir` into the repository `out` (atomically, that folder
    only); returns the model's directory."""
    bundle = Bundle.load(bundle_dir)
    options = _checked(options, bundle)
    check_repository(out, options.model_name)
    make_directories(out, "model repository")
    with atomic_directory(Path(out) / options.model_name, KIND) as model:
        copy_listed(bundle.path, model / "1" / "bundle", _listed_files(bundle), "bundle file")
        if Manifest.read(model / "1" / "bundle").to_dict() != bundle.manifest.to_dict():
            raise BundleError(f"{shown(bundle.path / MANIFEST_FILE)} changed while the bundle was copied; try again")
        write_file(model / "1" / "model.py", MODEL_PY)
        write_file(model / "config.pbtxt", model_config(bundle, options))
        files = sorted(p.relative_to(model).as_posix() for p in model.rglob("*") if p.is_file())
        write_marker(model, KIND, files=files, writer=f"mirasol-edge {version()}", bundle=str(bundle.path),
                     bundle_fingerprint=bundle.fingerprint, options=asdict(options))
    return Path(out).absolute() / options.model_name


def _listed_files(bundle: Bundle) -> dict[str, Expected]:
    """The files the manifest lists, with what each must be: graphs and their external data (sha256), engines it
    records and that are present (sha256 and size), and the manifest itself (bounded; compared once copied)."""
    files = {MANIFEST_FILE: Expected(max_bytes=MAX_MANIFEST_BYTES)}
    for graph in bundle.graphs.values():
        files[graph.file] = Expected(graph.sha256)
        for extra in graph.external_data:
            if extra not in graph.external_sha256:
                raise BundleError(f"{shown(bundle.path)}: graph {graph.name!r} lists external data {extra!r} without "
                                  f"a sha256, so its copy could not be checked; re-export the bundle")
            files[extra] = Expected(graph.external_sha256[extra])
        engine = graph.engine if isinstance(graph.engine, dict) else {}
        name, sha256, size = engine.get("file"), engine.get("sha256"), engine.get("bytes")
        if isinstance(name, str) and isinstance(sha256, str) and os.path.lexists(bundle.path / name):
            files[name] = Expected(sha256, size if isinstance(size, int) and not isinstance(size, bool) else None)
    return files


def _checked(options: ServingOptions, bundle: Bundle) -> ServingOptions:
    """Options as written: max batch filled in, state_dir absolute; anything out of range refused."""
    bundle_max = bundle.manifest.max_batch
    max_batch = options.max_batch or bundle_max
    if options.backend not in BACKENDS:
        raise InputError(f"--backend: {options.backend!r} is not one of {BACKENDS}")
    if not 1 <= max_batch <= bundle_max:
        raise InputError(f"--max-batch: {max_batch} is outside [1, {bundle_max}], the batch range of {bundle.path} "
                         f"(re-export it with mirasol-export --max-batch {max_batch})")
    for name in ("instances", "max_sequences"):
        if getattr(options, name) < 1:
            raise InputError(f"--{name.replace('_', '-')}: must be at least 1, got {getattr(options, name)}")
    if options.max_new_tokens < 0:
        raise InputError(f"--max-new-tokens: must be 0 (the bundle's default) or more, got {options.max_new_tokens}")
    if options.idle_timeout_s <= 0 or options.queue_delay_ms < 0 or options.threads < 0 or options.warmup < 0:
        raise InputError("--idle-timeout-s must be > 0, --queue-delay-ms, --threads and --warmup >= 0")
    if options.gpus and backend_entry(options.backend).device != "gpu":
        raise InputError(f"--gpus: the {options.backend} backend computes on the CPU (KIND_CPU instances); choose a "
                         f"GPU backend ({', '.join(e.name for e in REGISTRY.values() if e.device == 'gpu')}) or "
                         f"leave --gpus out")
    if any(gpu < 0 for gpu in options.gpus) or len(set(options.gpus)) != len(options.gpus):
        raise InputError(f"--gpus: GPU indices are different integers >= 0, got {list(options.gpus)}")
    if not options.model_name.replace("_", "").replace("-", "").isalnum():
        raise InputError(f"--model-name: {options.model_name!r} must be letters, digits, '-' and '_'")
    state_dir = str(Path(options.state_dir).absolute()) if options.state_dir else ""
    return ServingOptions(**{**asdict(options), "max_batch": max_batch, "state_dir": state_dir,
                             "gpus": tuple(options.gpus)})


def _quote(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # a protobuf text-format string literal


def model_config(bundle: Bundle, options: ServingOptions) -> str:
    """config.pbtxt: chunk inputs shaped as the bundle's push step takes them, the sequence batcher, parameters."""
    manifest = bundle.manifest
    video, audio = (manifest.step_tensor("push", name)[1] for name in ("video", "audio"))
    returns = manifest.steps["push"].returns
    _, context = manifest.step_tensor("push", returns, output=True)  # type: ignore[arg-type]

    def dims(shape: tuple[int | str, ...], first_free: bool = False) -> str:
        rest = [d for d in shape if d != "batch"]
        return ", ".join("-1" if isinstance(d, str) or (first_free and i == 0) else str(d) for i, d in enumerate(rest))

    def triton_type(dtype: str) -> str:
        if dtype not in TRITON_TYPES:
            raise ExportError(f"{bundle.path}: a {dtype} chunk input or output has no Triton type here")
        return TRITON_TYPES[dtype]

    parameters = {"bundle": "bundle", "backend": options.backend, "idle_timeout_s": f"{options.idle_timeout_s:g}",
                  "state_dir": options.state_dir, "max_new_tokens": str(options.max_new_tokens),
                  "threads": str(options.threads)}
    kind = "KIND_GPU" if backend_entry(options.backend).device == "gpu" else "KIND_CPU"
    gpus = f" gpus: [ {', '.join(map(str, options.gpus))} ]" if options.gpus else ""
    chunk = [("VIDEO", video), ("AUDIO", audio)]
    warmup = [  # zeros are a valid chunk; the model serves correlation ID 0 on a stream of its own
        f'model_warmup [ {{ name: "chunk" batch_size: 1 count: {options.warmup}',
        *(f"  inputs {{ key: {_quote(name)} value {{ data_type: {triton_type(info.dtype)} "
          f"dims: [ {dims(info.shape)} ] zero_data: true }} }}" for name, info in chunk),
        "} ]"] if options.warmup else []
    lines = [
        f"# Written by mirasol-triton {version()} for the bundle in 1/bundle ({manifest.precision}).",
        f"name: {_quote(options.model_name)}",
        'backend: "python"',
        f"max_batch_size: {options.max_batch}",
        "input [",
        f'  {{ name: "VIDEO" data_type: {triton_type(video.dtype)} dims: [ {dims(video.shape)} ] optional: true }},',
        f'  {{ name: "AUDIO" data_type: {triton_type(audio.dtype)} dims: [ {dims(audio.shape)} ] optional: true }},',
        '  { name: "QUESTION" data_type: TYPE_STRING dims: [ 1 ] optional: true },',
        '  { name: "MAX_NEW_TOKENS" data_type: TYPE_INT32 dims: [ 1 ] optional: true },',
        '  { name: "RESUME" data_type: TYPE_BOOL dims: [ 1 ] optional: true },',
        '  { name: "TEMPERATURE" data_type: TYPE_FP32 dims: [ 1 ] optional: true },',
        '  { name: "TOP_K" data_type: TYPE_INT32 dims: [ 1 ] optional: true },',
        '  { name: "TOP_P" data_type: TYPE_FP32 dims: [ 1 ] optional: true },',
        '  { name: "SEED" data_type: TYPE_INT64 dims: [ 1 ] optional: true }',
        "]",
        "output [",
        f'  {{ name: "CONTEXT" data_type: {triton_type(context.dtype)} dims: [ {dims(context.shape, True)} ] }},',
        '  { name: "ANSWER" data_type: TYPE_STRING dims: [ 1 ] },',
        *(['  { name: "PIECE" data_type: TYPE_STRING dims: [ 1 ] },'] if options.decoupled else []),
        '  { name: "CHUNKS" data_type: TYPE_INT64 dims: [ 1 ] }',
        "]",
        *(["model_transaction_policy { decoupled: true }"] if options.decoupled else []),
        "sequence_batching {",
        f"  max_sequence_idle_microseconds: {round(options.idle_timeout_s * 1e6)}",
        "  oldest {",
        f"    max_candidate_sequences: {options.max_sequences}",
        f"    preferred_batch_size: [ {options.max_batch} ]",
        f"    max_queue_delay_microseconds: {round(options.queue_delay_ms * 1e3)}",
        "  }",
        "  control_input [",
        '    { name: "START" control [ { kind: CONTROL_SEQUENCE_START int32_false_true: [ 0, 1 ] } ] },',
        '    { name: "END" control [ { kind: CONTROL_SEQUENCE_END int32_false_true: [ 0, 1 ] } ] }',
        "  ]",
        "}",
        f"instance_group [ {{ count: {options.instances} kind: {kind}{gpus} }} ]",
        *warmup,
        *(f"parameters {{ key: {_quote(k)} value {{ string_value: {_quote(v)} }} }}" for k, v in parameters.items()),
    ]
    return "\n".join(lines) + "\n"


def add_serving_options(parser: argparse.ArgumentParser, defaults: ServingOptions = ServingOptions()) -> None:
    """The ServingOptions as command-line options (shared with the load measurement)."""
    parser.add_argument("--model-name", default=defaults.model_name, help="the model's name in the repository")
    parser.add_argument("--backend", choices=BACKENDS, default=defaults.backend,
                        help="runtime backend inside the model: " + "; ".join(
                            f"{e.name}: {e.help}" for e in REGISTRY.values()))
    parser.add_argument("--instances", type=bounded(int, 1, 1024), default=defaults.instances,
                        help="model instances (processes); a sequence stays on one")
    parser.add_argument("--max-batch", type=BATCH, default=defaults.max_batch,
                        help="most requests (of different sequences) per model call; default: the bundle's maximum")
    parser.add_argument("--idle-timeout-s", type=SECONDS, default=defaults.idle_timeout_s,
                        help="a sequence idle this long is dropped by Triton and its stream reclaimed")
    parser.add_argument("--queue-delay-ms", type=bounded(float, 0, 1e7), default=defaults.queue_delay_ms,
                        help="how long Triton may hold a request to batch it with others (0: no wait)")
    parser.add_argument("--max-sequences", type=bounded(int, 1, 1 << 20), default=defaults.max_sequences,
                        help="sequences served at once per model (more wait until one ends)")
    parser.add_argument("--max-new-tokens", type=bounded(int, 0, 1 << 20), default=defaults.max_new_tokens,
                        help="answer length when a request gives no MAX_NEW_TOKENS or 0 (0 here: the bundle's "
                             "default); a question that leaves less of the text context gets what it leaves")
    parser.add_argument("--threads", type=bounded(int, 0, 1024), default=defaults.threads,
                        help="onnxruntime intra-op threads per instance (0: ONNX Runtime's default)")
    parser.add_argument("--state-dir", default=defaults.state_dir,
                        help="save each stream here after every chunk, so START+RESUME continues it after a "
                             "restart (off when empty)")
    parser.add_argument("--decoupled", action="store_true", default=defaults.decoupled,
                        help="a decoupled model: each answer's text is sent as it is generated (PIECE responses), "
                             "over gRPC streams only (Triton's HTTP endpoint refuses decoupled models)")
    parser.add_argument("--gpus", type=_gpu_list, default=defaults.gpus, metavar="0,1,...",
                        help="pin the instances to these GPUs (instance_group gpus; each GPU gets --instances "
                             "instances); for a GPU backend only; default: every GPU Triton sees")
    parser.add_argument("--warmup", type=bounded(int, 0, 1 << 20), default=defaults.warmup, metavar="N",
                        help="chunks (zeros) Triton pushes through each instance when it loads the model, so that "
                             "the first client does not wait for the graphs' first runs (0: none)")


def _gpu_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected GPU indices separated by commas (0,1), got {text!r}") from None


def serving_options(args: argparse.Namespace) -> ServingOptions:
    return ServingOptions(**{name: getattr(args, name) for name in ServingOptions.__dataclass_fields__})
