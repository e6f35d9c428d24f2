"""The reference world: procedural videos of one saturated shape moving steadily over a muted textured background.

Numpy only (the runtime scores engines with it on machines without PyTorch). Every clip is seeded, at any
resolution and any number of frames, at 8 fps (the cascade's rate, docs/model_spec.md §1); nothing is downloaded.
The trained reference cascade learns this world (`training/`), and `runtime.detector` reads it back analytically.

    scene = Scene(colour="red", shape="circle", direction="left")
    scene.caption                      'a red circle moving left'   (the prompt; 31 bytes at most)
    clip = Clip.sample(seed=3, scene=scene)
    frames = clip.render(17, 512, 896)   (17, 512, 896, 3) uint8

Geometry is in units of S = min(height, width) so a clip looks the same at every resolution: the object's radius
is 0.11-0.16 S, its speed 0.15-0.28 S per second (it travels 0.3-0.56 S in the 2 s of a 17-frame clip), and it
starts where its whole path over `PATH_FRAMES` frames stays inside the frame. The background is a grey tinted at
most 10 levels per channel with a smooth texture of 3 plane waves (at most 18 levels), so its saturation stays
below 0.3 while the object's colours have saturation above 0.75 and hues 60 degrees or more apart: the detector
separates them by colour alone.
"""

from __future__ import annotations

import itertools
from typing import Literal, get_args

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

FPS = 8.0
PATH_FRAMES = 17  # frames over which a sampled clip's object stays fully inside the frame (one clip of the cascade)

Colour = Literal["red", "green", "blue", "yellow"]
Shape = Literal["circle", "square", "triangle"]
Direction = Literal["left", "right", "up", "down"]
COLOURS: tuple[str, ...] = get_args(Colour)
SHAPES: tuple[str, ...] = get_args(Shape)
DIRECTIONS: tuple[str, ...] = get_args(Direction)

RGB = {"red": (215, 35, 35), "green": (35, 175, 55), "blue": (40, 70, 215), "yellow": (225, 205, 35)}  # sRGB 0-255
HUE = {"red": 0.0, "yellow": 54.0, "green": 129.0, "blue": 230.0}  # degrees, of the RGB values above
UNIT = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}  # (x, y), y downwards

RADIUS = (0.11, 0.16)  # object radius, in S
SPEED = (0.15, 0.28)  # object speed, in S per second


