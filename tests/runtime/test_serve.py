"""`python -m runtime serve` over loopback on a local Ray cluster (2 CPUs: two replicas of one CPU), `micro`
artifact: concurrent requests, the CLI's checks as 422, the bounded queue's 429, the token's 401, progress, and a
bounded load test that loses and corrupts nothing (benchmarks/serve_load.py)."""

import base64
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from benchmarks import serve_load
from benchmarks.serve_load import TOKEN, call
from runtime.video import read_video

pytest.importorskip("ray.serve", reason="the `ray` extra is not installed")
QUEUE = 4


@pytest.fixture(scope="module")
def server(micro_artifacts, ray_address, tmp_path_factory):
    """(URL, results directory) of one server for the module on the session's Ray cluster: 2 replicas, batches of up
    to 2, a queue of 4, a token."""
    directory, _ = micro_artifacts
    results = tmp_path_factory.mktemp("videos")
    with serve_load.server(directory, results, "--replicas", "2", "--batch", "2", "--queue", str(QUEUE),
                           "--ray", ray_address) as url:
        yield url, results


def _wait(url: str, video_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while (status := call(f"{url}/v1/videos/{video_id}", TOKEN).body)["status"] not in ("completed", "failed"):
        assert time.monotonic() < deadline, status
        time.sleep(0.1)
    return status


def _png(size: int = 48) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), (200, 40, 40), np.uint8)).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_without_the_token_every_route_is_401_and_nothing_runs(server):
    url, results = server
    before = sorted(results.iterdir())
    for wrong in (None, "not-the-token"):
        assert call(f"{url}/v1/videos", wrong, {"prompt": "a", "seed": 1}).code == 401
        assert call(f"{url}/v1/videos/video_{'0' * 32}", wrong).code == 401
        assert call(f"{url}/healthz", wrong).code == 401
    assert call(f"{url}/v1/videos", None, {"prompt": "a"}).body["detail"].startswith("this server needs a token")
    assert call(f"{url}/healthz", "wrong").body["detail"].startswith("this server did not accept the token sent")
    assert sorted(results.iterdir()) == before
    assert call(f"{url}/healthz", TOKEN).body["active"] == 0
    assert call(f"{url}/docs", None).code == 404 and call(f"{url}/openapi.json", None).code == 404


@pytest.mark.parametrize("body, says", [
    ({"prompt": "a", "frames": "nine"}, "frames: Input should be a valid integer (got 'nine')"),
    ({"prompt": "a", "frames": 10}, "frames=10 is not a length this artifact makes: 9, 13, 17, ... (9 + 4k)"),
    ({"prompt": "a", "colour": "red"}, "colour: Extra inputs are not permitted (got 'red')"),
    ({"prompt": "a", "seed": -1}, "seed: Input should be greater than or equal to 0 (got -1)"),
    ({"prompt": "a", "image": "%%%"}, "image: not valid base64"),
    ({"prompt": "a", "image": base64.b64encode(b"not an image").decode()},
     "cannot read an image from the uploaded image: not an image format Pillow reads"),
    ([1, 2], "the body must be a JSON object"),
])
def test_a_malformed_request_is_422_naming_the_field_as_the_cli_does(server, body, says):
    url, results = server
    reply = call(f"{url}/v1/videos", TOKEN, body)
    assert reply.code == 422 and says in reply.body["detail"], reply
    assert not list(results.glob("video_*/image"))  # an uploaded image of a refused request is not kept


def test_three_concurrent_requests_complete_with_valid_mp4s(server):
    url, _ = server
    bodies = [{"prompt": "a red circle", "seed": 1}, {"prompt": "a blue square", "seed": 2},
              {"prompt": "from an image", "seed": 3, "image": _png()}]
    with ThreadPoolExecutor(3) as pool:
        replies = list(pool.map(lambda body: call(f"{url}/v1/videos", TOKEN, body), bodies))
    assert [r.code for r in replies] == [200] * 3 and {r.body["status"] for r in replies} == {"queued"}
    for reply in replies:
        status = _wait(url, reply.body["id"])
        assert status["status"] == "completed" and status["frames"] == 9 and status["progress"] == 100, status
        content = call(f"{url}/v1/videos/{reply.body['id']}/content", TOKEN, raw=True)
        assert content[4:8] == b"ftyp"
    assert call(f"{url}/v1/videos/video_{'f' * 32}", TOKEN).code == 404
    assert call(f"{url}/v1/videos/..%2F..%2Fetc", TOKEN).code == 404


def test_a_full_queue_is_429_with_retry_after_and_progress_shows_stage_and_step(server):
    url, _ = server
    deadline = time.monotonic() + 30
    while call(f"{url}/healthz", TOKEN).body["active"]:  # the earlier tests' videos have left the queue
        assert time.monotonic() < deadline
        time.sleep(0.05)
    slow = {"prompt": "slow", "seed": 9, "steps": 400}
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda _: call(f"{url}/v1/videos", TOKEN, slow), range(8)))
    accepted = [r.body["id"] for r in replies if r.code == 200]
    refused = [r for r in replies if r.code == 429]
    assert len(accepted) == QUEUE and len(refused) == 8 - QUEUE, [r.code for r in replies]
    assert all(r.retry_after >= 1 and "retry later" in r.body["detail"] for r in refused)
    deadline = time.monotonic() + 60
    while (status := call(f"{url}/v1/videos/{accepted[0]}", TOKEN).body)["stage"] is None:
        assert time.monotonic() < deadline and status["status"] in ("queued", "in_progress"), status
        time.sleep(0.05)
    assert status["status"] == "in_progress" and status["stage"] in ("base", "sr1", "sr2"), status
    assert 1 <= status["step"] <= status["steps"] == 400, status
    assert call(f"{url}/v1/videos/{accepted[0]}/content", TOKEN).code in (409, 200)
    for video_id in accepted:
        assert _wait(url, video_id)["status"] == "completed"


def test_a_bounded_load_loses_nothing_and_corrupts_nothing(server):
    """20 requests of 5 seeds from 4 client threads within 120 s; 429s are retried after Retry-After. Every video
    arrives, decodes to 9 frames, and equals the other videos of its seed (within 2 levels: batched and single
    generations agree to 1 level before encoding)."""
    url, _ = server
    report = serve_load.load(url, TOKEN, requests=20, clients=4, seeds=5, time_limit=120, expected_frames=9)
    assert report.completed == 20 and report.lost == 0 and report.failed == 0, report.outcomes
    assert report.corrupt == [], report.corrupt
    print(json.dumps(report.model_dump(exclude={"outcomes"})))


def test_the_mp4_matches_the_status(server, tmp_path):
    url, _ = server
    video_id = call(f"{url}/v1/videos", TOKEN, {"prompt": "one", "seed": 4}).body["id"]
    status = _wait(url, video_id)
    (tmp_path / "v.mp4").write_bytes(call(f"{url}/v1/videos/{video_id}/content", TOKEN, raw=True))
    frames, fps, codec = read_video(tmp_path / "v.mp4")
    assert (len(frames), fps, codec) == (status["frames"], 8.0, "h264")
