"""mp4 and PNG output through PyAV: decodes back with the expected count, size, fps and codec; atomic writes."""

import numpy as np
import pytest

from runtime.video import atomic_output, read_video, write_mp4, write_pngs


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
