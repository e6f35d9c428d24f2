#!/usr/bin/env python3
"""A bounded load test of `python -m runtime serve`: N requests from C client threads over loopback, every video
fetched and checked; requests per minute and latency percentiles.

    python -m benchmarks.serve_load --artifacts artifacts/micro --out serve_load.json [--requests 20] [--clients 4]
                                    [--replicas 2] [--batch 2] [--queue 4] [--seeds 5] [--time-limit 300]

It starts the server (`serve --ray` on a local Ray cluster, a token set, on a free port of 127.0.0.1), waits for
/healthz, and runs the load: each client posts its share of the requests (seed = request number mod `--seeds`, so
every seed is asked for several times), honours 429's Retry-After (at most RETRY_CAP_S at a time), polls the status
until completed or failed, then downloads the mp4 and decodes it. Nothing may be lost (every request completed
within the time limit) or corrupt (every mp4 decodes to the artifact's frame count, and the videos of one seed agree
within `--tolerance` levels: a video delivered to the wrong request, or a partial one, would not).

Latency: from a request's first POST to its mp4 downloaded (429 waits included). Requests per minute: completed
requests over the wall time of the load. Prints a table and writes JSON (`--out`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from pydantic import BaseModel

from runtime.cli import run_command
from runtime.files import atomic_output, check_output
from runtime.request import Count, parse_as

RETRY_CAP_S = 5.0  # the longest one Retry-After wait of a client
POLL_S = 0.2
TOKEN = "load-test-token"


class Reply(BaseModel):
    """One HTTP exchange: status code, JSON body (or None), headers that matter."""

    code: int
    body: dict | None = None
    retry_after: float | None = None


class Outcome(BaseModel):
    """What happened to one request of the load."""

    number: int
    seed: int
    id: str | None = None
    status: str  # completed, failed, lost (no answer within the time limit), refused (4xx other than 429)
    refusals: int = 0  # 429s before it was accepted
    latency_s: float | None = None
    frames: int | None = None
    batch: int | None = None  # videos its replica generated together with it
    error: str | None = None


class LoadReport(BaseModel):
    requests: int
    clients: int
    seconds: float
    completed: int
    lost: int
    failed: int
    corrupt: list[str]  # what was wrong with each corrupt video
    refusals: int  # 429s in all
    requests_per_minute: float
    latency_p50_s: float | None
    latency_p90_s: float | None
    outcomes: list[Outcome]


def call(url: str, token: str | None, body: dict | None = None, raw: bool = False, timeout: float = 60):
    """One request (POST with a JSON body, else GET): a Reply, or the raw bytes of a 200 when `raw`."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            content = response.read()
            return content if raw else Reply(code=response.status, body=json.loads(content))
    except urllib.error.HTTPError as e:
        content = e.read()
        try:
            parsed = json.loads(content)
        except ValueError:
            parsed = None
        retry = e.headers.get("Retry-After")
        return Reply(code=e.code, body=parsed, retry_after=float(retry) if retry else None)


def one_request(url: str, token: str | None, number: int, body: dict, deadline: float,
                frames_dir: Path) -> Outcome:
    """Post, wait, fetch and decode one video before `deadline` (time.monotonic)."""
    from runtime.video import read_video

    start, refusals = time.monotonic(), 0
    while True:
        reply = call(f"{url}/v1/videos", token, body)
        if reply.code != 429:
            break
        refusals += 1
        wait = min(reply.retry_after or 1.0, RETRY_CAP_S)
        if time.monotonic() + wait > deadline:
            return Outcome(number=number, seed=body["seed"], status="lost", refusals=refusals,
                           error="still refused (429) at the time limit")
        time.sleep(wait)
    if reply.code != 200:
        return Outcome(number=number, seed=body["seed"], status="refused", refusals=refusals,
                       error=f"{reply.code}: {reply.body}")
    video_id = reply.body["id"]
    while True:
        status = call(f"{url}/v1/videos/{video_id}", token).body
        if status["status"] in ("completed", "failed") or time.monotonic() > deadline:
            break
        time.sleep(POLL_S)
    if status["status"] != "completed":
        state = "failed" if status["status"] == "failed" else "lost"
        return Outcome(number=number, seed=body["seed"], id=video_id, status=state, refusals=refusals,
                       error=status.get("error") or f"still {status['status']} at the time limit")
    mp4 = frames_dir / f"{number}.mp4"
    mp4.write_bytes(call(f"{url}/v1/videos/{video_id}/content", token, raw=True))
    latency = time.monotonic() - start
    frames, _, _ = read_video(mp4)
    np.save(frames_dir / f"{number}.npy", frames)
    return Outcome(number=number, seed=body["seed"], id=video_id, status="completed", refusals=refusals,
                   latency_s=round(latency, 3), frames=len(frames), batch=status["batch"])


