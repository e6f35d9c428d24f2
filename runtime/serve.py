"""`python -m runtime serve`: an HTTP video API on Ray Serve (docs/scaleout.md §3 has the API and `curl` examples).

    POST /v1/videos                 {"prompt": ..., "seed": ..., "frames": ..., "steps": ..., "guidance": ...,
                                     "class_id": ..., "image": BASE64} -> {"id": ..., "status": "queued", ...}
    GET  /v1/videos/{id}            the status: queued, in_progress (stage, step), completed, failed (error)
    GET  /v1/videos/{id}/content    the mp4, once completed
    GET  /healthz                   {"status": "ok", ...}

Two deployments: `VideoAPI`, the FastAPI front end (one replica, no CPU reserved), which checks each request as the
CLI does (`Request`, `Pipeline.check` on the manifest: 422 with the CLI's message), bounds the videos waiting or in
progress (429 with Retry-After beyond `queue`), keeps the statuses in the results directory (`VideoStore`) and
removes expired videos; and `VideoGenerator`, `replicas` replicas each holding one Pipeline on one device
(`ray_cluster.worker_resources`), which generate one batch at a time: concurrent requests that reach a replica
within `BATCH_WAIT_S` are batched (Ray Serve's `serve.batch`, up to `batch` videos; only compatible requests share a
model call, `render.job_batches`). With a token, every request needs `Authorization: Bearer TOKEN` (401 otherwise,
before anything is read or run).

This module imports Ray Serve and FastAPI (the `ray` extra): the CLI imports it only for `serve`, after checking
that they are installed.
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations (the HTTP request) at import.
import asyncio
import contextlib
import hmac
import json
import logging
import math
import time
from collections import deque
from collections.abc import Iterator

from fastapi import FastAPI, HTTPException
from fastapi import Request as HTTPRequest
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict
from ray import serve

from runtime.errors import RequestError, WaltExportError
from runtime.pipeline import Pipeline, PipelineSettings
from runtime.ray_cluster import WorkerResources
from runtime.render import job_batches
from runtime.request import Request
from runtime.video import mp4_writer
from runtime.video_store import VideoStatus, VideoStore, new_id

log = logging.getLogger(__name__)

BATCH_WAIT_S = 0.1  # how long a replica waits for more requests to batch with the first (serve.batch)
PROGRESS_INTERVAL_S = 0.5  # at most one in_progress status write per this many seconds per video
SWEEP_INTERVAL_S = 30.0  # expired videos are looked for at most this often
MAX_BODY_BYTES = 48 * 2**20  # a request's JSON, its base64 image included
FIRST_GUESS_S = 60.0  # the Retry-After estimate of one video's time before any has finished
APP = "walt-export"


class ServeSettings(BaseModel):
    """What `serve` runs: the pipeline each replica opens, where videos go, and the API's limits."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pipeline: PipelineSettings  # what each generator replica opens (`ray_cluster.worker_settings`)
    resources: WorkerResources  # per generator replica
    replicas: int = 1
    batch: int = 1  # videos one replica generates together, at most
    queue: int = 16  # videos waiting or in progress, at most; more get 429
    results_dir: str
    expire_after: float = 3600.0  # seconds a finished video is kept
    token: str | None = None


class VideoJob(BaseModel):
    """One accepted request, as the front end hands it to a generator replica."""

    model_config = ConfigDict(frozen=True)

    id: str
    request: Request


