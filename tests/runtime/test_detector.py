"""The analytic detector (runtime/detector.py) reads the reference world's clips back exactly, at every resolution
and aspect, and is not fooled by noise, a static video or an empty background."""

import numpy as np
import pytest

from runtime import detector
from runtime.detector import Detection, detect
from runtime.video import read_video, write_mp4
from runtime.world import FPS, HUE, Clip, Scene, scenes

# Tolerances of the measurements on world clips, in S = min(H, W) unless said otherwise.
CENTROID_TOLERANCE = 0.01  # each frame's centroid vs Clip.centre (a fraction of a pixel at S = 64)
DISPLACEMENT_TOLERANCE = 0.01  # fitted travel vs speed * (frames - 1) / FPS
HUE_TOLERANCE = 3.0  # degrees, mean hue vs world.HUE
FILL = {"square": (0.97, 1.03), "circle": (0.77, 0.82), "triangle": (0.49, 0.63)}  # fill ratio ranges
H264_TOLERANCE = 0.02  # centroid and displacement after an H.264 round trip (chroma at half resolution)

# (height, width, frames rendered, first frame read): landscape, square, portrait; 17 and 9 frames read
GRID = [(64, 112, 17, 0), (96, 96, 17, 0), (112, 64, 17, 0), (144, 256, 9, 0), (128, 224, 17, 8), (96, 160, 13, 4)]


def clip(seed: int, scene: Scene, height: int, width: int) -> Clip:
    return Clip.sample(seed, scene, aspect=width / height)


def check_reads(found: Detection, scene: Scene, where: str) -> None:
    """The answers are the scene's."""
    assert (found.colour, found.shape, found.direction) == (scene.colour, scene.shape, scene.direction), \
        f"{where}: read {found.colour} {found.shape} {found.direction} (hue {found.hue}, fill {found.fill}, " \
        f"displacement {found.displacement})"


def check_measures(found: Detection, world: Clip, first: int, frames: int, where: str, tolerance: float) -> None:
    """Every frame read has the object at the clip's centre; the travel is the clip's; hue and fill in range."""
    assert found.object_frames == len(found.centroids) == frames - first, f"{where}: {found.object_frames} frames"
    for i, centroid in enumerate(found.centroids):
        expected = world.centre(first + i)
        assert centroid is not None and np.allclose(centroid, expected, atol=tolerance), \
            f"{where}: frame {first + i} centroid {centroid}, expected {expected}"
    travel = world.speed * (frames - 1 - first) / FPS
    assert abs(found.displacement - travel) <= tolerance, f"{where}: displacement {found.displacement} vs {travel}"
    error = abs((found.hue - HUE[world.scene.colour] + 180) % 360 - 180)
    assert error <= HUE_TOLERANCE, f"{where}: hue {found.hue}"
    low, high = FILL[world.scene.shape]
    assert low <= found.fill <= high, f"{where}: fill {found.fill} outside {low} .. {high}"


@pytest.mark.parametrize(("height", "width", "frames", "first"), GRID)
def test_every_scene_is_read_exactly(height, width, frames, first):
    for i, scene in enumerate(scenes()):
        for seed in (i + 1000 * height, i + 1000 * height + 500):
            world = clip(seed, scene, height, width)
            where = f"seed {seed} '{scene.caption}' {height}x{width} frames {first}..{frames - 1}"
            found = detect(world.render(frames, height, width), first=first)
            check_reads(found, scene, where)
            check_measures(found, world, first, frames, where, CENTROID_TOLERANCE)


def test_full_resolution_clips_are_read_exactly():
    for seed, scene in ((1, Scene(colour="yellow", shape="triangle", direction="up")),
                        (2, Scene(colour="blue", shape="square", direction="left"))):
        world = clip(seed, scene, 512, 896)
        found = detect(world.render(17, 512, 896))
        check_reads(found, scene, f"seed {seed} '{scene.caption}' 512x896")
        check_measures(found, world, 0, 17, f"seed {seed} '{scene.caption}' 512x896", CENTROID_TOLERANCE)


