"""Many streams, one Pipeline: each camera's chunks pushed together in one batched step per round.

    python examples/many_streams.py bundles/demo a.mp4 b.mp4 c.mp4 --question "which colour appeared first?"

`Pipeline.push_streams` stacks the streams along the batch axis (up to the bundle's max batch, `mirasol-export
--max-batch`) and gives each stream exactly what `stream.push` would; streams stay isolated.
"""
import argparse

from mirasol.runtime import Pipeline
from mirasol.runtime.media.video_files import iter_chunks


def main(bundle: str, files: list[str], question: str) -> None:
    with Pipeline.load(bundle) as pipe:
        streams = [pipe.stream() for _ in files]
        sources = [iter_chunks(path, pipe.config) for path in files]
        live = list(range(len(files)))
        while live:  # a round: the next chunk of every source that still has one, pushed in one call
            chunks = {i: next(sources[i], None) for i in live}
            live = [i for i in live if chunks[i] is not None]
            if live:
                pipe.push_streams([streams[i] for i in live], [chunks[i] for i in live])
        for path, stream in zip(files, streams):
            print(f"{path}: {stream.ask(question)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("files", nargs="+")
    parser.add_argument("--question", required=True)
    args = parser.parse_args()
    main(args.bundle, args.files, args.question)