# ------------------------------------------------------------------------------------------------ generators
class VideoGenerator:
    """A generator replica: one Pipeline, one batch at a time, each video streamed into its mp4 in the store."""

    def __init__(self, settings: ServeSettings):
        self.pipeline = settings.pipeline.open()
        self.store = VideoStore(settings.results_dir, settings.expire_after)
        self.generate.set_max_batch_size(settings.batch)

    @serve.batch(max_batch_size=1, batch_wait_timeout_s=BATCH_WAIT_S)
    async def generate(self, jobs: list[VideoJob]) -> list[str]:
        """Generate the jobs (those that can share a batch together); returns each one's final status."""
        finished = await asyncio.to_thread(self._generate, jobs)
        return [finished[job.id] for job in jobs]

    def _generate(self, jobs: list[VideoJob]) -> dict[str, str]:
        requests = {job.id: job.request for job in jobs}
        finished = {}
        for group in job_batches(self.pipeline, list(requests.items()), len(jobs)):
            ids = [video_id for video_id, _ in group]
            start = time.perf_counter()
            try:
                frames = self._stream(ids, [request for _, request in group])
            except Exception as e:  # a failed batch fails its videos, and the replica goes on
                if not isinstance(e, WaltExportError):
                    log.exception("videos %s failed", ", ".join(ids))
                for video_id in ids:
                    finished[video_id] = self.store.update(video_id, status="failed",
                                                           error=f"{type(e).__name__}: {e}").status
                continue
            seconds = round(time.perf_counter() - start, 3)
            for video_id, count in zip(ids, frames, strict=True):
                finished[video_id] = self.store.update(video_id, status="completed", progress=100, stage=None,
                                                       step=None, steps=None, frames=count, seconds=seconds,
                                                       batch=len(ids)).status
        return finished

    def _stream(self, ids: list[str], requests: list[Request]) -> list[int]:
        """Stream one batch into the videos' mp4s, writing their progress; returns each one's frame count."""
        frames = [0] * len(ids)
        for video_id in ids:
            self.store.update(video_id, status="in_progress")
        with contextlib.ExitStack() as stack:
            writers = [stack.enter_context(mp4_writer(self.store.video(video_id), self.pipeline.fps))
                       for video_id in ids]
            for index, chunk in self.pipeline.stream_batch(requests, self._progress(ids)):
                writers[index](chunk)
                frames[index] += len(chunk)
        return frames

    def _progress(self, ids: list[str]):
        """A Progress callback writing the batch's in_progress statuses, at most every PROGRESS_INTERVAL_S."""
        last = [0.0]
        denoisers = self.pipeline.denoisers

        def report(denoiser: str, step: int, steps: int) -> None:
            now = time.monotonic()
            if now - last[0] < PROGRESS_INTERVAL_S and step not in (1, steps):
                return
            last[0] = now
            done = (denoisers.index(denoiser) + step / steps) / len(denoisers)
            for video_id in ids:
                self.store.update(video_id, stage=denoiser, step=step, steps=steps, progress=min(99, int(100 * done)))

        return report


# ------------------------------------------------------------------------------------------------ front end
# No /docs, /redoc or /openapi.json: they would answer without the token (the API is in docs/scaleout.md §3).
api = FastAPI(title="walt-export video API", docs_url=None, redoc_url=None, openapi_url=None)


