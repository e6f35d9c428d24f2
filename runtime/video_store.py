"""The results directory of `serve`: one folder per video, its status and its mp4, written atomically, expiring.

    RESULTS/video_<32 hex>/status.json   the API's video object (`VideoStatus`), replaced whole on every change
    RESULTS/video_<32 hex>/video.mp4     the finished video (streamed into a temporary name, renamed when complete)
    RESULTS/video_<32 hex>/image         the first-frame image of an image-to-video request, as uploaded

The front end writes `queued`; the replica that generates the video writes `in_progress` (its stage and step, at
most every `PROGRESS_INTERVAL_S`), then `completed` or `failed`. Every reader sees a whole status (`atomic_output`).
A finished video expires `expire_after` seconds after it finished: `expired` lists them and `remove` deletes them.
Replicas on several nodes share one store through a shared filesystem, like `render`'s --out-dir.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from runtime.errors import RequestError
from runtime.files import atomic_output

log = logging.getLogger(__name__)

ID = re.compile(r"video_[0-9a-f]{32}")
MAX_IMAGE_BYTES = 32 * 2**20  # a first-frame image, decoded
Status = Literal["queued", "in_progress", "completed", "failed"]


class VideoStatus(BaseModel):
    """The API's video object (`GET /v1/videos/{id}`), shaped like the video-generation APIs' (OpenAI's `video`).

    Times are Unix seconds; `progress` is the percent of the current clip's denoising steps done (100 when
    completed); `stage`, `step`, `steps`: the denoiser running and its step while in progress."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    object: Literal["video"] = "video"
    status: Status
    created_at: int
    completed_at: int | None = None  # completed or failed
    expires_at: int | None = None  # when the finished video and its status are removed
    progress: int = 0
    stage: str | None = None
    step: int | None = None
    steps: int | None = None
    frames: int | None = None  # completed: frames in the mp4
    seconds: float | None = None  # completed: generation and encoding, of its batch
    batch: int | None = None  # completed: videos generated together with it, itself included
    error: str | None = None  # failed: why

    @property
    def finished(self) -> bool:
        return self.status in ("completed", "failed")


def new_id() -> str:
    return f"video_{uuid.uuid4().hex}"


def is_video_id(text: str) -> bool:
    """Whether `text` is an id `new_id` makes (so its folder is inside the store)."""
    return ID.fullmatch(text) is not None


class VideoStore:
    """The videos of one `serve` under `root`; finished ones kept for `expire_after` seconds."""

    def __init__(self, root: str | Path, expire_after: float):
        self.root, self.expire_after = Path(root), expire_after
        self.root.mkdir(parents=True, exist_ok=True)

    def folder(self, video_id: str) -> Path:
        """The folder of an id; ValueError for a string that is not one (nothing outside `root` is ever named)."""
        if not is_video_id(video_id):
            raise ValueError(f"not a video id: {video_id!r}")
        return self.root / video_id

    def save_image(self, video_id: str, data: str) -> Path:
        """Store a first-frame image sent as base64 (or a data URL, `data:image/png;base64,...`); returns its path.
        Raises RequestError for text that is not base64 or an image over MAX_IMAGE_BYTES (checked before decoding
        it as an image, which `Pipeline.check` does)."""
        if not isinstance(data, str):
            raise RequestError("image: expected the image file's bytes as a base64 string")
        encoded = data.split(",", 1)[1] if data.startswith("data:") and "," in data else data
        if len(encoded) * 3 // 4 > MAX_IMAGE_BYTES:
            raise RequestError(f"image: larger than {MAX_IMAGE_BYTES // 2**20} MiB; send a smaller image")
        try:
            raw = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError("image: not valid base64; send the image file's bytes base64-encoded "
                               "(or as a data: URL)") from None
        folder = self.folder(video_id)
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_output(folder / "image") as tmp:
            tmp.write_bytes(raw)
        return folder / "image"

    def write(self, status: VideoStatus) -> VideoStatus:
        """Replace a video's status, whole; a finished one gets its expiry time. Returns what was written."""
        if status.finished and status.expires_at is None:
            status = status.model_copy(update={"expires_at": int(status.completed_at + self.expire_after)})
        folder = self.folder(status.id)
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_output(folder / "status.json") as tmp:
            tmp.write_text(status.model_dump_json())
        return status

    def update(self, video_id: str, **changes: object) -> VideoStatus:
        """Write the video's status with `changes`; finishing (completed, failed) stamps `completed_at`."""
        status = self.read(video_id)
        if changes.get("status") in ("completed", "failed"):
            changes.setdefault("completed_at", int(time.time()))
        return self.write(status.model_copy(update=changes))

    def read(self, video_id: str) -> VideoStatus | None:
        """The video's status, or None when there is no such video (or it expired)."""
        try:
            status = VideoStatus.model_validate_json((self.folder(video_id) / "status.json").read_text())
        except (ValueError, FileNotFoundError):
            return None
        return None if status.expires_at is not None and status.expires_at <= time.time() else status

    def video(self, video_id: str) -> Path:
        """Where the video's mp4 is (or will be) written."""
        return self.folder(video_id) / "video.mp4"

    def videos(self) -> list[VideoStatus]:
        """Every video's status, expired ones included."""
        found = []
        for status in self.root.glob("video_*/status.json"):
            try:
                found.append(VideoStatus.model_validate_json(status.read_text()))
            except (ValueError, FileNotFoundError):  # removed meanwhile
                continue
        return found

    def expired(self, now: float | None = None) -> list[str]:
        """The ids of finished videos whose time is up."""
        now = time.time() if now is None else now
        return [s.id for s in self.videos() if s.expires_at is not None and s.expires_at <= now]

    def remove(self, video_id: str) -> None:
        """Delete a video's folder (its status, mp4 and image)."""
        shutil.rmtree(self.folder(video_id), ignore_errors=True)
        log.info("removed %s", video_id)
