"""An analytic detector for the reference world (`runtime.world`): what object a decoded video shows.

Numpy only: no learned model, no SciPy, no PyTorch. It reads frames (T, H, W, 3) uint8 sRGB, as rendered by
`world.Clip.render` or decoded from a generated video, and answers the colour, shape and direction of motion of the
one saturated object, so a generation can be scored against the caption it was prompted with.

    detection = detect(frames)                       frames (T, H, W, 3) uint8
    detection.colour, detection.shape, detection.direction     'red', 'circle', 'left' (None: not found)
    detect(frames, first=1)                          image-to-video / continuations: read only the new frames

Lengths are in units of S = min(H, W) and positions in S from the frame centre, x right and y down, as in
`runtime.world`. Only `frames[first:]` are read; every answer comes from them.

Per frame (one frame at a time):

1. Object pixels: saturation (max - min) / max >= `MIN_SATURATION` and value (max) >= `MIN_VALUE` (levels). The
   world's background has saturation below 0.3 and its objects above 0.75, so this separates them by colour alone.
2. The frame has an object when that mask is a plausible single object: its area is `MIN_AREA` .. `MAX_AREA` of
   the frame, its robust bounding box (the `BOX_PERCENTILE` .. 100 - `BOX_PERCENTILE` percentiles of the mask's
   columns and rows, so stray pixels do not count) is at most `MAX_EXTENT` S on each side, and the mask fills at
   least `MIN_DENSITY` of that box. Noise (uniform random RGB, grey + gaussian noise) fails these: too many
   saturated pixels, or saturated pixels scattered over the whole frame.
3. Coverage: the object is antialiased, so every pixel near it is a blend c * object + (1 - c) * background. The
   chroma of a pixel (RGB minus its mean) is linear in that blend and the background's chroma is one constant
   (its texture is grey), so c is the projection of the pixel's chroma between the background's chroma (median
   over about `_SAMPLES` non-object pixels) and the object's (median over object pixels), clipped to 0 .. 1.
   It is read in a window around the box, widened by `WINDOW_MARGIN` of the box's larger side plus 2 pixels.
4. From the coverage: the centroid (coverage-weighted), and the fill ratio = area / (width * height), where the
   area is the total coverage, the width the largest row sum and the height the largest column sum (a convex
   shape's widest chord and tallest chord). Square 1.0, circle pi/4 = 0.785, triangle 0.5 at any size and
   position, antialiased edges measured to a fraction of a pixel. Measured on world clips (S = 64 .. 512, also
   after H.264 or a 7-pixel box blur at S = 128): square 0.99 - 1.0, circle 0.785 - 0.80, triangle 0.51 - 0.66
   (its base and apex are thin: the widest row and tallest column fall short at low resolution or under blur).
   Not measured when the object touches the frame border (it is cut off there).
5. Hue (standard HSV hue, degrees) of the object pixels in the window.

Over the frames read (`Detection`):

- an object must be found in at least half of them, else colour, shape and direction are all None;
- colour: the circular mean of the hue over the object pixels of every frame with an object, named by the nearest
  of `world.HUE`; None when that is more than `MAX_HUE_ERROR` degrees away, or when the hues are spread (mean
  resultant length below `MIN_HUE_CONCENTRATION`: e.g. two objects of different colours);
- shape: the median fill ratio of the frames where it was measured, named by `FILL_THRESHOLDS` (triangle below
  the first, circle up to the second, square above); None when it is outside `FILL_RANGE` or fewer than
  `MIN_SHAPE_AGREEMENT` of those frames name the same shape;
- motion: least-squares lines x(t), y(t) of the centroids over the frame index t; the axis with the larger slope
  is the direction's; the travel along it over the frames with an object must be at least `MIN_TRAVEL` S, else
  direction is None (a static video).
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import numpy as np
from pydantic import BaseModel, ConfigDict

from runtime.world import HUE, Colour, Direction, Shape

log = logging.getLogger(__name__)

MIN_SATURATION = 0.5  # object pixels: (max - min) / max at least this
MIN_VALUE = 60.0  # ... and max(R, G, B) at least this many levels (dark pixels' saturation is noise)
MIN_AREA = 0.002  # an object covers at least this fraction of the frame
MAX_AREA = 0.25  # ... and at most this fraction
BOX_PERCENTILE = 1.0  # the robust box spans these percentiles of the mask's columns and rows (and 100 - this)
MAX_EXTENT = 0.6  # the robust box is at most this many S wide and high (the world's objects: 0.34 S at most)
MIN_DENSITY = 0.3  # the mask fills at least this fraction of its robust box (a triangle fills 0.5)
WINDOW_MARGIN = 0.25  # coverage is read in the box widened by this fraction of its larger side (+ 2 pixels)
MAX_HUE_ERROR = 30.0  # degrees between the mean hue and the nearest world.HUE for a colour to be named
MIN_HUE_CONCENTRATION = 0.8  # mean resultant length of the object pixels' hues (1: all the same hue)
FILL_THRESHOLDS = (0.69, 0.9)  # fill ratio: triangle (0.5) < 0.69 <= circle (0.785) < 0.9 <= square (1.0)
FILL_RANGE = (0.35, 1.15)  # a median fill ratio outside this is no shape of the world
MIN_SHAPE_AGREEMENT = 0.6  # fraction of the measured frames whose own fill ratio names the shape
MIN_TRAVEL = 0.05  # S: the fitted travel along the dominant axis for a direction to be named

_SAMPLES = 1024  # background pixels (about) whose median chroma is the background's


class Detection(BaseModel):
    """What `detect` found in the frames it read (`frames[first:]`).

    colour, shape, direction: the answer, None where not found (no object in half the frames read, a colour or
    shape unlike the world's, an ambiguous shape, no motion). object_frames: how many of the frames read have an
    object. displacement: the fitted travel of the centroid along the dominant axis between the first and the last
    frame with an object, in S, >= 0 (its sign is in `direction`); 0.0 with fewer than two such frames. hue: the
    circular mean hue of the object pixels, degrees 0 .. 360, None without an object. fill: the median fill
    ratio (area / (width * height); square 1.0, circle 0.785, triangle 0.5), None where never measured.
    centroids: per frame read (frame `first + i` at index i), the object's centroid (x, y) in S from the frame
    centre (x right, y down, as `world.Clip.centre`), or None where that frame has no object.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    colour: Colour | None
    shape: Shape | None
    direction: Direction | None
    object_frames: int
    displacement: float
    hue: float | None
    fill: float | None
    centroids: tuple[tuple[float, float] | None, ...]


class _Found(NamedTuple):
    """One frame's object: centroid (S from the centre), fill ratio (None: touches the border), hue sums."""

    x: float
    y: float
    fill: float | None
    hue_cos: float
    hue_sin: float
    hue_count: int


def detect(frames: np.ndarray, first: int = 0) -> Detection:
    """The object that `frames[first:]` show.

    frames: (T, H, W, 3) uint8 sRGB. first: the first frame to read, 0 <= first < T (image-to-video and
    continuations pass the number of given frames, so only the generated ones are scored).
    Raises ValueError for frames of another shape or dtype, no frames, or `first` out of range.
    """
    if not isinstance(frames, np.ndarray) or frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        shape, dtype = getattr(frames, "shape", None), getattr(frames, "dtype", type(frames).__name__)
        raise ValueError(f"frames must be a (T, H, W, 3) uint8 array, got {shape} {dtype}")
    count, height, width = frames.shape[:3]
    if count == 0 or height == 0 or width == 0:
        raise ValueError(f"frames must hold at least one pixel of one frame, got shape {frames.shape}")
    if not 0 <= first < count:
        raise ValueError(f"first must be in 0 .. {count - 1} for {count} frames, got {first}")
    found = [_read_frame(frame) for frame in frames[first:]]
    present = [(t, f) for t, f in enumerate(found) if f is not None]
    centroids = tuple(None if f is None else (f.x, f.y) for f in found)
    enough = 2 * len(present) >= len(found)

    hue = concentration = None
    if present:
        c, s, n = (sum(f.hue_cos for _, f in present), sum(f.hue_sin for _, f in present),
                   sum(f.hue_count for _, f in present))
        hue, concentration = float(np.degrees(np.arctan2(s, c)) % 360.0), float(np.hypot(c, s) / n)
    fills = [f.fill for _, f in present if f.fill is not None]
    fill = float(np.median(fills)) if fills else None
    direction, displacement = _motion([t for t, _ in present], [(f.x, f.y) for _, f in present])

    detection = Detection(
        colour=_colour(hue, concentration) if enough else None,
        shape=_shape(fill, fills) if enough else None,
        direction=direction if enough else None,
        object_frames=len(present), displacement=displacement, hue=hue, fill=fill, centroids=centroids)
    log.debug("detected %s %s %s: object in %d/%d frames, hue %s (concentration %s), fill %s, displacement %.3f S",
              detection.colour, detection.shape, detection.direction, len(present), len(found),
              None if hue is None else round(hue, 1), None if concentration is None else round(concentration, 3),
              None if fill is None else round(fill, 3), displacement)
    return detection


def _read_frame(image: np.ndarray) -> _Found | None:
    """One frame (H, W, 3) uint8: its object, or None (see the module docstring, steps 1-5)."""
    height, width = image.shape[:2]
    s = min(height, width)
    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    value = np.maximum(np.maximum(r, g), b).astype(np.float32)  # (H, W)
    low = np.minimum(np.minimum(r, g), b).astype(np.float32)
    mask = (value - low >= MIN_SATURATION * value) & (value >= MIN_VALUE)
    area = int(np.count_nonzero(mask))
    if not MIN_AREA * height * width <= area <= MAX_AREA * height * width:
        log.debug("no object: %d saturated pixels of %d", area, height * width)
        return None
    y0, y1 = _percentiles(np.count_nonzero(mask, axis=1))
    x0, x1 = _percentiles(np.count_nonzero(mask, axis=0))
    box_w, box_h = x1 - x0 + 1, y1 - y0 + 1
    if max(box_w, box_h) > MAX_EXTENT * s or area < MIN_DENSITY * box_w * box_h:
        log.debug("no object: %d saturated pixels in a %.0fx%.0f box", area, box_w, box_h)
        return None

    margin = int(WINDOW_MARGIN * max(box_w, box_h)) + 2
    top, bottom = max(y0 - margin, 0), min(y1 + margin + 1, height)
    left, right = max(x0 - margin, 0), min(x1 + margin + 1, width)
    step = max(1, int(np.sqrt(height * width / _SAMPLES)))
    background = np.median(_chroma(image[::step, ::step][~mask[::step, ::step]]), axis=0)
    window, window_mask = _chroma(image[top:bottom, left:right]), mask[top:bottom, left:right]
    axis = np.median(window[window_mask], axis=0) - background
    coverage = np.clip((window - background) @ axis / max(float(axis @ axis), 1.0), 0.0, 1.0)  # (h, w)

    total = float(coverage.sum())
    ys = np.arange(top, bottom, dtype=np.float64) + 0.5
    xs = np.arange(left, right, dtype=np.float64) + 0.5
    cx, cy = float(coverage.sum(axis=0) @ xs) / total, float(coverage.sum(axis=1) @ ys) / total
    touches = bool((top == 0 and window_mask[0].any()) or (bottom == height and window_mask[-1].any())
                   or (left == 0 and window_mask[:, 0].any()) or (right == width and window_mask[:, -1].any()))
    fill = None if touches else total / (float(coverage.sum(axis=1).max()) * float(coverage.sum(axis=0).max()))

    pixels = image[top:bottom, left:right][window_mask].astype(np.float32)  # (n, 3)
    hues = np.radians(_hue(pixels))
    return _Found(x=(cx - width / 2) / s, y=(cy - height / 2) / s, fill=fill, hue_cos=float(np.cos(hues).sum()),
                  hue_sin=float(np.sin(hues).sum()), hue_count=len(pixels))


def _percentiles(counts: np.ndarray) -> tuple[int, int]:
    """The `BOX_PERCENTILE` and 100 - `BOX_PERCENTILE` percentiles (lower index) of the mask's rows (or columns),
    from its pixel count per row (or column) (n,), which has at least one pixel."""
    cumulative = np.cumsum(counts)
    ranks = np.array([BOX_PERCENTILE, 100 - BOX_PERCENTILE]) / 100 * (cumulative[-1] - 1)
    low, high = np.searchsorted(cumulative, ranks, side="right")
    return int(low), int(high)


def _chroma(pixels: np.ndarray) -> np.ndarray:
    """Pixels (..., 3) uint8 minus their mean over R, G, B: (..., 3) float32, the linear colour part of a blend."""
    pixels = pixels.astype(np.float32)
    return pixels - (pixels[..., 0] + pixels[..., 1] + pixels[..., 2])[..., None] / 3


def _hue(pixels: np.ndarray) -> np.ndarray:
    """HSV hue in degrees [0, 360) of pixels (n, 3) float (all saturated: max > min)."""
    r, g, b = pixels[:, 0], pixels[:, 1], pixels[:, 2]
    high, spread = pixels.max(axis=1), np.maximum(np.ptp(pixels, axis=1), 1e-6)
    hue = np.where(high == r, (g - b) / spread, np.where(high == g, 2.0 + (b - r) / spread, 4.0 + (r - g) / spread))
    return (60.0 * hue) % 360.0


def _colour(hue: float | None, concentration: float | None) -> Colour | None:
    """The world colour named by a mean hue (degrees), or None (no hue, spread hues, unlike every colour)."""
    if hue is None or concentration < MIN_HUE_CONCENTRATION:
        return None
    name, error = min(((name, abs((hue - h + 180.0) % 360.0 - 180.0)) for name, h in HUE.items()),
                      key=lambda pair: pair[1])
    return name if error <= MAX_HUE_ERROR else None


def _classify(fill: float) -> Shape:
    return "triangle" if fill < FILL_THRESHOLDS[0] else "circle" if fill < FILL_THRESHOLDS[1] else "square"


def _shape(fill: float | None, fills: list[float]) -> Shape | None:
    """The world shape named by the median fill ratio, or None (not measured, implausible, frames disagree)."""
    if fill is None or not FILL_RANGE[0] <= fill <= FILL_RANGE[1]:
        return None
    shape = _classify(fill)
    agreeing = sum(_classify(f) == shape for f in fills)
    return shape if agreeing >= MIN_SHAPE_AGREEMENT * len(fills) else None


def _motion(times: list[int], points: list[tuple[float, float]]) -> tuple[Direction | None, float]:
    """(direction or None, travel in S >= 0) of centroids `points` (x, y) in S at frame indices `times`."""
    if len(times) < 2:
        return None, 0.0
    t = np.asarray(times, np.float64)
    slopes = np.polyfit(t, np.asarray(points, np.float64), 1)[0]  # (2,): S per frame in x and y
    axis = int(abs(slopes[1]) > abs(slopes[0]))
    travel = float(slopes[axis] * (t[-1] - t[0]))
    if abs(travel) < MIN_TRAVEL:
        return None, abs(travel)
    names = ("left", "right") if axis == 0 else ("up", "down")
    return names[travel > 0], abs(travel)
