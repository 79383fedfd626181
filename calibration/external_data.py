"""ONNX graphs whose weights live beside them (external data), handled one tensor at a time.

A mirasol3b graph holds 8 GB of weights. Protobuf cannot serialise a message over 2 GB, and a transform that loads
the graph, copies it and adds its own tensors holds the weights several times over. So every precision transform
works on a *weightless* proto (`load_weightless`: the graph's structure, with its large tensors still pointing into
the file they came from) and:

- `read_tensor` reads one tensor's values from its file when they are needed, and nothing keeps them;
- `weightless_session` makes an ONNX Runtime session of a weightless proto (the proto's bytes, plus the folder its
  tensors live in): ONNX Runtime reads the weights once, for itself (a proto that still holds its weights is
  written out with them beside it first);
- `lazy_weights` lets ONNX Runtime's quantizers (which read a weight through `tensor_proto_to_array`, from bytes in
  the proto) read each weight from its file instead;
- `write_graph` writes the result: tensors still in their source file are copied piece by piece, large tensors made
  in memory (quantized weights) are written out, and only the weightless proto is serialised. Graphs whose weights
  reach EXTERNAL_DATA_BYTES keep them in `<graph>.onnx.data`; smaller ones are written whole, as before.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto

from mirasol.runtime.errors import ExportError

EXTERNAL_DATA_BYTES = 1 << 31  # protobuf's 2 GB limit: larger graphs keep their weights beside them
INLINE_BYTES = 1024  # smaller tensors stay in the proto (ONNX Runtime needs shape-relevant constants inline)
ALIGN = 4096  # offsets of tensors in a .data file: page-aligned, so a runtime may map them
COPY_PIECE = 64 << 20  # bytes copied at a time from one .data file to another
PACKED_TYPES = (TensorProto.INT4, TensorProto.UINT4)


def load_weightless(path: str | Path) -> onnx.ModelProto:
    """The graph at `path` without its external tensors' bytes (they stay in their files, named by location)."""
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as bad:  # noqa: BLE001 - protobuf's DecodeError, OSError, ...
        raise ExportError(f"cannot read ONNX graph {path}: {bad}") from None


def with_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with ONNX shape inference's value_info (edited in place). Inference runs on a copy that holds no
    large tensor values (a graph whose weights are inline, up to 2 GB, is not copied three times over)."""
    stub = onnx.ModelProto()
    stub.ir_version = model.ir_version
    stub.opset_import.extend(model.opset_import)
    stub.functions.extend(model.functions)
    graph = stub.graph
    graph.name = model.graph.name
    for field in ("node", "input", "output", "value_info"):
        getattr(graph, field).extend(getattr(model.graph, field))
    for tensor in model.graph.initializer:
        copy = graph.initializer.add()
        if tensor.ByteSize() < INLINE_BYTES:  # shapes and constants inference may read
            copy.CopyFrom(tensor)
            continue
        copy.name, copy.data_type = tensor.name, tensor.data_type
        copy.dims.extend(tensor.dims)
        copy.data_location = TensorProto.EXTERNAL
        entry = copy.external_data.add()
        entry.key, entry.value = "location", "values-not-needed"
    inferred = onnx.shape_inference.infer_shapes(stub)
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred.graph.value_info)
    return model


def external_info(tensor: TensorProto) -> tuple[str, int, int] | None:
    """(location, offset, length) of a tensor stored outside the proto, else None."""
    if tensor.data_location != TensorProto.EXTERNAL:
        return None
    info = {entry.key: entry.value for entry in tensor.external_data}
    location = info.get("location")
    if not location or Path(location).is_absolute() or ".." in Path(location).parts:
        raise ExportError(f"tensor {tensor.name!r}: external data location {location!r} is not a file beside the "
                          f"graph")
    if "length" in info:
        length = int(info["length"])
    else:  # optional in the format: the tensor's own size
        count = int(np.prod(tensor.dims))
        length = ((count + 1) // 2 if tensor.data_type in PACKED_TYPES else
                  count * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize)
    return location, int(info.get("offset", 0)), length


def tensor_bytes(tensor: TensorProto) -> int:
    """Bytes of a tensor's data, wherever it is stored."""
    info = external_info(tensor)
    if info is not None:
        return info[2]
    return tensor.ByteSize()


def read_tensor(tensor: TensorProto, base_dir: str | Path) -> np.ndarray:
    """A tensor's values, read from its file when it is external (`base_dir`: the graph's folder)."""
    info = external_info(tensor)
    if info is None:
        return onnx.numpy_helper.to_array(tensor)
    location, offset, length = info
    path = Path(base_dir) / location
    if tensor.data_type in PACKED_TYPES:  # two values a byte: let onnx unpack a copy that holds the bytes
        unpacked = TensorProto()
        unpacked.CopyFrom(tensor)
        del unpacked.external_data[:]
        unpacked.data_location = TensorProto.DEFAULT
        with open(path, "rb") as f:
            f.seek(offset)
            unpacked.raw_data = f.read(length)
        return onnx.numpy_helper.to_array(unpacked)
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
    count = int(np.prod(tensor.dims)) if tensor.dims else 1
    if length != count * dtype.itemsize:
        raise ExportError(f"tensor {tensor.name!r}: {length} bytes in {location}, its shape {list(tensor.dims)} of "
                          f"{dtype} needs {count * dtype.itemsize}")
    try:
        values = np.fromfile(path, dtype=dtype, count=count, offset=offset)
    except OSError as bad:
        raise ExportError(f"tensor {tensor.name!r}: cannot read {path}: {bad}") from None
    if values.size != count:
        raise ExportError(f"tensor {tensor.name!r}: {path} ends before its {count} values")
    return values.reshape(tuple(tensor.dims))


