"""mirasol.export: split ONNX export, bundle writing and validation."""

# The ONNX opset the graphs are exported at (kept here, free of heavy imports, for the command line's default): the
# newest that TensorRT 10.3 (JetPack 6) parses (9..20), and the first with Gelu as one node (docs/benchmark.md).
DEFAULT_OPSET = 20
MIN_OPSET, MAX_OPSET = 18, 20  # torch's exporter writes 18 and later; TensorRT 10.3 parses up to 20
