"""mirasol.runtime.triton: serving many streams with Triton Inference Server: the model repository
(`repository.py`), the Python-backend model (`model.py`: Triton requests in and out; `sequences.py`: the streams by
sequence ID; `streaming.py`: the decoupled model's token stream; `metrics.py`: its custom metrics), a local server
for tests and demos (`server.py`), and a load generator (`load.py`)."""
