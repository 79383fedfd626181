"""Child: the runtime child's work in PyTorch eager (build the model, stream the clip, generate); time and peak RSS.

    python -m mirasol.export.bench.child_pytorch '{"source": {...}, "threads": ..., "chunks": ..., "question": ...,
                                                     "new_tokens": ...}'
"""
from __future__ import annotations

import json
import sys
import time
from typing import Any

from .children import print_result


def main(args: dict[str, Any]) -> None:
    start = time.perf_counter()
    import numpy as np  # inside the clock: the import time is part of start-up
    import torch

    from mirasol.runtime.bundle.tokenizer import ByteTokenizer

    from .baselines import TorchStepper, pytorch_model
    imported = time.perf_counter() - start
    torch.set_num_threads(args["threads"])
    t = time.perf_counter()
    model = pytorch_model(args["source"])
    load = time.perf_counter() - t
    c = model.config
    rng = np.random.default_rng(0)
    video = torch.from_numpy(rng.random((c.frames_per_chunk, 3, c.image_size, c.image_size), dtype=np.float32))
    audio = torch.from_numpy(rng.standard_normal((c.n_mels, c.audio_frames_per_chunk)).astype(np.float32))
    stepper = TorchStepper(model)
    t = time.perf_counter()
    for _ in range(args["chunks"]):
        stepper.push(video, audio)
    streamed = time.perf_counter() - t
    t = time.perf_counter()
    tokens = model.generate(torch.stack(stepper.contexts, dim=1), ByteTokenizer().prompt(args["question"]),
                            args["new_tokens"])
    asked = time.perf_counter() - t
    print_result({"import_s": imported, "load_s": load, "stream_s": streamed, "ask_s": asked, "tokens": len(tokens),
                  "start_to_ready_s": imported + load})


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
