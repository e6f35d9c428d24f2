"""`render --ray`: a jobs file rendered by a pool of Ray workers, one `Pipeline` per device (docs/scaleout.md §1).

The driver (the process that runs `python -m runtime render --ray`) checks every job against the artifact's manifest
(`read_jobs` with `Pipeline.for_checks`: it runs no model, so it may be a head node without a GPU), groups them as a
local `--batch` run does (`render.job_batches`), and hands one group at a time to each idle worker. A worker is a Ray
actor holding one Pipeline for the whole run; it renders its group with the local `render` (`runtime.render`), so
every guarantee of a local run holds across the cluster: each job under its lock in the shared `--out-dir`, skipped
when done, written atomically, one `results.jsonl` line per job it finished, skipped or failed.

A worker that dies mid-group (its process killed, its node lost) loses nothing written: the kernel drops its locks,
and the next run of a job removes its partial temporary file. The driver starts a replacement worker and hands the
group to the next idle worker, up to `retries` times per group; after that its jobs are recorded as failed and the
run goes on. A job that fails inside a live worker (a model error) is recorded as failed by the worker, as locally,
and not retried.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from runtime.errors import WaltExportError
from runtime.pipeline import Pipeline, PipelineSettings
from runtime.ray_cluster import ClusterError, WorkerResources, worker_count, worker_settings
from runtime.render import Job, JobResult, append_result, job_batches, render

log = logging.getLogger(__name__)

RETRIES = 2  # times a group whose worker died is handed to another worker before its jobs are recorded as failed
WAITING_WARNING_S = 120  # warn when no worker has started for this long (the cluster has no room for one)


class RenderWorker:
    """One Ray worker of `render --ray`: a Pipeline opened once (on its first call) for the whole run."""

    def __init__(self, settings: PipelineSettings):
        self.settings, self.pipeline = settings, None

    def ready(self) -> str:
        """Open the pipeline; returns where this worker runs, HOST:PID. Raises what `from_artifacts` raises."""
        if self.pipeline is None:
            self.pipeline = self.settings.open()
        return f"{socket.gethostname()}:{os.getpid()}"

    def render(self, jobs: list[tuple[int, Job]], out_dir: str) -> list[JobResult]:
        """Render one group of jobs with the local `render` (one batch: `job_batches` made them compatible)."""
        self.ready()
        return list(render(self.pipeline, jobs, out_dir, batch=len(jobs)))


@dataclass
class _Group:
    jobs: list[tuple[int, Job]]
    deaths: list[str] = field(default_factory=list)  # the workers that died while rendering it


def render_on_ray(ray, settings: PipelineSettings, checker: Pipeline, jobs: Sequence[tuple[int, Job]],
                  out_dir: str | Path, resources: WorkerResources, *, batch: int = 1, workers: int | None = None,
                  retries: int = RETRIES, started: Callable[[str], None] | None = None) -> Iterator[JobResult]:
    """Render checked jobs (`read_jobs`) on the Ray cluster `ray` is connected to (`ray_cluster.connect`); yields
    each job's result as its group finishes, in no fixed order.

    Args:
        settings: how each worker opens its pipeline (a CPU worker's threads follow its CPUs: `worker_settings`).
        checker: a pipeline over the same artifact that groups the jobs (`Pipeline.for_checks`).
        resources: what each worker reserves (`ray_cluster.worker_resources`).
        batch: videos per group (`render --batch`).
        workers: how many; default: as many as the cluster has room for, at most one per group.
        retries: times a group whose worker died is given to another worker; then its jobs fail.
        started: called with HOST:PID as each worker has opened its pipeline.
    Raises ClusterError when a worker cannot open the artifact (e.g. its node lacks the files or engines: the
    message has the node and the worker's error) or the cluster has no room for one worker.
    """
    out_dir = str(Path(out_dir).absolute())
    jobs = [(number, job.model_copy(update={"image": str(Path(job.image).absolute())}) if job.image else job)
            for number, job in jobs]  # the workers' working directory is not this one
    queue = deque(_Group(group) for group in job_batches(checker, jobs, batch))
    actor = ray.remote(RenderWorker).options(num_cpus=resources.num_cpus, num_gpus=resources.num_gpus,
                                             max_restarts=0, max_task_retries=0)
    settings = worker_settings(settings, resources)
    pool = [actor.remote(settings) for _ in range(worker_count(ray, resources, workers, len(queue)))]
    log.info("started %d %s workers (%s each) for %d groups", len(pool), resources.kind,
             resources.model_dump(), len(queue))
    pending = {worker.ready.remote(): (worker, None) for worker in pool}  # ref -> (worker, its group or None)
    idle = []
    since, lost_starting = time.monotonic(), 0
    try:
        while queue or any(group is not None for _, group in pending.values()):
            while queue and idle:
                worker, group = idle.pop(), queue.popleft()
                pending[worker.render.remote(group.jobs, out_dir)] = (worker, group)
            done, _ = ray.wait(list(pending), num_returns=1, timeout=WAITING_WARNING_S)
            if not done:
                if not idle and all(group is None for _, group in pending.values()):
                    log.warning("no Ray worker has started for %.0f s: the cluster may have no room for one (%s)",
                                time.monotonic() - since, resources.model_dump())
                continue
            worker, group = pending.pop(done[0])
            try:
                value = ray.get(done[0])
            except ray.exceptions.RayActorError as e:  # the worker's process or node is gone
                if group is None:
                    lost_starting += 1
                    if lost_starting > (retries + 1) * len(pool):
                        raise ClusterError(f"Ray workers died {lost_starting} times before they had opened the "
                                           f"artifact ({_first_line(e)}); see the Ray logs of the workers") from None
                pool.remove(worker)
                replacement = actor.remote(settings)
                pool.append(replacement)
                pending[replacement.ready.remote()] = (replacement, None)
                if group is not None:
                    yield from _lost(group, e, queue, out_dir, retries)
                continue
            except ray.exceptions.RayTaskError as e:
                if isinstance(e.cause, WaltExportError):  # e.g. a worker that cannot open the artifact
                    doing = "cannot open the artifact" if group is None else "stopped"
                    raise ClusterError(f"the Ray worker on {getattr(e, 'ip', None) or 'a node'} {doing}: "
                                       f"{e.cause}") from None
                raise
            idle.append(worker)
            if group is None:
                log.info("worker %s is ready", value)
                if started:
                    started(value)
            else:
                yield from value
    finally:
        for worker in pool:
            ray.kill(worker)


def _lost(group: _Group, error: Exception, queue: deque, out_dir: str, retries: int) -> Iterator[JobResult]:
    """A group whose worker died: back to the front of the queue, or failed after `retries` deaths."""
    cause = _first_line(error)
    group.deaths.append(cause)
    lines = ", ".join(str(number) for number, _ in group.jobs)
    if len(group.deaths) <= retries:
        log.warning("the worker rendering line(s) %s died (%s); retrying them on another worker (%d of %d)",
                    lines, cause, len(group.deaths), retries)
        queue.appendleft(group)
        return
    log.error("line(s) %s lost %d workers; recorded as failed", lines, len(group.deaths))
    for number, job in group.jobs:
        yield append_result(out_dir, JobResult.of(
            number, job, out_dir, status="failed",
            error=f"WorkerDied: its Ray worker died {len(group.deaths)} times ({cause})"))


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
