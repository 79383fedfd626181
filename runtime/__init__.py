"""mirasol.runtime: chain the exported graphs with numpy + ONNX Runtime (or TensorRT). Never imports torch."""
from .bundle import Bundle
from .errors import BackendError, BundleError, ExportError, InputError, MirasolError, OutputError
from .pipeline import Pipeline, Stream
from .tokenizer import ByteTokenizer

__all__ = ["BackendError", "Bundle", "BundleError", "ByteTokenizer", "ExportError", "InputError", "MirasolError",
           "OutputError", "Pipeline", "Stream"]
