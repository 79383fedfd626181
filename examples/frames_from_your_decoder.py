"""Frames you decode yourself (a camera SDK, GStreamer, a Jetson's hardware decoder) to answers: hand `iter_live`
one picture per sampling time of the model (its fps) with the audio that came with it, and it cuts chunks as soon
as their frames and samples have arrived. No PyAV in the runtime's path.

    python examples/frames_from_your_decoder.py bundles/demo clip.mp4 "which colour appeared first?"

Here PyAV stands in for your decoder: `camera()` yields (uint8 [H, W, 3] RGB picture, float32 mono samples).
"""
import sys
from collections.abc import Iterator

import numpy as np

from mirasol.runtime import Pipeline
from mirasol.runtime.media.chunking import iter_live
from mirasol.runtime.media.frames import FrameSampler


def pictures(path: str, fps: float) -> Iterator[np.ndarray]:
    """The picture shown at each time k / fps (FrameSampler: the last frame whose time is <= k / fps)."""
    import av

    with av.open(path) as container:
        video = container.streams.video[0]
        sampler = FrameSampler(fps, default_duration=1.0 / float(video.average_rate))
        for frame in container.decode(video):
            yield from sampler.add(frame.to_ndarray(format="rgb24"), frame.time, None)
        yield from sampler.finish()


def camera(path: str, fps: float, sample_rate: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Each picture with the mono samples of its 1 / fps span."""
    import av

    resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
    with av.open(path) as container:
        pieces = [out.to_ndarray().reshape(-1) for frame in container.decode(audio=0)
                  for out in resampler.resample(frame)]
    audio = np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
    for k, picture in enumerate(pictures(path, fps)):
        yield picture, audio[round(k * sample_rate / fps):round((k + 1) * sample_rate / fps)]


def main(bundle: str, video_file: str, question: str) -> None:
    with Pipeline.load(bundle) as pipe:
        stream = pipe.stream()
        frames = camera(video_file, float(pipe.config["fps"]), int(pipe.config["sample_rate"]))
        for video, audio in iter_live(frames, pipe.config):
            stream.push(video, audio)
        print(f"{question} {stream.ask(question)}")


if __name__ == "__main__":
    main(*sys.argv[1:4])
