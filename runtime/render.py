"""Batch rendering: a JSONL file of jobs -> one mp4 per job, resumable, with a results JSONL.

Every value of every line is validated against the artifact before anything runs (`Job` is a `Request` plus its
output; `Pipeline.check` as for `generate`; a bad line is reported with its number and reason). Finished outputs are
skipped, so a killed run resumes where it stopped; outputs are written atomically, so no partial mp4 is ever left
under its final name. With `--batch N`, compatible jobs are generated N at a time (`render`), each still locked,
skipped and written on its own.

Several `render` runs may share one output directory, on one machine or on several sharing a filesystem
(docs/architecture.md §10): a run renders a job only while it holds the job's lock (`OUT/.locks/OUTPUT.lock`,
`runtime.files.try_lock`); a job another run holds is left to that run, and a finished one is skipped, so each job is
rendered once in all. A killed run's lock is free again at once, and its partial temporary file is removed by the
next run that takes the job (a live one never is). `results.jsonl` gets one line per job a run finished, skipped or
failed, appended under its own lock.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from runtime.errors import RequestError, WaltExportError, describe_validation
from runtime.files import exclusive, remove_stale, try_lock
from runtime.pipeline import Pipeline, Progress
from runtime.request import Request
from runtime.video import mp4_writer

log = logging.getLogger(__name__)

Key = TypeVar("Key")

RESULTS = "results.jsonl"
LOCKS = ".locks"  # the output directory's lock files: one per job, and one for appending to results.jsonl


class Job(Request):
    """One line of a jobs file: a generation request and the mp4 it writes."""

    output: str  # file name (or relative path) of the mp4 inside the output directory

    @field_validator("output")
    @classmethod
    def _relative_mp4(cls, value: str) -> str:
        path = PurePosixPath(value)
        if path.suffix.lower() != ".mp4" or path.is_absolute() or ".." in path.parts or "\\" in value:
            raise ValueError("must be a relative path ending in .mp4 inside the output directory")
        if any(part.startswith(".") for part in path.parts):
            raise ValueError("no part of it may start with '.' (hidden names are the temporary files and locks of "
                             "runs in progress)")
        return value


class JobResult(BaseModel):
    """What one run did with one job: a line of `results.jsonl`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    line: int  # of the jobs file
    output: str  # the mp4's path
    status: Literal["done", "skipped", "failed", "busy"]  # busy: another run holds the job (not written to results)
    prompt: str | None = None
    class_id: int | None = None
    seed: int
    seconds: float | None = None  # done: wall time of the generation and encoding (of its whole batch)
    frames: int | None = None  # done: frames written
    batch: int | None = None  # done: videos generated together with it, itself included (`render --batch`)
    reason: str | None = None  # skipped, busy: why
    error: str | None = None  # failed: the exception
    time: str = ""  # when the line was written, ISO 8601 local time
    worker: str = ""  # the process that wrote it, HOST:PID (with `render --ray`, the Ray worker)

    @classmethod
    def of(cls, number: int, job: Job, out_dir: str | Path, **outcome: object) -> JobResult:
        """The result of the job on line `number`, whose mp4 goes into `out_dir`: `outcome` gives status etc."""
        return cls(line=number, output=str(Path(out_dir) / job.output), prompt=job.prompt, class_id=job.class_id,
                   seed=job.seed, **outcome)


class JobsError(WaltExportError, ValueError):
    """A jobs file with bad lines; the message lists each with its line number."""


