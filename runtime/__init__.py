"""mirasol.runtime: chain the exported graphs with numpy + ONNX Runtime (or TensorRT). Never imports torch."""
