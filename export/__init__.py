"""mirasol.export: split ONNX export, bundle writing and validation."""