def test_clips_are_read_after_an_h264_round_trip(tmp_path):
    """What the scorer reads: frames decoded from the mp4 a generation is written to."""
    for i, scene in enumerate(scenes()[::4]):
        world = clip(i, scene, 128, 224)
        path = write_mp4(world.render(17, 128, 224), tmp_path / f"{i}.mp4", FPS)
        found = detect(read_video(path)[0])
        where = f"seed {i} '{scene.caption}' 128x224 through H.264"
        check_reads(found, scene, where)
        check_measures(found, world, 0, 17, where, H264_TOLERANCE)


def test_first_skips_the_given_frames():
    """Frames before `first` (the conditioning of image-to-video and continuations) are not read."""
    scene = Scene(colour="green", shape="circle", direction="right")
    world = clip(7, scene, 96, 160)
    other = clip(8, Scene(colour="red", shape="square", direction="down"), 96, 160)
    frames = np.concatenate([other.render(8, 96, 160), world.render(9, 96, 160, first=8)])
    found = detect(frames, first=8)
    check_reads(found, scene, "after 8 frames of another scene")
    check_measures(found, world, 8, 17, "after 8 frames of another scene", CENTROID_TOLERANCE)


def test_a_static_video_has_no_direction():
    for i, scene in enumerate(scenes()[::5]):
        frames = np.repeat(clip(i, scene, 96, 160).render(1, 96, 160, first=6), 17, axis=0)
        found = detect(frames)
        where = f"seed {i} '{scene.caption}' static"
        assert (found.colour, found.shape, found.direction) == (scene.colour, scene.shape, None), where
        assert found.object_frames == 17 and found.displacement < detector.MIN_TRAVEL, where


def test_noise_has_no_object():
    rng = np.random.default_rng(0)
    videos = {"uniform RGB": rng.integers(0, 256, (9, 96, 160, 3), dtype=np.uint8)}
    for sigma in (5, 20, 40, 80):
        videos[f"grey + gaussian sigma {sigma}"] = np.clip(np.round(
            128 + rng.normal(0, sigma, (9, 96, 160, 3))), 0, 255).astype(np.uint8)
    for name, video in videos.items():
        found = detect(video)
        assert found.colour is None and found.shape is None and found.direction is None, f"{name}: {found}"
        assert found.object_frames == 0, f"{name}: object in {found.object_frames} frames"


def background(seed: int, height: int, width: int, frames: int) -> np.ndarray:
    """A world clip's background alone: its object far outside the frame, not moving."""
    empty = clip(seed, scenes()[seed % 48], height, width).model_copy(update={"start": (5.0, 5.0), "speed": 0.0})
    return empty.render(frames, height, width)


def test_a_background_has_no_object():
    for seed in range(4):
        found = detect(background(seed, 96, 160, 9))
        assert found == Detection(colour=None, shape=None, direction=None, object_frames=0, displacement=0.0,
                                  hue=None, fill=None, centroids=(None,) * 9), f"seed {seed}: {found}"


def test_an_object_in_fewer_than_half_the_frames_is_not_named():
    scene = Scene(colour="blue", shape="triangle", direction="down")
    frames = clip(3, scene, 96, 160).render(17, 96, 160)
    frames[8:] = background(3, 96, 160, 9)
    found = detect(frames)
    assert (found.colour, found.shape, found.direction, found.object_frames) == (None, None, None, 8), found
    found = detect(frames[:16])  # 8 of 16: half is enough
    check_reads(found, scene, "object in 8 of 16 frames")


@pytest.mark.parametrize(("frames", "first", "message"), [
    (np.zeros((4, 4, 3), np.uint8), 0, "(T, H, W, 3) uint8"),
    (np.zeros((2, 4, 4, 3), np.float32), 0, "(T, H, W, 3) uint8"),
    (np.zeros((2, 4, 4, 4), np.uint8), 0, "(T, H, W, 3) uint8"),
    ([[[[0, 0, 0]]]], 0, "(T, H, W, 3) uint8"),
    (np.zeros((0, 4, 4, 3), np.uint8), 0, "at least one pixel"),
    (np.zeros((2, 4, 4, 3), np.uint8), 2, "first must be in 0 .. 1"),
    (np.zeros((2, 4, 4, 3), np.uint8), -1, "first must be in 0 .. 1"),
])
def test_bad_input_is_a_value_error(frames, first, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        detect(frames, first=first)
