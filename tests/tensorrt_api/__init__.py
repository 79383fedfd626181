"""Name tables of the real TensorRT and CUDA Python bindings, for checking the fakes (see extract.py)."""
