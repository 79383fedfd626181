"""What TensorRT's ONNX parser supports, as data: operators (with the types of their data input and their
restrictions), the opsets, the tensor types, and the Q/DQ placements TensorRT fuses. The readiness check
(`readiness.py`) checks graphs against it.

Sources (the data below is copied from them, by hand):
- Operator support matrix of TensorRT 10.15 (opset 9 to 24): onnx/onnx-tensorrt, docs/operators.md
  ("TensorRT 10.15 supports operators in the inclusive range of opset 9 to opset 24"),
  https://github.com/onnx/onnx-tensorrt/blob/main/docs/operators.md
- Operators added during TensorRT 10.x: onnx/onnx-tensorrt docs/Changelog.md (10.1 DeformConv; 10.4 Blackman/
  Hamming/HannWindow; 10.5 STFT; 10.9 opset-21 GroupNormalization; 10.14 Attention; 10.15 RotaryEmbedding,
  RMSNormalization, TensorScatter). TensorRT 10.0 documents opset 9 to 20.
- Symmetric quantization, Q/DQ:
  https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/work-quantized-types.html
  and .../quantized-types-explicit-quantization.html
"""
from __future__ import annotations

DEFAULT_TARGET = "10.3"  # JetPack 6.1 and 6.2 ship TensorRT 10.3
MATRIX_VERSION = "10.15"
OPSET_RANGE = {"10.0": (9, 20), "10.15": (9, 24)}

_FP = ("FP32", "FP16", "BF16")
_FPI = _FP + ("INT32", "INT64")
_ALL = _FPI + ("BOOL",)

