"""Save a stream's state, restore it in another process (or after a restart), and carry on.

    python examples/save_restore.py bundles/demo clip.mp4 state.npz "what did you hear first?"

The state file holds the carried tensors (the TTM memory, the windowed KV cache) as plain arrays with a JSON header
(no pickle); it is bound to the bundle it came from. Its size does not grow with the stream's length.
"""
import sys

from mirasol.runtime import Pipeline
from mirasol.runtime.media.video_files import iter_chunks


def main(bundle: str, video_file: str, state_file: str, question: str) -> None:
    with Pipeline.load(bundle) as pipe:
        chunks = list(iter_chunks(video_file, pipe.config))
        half = len(chunks) // 2
        first = pipe.stream()
        for video, audio in chunks[:half]:
            first.push(video, audio)
        first.save(state_file)  # ... the process may end here ...
    with Pipeline.load(bundle) as pipe:
        resumed = pipe.restore(state_file)
        for video, audio in chunks[half:]:
            resumed.push(video, audio)
        print(f"after restoring at chunk {half} of {len(chunks)}: {resumed.ask(question)}")


if __name__ == "__main__":
    main(*sys.argv[1:5])