def weightless_session(model: onnx.ModelProto, weights_dir: str | Path, work: Path, threads: int | None = None
                       ) -> ort.InferenceSession:
    """An ONNX Runtime CPU session of `model`, whose external tensors ONNX Runtime reads from `weights_dir`.

    A weightless proto goes to ONNX Runtime as bytes (with the folder its tensors are in). One that holds its weights
    (a graph under 2 GB is written whole) is first written to `work` with its weights beside it, and loaded from
    there: given a model's bytes, ONNX Runtime keeps a copy of them as long as the session lives (onnxruntime issue
    21165), a second copy of the weights. The CPU arena is off: activations go back when a call ends instead of being
    kept at their largest for each of the graphs loaded side by side."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_cpu_mem_arena = False
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as the runtime's backend
    if threads:
        options.intra_op_num_threads = threads
    providers = ["CPUExecutionProvider"]
    if any(tensor_bytes(t) >= INLINE_BYTES and external_info(t) is None for t in model.graph.initializer):
        path = work / f"{model.graph.name or 'graph'}.weights-beside.onnx"
        write_graph(model, path, weights_dir, external=True)
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(weights_dir))
    return ort.InferenceSession(model.SerializeToString(), sess_options=options, providers=providers)


# The modules of ONNX Runtime's quantization package that read weights through this name.
_QUANTIZER_MODULES = ("quant_utils", "base_quantizer", "qdq_quantizer", "onnx_quantizer")


@contextlib.contextmanager
def lazy_weights(weights_dir: str | Path) -> Iterator[None]:
    """While inside, ONNX Runtime's quantizers read a weight stored outside the proto from `weights_dir`, one at a
    time, without putting its bytes into the proto (they read it through `tensor_proto_to_array`, which would fail
    on an external tensor: the quantized model would otherwise need the whole fp32 model in memory)."""
    import importlib

    modules = [importlib.import_module(f"onnxruntime.quantization.{name}") for name in _QUANTIZER_MODULES]
    original = modules[0].tensor_proto_to_array
    for module in modules:
        if getattr(module, "tensor_proto_to_array", None) is not original:
            raise ExportError(f"onnxruntime.quantization.{module.__name__.rsplit('.', 1)[1]} no longer reads weights "
                              f"through tensor_proto_to_array: this onnxruntime ({ort.__version__}) cannot quantize "
                              f"graphs with external weights here")

    def read(initializer: TensorProto) -> np.ndarray:
        if external_info(initializer) is None:
            return original(initializer)
        if initializer.data_type not in (TensorProto.FLOAT, TensorProto.FLOAT16):
            raise ValueError(f"Only float type is supported. Weights {initializer.name} is {initializer.data_type}")
        return read_tensor(initializer, weights_dir)

    for module in modules:
        module.tensor_proto_to_array = read
    try:
        yield
    finally:
        for module in modules:
            module.tensor_proto_to_array = original


def write_graph(model: onnx.ModelProto, path: Path, source_dir: str | Path | None,
                external: bool | None = None) -> None:
    """Write `model` to `path`: its tensors stored outside the proto are read from `source_dir`.

    external: keep the weights in `<path.name>.data` (default: when they reach EXTERNAL_DATA_BYTES). The model is
    consumed (its tensors are moved out of it or into it).
    """
    tensors = _tensors(model)
    if any(external_info(t) is not None for t in tensors) and source_dir is None:
        raise ExportError(f"{path.name}: the graph has external tensors and no folder to read them from")
    total = sum(tensor_bytes(t) for t in tensors)
    if external is None:
        external = total >= EXTERNAL_DATA_BYTES
    if not external:
        for tensor in tensors:
            if external_info(tensor) is not None:
                raw = read_tensor(tensor, source_dir).tobytes()  # type: ignore[arg-type]
                del tensor.external_data[:]
                tensor.data_location = TensorProto.DEFAULT
                tensor.raw_data = raw
        onnx.save(model, str(path))
        return
    location = f"{path.name}.data"
    with open(path.parent / location, "wb") as out:
        def put(write: Callable[[], None]) -> tuple[int, int]:
            out.write(b"\0" * ((-out.tell()) % ALIGN))
            start = out.tell()
            write()
            return start, out.tell() - start

        for tensor in tensors:
            info = external_info(tensor)
            if info is not None:
                offset, length = put(lambda: _copy(Path(source_dir) / info[0], info[1], info[2], out))  # type: ignore
            elif tensor.ByteSize() >= INLINE_BYTES:
                raw = tensor.raw_data if tensor.HasField("raw_data") else onnx.numpy_helper.to_array(tensor).tobytes()
                offset, length = put(lambda: out.write(raw))
                for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                    tensor.ClearField(field)
                del raw
            else:
                continue
            del tensor.external_data[:]
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
    onnx.save(model, str(path))


def _tensors(model: onnx.ModelProto) -> list[TensorProto]:
    """The graph's initializers (the exporters and quantizers keep every weight there)."""
    return list(model.graph.initializer)


def _copy(source: Path, offset: int, length: int, out) -> None:
    try:
        with open(source, "rb") as f:
            f.seek(offset)
            remaining = length
            while remaining:
                piece = f.read(min(remaining, COPY_PIECE))
                if not piece:
                    raise ExportError(f"{source} ends before the {length} bytes at offset {offset}")
                out.write(piece)
                remaining -= len(piece)
    except OSError as bad:
        raise ExportError(f"cannot read external data {source}: {bad}") from None
