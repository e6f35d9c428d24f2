"""The results directory of `serve` (no Ray needed): statuses written whole, expiry, ids that name nothing outside."""

import base64
import time

import pytest

from runtime.errors import RequestError
from runtime.video_store import VideoStatus, VideoStore, is_video_id, new_id


def test_a_finished_video_expires_after_its_time(tmp_path):
    store = VideoStore(tmp_path, expire_after=60)
    old, fresh = new_id(), new_id()
    store.write(VideoStatus(id=old, status="queued", created_at=0))
    store.update(old, status="completed", completed_at=int(time.time()) - 61)
    written = store.write(VideoStatus(id=fresh, status="in_progress", created_at=0))
    assert written.expires_at is None and store.read(fresh) == written  # unfinished: never expires
    assert store.read(old) is None and store.expired() == [old]
    store.remove(old)
    assert not (tmp_path / old).exists() and store.expired() == []
    failed = store.update(fresh, status="failed", error="boom")
    assert failed.completed_at is not None and failed.expires_at == failed.completed_at + 60
    assert store.read(fresh).error == "boom"


@pytest.mark.parametrize("text", ["../etc", "video_" + "0" * 31, "video_" + "G" * 32, "VIDEO_" + "0" * 32, ""])
def test_only_ids_new_id_makes_name_a_folder(tmp_path, text):
    assert is_video_id(new_id()) and not is_video_id(text)
    with pytest.raises(ValueError):
        VideoStore(tmp_path, 60).folder(text)
    assert VideoStore(tmp_path, 60).read(text) is None


def test_an_uploaded_image_is_base64_or_a_data_url(tmp_path):
    store, video_id = VideoStore(tmp_path, 60), new_id()
    raw = b"\x89PNG and so on"
    assert store.save_image(video_id, base64.b64encode(raw).decode()).read_bytes() == raw
    assert store.save_image(video_id, "data:image/png;base64," + base64.b64encode(raw).decode()).read_bytes() == raw
    for bad, says in (("***", "not valid base64"), (5, "expected the image file's bytes as a base64 string")):
        with pytest.raises(RequestError, match=says):
            store.save_image(video_id, bad)