class Scene(BaseModel):
    """What a clip shows: one `colour` `shape` moving in `direction`; its caption is the prompt."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    colour: Colour
    shape: Shape
    direction: Direction

    @property
    def caption(self) -> str:
        """'a red circle moving left'."""
        return f"a {self.colour} {self.shape} moving {self.direction}"

    @property
    def class_id(self) -> int:
        """Index in `scenes()`: colour-major, then shape, then direction (48 classes)."""
        return scenes().index(self)

    @classmethod
    def from_caption(cls, caption: str) -> Scene | None:
        """The scene a caption of this world names, or None for any other text."""
        words = caption.strip().lower().split()
        if len(words) != 5 or words[0] != "a" or words[3] != "moving":
            return None
        colour, shape, direction = words[1], words[2], words[4]
        if colour not in COLOURS or shape not in SHAPES or direction not in DIRECTIONS:
            return None
        return cls(colour=colour, shape=shape, direction=direction)


def scenes() -> list[Scene]:
    """Every scene of the world, in class-id order."""
    return [Scene(colour=c, shape=s, direction=d) for c, s, d in itertools.product(COLOURS, SHAPES, DIRECTIONS)]


class Clip(BaseModel):
    """One seeded clip: its scene and layout (in units of S = min(height, width), origin at the frame centre).

    `render` draws it at any size and length; the object is at `start` at frame 0 and moves `speed` S per second.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    scene: Scene
    start: tuple[float, float]  # (x, y) of the object's centre at frame 0, in S from the frame centre
    radius: float = Field(gt=0)  # in S
    speed: float = Field(ge=0)  # in S per second
    grey: float = Field(ge=0, le=255)  # background level
    tint: tuple[float, float, float]  # background per-channel offset, levels
    waves: tuple[tuple[float, float, float, float], ...]  # texture plane waves: (fx, fy in cycles per S, phase, levels)

    @classmethod
    def sample(cls, seed: int, scene: Scene | None = None, aspect: float = 896 / 512) -> Clip:
        """A random clip (a random scene unless given) for frames of width/height `aspect`, from `seed`."""
        rng = np.random.default_rng(seed)
        scene = scene or scenes()[int(rng.integers(len(scenes())))]
        radius = float(rng.uniform(*RADIUS))
        speed = float(rng.uniform(*SPEED))
        half = (max(aspect, 1.0) / 2, max(1.0 / aspect, 1.0) / 2)  # half extents (x, y) in S
        ux, uy = UNIT[scene.direction]
        travel = speed * (PATH_FRAMES - 1) / FPS
        start = []
        for axis, u in ((0, ux), (1, uy)):
            low, high = -half[axis] + radius * 1.2, half[axis] - radius * 1.2  # the shape's extent, with a margin
            if u > 0:
                high -= travel
            elif u < 0:
                low += travel
            start.append(float(rng.uniform(low, max(low, high))))
        waves = tuple((float(rng.uniform(-2, 2)), float(rng.uniform(-2, 2)), float(rng.uniform(0, 2 * np.pi)),
                       float(rng.uniform(3, 6))) for _ in range(3))
        return cls(scene=scene, start=(start[0], start[1]), radius=radius, speed=speed,
                   grey=float(rng.uniform(90, 165)), tint=tuple(float(v) for v in rng.uniform(-10, 10, 3)),
                   waves=waves)

    def centre(self, frame: float) -> tuple[float, float]:
        """(x, y) of the object's centre at `frame`, in S from the frame centre."""
        ux, uy = UNIT[self.scene.direction]
        distance = self.speed * frame / FPS
        return self.start[0] + ux * distance, self.start[1] + uy * distance

    def render(self, frames: int, height: int, width: int, first: int = 0,
               region: tuple[int, int, int, int] | None = None) -> np.ndarray:
        """Frames `first` .. `first + frames - 1` of the clip at `height` x `width`, as (frames, h, w, 3) uint8
        (sRGB); `region` = (top, left, h, w) renders only that crop of them (default: the whole frame).

        Raises ValueError for a non-positive size or length, or a region outside the frame."""
        if frames < 1 or height < 1 or width < 1:
            raise ValueError(f"a clip needs frames, height and width >= 1, got {frames}, {height}, {width}")
        top, left, h, w = region or (0, 0, height, width)
        if h < 1 or w < 1 or top < 0 or left < 0 or top + h > height or left + w > width:
            raise ValueError(f"region {region} is not inside the {height}x{width} frame")
        background = self._background(height, width, top, left, h, w)
        video = np.empty((frames, h, w, 3), np.uint8)
        for i in range(frames):
            image = background.copy()
            self._draw(image, first + i, height, width, top, left)
            video[i] = np.clip(np.round(image), 0, 255).astype(np.uint8)
        return video

    def _background(self, height: int, width: int, top: int, left: int, h: int, w: int) -> np.ndarray:
        """(h, w, 3) float32 at (top, left) of the frame: grey + tint + texture."""
        s = min(height, width)
        y = ((np.arange(top, top + h, dtype=np.float32) + 0.5 - height / 2) / s)[:, None]
        x = ((np.arange(left, left + w, dtype=np.float32) + 0.5 - width / 2) / s)[None, :]
        texture = np.zeros((h, w), np.float32)
        for fx, fy, phase, amplitude in self.waves:
            texture += amplitude * np.sin(2 * np.pi * (fx * x + fy * y) + phase)
        base = self.grey + np.asarray(self.tint, np.float32)
        return base[None, None, :] + texture[..., None]

    def _draw(self, image: np.ndarray, frame: int, height: int, width: int, top: int, left: int) -> None:
        """Blend the object into `image`, the (h, w, 3) float32 crop at (top, left) of a height x width frame, in
        place, antialiased by its signed distance."""
        s = min(height, width)
        cx, cy = self.centre(frame)
        px, py = cx * s + width / 2 - left, cy * s + height / 2 - top  # centre in the crop's pixels
        reach = self.radius * s * 1.3 + 2  # every shape lies within this many pixels of its centre
        x0, x1 = max(int(px - reach), 0), min(int(px + reach) + 1, image.shape[1])
        y0, y1 = max(int(py - reach), 0), min(int(py + reach) + 1, image.shape[0])
        if x0 >= x1 or y0 >= y1:
            return  # outside the crop
        dx = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5 - px
        dy = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5 - py
        distance = _signed_distance(self.scene.shape, dx, dy, self.radius * s)  # pixels, < 0 inside
        coverage = np.clip(0.5 - distance, 0.0, 1.0)[..., None]
        colour = np.asarray(RGB[self.scene.colour], np.float32)
        patch = image[y0:y1, x0:x1]
        patch += coverage * (colour - patch)


def _signed_distance(shape: str, dx: np.ndarray, dy: np.ndarray, radius: float) -> np.ndarray:
    """Signed distance in pixels (negative inside) of a circle of `radius`, an axis-aligned square of half-side
    0.85 radius, or an upward triangle of circumradius 1.2 radius, at offsets (dx, dy) from the centre."""
    if shape == "circle":
        return np.sqrt(dx * dx + dy * dy) - radius
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) - 0.85 * radius
    r = 1.2 * radius  # equilateral triangle, apex up: three half-planes at distance r/2 from the centre
    edges = [(0.0, 1.0), (np.sqrt(3) / 2, -0.5), (-np.sqrt(3) / 2, -0.5)]  # outward normals (y downwards)
    return np.max([nx * dx + ny * dy for nx, ny in edges], axis=0) - r / 2


def sample_clips(count: int, seed: int, aspect: float = 896 / 512) -> list[Clip]:
    """`count` clips from seeds seed, seed + 1, ...: scenes cycle through `scenes()` so every one appears."""
    all_scenes = scenes()
    return [Clip.sample(seed + i, all_scenes[(seed + i) % len(all_scenes)], aspect) for i in range(count)]