def read_jobs(path: str | Path, pipeline: Pipeline) -> list[tuple[int, Job]]:
    """(line number, job) for every non-empty line, all validated (also against the artifact) before returning.

    Raises JobsError listing every bad line (its number and what is wrong), or when the file is unreadable, is not
    UTF-8, or holds no jobs.
    """
    problems, jobs, outputs = [], [], {}
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise JobsError(f"cannot read the jobs file {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise JobsError(f"the jobs file {path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                        f"{e.start}); save it as UTF-8") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            job = Job.model_validate_json(line)
            pipeline.check(job)
        except ValidationError as e:
            problems.append(f"line {number}: {describe_validation(e)}")
            continue
        except RequestError as e:
            problems.append(f"line {number}: {e}")
            continue
        if job.output in outputs:
            problems.append(f"line {number}: output {job.output!r} is also written by line {outputs[job.output]}")
        outputs[job.output] = number
        jobs.append((number, job))
    if problems:
        raise JobsError(f"{path}: {len(problems)} bad line(s), nothing was rendered:\n  " + "\n  ".join(problems))
    if not jobs:
        raise JobsError(f"{path} holds no jobs (one JSON object per line, e.g. "
                        '{"prompt": "a corgi", "seed": 1, "output": "corgi.mp4"})')
    return jobs


def job_batches(pipeline: Pipeline, jobs: Sequence[tuple[Key, Request]],
                size: int) -> list[list[tuple[Key, Request]]]:
    """The jobs ((line number or id, request) pairs) in batches of up to `size` that can be generated together
    (`GenerationPlan.batch_key`: same length, steps, guidance, image or not), in order: a batch as soon as `size`
    jobs of its kind came, then what is left of each kind, in the order of its first job. `render`, `render --ray`
    (`runtime.ray_render`) and `serve`'s replicas batch by this. Raises RequestError for a job that does not fit
    the artifact (`read_jobs` has checked them all)."""
    batches, waiting = [], {}
    for number, job in jobs:
        key = pipeline.check(job).batch_key
        waiting.setdefault(key, []).append((number, job))
        if len(waiting[key]) == size:
            batches.append(waiting.pop(key))
    return batches + list(waiting.values())


def render(pipeline: Pipeline, jobs: Sequence[tuple[int, Job]], out_dir: str | Path,
           progress: Callable[[Sequence[int]], Progress | None] | None = None, batch: int = 1) -> Iterator[JobResult]:
    """Run the jobs whose output does not exist yet and that no other run holds, as the iterator is consumed;
    appends the result of each job it finished, skipped or failed to `out_dir/results.jsonl` and yields one result
    per job (busy ones included).

    With `batch` > 1, jobs that can share a batch (`job_batches`) are generated `batch` at a time, each video
    streamed into its own mp4 as it is decoded; the jobs of a batch that are done or held by another run are left
    out of it. Each job is still locked, skipped when done, and written atomically on its own: a killed batch leaves
    none of its videos, and the next run redoes only those.

    Args:
        progress: called with the line numbers of each batch, returns its Progress callback (or None).
    A batch that raises is recorded as failed for each of its jobs (with the traceback in the log) and the run
    goes on.
    """
    out_dir = Path(out_dir)
    for group in job_batches(pipeline, jobs, batch):
        held: list[_Held] = []
        try:
            for number, job in group:
                target = out_dir / job.output
                lock = try_lock(out_dir / LOCKS / f"{job.output}.lock")
                if lock is None:
                    yield JobResult.of(number, job, out_dir, status="busy", reason="another run holds it")
                    continue
                held.append(_Held(number, job, target, lock))
                remove_stale(target)  # a killed run's partial file: nobody else holds this job
                if target.exists():
                    held.pop()
                    try:
                        yield append_result(out_dir, JobResult.of(number, job, out_dir, status="skipped",
                                                                  reason="already rendered"))
                    finally:
                        lock.release()
        except BaseException:  # the iterator was closed early: free the jobs it held
            for taken in held:
                taken.lock.release()
            raise
        if held:
            yield from _render_batch(pipeline, held, out_dir, progress)


@dataclass(frozen=True)
class _Held:
    """A job this run holds the lock of, waiting for its batch."""

    number: int
    job: Job
    target: Path
    lock: object  # filelock.FileLock


def _render_batch(pipeline: Pipeline, group: list[_Held], out_dir: Path,
                  progress: Callable[[Sequence[int]], Progress | None] | None) -> Iterator[JobResult]:
    """Generate a group of jobs as one batch, each streamed into its mp4; one result per job, then its lock is
    released."""
    start = time.perf_counter()
    try:
        try:
            frames = [0] * len(group)
            with contextlib.ExitStack() as stack:
                writers = [stack.enter_context(mp4_writer(held.target, pipeline.fps)) for held in group]
                callback = progress([held.number for held in group]) if progress else None
                for index, chunk in pipeline.stream_batch([held.job for held in group], callback):
                    writers[index](chunk)
                    frames[index] += len(chunk)
            seconds = round(time.perf_counter() - start, 3)
            outcome = [{"status": "done", "seconds": seconds, "frames": n, "batch": len(group)} for n in frames]
        except Exception as e:  # one bad batch must not stop the run
            log.exception("jobs %s failed", ", ".join(held.job.output for held in group))
            outcome = [{"status": "failed", "error": f"{type(e).__name__}: {e}"}] * len(group)
        for held, result in zip(group, outcome, strict=True):
            yield append_result(out_dir, JobResult.of(held.number, held.job, out_dir, **result))
    finally:
        for held in group:
            held.lock.release()


def append_result(out_dir: str | Path, result: JobResult) -> JobResult:
    """Append one line to `out_dir/results.jsonl`, whole: one write under the results lock (runs on other machines
    append to the same file). The line gets the time and this process (`worker`); returns the result as written."""
    out_dir = Path(out_dir)
    result = result.model_copy(update={"time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                       "worker": f"{socket.gethostname()}:{os.getpid()}"})
    line = (result.model_dump_json(exclude_none=True) + "\n").encode()
    with exclusive(out_dir / LOCKS / f"{RESULTS}.lock", f"cannot append to {out_dir / RESULTS}: another run has "
                   "held its lock for a minute", timeout=60):
        fd = os.open(out_dir / RESULTS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
    return result
