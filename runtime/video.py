"""Video files: frames (T, H, W, 3) uint8 <-> H.264 mp4 through PyAV, and PNG frames; written atomically.

An output is written under a temporary name beside its target and renamed when complete, so a killed run never
leaves a partial or corrupt file under the final name.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np

from runtime.errors import RequestError
from runtime.files import atomic_output

CRF = 18  # visually lossless for H.264


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (T, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"H.264 in yuv420p needs an even height and width, got {frames.shape[2]}x{frames.shape[1]}")
    return frames


def write_mp4(frames: np.ndarray, path: str | Path, fps: float, crf: int = CRF) -> Path:
    """Encode frames (T, H, W, 3) uint8 RGB as H.264 (yuv420p) at `fps` into `path`; returns the path."""
    import av

    frames = _check_frames(frames)
    rate = Fraction(fps).limit_denominator(1001)
    with atomic_output(path) as tmp:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=rate)
            stream.width, stream.height = frames.shape[2], frames.shape[1]
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": str(crf), "preset": "medium"}
            for frame in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    return Path(path)


def read_video(path: str | Path) -> tuple[np.ndarray, float, str]:
    """(frames (T, H, W, 3) uint8 RGB, fps, codec name) of a video file."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
        return frames, float(stream.average_rate), stream.codec_context.name


def write_pngs(frames: np.ndarray, directory: str | Path, stem: str = "frame") -> list[Path]:
    """One PNG per frame, `stem_0000.png`, ..., each written atomically."""
    import av

    frames = _check_frames(frames)
    paths = []
    for i, frame in enumerate(frames):
        path = Path(directory) / f"{stem}_{i:04d}.png"
        with atomic_output(path) as tmp:
            with av.open(str(tmp), mode="w", format="image2") as container:
                stream = container.add_stream("png", rate=1)
                stream.width, stream.height, stream.pix_fmt = frame.shape[1], frame.shape[0], "rgb24"
                for packet in [*stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")), *stream.encode()]:
                    container.mux(packet)
        paths.append(path)
    return paths


def read_image(path: str | Path, size: tuple[int, int]) -> np.ndarray:
    """The first frame of an image (or video) file as (H, W, 3) uint8 RGB, resized to size = (H, W).

    Raises RequestError when there is no file or PyAV cannot decode it."""
    import av

    path = Path(path)
    if not path.is_file():
        raise RequestError(f"no image at {path}")
    try:
        with av.open(str(path)) as container:
            frame = next(container.decode(video=0))
    except (av.error.FFmpegError, StopIteration) as e:
        raise RequestError(f"cannot read an image from {path}: {e}") from None
    return frame.reformat(width=size[1], height=size[0], format="rgb24").to_ndarray()
