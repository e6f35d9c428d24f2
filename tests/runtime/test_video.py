"""mp4 and PNG output through PyAV: decodes back with the expected count, size, fps and codec; atomic writes. The
first-frame image: broken files refused, transparency on white, other aspect ratios center-cropped."""

import io
import logging

import numpy as np
import pytest
from PIL import Image

from runtime.errors import RequestError
from runtime.video import atomic_output, read_image, read_video, to_frames, to_video, write_mp4, write_pngs


def gradient_frames(t=17, h=64, w=112):
    y, x = np.mgrid[0:h, 0:w]
    frames = [np.stack([(x * 2 + 9 * i) % 256, (y * 3) % 256, np.full_like(x, 16 * i % 256)], -1) for i in range(t)]
    return np.stack(frames).astype(np.uint8)


def test_mp4_round_trip(tmp_path):
    frames = gradient_frames()
    path = write_mp4(frames, tmp_path / "out.mp4", fps=8)
    decoded, fps, codec = read_video(path)
    assert decoded.shape == frames.shape and fps == 8.0 and codec == "h264"
    psnr = 10 * np.log10(255**2 / np.mean((decoded.astype(float) - frames) ** 2))
    assert psnr > 30, psnr  # crf 18 with 4:2:0 chroma
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]


def test_bad_frames_are_refused_and_nothing_is_left(tmp_path):
    with pytest.raises(ValueError, match=r"\(T, H, W, 3\) uint8"):
        write_mp4(gradient_frames().astype(np.float32), tmp_path / "out.mp4", fps=8)
    with pytest.raises(ValueError, match="even height and width"):
        write_mp4(gradient_frames(h=63), tmp_path / "out.mp4", fps=8)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_leaves_no_partial_file(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_output(tmp_path / "video.mp4") as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_png_frames(tmp_path):
    import av

    frames = gradient_frames(t=3)
    paths = write_pngs(frames, tmp_path, "clip")
    assert [p.name for p in paths] == ["clip_0000.png", "clip_0001.png", "clip_0002.png"]
    with av.open(str(paths[1])) as container:
        np.testing.assert_array_equal(next(container.decode(video=0)).to_ndarray(format="rgb24"), frames[1])


def test_outputs_get_the_usual_file_mode(tmp_path):
    from runtime.files import usual_mode

    path = write_mp4(gradient_frames(t=1), tmp_path / "one.mp4", fps=8)
    assert path.stat().st_mode & 0o777 == usual_mode()  # not mkstemp's 0600


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png_with_a_flipped_byte(where: str) -> bytes:
    """A PNG with one byte flipped in the middle of its image data or in the data's checksum (CRC)."""
    data = bytearray(encoded(Image.fromarray(gradient_frames(t=1)[0]), "PNG"))
    start = data.index(b"IDAT") + 4
    length = int.from_bytes(data[start - 8 : start - 4], "big")
    data[start + length // 2 if where == "data" else start + length + 3] ^= 0xFF
    return bytes(data)


def half(data: bytes) -> bytes:
    return data[: len(data) // 2]


@pytest.mark.parametrize("name, broken", [
    ("truncated.jpg", lambda: half(encoded(Image.fromarray(gradient_frames(t=1)[0]), "JPEG"))),
    ("truncated.png", lambda: half(encoded(Image.fromarray(gradient_frames(t=1)[0]), "PNG"))),
    ("flipped.png", lambda: png_with_a_flipped_byte("data")),
    ("bad_crc.png", lambda: png_with_a_flipped_byte("crc")),  # decodes without an error: only a checksum tells
])
def test_a_broken_image_is_refused_naming_the_file(tmp_path, name, broken):
    (tmp_path / name).write_bytes(broken())
    with pytest.raises(RequestError, match=rf"cannot read an image from \S*{name}: the file is truncated or corrupt"):
        read_image(tmp_path / name, (64, 112))


def test_a_missing_file_or_not_an_image_is_refused(tmp_path):
    with pytest.raises(RequestError, match=r"no image at \S*missing.png"):
        read_image(tmp_path / "missing.png", (64, 112))
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(RequestError, match=r"cannot read an image from \S*notes.png: not an image format"):
        read_image(tmp_path / "notes.png", (64, 112))


def test_an_image_over_the_decompression_bomb_limit_is_refused(tmp_path, monkeypatch):
    Image.fromarray(gradient_frames(t=1)[0]).save(tmp_path / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(RequestError, match=r"huge.png: Image size \(7168 pixels\) exceeds limit"):
        read_image(tmp_path / "huge.png", (64, 112))


def transparent_left_half(mode: str) -> Image.Image:
    """64x48, the left half fully transparent (black underneath), the right half opaque blue (gray for LA)."""
    alpha = np.zeros((48, 64), np.uint8)
    alpha[:, 32:] = 255
    if mode == "RGBA":
        rgb = np.zeros((48, 64, 3), np.uint8)
        rgb[:, 32:, 2] = 255
        return Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    if mode == "LA":
        return Image.fromarray(np.dstack([alpha // 255 * 100, alpha]), "LA")
    image = Image.fromarray(alpha // 255, "P")  # index 0 (black) transparent, 1 blue
    image.putpalette([0, 0, 0, 0, 0, 255])
    image.info["transparency"] = 0
    return image


@pytest.mark.parametrize("mode, opaque", [("RGBA", (0, 0, 255)), ("LA", (100, 100, 100)), ("P", (0, 0, 255))])
def test_transparency_is_composited_on_white_with_a_warning(tmp_path, caplog, mode, opaque):
    transparent_left_half(mode).save(tmp_path / "logo.png")
    with caplog.at_level(logging.WARNING, logger="runtime.video"):
        image = read_image(tmp_path / "logo.png", (48, 64))
    assert image.shape == (48, 64, 3) and image.dtype == np.uint8 and image.flags.writeable
    assert (image[:, :32] == 255).all()
    assert (image[:, 32:] == opaque).all()
    warning = f"{tmp_path / 'logo.png'} has transparency; composited on white"
    assert [r.getMessage() for r in caplog.records] == [warning]


def test_an_opaque_alpha_channel_does_not_warn(tmp_path, caplog):
    Image.fromarray(np.full((48, 64, 4), 255, np.uint8), "RGBA").save(tmp_path / "opaque.png")
    with caplog.at_level(logging.WARNING, logger="runtime.video"):
        assert (read_image(tmp_path / "opaque.png", (48, 64)) == 255).all()
    assert caplog.records == []


MAGENTA, RED, BLUE, GREEN, YELLOW = (255, 0, 255), (255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 0)


def framed(width: int, height: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """Gray with 40-pixel red/blue/green/yellow strips inside `box` (top/bottom/left/right), magenta beyond it
    (20 pixels off, out of reach of the resampling filter)."""
    left, top, right, bottom = box
    image = np.full((height, width, 3), 128, np.uint8)
    image[:, : max(left - 20, 0)] = image[:, right + 20 :] = MAGENTA
    image[: max(top - 20, 0)] = image[bottom + 20 :] = MAGENTA
    image[top : top + 40, left + 40 : right - 40] = RED
    image[bottom - 40 : bottom, left + 40 : right - 40] = BLUE
    image[top + 40 : bottom - 40, left : left + 40] = GREEN
    image[top + 40 : bottom - 40, right - 40 : right] = YELLOW
    return image


@pytest.mark.parametrize("width, height, box, size, cropped", [
    (640, 480, (0, 60, 640, 420), (90, 160), "640x360 (4:3 -> 16:9)"),  # top and bottom go
    (320, 180, (70, 0, 250, 180), (64, 64), "180x180 (16:9 -> 1:1)"),  # left and right go
])
def test_another_aspect_ratio_is_center_cropped_with_a_warning(tmp_path, caplog, width, height, box, size, cropped):
    Image.fromarray(framed(width, height, box)).save(tmp_path / "photo.png")
    with caplog.at_level(logging.WARNING, logger="runtime.video"):
        image = read_image(tmp_path / "photo.png", size).astype(int)
    assert image.shape == (*size, 3)
    assert not ((image[..., [0, 2]].min(-1) - image[..., 1]) > 100).any()  # no magenta: the cut parts are gone
    h, w = size
    for pixel, colour in [(image[0, w // 2], RED), (image[-1, w // 2], BLUE), (image[h // 2, 0], GREEN),
                          (image[h // 2, -1], YELLOW)]:  # all four edges of the box are kept
        np.testing.assert_allclose(pixel, colour, atol=40)
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path / 'photo.png'} is {width}x{height}; center-cropped to {cropped} and resized to {w}x{h}"]


@pytest.mark.parametrize("width, height", [(320, 180), (321, 180), (320, 181), (1792, 1024)])
def test_the_same_aspect_ratio_is_only_resized(tmp_path, caplog, width, height):
    """Up to a rounding pixel: 321x180 is 16:9 too."""
    Image.fromarray(framed(width, height, (0, 0, width, height))).save(tmp_path / "still.png")
    with caplog.at_level(logging.WARNING, logger="runtime.video"):
        image = read_image(tmp_path / "still.png", (90, 160) if width < 1000 else (128, 224)).astype(int)
    assert caplog.records == []
    np.testing.assert_allclose(image[0, image.shape[1] // 2], RED, atol=40)
    np.testing.assert_allclose(image[-1, image.shape[1] // 2], BLUE, atol=40)


def test_the_exif_orientation_of_a_photo_is_applied(tmp_path):
    stored = np.zeros((32, 64, 3), np.uint8)
    stored[:, :32] = RED  # left half as stored; on screen (rotated 90 degrees clockwise) the top half
    stored[:, 32:] = BLUE
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    Image.fromarray(stored).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    image = read_image(tmp_path / "phone.jpg", (64, 32)).astype(int)
    np.testing.assert_allclose(image[8, 16], RED, atol=30)
    np.testing.assert_allclose(image[-8, 16], BLUE, atol=30)


def test_a_16_bit_grayscale_image_keeps_its_range(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (48, 1))
    Image.fromarray(ramp).save(tmp_path / "depth.png")
    image = read_image(tmp_path / "depth.png", (48, 64)).astype(int)
    np.testing.assert_array_equal(image[..., 0], image[..., 2])
    np.testing.assert_allclose(image[0, :, 0], ramp[0] >> 8, atol=2)


def test_frames_to_the_tokenizer_video_and_back():
    frames = np.random.default_rng(0).integers(0, 256, (5, 16, 24, 3), dtype=np.uint8)
    video = to_video(frames)
    assert video.shape == (1, 3, 5, 16, 24) and video.dtype == np.float32
    assert -1.0 <= video.min() and video.max() <= 1.0
    assert np.array_equal(to_frames(video), frames)
