"""mirasol.export: split ONNX export, bundle writing and validation."""

# The ONNX opset the graphs are exported at (kept here, free of heavy imports, for the command line's default).
# Measured: opset 20 graphs (Gelu as one node) run 5-10% faster per chunk than 18 here; TensorRT 10.3 parses 9..20.
DEFAULT_OPSET = 20
MIN_OPSET, MAX_OPSET = 18, 20  # torch's exporter writes 18 and later; TensorRT 10.3 parses up to 20
