"""mirasol.runtime.triton: serving many streams with Triton Inference Server: the model repository
(`repository.py`), the Python-backend model (`model.py`), a local server for tests and demos (`server.py`), and a
load generator (`load.py`)."""
