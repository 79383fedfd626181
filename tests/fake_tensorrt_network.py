"""The network half of the fake TensorRT (fake_tensorrt.py): tensors, a layer per ONNX node, the ONNX parser, and
the check that flags a weakly typed fp16 network whose rotary-angle layers are not pinned to fp32."""
from __future__ import annotations

import enum
import types
from typing import Any

import onnx


def make_network(DataType: Any, onnx_types: dict[int, Any], NetworkDefinitionCreationFlag: Any,  # noqa: N803
                 trt11: bool) -> types.SimpleNamespace:
    """The network classes of one fake TensorRT version (its DataType and creation flags)."""

    class ITensor:
        __slots__ = ("name", "shape", "dtype", "is_shape_tensor")

        def __init__(self, name: str, shape: tuple[int, ...], dtype: DataType) -> None:
            self.name, self.shape, self.dtype, self.is_shape_tensor = name, shape, dtype, False

    class LayerType(enum.IntEnum):  # a few of NvInfer.h's; every other ONNX op is an ELEMENTWISE layer here
        CAST, ELEMENTWISE, UNARY, MATRIX_MULTIPLY, CONSTANT = 1, 9, 11, 17, 19

    class UnaryOperation(enum.IntEnum):
        EXP, SIN, COS = 0, 6, 7

    layer_types = {"Cast": LayerType.CAST, "Sin": LayerType.UNARY, "Cos": LayerType.UNARY, "Exp": LayerType.UNARY,
                   "MatMul": LayerType.MATRIX_MULTIPLY, "Constant": LayerType.CONSTANT}

    class ILayer:
        def __init__(self, network: "INetworkDefinition", name: str, op_type: str, inputs: list[Any],
                     outputs: list[ITensor]) -> None:
            self._network, self._name, self._op_type = network, name, op_type
            self._inputs, self._outputs = inputs, outputs
            self._precision: DataType | None = None
            self._output_types: dict[int, DataType] = {}

        name = property(lambda self: self._name)
        type = property(lambda self: layer_types.get(self._op_type, LayerType.ELEMENTWISE))
        num_inputs = property(lambda self: len(self._inputs))
        num_outputs = property(lambda self: len(self._outputs))

        def get_input(self, index: int) -> ITensor | None:
            return self._inputs[index] if 0 <= index < len(self._inputs) else None

        def get_output(self, index: int) -> ITensor | None:
            return self._outputs[index] if 0 <= index < len(self._outputs) else None

        @property
        def precision(self) -> DataType:
            return self._precision if self._precision is not None else DataType.FLOAT

        @precision.setter
        def precision(self, dtype: DataType) -> None:
            self._constrain()
            self._precision = DataType(dtype)

        def set_output_type(self, index: int, dtype: DataType) -> None:
            self._constrain()
            self._output_types[int(index)] = DataType(dtype)

        def _constrain(self) -> None:
            if self._network._strongly_typed:  # 10.3: "Setting layer precision and layer output types is not allowed"
                self._network._refused.append(f"layer {self._name!r}: precision set on a strongly typed network")

    if trt11:  # TensorRT 11 types every network strongly: layers have no precision to set (absent from its strings)
        del ILayer.precision, ILayer.set_output_type

    class IUnaryLayer(ILayer):
        @property
        def op(self) -> UnaryOperation:
            if self._op_type not in ("Sin", "Cos", "Exp"):
                raise TypeError(f"layer {self._name!r} ({self._op_type}) is not an IUnaryLayer")
            return UnaryOperation[self._op_type.upper()]

    class INetworkDefinition:
        def __init__(self, flags: int) -> None:
            known = sum(1 << int(f) for f in NetworkDefinitionCreationFlag)
            if flags & ~known:
                raise ValueError(f"create_network: unknown NetworkDefinitionCreationFlag bits {flags & ~known:#x}")
            self._strongly_typed = trt11 or bool(flags & (1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED)))
            self._inputs: list[ITensor] = []
            self._outputs: list[ITensor] = []
            self._layers: list[ILayer] = []
            self._refused: list[str] = []
            self._path = ""

        num_inputs = property(lambda self: len(self._inputs))
        num_outputs = property(lambda self: len(self._outputs))
        num_layers = property(lambda self: len(self._layers))

        def get_layer(self, index: int) -> ILayer:
            return self._layers[index]

        def get_input(self, index: int) -> ITensor:
            return self._inputs[index]

        def get_output(self, index: int) -> ITensor:
            return self._outputs[index]

    class OnnxParser:
        def __init__(self, network: INetworkDefinition, logger: Any) -> None:
            self._network, self._errors = network, []

        num_errors = property(lambda self: len(self._errors))

        def get_error(self, index: int) -> str:
            return self._errors[index]

        def parse_from_file(self, model: str) -> bool:
            proto = onnx.load(model, load_external_data=False)
            initializers = {i.name for i in proto.graph.initializer}

            def tensor(value: Any) -> ITensor:
                dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim)
                return ITensor(value.name, dims, onnx_types[value.type.tensor_type.elem_type])
            network = self._network
            network._inputs = [tensor(v) for v in proto.graph.input if v.name not in initializers]
            network._outputs = [tensor(v) for v in proto.graph.output]
            network._path = model
            inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False).graph
            types = {v.name: v.type.tensor_type.elem_type for v in (*inferred.value_info, *inferred.output)}
            tensors = {t.name: t for t in network._inputs}
            for node in proto.graph.node:
                outputs = [ITensor(name, (), onnx_types.get(types.get(name, 1), DataType.FLOAT))
                           for name in node.output]
                network._layers.append(ILayer(network, node.name, node.op_type,
                                              [tensors.get(name) for name in node.input], outputs))
                tensors.update((t.name, t) for t in outputs)
            return True

    def unpinned_rotary(network: INetworkDefinition, config: Any) -> list[str]:
        """The float layers computing a Cos or Sin (and feeding one) that are not pinned to fp32 and obeyed."""
        producer = {t.name: layer for layer in network._layers for t in layer._outputs}
        todo = [layer for layer in network._layers if layer._op_type in ("Cos", "Sin")]
        seen: dict[str, ILayer] = {}
        while todo:
            layer = todo.pop()
            if layer.name not in seen:
                seen[layer.name] = layer
                todo.extend(producer[t.name] for t in layer._inputs if t is not None and t.name in producer)
        obeyed = "OBEY_PRECISION_CONSTRAINTS" in {f.name for f in config._flags}
        floats = (DataType.FLOAT, DataType.HALF)
        return sorted(name for name, layer in seen.items()
                      if any(t.dtype in floats for t in layer._outputs)
                      and not (obeyed and layer._precision == DataType.FLOAT
                               and all(layer._output_types.get(k) == DataType.FLOAT
                                       for k, t in enumerate(layer._outputs) if t.dtype in floats)))

    return types.SimpleNamespace(ITensor=ITensor, LayerType=LayerType, UnaryOperation=UnaryOperation, ILayer=ILayer,
                                 IUnaryLayer=IUnaryLayer, INetworkDefinition=INetworkDefinition, OnnxParser=OnnxParser,
                                 unpinned_rotary=unpinned_rotary)