def load(url: str, token: str | None, requests: int, clients: int, seeds: int, time_limit: float,
         expected_frames: int, tolerance: int = 2, steps: int | None = None) -> LoadReport:
    """Run the load against a running server and check every video (module docstring)."""
    deadline = time.monotonic() + time_limit
    bodies = [{"prompt": f"load test {n % seeds}", "seed": n % seeds} | ({"steps": steps} if steps else {})
              for n in range(requests)]
    with tempfile.TemporaryDirectory() as scratch, ThreadPoolExecutor(clients) as pool:
        start = time.monotonic()
        shares = [list(range(c, requests, clients)) for c in range(clients)]

        def client(numbers: list[int]) -> list[Outcome]:
            return [one_request(url, token, n, bodies[n], deadline, Path(scratch)) for n in numbers]

        outcomes = sorted((o for share in pool.map(client, shares) for o in share), key=lambda o: o.number)
        seconds = time.monotonic() - start
        corrupt = _corrupt(outcomes, Path(scratch), expected_frames, tolerance)
    latencies = [o.latency_s for o in outcomes if o.latency_s is not None]
    deciles = statistics.quantiles(latencies, n=10) if len(latencies) >= 2 else None
    completed = sum(o.status == "completed" for o in outcomes)
    return LoadReport(requests=requests, clients=clients, seconds=round(seconds, 2), completed=completed,
                      lost=sum(o.status in ("lost", "refused") for o in outcomes),
                      failed=sum(o.status == "failed" for o in outcomes), corrupt=corrupt,
                      refusals=sum(o.refusals for o in outcomes),
                      requests_per_minute=round(60 * completed / seconds, 1),
                      latency_p50_s=round(statistics.median(latencies), 3) if latencies else None,
                      latency_p90_s=round(deciles[8], 3) if deciles else None, outcomes=outcomes)


def _corrupt(outcomes: list[Outcome], scratch: Path, frames: int, tolerance: int) -> list[str]:
    """What is wrong with each delivered video: a frame count other than `frames`, or frames that differ from the
    first video of the same seed by more than `tolerance` levels."""
    problems, first = [], {}
    for o in outcomes:
        if o.status != "completed":
            continue
        if o.frames != frames:
            problems.append(f"request {o.number} ({o.id}): {o.frames} frames, expected {frames}")
            continue
        video = np.load(scratch / f"{o.number}.npy").astype(np.int16)
        if o.seed not in first:
            first[o.seed] = (o.number, video)
            continue
        number, reference = first[o.seed]
        worst = np.abs(video - reference)
        if worst.max() > tolerance:
            where = np.unravel_index(worst.argmax(), worst.shape)
            problems.append(f"request {o.number} ({o.id}) differs from request {number} of the same seed {o.seed} "
                            f"by {worst.max()} levels at (frame, y, x, channel) {tuple(map(int, where))}")
    return problems


# ------------------------------------------------------------------------------------------------ the server
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def server(artifacts: str | Path, results_dir: str | Path, *options: str, token: str | None = TOKEN,
           startup_s: float = 180) -> Iterator[str]:
    """`python -m runtime serve` on a free loopback port for the block, stopped after with SIGTERM (which `serve`
    handles as Ctrl-C, and which a background job, unlike SIGINT, never has ignored); gives its URL once /healthz
    answers. Raises RuntimeError with the server's output when it does not start."""
    port = free_port()
    env = dict(os.environ) | ({"WALT_API_TOKEN": token} if token else {})
    env.pop("RAY_ADDRESS", None)
    log = tempfile.TemporaryFile()
    process = subprocess.Popen([sys.executable, "-m", "runtime", "serve", "--artifacts", str(artifacts), "--port",
                                str(port), "--results-dir", str(results_dir), *options], stdout=log,
                               stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_s
        while True:
            try:
                if call(f"{url}/healthz", token, timeout=5).code == 200:
                    break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                raise RuntimeError(f"the server did not start:\n{log.read().decode(errors='replace')[-4000:]}")
            time.sleep(0.5)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


def _table(report: LoadReport, setting: str) -> str:
    return "\n".join([
        f"serve load test ({setting})",
        "| requests | clients | completed | lost | failed | corrupt | 429s | wall s | requests/min | p50 s | p90 s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {report.requests} | {report.clients} | {report.completed} | {report.lost} | {report.failed} | "
        f"{len(report.corrupt)} | {report.refusals} | {report.seconds} | {report.requests_per_minute} | "
        f"{report.latency_p50_s} | {report.latency_p90_s} |"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serve_load", description=__doc__.split("\n")[0])
    parser.add_argument("--artifacts", required=True)
    parser.add_argument("--out", required=True, help="the JSON report")
    parser.add_argument("--requests", type=parse_as(Count), default=20)
    parser.add_argument("--clients", type=parse_as(Count), default=4)
    parser.add_argument("--seeds", type=parse_as(Count), default=5)
    parser.add_argument("--replicas", type=parse_as(Count), default=2)
    parser.add_argument("--batch", type=parse_as(Count), default=2)
    parser.add_argument("--queue", type=parse_as(Count), default=4)
    parser.add_argument("--steps", type=parse_as(Count), help="DDIM steps per denoiser (default: the artifact's)")
    parser.add_argument("--time-limit", type=float, default=300.0)
    args = parser.parse_args(argv)

    def run() -> int:
        from runtime.pipeline import Pipeline

        check_output(args.out, "--out", "file", suffix=".json")
        frames = Pipeline.for_checks(args.artifacts).manifest.frames
        setting = (f"{Path(args.artifacts).name}, {args.replicas} replicas, batch {args.batch}, queue {args.queue}, "
                   f"steps {args.steps or 'default'}")
        with tempfile.TemporaryDirectory() as results, \
                server(args.artifacts, results, "--replicas", str(args.replicas), "--batch", str(args.batch),
                       "--queue", str(args.queue)) as url:
            report = load(url, TOKEN, args.requests, args.clients, args.seeds, args.time_limit, frames,
                          steps=args.steps)
        print(_table(report, setting))
        with atomic_output(args.out) as tmp:
            tmp.write_text(json.dumps({"setting": setting, "machine": os.uname().nodename, "cpus": os.cpu_count(),
                                       **report.model_dump()}, indent=2))
        return 0 if report.completed == report.requests and not report.corrupt else 1

    return run_command("python -m benchmarks.serve_load", False, run)


if __name__ == "__main__":
    raise SystemExit(main())
