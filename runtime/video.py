"""Video files: frames (T, H, W, 3) uint8 <-> H.264 mp4 through PyAV (written whole, or streamed as frames come:
`mp4_writer`), and PNG frames; written atomically. The first-frame image of image-to-video is read with Pillow.

An output is written under a temporary name beside its target and renamed when complete, so a killed run never
leaves a partial or corrupt file under the final name.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path

import numpy as np

from runtime.errors import RequestError
from runtime.files import atomic_output

log = logging.getLogger(__name__)

CRF = 18  # visually lossless for H.264


def to_video(frames: np.ndarray) -> np.ndarray:
    """Frames (T, H, W, 3) uint8 -> the tokenizer's video (1, 3, T, H, W) float32 in [-1, 1]."""
    return (frames.astype(np.float32) / 127.5 - 1.0).transpose(3, 0, 1, 2)[None]


def to_frames(video: np.ndarray) -> np.ndarray:
    """The tokenizer decoder's video (1, 3, T, H, W) in [-1, 1] -> frames (T, H, W, 3) uint8 (rounded, clipped)."""
    return np.clip(np.round((video[0].transpose(1, 2, 3, 0) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (T, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"H.264 in yuv420p needs an even height and width, got {frames.shape[2]}x{frames.shape[1]}")
    return frames


def write_mp4(frames: np.ndarray, path: str | Path, fps: float, crf: int = CRF) -> Path:
    """Encode frames (T, H, W, 3) uint8 RGB as H.264 (yuv420p) at `fps` into `path`; returns the path."""
    with mp4_writer(path, fps, crf) as write:
        write(frames)
    return Path(path)


@contextmanager
def mp4_writer(path: str | Path, fps: float, crf: int = CRF) -> Iterator[Callable[[np.ndarray], None]]:
    """A function that appends frames (n, H, W, 3) uint8 RGB to an H.264 (yuv420p) mp4 at `fps`, encoding them as
    they come (a long video is never held whole); the file gets its name `path` when the block ends without an
    error, and is discarded otherwise (`runtime.files.atomic_output`).

    Every call must give frames of the size of the first. Raises ValueError for frames of another shape or dtype,
    and when the block wrote no frame."""
    import av

    rate = Fraction(fps).limit_denominator(1001)
    with atomic_output(path) as tmp, av.open(str(tmp), mode="w", format="mp4") as container:
        stream = None

        def write(frames: np.ndarray) -> None:
            nonlocal stream
            frames = _check_frames(frames)
            if stream is None:
                stream = container.add_stream("libx264", rate=rate)
                stream.width, stream.height = frames.shape[2], frames.shape[1]
                stream.pix_fmt = "yuv420p"
                stream.options = {"crf": str(crf), "preset": "medium"}
            elif frames.shape[1:3] != (stream.height, stream.width):
                raise ValueError(f"frames of {frames.shape[2]}x{frames.shape[1]} after frames of "
                                 f"{stream.width}x{stream.height}: one video has one size")
            for frame in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)

        yield write
        if stream is None:
            raise ValueError(f"{path}: no frames were written")
        for packet in stream.encode():
            container.mux(packet)


def read_video(path: str | Path) -> tuple[np.ndarray, float, str]:
    """(frames (T, H, W, 3) uint8 RGB, fps, codec name) of a video file."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
        return frames, float(stream.average_rate), stream.codec_context.name


def write_pngs(frames: np.ndarray, directory: str | Path, stem: str = "frame", start: int = 0) -> list[Path]:
    """One PNG per frame, `stem_0000.png`, ... (numbered from `start`), each written atomically."""
    import av

    frames = _check_frames(frames)
    paths = []
    for i, frame in enumerate(frames, start):
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
    """The first frame of an image file (PNG, JPEG, WebP, GIF, ... through Pillow) as (H, W, 3) uint8 RGB at
    size = (H, W), for image-to-video.

    Pillow decodes it strictly: a truncated file, and a PNG whose data or checksums do not match, are refused (PyAV
    decodes a truncated JPEG without an error). The EXIF orientation of a photo is applied. Transparent pixels are
    composited on white, with a warning. An image of another aspect ratio is scaled to cover `size` and
    center-cropped to it (as diffusers' `VaeImageProcessor(resize_mode="crop")` does), with a warning saying what was
    cut; resampling is Lanczos. A 16-bit grayscale image keeps its top 8 bits.

    Raises RequestError naming the file when there is none, or it is not an image, truncated, corrupt or larger than
    Pillow's decompression-bomb limit."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise RequestError(f"no image at {path}")
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()  # a PNG's chunk checksums; verify() leaves the image unusable, so it is opened again
        image = Image.open(io.BytesIO(data))
        image.load()
    except UnidentifiedImageError:
        raise RequestError(f"cannot read an image from {path}: not an image format Pillow reads; use PNG or JPEG") \
            from None
    except Image.DecompressionBombError as e:
        raise RequestError(f"cannot read an image from {path}: {e}") from None
    except (OSError, SyntaxError) as e:  # Pillow reports a broken PNG as SyntaxError
        raise RequestError(f"cannot read an image from {path}: the file is truncated or corrupt ({e})") from None
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I;16"):
        image = Image.fromarray((np.asarray(image) >> 8).astype(np.uint8))
    if image.has_transparency_data:
        image = image.convert("RGBA")
        if image.getchannel("A").getextrema()[0] < 255:
            log.warning("%s has transparency; composited on white", path)
        image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image)
    image = image.convert("RGB")
    box = _center_crop(image.size, size)
    (left, top, right, bottom), (width, height) = box, image.size
    if width - (right - left) > 1 or height - (bottom - top) > 1:
        log.warning("%s is %dx%d; center-cropped to %dx%d (%s -> %s) and resized to %dx%d", path, width, height,
                    round(right - left), round(bottom - top), _aspect(width, height), _aspect(size[1], size[0]),
                    size[1], size[0])
    return np.array(image.resize((size[1], size[0]), Image.Resampling.LANCZOS, box=box))  # writable, as PyAV gave


def _center_crop(image_size: tuple[int, int], size: tuple[int, int]) -> tuple[float, float, float, float]:
    """The centered (left, top, right, bottom) box of an image of image_size = (width, height) with the aspect ratio
    of size = (H, W): the largest one, so that scaled to `size` it covers it."""
    (width, height), (h, w) = image_size, size
    scale = max(w / width, h / height)
    left, top = (width - w / scale) / 2, (height - h / scale) / 2
    return left, top, width - left, height - top


def _aspect(width: int, height: int) -> str:
    """'4:3', '16:9', '7:4' (the nearest ratio of small integers)."""
    ratio = Fraction(width, height).limit_denominator(32)
    return f"{ratio.numerator}:{ratio.denominator}"
