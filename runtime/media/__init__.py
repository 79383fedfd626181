"""mirasol.runtime.media: video files (mp4, mkv, webm, avi, ...) or a live source -> the model's per-chunk inputs.

Per chunk of `frames_per_chunk` frames at the config's `fps` (and the audio of the same span):
- `video` float32 [frames_per_chunk, 3, image_size, image_size], RGB in [0, 1];
- `audio` float32 [n_mels, audio_frames_per_chunk], the log-mel spectrogram (see `spectrogram.py`) of the
  chunk's mono waveform resampled to `sample_rate`.
Arrays are unbatched: the caller adds the batch axis.

Rules, the same for files and live sources:
- Frame k of the stream is the picture shown at time k / fps (the last source frame whose timestamp is
  <= k / fps; before the first source frame, the first one). Source frames are decoded to RGB at their
  own size and resized with an area filter in numpy (`resize_frame`), so a file and a live source given
  the same pixels give the same arrays. A non-square picture is squashed to a square, not cropped.
- Audio is downmixed to mono as the mean of its channels; time 0 of the audio is time 0 of the video
  (the container's start time), a late-starting audio track is zero-filled at its start.
- The stream ends with the last whole chunk of video; a trailing partial chunk is dropped. A clip
  shorter than one chunk is padded to one chunk (last frame repeated, zero audio) with a warning.
- No audio track: the audio is silence (the log-mel of zeros), with a warning. Audio that ends before
  the video is zero-filled (with a warning when more than half a chunk is missing).
- A missing, empty or corrupt file raises `InputError` naming the file.
- Live sources only (cameras, network streams: `live_sources.py`; `iter_live`): audio a whole chunk behind
  the video is given up (silence for that chunk) and audio more than two chunks ahead is trimmed, so a
  stalled track neither holds chunks back nor grows memory; a frame time that goes backwards or jumps
  far ahead (a timestamp wrap, a restarted sender) continues from the previous frame.

The room: `chunking.py` (the chunk rules, shared by files and live sources), `frames.py` (resizing and
the frame sampling rule), `pyav.py` (PyAV frames to numpy), `video_files.py` (files), `spectrogram.py` (audio
features), `live_sources.py`, `arrival.py`, `feed.py` and `live.py` (cameras and network streams: a source's
chunks and when their media arrived, its decode thread, queue, drop policy and telemetry, the one-source real-time
driver), `evidence.py` (what an answer rests on), `sender.py` (a real-time MPEG-TS sender for tests and load
figures), `chunks_file.py` (decoded chunks saved as `.npz`).

Decoding is chunk by chunk with bounded memory: the video and the audio are read by two demuxers of the
same file, each pulled only as far as the current chunk needs, so memory does not depend on the file's
length or on how its streams are interleaved. PyAV is imported lazily (`pip install "mirasol-edge[media]"`).
"""