# op -> (supported types of the data input, restriction text). From onnx-tensorrt docs/operators.md (TensorRT 10.15).
SUPPORTED_OPS: dict[str, tuple[tuple[str, ...], str]] = {
    "Abs": (_FPI, ""), "Acos": (_FP, ""), "Acosh": (_FP, ""), "Add": (_FPI, ""), "And": (("BOOL",), ""),
    "ArgMax": (_FPI, ""), "ArgMin": (_FPI, ""), "Asin": (_FP, ""), "Asinh": (_FP, ""), "Atan": (_FP, ""),
    "Atanh": (_FP, ""),
    "Attention": (_FP + ("INT8", "FP8"), "Q, K, V and attn_mask must be 4D; past_key, past_value, nonpad_kv_seqlen "
                  "inputs and present_key, present_value, qk_matmul_output outputs are unsupported"),
    "AveragePool": (_FP, "2D or 3D pooling only; dilations must be empty or all ones"),
    "BatchNormalization": (_FP, ""), "BlackmanWindow": (("FP32", "FP16"), ""),
    "Cast": (_FPI + ("UINT8", "BOOL"), ""), "CastLike": (_FPI + ("UINT8", "BOOL"), ""),
    "Ceil": (_FP, ""), "Celu": (_FP, ""), "Clip": (_FP, ""), "Concat": (_ALL, ""),
    "Constant": (_FP + ("FP8", "FP4", "INT4", "INT32", "INT64", "BOOL"),
                 "sparse_value, value_string and value_strings attributes are unsupported"),
    "ConstantOfShape": (_FP + ("FP8", "FP4", "INT4", "INT32", "INT64", "BOOL"), ""),
    "Conv": (_FP, ""), "ConvTranspose": (_FP, ""), "Cos": (_FP, ""), "Cosh": (_FP, ""),
    "CumSum": (_FP, "axis must be a build-time constant"),
    "DeformConv": (("FP32", "FP16"), "input must have 1D or 2D spatial dimensions"),
    "DepthToSpace": (_FPI, ""),
    "DequantizeLinear": (("INT8", "FP8", "FP4", "INT4"), "x_zero_point must be zero"),
    "Div": (_FPI, ""), "Dropout": (_FP, "is_training must be an initializer and evaluate to False"),
    "Einsum": (_FP, ""), "Elu": (_FP, ""), "Equal": (_FPI, ""), "Erf": (_FP, ""), "Exp": (_FP, ""),
    "Expand": (_ALL, ""), "EyeLike": (_ALL, "input must have static dimensions"), "Flatten": (_ALL, ""),
    "Floor": (_FP, ""), "Gather": (_ALL, ""), "GatherElements": (_ALL, ""), "GatherND": (_ALL, ""),
    "Gelu": (_FP + ("INT8", "INT32", "INT64"), ""), "Gemm": (_FP, ""), "GlobalAveragePool": (_FP, ""),
    "GlobalLpPool": (_FP, ""), "GlobalMaxPool": (_FP, ""), "Greater": (_FPI, ""), "GreaterOrEqual": (_FPI, ""),
    "GridSample": (("FP32", "FP16"), "input must be 4D"), "GroupNormalization": (_FP, ""),
    "GRU": (_FP, "bidirectional GRUs need the same activations in both directions"),
    "HammingWindow": (("FP32", "FP16"), ""), "HannWindow": (("FP32", "FP16"), ""), "HardSigmoid": (_FP, ""),
    "HardSwish": (_FP, ""), "Hardmax": (_FP, "axis dimension of input must be a build-time constant"),
    "Identity": (_ALL, ""), "If": (_ALL, "both branches' outputs must have the same rank and different names"),
    "ImageScaler": (_FP, ""), "InstanceNormalization": (_FP, ""), "IsInf": (_FP, ""), "IsNaN": (_FPI, ""),
    "LayerNormalization": (_FP, "only the first output Y is supported"), "LeakyRelu": (_FP, ""),
    "Less": (_FPI, ""), "LessOrEqual": (_FPI, ""), "Log": (_FP, ""), "LogSoftmax": (_FP, ""),
    "Loop": (_ALL, "scan output length cannot be dynamic; loop-carried shapes must not change"),
    "LRN": (_FP, ""), "LSTM": (_FP, "input_forget must be 0, layout must be 0"), "LpNormalization": (_FP, ""),
    "LpPool": (_FP, "dilations must be empty or all ones"), "MatMul": (_FP, ""), "Max": (_FPI, ""),
    "MaxPool": (_FP, "2D or 3D pooling only; Indices output unsupported; dilations empty or all ones"),
    "Mean": (_FP + ("FP8", "INT32", "INT64"), ""), "MeanVarianceNormalization": (_FP, ""), "Min": (_FPI, ""),
    "Mish": (("FP32", "FP16"), ""), "Mod": (_FPI, ""), "Mul": (_FPI, ""), "Neg": (_FPI, ""),
    "NonMaxSuppression": (("FP32", "FP16"), ""), "NonZero": (("FP32", "FP16"), ""), "Not": (("BOOL",), ""),
    "OneHot": (_ALL, "depth must be a build-time constant"), "Or": (("BOOL",), ""), "Pad": (_FPI, ""),
    "ParametricSoftplus": (_FP, ""), "Pow": (_FPI, ""), "PRelu": (_FP, ""),
    "QuantizeLinear": (_FP, "y_zero_point must be 0"),
    "RandomNormal": (_FP, "seed is ignored"), "RandomNormalLike": (_FP, "seed is ignored"),
    "RandomUniform": (_FP, "seed is ignored"), "RandomUniformLike": (_FP, "seed is ignored"),
    "Range": (_FPI, ""), "Reciprocal": (_FP, ""),
    **{op: (_FPI, "axes must be an initializer") for op in (
        "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
        "ReduceProd", "ReduceSum", "ReduceSumSquare")},
    "Relu": (_FPI, ""), "Reshape": (_ALL, ""),
    "Resize": (_FP, "modes nearest/linear only; no antialiasing; aspect ratio policy stretch"),
    "ReverseSequence": (_ALL, ""), "RMSNormalization": (_FP, ""),
    "RNN": (_FP, "bidirectional RNNs need the same activations in both directions"),
    "RoiAlign": (("FP32", "FP16"), ""), "RotaryEmbedding": (_FP, "position_ids must be INT64"), "Round": (_FP, ""),
    "STFT": (("FP32",), "frame_step and window must be initializers; input must be real-valued"),
    "ScaledTanh": (_FP, ""), "Scan": (_FP, ""), "Scatter": (_FPI, ""), "ScatterElements": (_FPI, ""),
    "ScatterND": (_FPI, "reduction other than none is not supported"), "Selu": (_FP, ""), "Shape": (_ALL, ""),
    "Shrink": (_FPI, ""), "Sigmoid": (_FP, ""), "Sign": (_FPI, ""), "Sin": (_FP, ""), "Sinh": (_FP, ""),
    "Size": (_ALL, ""), "Slice": (_ALL, ""), "Softmax": (_FP, ""), "Softplus": (_FP, ""), "Softsign": (_FP, ""),
    "SpaceToDepth": (_FPI, ""), "Split": (_ALL, ""), "Sqrt": (_FP, ""),
    "Squeeze": (_ALL, "axes must be resolvable to a constant"), "Sub": (_FPI, ""), "Sum": (_FPI, ""),
    "Tan": (_FP, ""), "Tanh": (_FP, ""),
    "TensorScatter": (_FP + ("INT32",), "past_cache and update must be 4D; axis must be -2"),
    "ThresholdedRelu": (_FP, ""), "Tile": (_ALL, ""),
    "TopK": (_FPI, "sorted must be 1; K must be less than 3840"), "Transpose": (_ALL, ""), "Trilu": (_ALL, ""),
    "Unsqueeze": (_ALL, "axes must be resolvable to a constant"), "Upsample": (_FP, ""), "Where": (_ALL, ""),
    "Xor": (("BOOL",), ""),
}

