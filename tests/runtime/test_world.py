"""The procedural world: seeded, any size, captions round-trip, crops equal the frame they are cut from."""

import numpy as np
import pytest

from runtime.world import COLOURS, DIRECTIONS, SHAPES, Clip, Scene, sample_clips, scenes


def test_scenes_and_captions():
    assert len(scenes()) == len(COLOURS) * len(SHAPES) * len(DIRECTIONS) == 48
    for i, scene in enumerate(scenes()):
        assert scene.class_id == i and Scene.from_caption(scene.caption) == scene
        assert len(scene.caption.encode()) <= 31  # what tiny's byte-level text encoder reads
    assert Scene.from_caption("a corgi surfing a wave") is None
    assert Scene.from_caption("a purple circle moving left") is None


def test_clips_are_seeded_and_resolution_independent():
    a, b = Clip.sample(7), Clip.sample(7)
    assert a == b and np.array_equal(a.render(3, 32, 56), b.render(3, 32, 56))
    assert Clip.sample(8) != a
    small, large = a.render(2, 64, 112), a.render(2, 256, 448)
    assert small.shape == (2, 64, 112, 3) and small.dtype == np.uint8
    pooled = large.reshape(2, 64, 4, 112, 4, 3).mean(axis=(2, 4))  # the same picture at 4x the size
    assert np.abs(pooled - small).mean() < 3.0


def test_a_region_is_the_crop_of_the_whole_frame():
    clip = Clip.sample(5)
    full = clip.render(4, 128, 224, first=3)
    crop = clip.render(4, 128, 224, first=3, region=(20, 60, 48, 80))
    assert np.abs(full[:, 20:68, 60:140].astype(int) - crop).max() <= 1  # float32 rounding of the pixel grid
    with pytest.raises(ValueError, match="not inside"):
        clip.render(1, 128, 224, region=(100, 0, 48, 48))


def test_the_object_stays_inside_over_one_clip_and_moves_its_direction():
    for clip in sample_clips(48, seed=100):
        x0, y0 = clip.centre(0)
        x1, y1 = clip.centre(16)
        ux, uy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[clip.scene.direction]
        assert (x1 - x0) * ux + (y1 - y0) * uy > 0.25  # travels at least a quarter of S
        for x, y in ((x0, y0), (x1, y1)):
            assert abs(x) + clip.radius <= 896 / 512 / 2 and abs(y) + clip.radius <= 0.5, clip
