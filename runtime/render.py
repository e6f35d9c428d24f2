"""Batch rendering: a JSONL file of jobs -> one mp4 per job, resumable, with a results JSONL.

Every line is validated before anything runs (a bad line is reported with its number and reason). Finished outputs
are skipped, so a killed run resumes where it stopped; outputs are written atomically, so no partial mp4 is ever
left under its final name (stale temporary files of a killed run are removed on start).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from runtime.errors import RequestError, WaltExportError
from runtime.pipeline import Pipeline, Progress
from runtime.video import read_image

log = logging.getLogger(__name__)

RESULTS = "results.jsonl"


class Job(BaseModel):
    """One line of a jobs file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    output: str  # file name (or relative path) of the mp4 inside the output directory
    prompt: str | None = None
    class_id: int | None = None
    seed: int = 0
    frames: int | None = None
    steps: int | dict[str, int] | None = None
    guidance: float | dict[str, float] | None = None
    image: str | None = None  # path of the first frame (image-to-video)

    @field_validator("output")
    @classmethod
    def _relative_mp4(cls, value: str) -> str:
        path = PurePosixPath(value)
        if path.suffix.lower() != ".mp4" or path.is_absolute() or ".." in path.parts:
            raise ValueError("must be a relative path ending in .mp4 inside the output directory")
        return value


class JobsError(WaltExportError, ValueError):
    """A jobs file with bad lines; the message lists each with its line number."""


def read_jobs(path: str | Path, pipeline: Pipeline) -> list[tuple[int, Job]]:
    """(line number, job) for every non-empty line, all validated (also against the artifact) before returning."""
    problems, jobs, outputs = [], [], {}
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise JobsError(f"cannot read the jobs file {path}: {e.strerror}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            job = Job.model_validate_json(line)
            _check_job(job, pipeline)
        except ValidationError as e:
            problems.append(f"line {number}: " + "; ".join(
                f"{'.'.join(map(str, err['loc']))}: {err['msg']}" if err["loc"] else err["msg"] for err in e.errors()))
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


def _check_job(job: Job, pipeline: Pipeline) -> None:
    pipeline.check_conditioning(job.prompt, job.class_id)
    if job.frames is not None:
        pipeline.check_frames(job.frames)
    if job.image is not None and not Path(job.image).is_file():
        raise RequestError(f"image {job.image} does not exist")


def render(pipeline: Pipeline, jobs: list[tuple[int, Job]], out_dir: str | Path,
           progress: Callable[[int, Job], Progress | None] | None = None) -> list[dict]:
    """Run the jobs whose output does not exist yet; appends one result per job to `out_dir/results.jsonl`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.rglob(".*.tmp.mp4"):  # left by a killed run
        log.info("removing the partial output %s of an interrupted run", stale)
        stale.unlink()
    results = []
    for number, job in jobs:
        target = out_dir / job.output
        result = {"line": number, "output": str(target), "prompt": job.prompt, "class_id": job.class_id,
                  "seed": job.seed}
        if target.exists():
            result |= {"status": "skipped", "reason": "already rendered"}
        else:
            start = time.perf_counter()
            try:
                image = None if job.image is None else read_image(job.image, (pipeline.manifest.height,
                                                                             pipeline.manifest.width))
                video = pipeline.generate(job.prompt, class_id=job.class_id, seed=job.seed, steps=job.steps,
                                          guidance=job.guidance, frames=job.frames, image=image,
                                          progress=progress(number, job) if progress else None)
                video.save(target)
                result |= {"status": "done", "seconds": round(time.perf_counter() - start, 3),
                           "frames": int(video.frames.shape[0])}
            except Exception as e:  # one bad job must not stop the batch
                log.exception("job on line %d failed", number)
                result |= {"status": "failed", "error": f"{type(e).__name__}: {e}"}
        with open(out_dir / RESULTS, "a") as f:
            f.write(json.dumps(result | {"time": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")
        results.append(result)
    return results
