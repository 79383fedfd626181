"""mirasol.runtime.tensorrt: native TensorRT: engines built from a bundle (`build.py`, planned by `plan.py`), the
backend that runs them (`backend.py`), CUDA through cuda-python (`cuda.py`), and what this machine has (`env.py`).
TensorRT and cuda-python are imported only when used."""
