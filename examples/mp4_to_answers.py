"""An mp4 to answers: stream a video file through a bundle chunk by chunk, then ask about it.

    python examples/mp4_to_answers.py bundles/demo clip.mp4 "which colour appeared first?" "what did you hear first?"

Needs the runtime and PyAV (`pip install "mirasol-edge[media]"`); `mirasol-demo clip.mp4` writes a clip the demo
model answers about.
"""
import sys

from mirasol.runtime import Pipeline
from mirasol.runtime.media.video_files import iter_chunks


def main(bundle: str, video_file: str, questions: list[str]) -> None:
    with Pipeline.load(bundle) as pipe:
        stream = pipe.stream()
        for video, audio in iter_chunks(video_file, pipe.config):  # one chunk decoded at a time
            stream.push(video, audio)
        for question in questions:
            print(f"{question} {stream.ask(question)}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