@serve.ingress(api)  # at import: each replica imports this module, routes included
class VideoAPI:
    """The front end: checks, queues and reports; generation happens on the `VideoGenerator` replicas."""

    def __init__(self, generator, settings: ServeSettings):
        self.generator, self.settings = generator, settings
        self.checker = Pipeline.for_checks(settings.pipeline.artifacts)
        self.store = VideoStore(settings.results_dir, settings.expire_after)
        for status in self.store.videos():  # a previous server's unfinished videos will never finish
            if not status.finished:
                self.store.update(status.id, status="failed", error="the server stopped before it finished")
        self.active: dict[str, asyncio.Task] = {}
        self.durations: deque[float] = deque(maxlen=16)
        self.swept = 0.0

    @api.post("/v1/videos")
    async def create(self, http: HTTPRequest) -> VideoStatus:
        self._authorize(http)
        self._sweep()
        body = await http.body()
        if len(body) > MAX_BODY_BYTES:
            raise HTTPException(413, f"the request is over {MAX_BODY_BYTES // 2**20} MiB; send a smaller image")
        video_id = new_id()
        try:
            request = self._request(video_id, body)
        except RequestError as e:
            self.store.remove(video_id)
            raise HTTPException(422, str(e)) from None
        if len(self.active) >= self.settings.queue:
            self.store.remove(video_id)
            raise HTTPException(429, f"{len(self.active)} videos are waiting or in progress, the most this server "
                                     "queues; retry later", headers={"Retry-After": str(self._retry_after())})
        status = self.store.write(VideoStatus(id=video_id, status="queued", created_at=int(time.time())))
        self.active[video_id] = asyncio.create_task(self._run(VideoJob(id=video_id, request=request)))
        return status

    def _request(self, video_id: str, body: bytes) -> Request:
        """The body as a checked Request (its image stored first); RequestError with the CLI's message."""
        try:
            fields = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RequestError(f"the body is not JSON ({e}); send a JSON object such as "
                               '{"prompt": "a corgi", "seed": 1}') from None
        if not isinstance(fields, dict):
            raise RequestError('the body must be a JSON object such as {"prompt": "a corgi", "seed": 1}')
        image = None
        if fields.get("image") is not None:
            image = fields["image"] = str(self.store.save_image(video_id, fields["image"]))
        request = Request.parse(**fields)
        try:
            self.checker.check(request)
        except RequestError as e:  # the client knows its image as "image", not by this server's path
            raise RequestError(str(e).replace(image, "the uploaded image") if image else str(e)) from None
        return request

    async def _run(self, job: VideoJob) -> None:
        try:
            await self.generator.generate.remote(job)
        except Exception as e:  # the replica died, or the call failed outside the generation
            log.exception("video %s was lost", job.id)
            if not self.store.read(job.id).finished:
                self.store.update(job.id, status="failed", error=f"its replica failed: {type(e).__name__}: {e}")
        finally:
            del self.active[job.id]
        status = self.store.read(job.id)
        if status is not None and status.seconds is not None:
            self.durations.append(status.seconds / (status.batch or 1))

    def _retry_after(self) -> int:
        """Seconds until a place in the queue is likely free: one video's recent time over the replicas."""
        typical = sum(self.durations) / len(self.durations) if self.durations else FIRST_GUESS_S
        return max(1, math.ceil(typical / self.settings.replicas))

    @api.get("/v1/videos/{video_id}")
    async def status(self, video_id: str, http: HTTPRequest) -> VideoStatus:
        self._authorize(http)
        self._sweep()
        return self._find(video_id)

    @api.get("/v1/videos/{video_id}/content")
    async def content(self, video_id: str, http: HTTPRequest) -> FileResponse:
        self._authorize(http)
        status = self._find(video_id)
        if status.status != "completed":
            raise HTTPException(409, f"video {video_id} is {status.status}, not completed"
                                     + (f": {status.error}" if status.error else ""))
        return FileResponse(self.store.video(video_id), media_type="video/mp4", filename=f"{video_id}.mp4")

    @api.get("/healthz")
    async def health(self, http: HTTPRequest) -> dict:
        self._authorize(http)
        return {"status": "ok", "active": len(self.active), "queue": self.settings.queue,
                "replicas": self.settings.replicas}

    def _authorize(self, http: HTTPRequest) -> None:
        """Every route's first check: the bearer token, when the server has one (401 before anything is read)."""
        token, sent = self.settings.token, http.headers.get("authorization")
        if token and not hmac.compare_digest((sent or "").encode(), f"Bearer {token}".encode()):
            problem = "needs a token" if sent is None else "did not accept the token sent"
            raise HTTPException(401, f"this server {problem}: send the header 'Authorization: Bearer TOKEN'",
                                headers={"WWW-Authenticate": "Bearer"})

    def _find(self, video_id: str) -> VideoStatus:
        status = self.store.read(video_id)  # None for a string that is not an id, too
        if status is None:
            raise HTTPException(404, f"no video {video_id!r} (unknown, or expired after "
                                     f"{self.settings.expire_after:g} s)")
        return status

    def _sweep(self) -> None:
        """Remove expired videos, at most every SWEEP_INTERVAL_S."""
        if time.monotonic() - self.swept >= min(SWEEP_INTERVAL_S, self.settings.expire_after):
            self.swept = time.monotonic()
            for video_id in self.store.expired():
                self.store.remove(video_id)


# ------------------------------------------------------------------------------------------------ the app
def application(settings: ServeSettings):
    """The Serve application: the front end bound to `replicas` generator replicas."""
    generator = serve.deployment(VideoGenerator, name="VideoGenerator").options(
        num_replicas=settings.replicas, max_ongoing_requests=settings.batch, max_constructor_retry_count=1,
        ray_actor_options=settings.resources.model_dump())
    front = serve.deployment(VideoAPI, name="VideoAPI").options(
        num_replicas=1, max_ongoing_requests=max(100, 4 * settings.queue), ray_actor_options={"num_cpus": 0})
    return front.bind(generator.bind(settings), settings)


@contextlib.contextmanager
def serving(settings: ServeSettings, host: str, port: int) -> Iterator[str]:
    """Run the application on the connected Ray cluster, listening on host:port, for the block; gives its URL once
    every replica has opened its pipeline, and shuts Serve down after."""
    serve.start(http_options={"host": host, "port": port})
    try:
        try:
            serve.run(application(settings), name=APP, route_prefix="/")
        except RuntimeError as e:  # Serve's "Deploying application ... failed"
            failed = _failed_replicas()
            if not failed:
                raise
            raise ServeError(f"the server did not start: {failed}") from e
        yield f"http://{host}:{port}"
    finally:
        serve.shutdown()


class ServeError(WaltExportError, RuntimeError):
    """The application's replicas could not start; the message is the last line of their error (e.g. the
    ArtifactError of an artifact a node cannot open)."""


def _failed_replicas() -> str | None:
    """'DEPLOYMENT: the last line of its error' for each deployment whose replicas failed to start, or None."""
    application = serve.status().applications.get(APP)
    failed = [f"{name} replicas: {deployment.message.strip().splitlines()[-1]}"
              for name, deployment in (application.deployments.items() if application else ())
              if deployment.status == "DEPLOY_FAILED" and deployment.message.strip()]
    return "; ".join(failed) or None
