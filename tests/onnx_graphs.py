"""Small hand-made ONNX graphs and bundles around them, for the TensorRT readiness and engine-build tests."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from mirasol.runtime.bundle.tensors import TensorInfo
from mirasol.runtime.bundle.manifest import AxisRange, GraphEntry, Manifest, StepSpec

AXES = {"batch": (1, 1, 4), "seq": (1, 8, 16)}


def model(nodes, inputs, outputs, inits=(), opset=17, functions=()):
    graph = h.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    return h.make_model(graph, opset_imports=[h.make_opsetid("", opset)], functions=list(functions))


def x_info(dtype=T.FLOAT, shape=("batch", "seq", 4), name="x"):
    return h.make_tensor_value_info(name, dtype, list(shape))


def y_info(dtype=T.FLOAT, shape=("batch", "seq", 3), name="y"):
    return h.make_tensor_value_info(name, dtype, list(shape))


def weight(name="w", shape=(4, 3)):
    return nh.from_array(np.random.default_rng(0).standard_normal(shape).astype(np.float32), name)


def supported_model(x_shape=("batch", "seq", 4)):
    """LayerNorm -> MatMul -> Add -> Softmax, like our transformer blocks: x [batch, seq, 4] -> y [batch, seq, 3]."""
    scale = nh.from_array(np.ones(4, np.float32), "ln_scale")
    bias = nh.from_array(np.zeros(3, np.float32), "b")
    axes = nh.from_array(np.array([-1], np.int64), "axes")
    nodes = [h.make_node("LayerNormalization", ["x", "ln_scale"], ["n"], axis=-1),
             h.make_node("MatMul", ["n", "w"], ["m"]), h.make_node("Add", ["m", "b"], ["a"]),
             h.make_node("ReduceMean", ["a", "axes"], ["mean"], keepdims=1), h.make_node("Sub", ["a", "mean"], ["c"]),
             h.make_node("Softmax", ["c"], ["y"], axis=-1)]
    return model(nodes, [x_info(shape=x_shape)], [y_info(shape=(*x_shape[:2], 3))], [scale, weight(), bias, axes],
                 opset=18)


def write_bundle(directory: Path, models: dict, precision="fp32", axes=None, shapes=None) -> Path:
    """A bundle directory of these graphs (all in the push step); `shapes` overrides the manifest's symbolic shape
    of named inputs (by default each is the ONNX file's)."""
    directory.mkdir(parents=True, exist_ok=True)
    axes = axes or {"batch": AxisRange(1, 1, 4), "seq": AxisRange(1, 8, 16)}
    graphs, feeds = {}, []
    for name, graph in models.items():
        path = directory / f"{name}.onnx"
        onnx.save(graph, str(path))

        def info(v):
            dims = tuple(d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim)
            dtype = onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name
            return TensorInfo(v.name, dtype, tuple((shapes or {}).get(v.name, dims)))
        graphs[name] = GraphEntry(name, path.name, hashlib.sha256(path.read_bytes()).hexdigest(),
                                  tuple(info(v) for v in graph.graph.input), tuple(info(v) for v in graph.graph.output),
                                  dict(axes))
        feeds += [v.name for v in graph.graph.input]
    manifest = Manifest(config={}, precision=precision, graphs=graphs,
                        steps={"push": StepSpec(tuple(models), tuple(dict.fromkeys(feeds))), "ask": StepSpec(()),
                               "generate": StepSpec(())}, state=(), counters=(), tokenizer={})
    manifest.check()
    manifest.write(directory)
    return directory
