"""TensorRT readiness of exported graphs, checked at export time without TensorRT (numpy + onnx)."""