# Marked "N" in the same matrix.
UNSUPPORTED_OPS = frozenset({
    "AffineGrid", "Bernoulli", "BitShift", "BitwiseAnd", "BitwiseNot", "BitwiseOr", "BitwiseXor", "Col2Im",
    "CenterCropPad", "Compress", "ConcatFromSequence", "ConvInteger", "DFT", "Det", "DynamicQuantizeLinear",
    "ImageDecoder", "MatMulInteger", "MaxRoiPool", "MaxUnpool", "MelWeightMatrix", "Multinomial",
    "NegativeLogLikelihoodLoss", "Optional", "OptionalGetElement", "OptionalHasElement", "QLinearConv",
    "QLinearMatMul", "RegexFullMatch", "SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase",
    "SequenceInsert", "SequenceLength", "SequenceMap", "SoftmaxCrossEntropyLoss", "SplitToSequence", "StringConcat",
    "StringNormalizer", "StringSplit", "TfIdfVectorizer", "Unique"})

# First TensorRT release whose parser has the op (onnx-tensorrt docs/Changelog.md); older ops are in 10.0.
OP_SINCE = {"DeformConv": "10.1", "BlackmanWindow": "10.4", "HammingWindow": "10.4", "HannWindow": "10.4",
            "STFT": "10.5", "Attention": "10.14", "RotaryEmbedding": "10.15", "RMSNormalization": "10.15",
            "TensorScatter": "10.15"}

# ONNX TensorProto.DataType -> the matrix's type names (None: TensorRT has no such type).
TYPE_NAMES = {1: "FP32", 2: "UINT8", 3: "INT8", 4: "UINT16", 5: "INT16", 6: "INT32", 7: "INT64", 8: "STRING",
               9: "BOOL", 10: "FP16", 11: "DOUBLE", 12: "UINT32", 13: "UINT64", 14: "COMPLEX64", 15: "COMPLEX128",
               16: "BF16", 17: "FP8", 18: "FP8", 19: "FP8", 20: "FP8", 21: "UINT4", 22: "INT4", 23: "FP4"}
TRT_TYPES = {"FP32", "FP16", "BF16", "INT32", "INT64", "INT8", "BOOL", "UINT8", "FP8", "INT4", "FP4"}
# FP8 in TensorRT is E4M3FN (ONNX FLOAT8E4M3FN = 17); the other FP8 encodings are not TensorRT types.
UNSUPPORTED_ELEM = {18: "FLOAT8E4M3FNUZ", 19: "FLOAT8E5M2", 20: "FLOAT8E5M2FNUZ", 21: "UINT4"}

# Q/DQ: operators TensorRT runs in int8 when their inputs are dequantized, and shape-only operators a
# DequantizeLinear may pass through on the way (TensorRT propagates Q/DQ across them).
QDQ_FUSABLE = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose"})
QDQ_PASS_THROUGH = frozenset({"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Slice",
                              "Concat", "Split", "MaxPool", "GlobalMaxPool", "AveragePool", "GlobalAveragePool",
                              "Pad", "Expand", "Gather"})
# INT4 is weight-only, with per-block scales of these block sizes (TensorRT "Quantization Schemes": "The supported
# block sizes are {64, 128}. The block dimension should be one of the last two dimensions.")
INT4_BLOCK_SIZES = (64, 128)
WEIGHTED_DATA_INPUTS = {"MatMul": (0, 1), "Gemm": (0, 1), "Conv": (0, 1), "ConvTranspose": (0, 1)}
