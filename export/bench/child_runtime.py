"""Child: load a bundle with the runtime alone (never torch), stream a clip, ask; time and peak RSS.

    python -m mirasol.export.bench.child_runtime '{"bundle": ..., "threads": ..., "chunks": ..., "question": ...,
                                                     "new_tokens": ..., "arena": false}'
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

    from mirasol.runtime.pipeline import Pipeline
    imported = time.perf_counter() - start
    t = time.perf_counter()
    pipe = Pipeline.load(args["bundle"], threads=args["threads"], arena=args.get("arena", False))
    load = time.perf_counter() - t
    c = pipe.config
    rng = np.random.default_rng(0)
    video = rng.random((c["frames_per_chunk"], 3, c["image_size"], c["image_size"]), dtype=np.float32)
    audio = rng.standard_normal(tuple(pipe.chunk_inputs["audio"].shape[1:])).astype(np.float32)
    stream = pipe.stream()
    t = time.perf_counter()
    for _ in range(args["chunks"]):
        stream.push(video, audio)
    streamed = time.perf_counter() - t
    t = time.perf_counter()
    tokens = stream.token_ids(args["question"], args["new_tokens"])[0]
    asked = time.perf_counter() - t
    print_result({"import_s": imported, "load_s": load, "stream_s": streamed, "ask_s": asked, "tokens": len(tokens),
                  "torch_imported": "torch" in sys.modules, "start_to_ready_s": imported + load})


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
