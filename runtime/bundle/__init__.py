"""mirasol.runtime.bundle: the bundle format, the contract between the exporter and the runtime.

`manifest.py` (what the manifest says: graphs, IO, axes, steps, state wiring, counters), `tensors.py` (one graph
input or output), `precisions.py` (the precision registry), `reader.py` (a bundle directory read and verified;
state files read within bounds), `graph_files.py` (external-data references of ONNX files), `json_reader.py`
(strict JSON), `tokenizer.py`, `reports.py` (validation and accuracy reports as text).
"""
