"""mirasol.runtime: chain the exported graphs with numpy + ONNX Runtime (or TensorRT). Never imports torch."""
from .bundle.reader import Bundle
from .bundle.tokenizer import ByteTokenizer
from .errors import BackendError, BundleError, ExportError, InputError, MirasolError, OutputError
from .pipeline import Pipeline, Stream

__all__ = ["BackendError", "Bundle", "BundleError", "ByteTokenizer", "ExportError", "InputError", "MirasolError",
           "OutputError", "Pipeline", "Stream"]
