"""`render --ray` on a local Ray cluster (this machine's 2 CPUs): jobs over two workers, a worker killed mid-job, the
retry bound, and the commands without Ray installed."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

from runtime.render import Job
from tests import kill_trials
from tests.runtime.test_render import JOBS, _check_every_job_done_once, _jobs

ROOT = Path(__file__).resolve().parents[2]
BLOCK_RAY = "import sys\nsys.modules['ray'] = None  # `import ray` raises ImportError, as without the extra\n"


def _render_on_ray(directory, jobs, out, *ray):
    """`render --ray *ray` (an address, then options; none: a Ray instance of its own)."""
    return subprocess.Popen(kill_trials._command("render", "--artifacts", str(directory), "--jobs", str(jobs),
                                                 "--out-dir", str(out), "--progress", "off", "--ray", *ray),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, start_new_session=True)


def _holder(path_glob: str, root: Path, timeout: float) -> tuple[int, Path]:
    """(pid, file) of the first process found holding a file of `root` matching `path_glob` open."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in root.glob(path_glob):
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    if any(os.readlink(f"/proc/{pid}/fd/{fd}") == str(path) for fd in os.listdir(f"/proc/{pid}/fd")):
                        return int(pid), path
                except OSError:  # gone, or not ours to read
                    continue
        time.sleep(0.05)
    raise AssertionError(f"no process wrote {path_glob} in {root} within {timeout} s")


def _results(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_six_jobs_over_two_workers_in_batches_each_done_once(micro_artifacts, ray_address, tmp_path):
    directory, _ = micro_artifacts
    out = tmp_path / "out"
    run = _render_on_ray(directory, _jobs(tmp_path), out, ray_address, "--workers", "2", "--batch", "2")
    stdout, stderr = run.communicate(timeout=300)
    assert run.returncode == 0, stderr
    assert stdout.splitlines()[-1].startswith(f"{JOBS} rendered, 0 already done"), stdout
    _check_every_job_done_once(out)  # every mp4 decodes to 9 frames; 6 done lines, one per job
    assert len({r["worker"] for r in _results(out)}) == 2  # both workers rendered
    assert [r["batch"] for r in _results(out)] == [2] * JOBS  # three batches of two
    rerun = _render_on_ray(directory, _jobs(tmp_path), out)  # `--ray` alone: on a Ray instance of its own
    stdout, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0 and stdout.splitlines()[-1].startswith(f"0 rendered, {JOBS} already done"), stderr


def test_a_worker_killed_mid_job_has_its_job_retried_on_another(micro_artifacts, ray_address, tmp_path):
    """SIGKILL to the worker process writing the first video: its job goes to another worker, every job is done
    exactly once, and nothing partial is left."""
    directory, _ = micro_artifacts
    out = tmp_path / "out"
    run = _render_on_ray(directory, _jobs(tmp_path, steps=300), out, ray_address, "--workers", "2")
    pid, partial = _holder(".c*.tmp.mp4", out, timeout=120)  # a worker streaming into a job's temporary mp4
    os.kill(pid, signal.SIGKILL)
    stdout, stderr = run.communicate(timeout=300)
    assert run.returncode == 0, stderr
    assert "died" in stderr and "retrying them on another worker (1 of 2)" in stderr, stderr
    _check_every_job_done_once(out)
    lines = _results(out)
    assert all(not r["worker"].endswith(f":{pid}") for r in lines)  # the killed worker finished nothing
    assert len(lines) == JOBS and not partial.exists()
    assert kill_trials._hidden(out, allowed=(".locks",)) == []


def test_an_artifact_the_workers_cannot_open_stops_the_run_in_one_line(micro_artifacts, ray_address, tmp_path):
    """A missing file is found by the driver before Ray starts; a modified one (its sha256) by the workers, whose
    error names the node."""
    directory, _ = micro_artifacts
    broken = tmp_path / "micro"
    shutil.copytree(directory, broken)
    model = broken / "tokenizer_decoder.onnx"
    model.rename(tmp_path / "kept.onnx")
    run = _render_on_ray(broken, _jobs(tmp_path), tmp_path / "out", ray_address)
    _, stderr = run.communicate(timeout=300)
    assert run.returncode == 1 and stderr.strip().splitlines() == [
        f"python -m runtime: error: {model} is missing; re-export the artifact (`walt-export onnx ...`)"], stderr
    (tmp_path / "kept.onnx").rename(model)
    with model.open("ab") as f:
        f.write(b"\0")
    run = _render_on_ray(broken, _jobs(tmp_path), tmp_path / "out", ray_address)
    _, stderr = run.communicate(timeout=300)
    last = stderr.strip().splitlines()[-1]
    assert run.returncode == 1 and last.startswith("python -m runtime: error: the Ray worker on ") and (
        f"cannot open the artifact: {model} does not match the manifest" in last), stderr
    assert not list((tmp_path / "out").glob("*.mp4"))


def test_an_address_where_no_cluster_listens_is_refused_at_once(micro_artifacts, tmp_path):
    directory, _ = micro_artifacts
    start = time.monotonic()
    run = _render_on_ray(directory, _jobs(tmp_path), tmp_path / "out", "127.0.0.1:9")
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 1 and stderr.strip().splitlines()[-1] == (
        "python -m runtime: error: no Ray cluster answers at --ray 127.0.0.1:9 (Connection refused); start one with "
        "`ray start --head` there, or give --ray without an address for a local one"), stderr
    assert time.monotonic() - start < 60


def test_a_group_whose_workers_keep_dying_is_recorded_failed_after_its_retries(tmp_path):
    """The retry bound, on the driver's bookkeeping (`_lost`): back in the queue `retries` times, then one failed
    line per job."""
    from runtime.ray_render import _Group, _lost

    group, queue = _Group([(1, Job(prompt="a", seed=1, output="a.mp4")), (2, Job(prompt="b", output="b.mp4"))]), deque()
    for attempt in range(2):
        assert list(_lost(group, RuntimeError("The actor died unexpectedly."), queue, str(tmp_path), 2)) == []
        assert queue.popleft() is group and not (tmp_path / "results.jsonl").exists()
    failed = list(_lost(group, RuntimeError("The actor died unexpectedly."), queue, str(tmp_path), 2))
    assert not queue and [r.status for r in failed] == ["failed", "failed"]
    assert failed[0].error == "WorkerDied: its Ray worker died 3 times (The actor died unexpectedly.)"
    assert [r["line"] for r in _results(tmp_path)] == [1, 2]


def test_without_ray_the_runtime_imports_and_generates_and_ray_flags_name_the_extra(micro_artifacts, tmp_path):
    """A Python where `import ray` fails, as without the extra."""
    directory, _ = micro_artifacts
    cli = BLOCK_RAY + "from runtime.cli import main\nraise SystemExit(main(sys.argv[1:]))\n"

    def python(code: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True)

    imported = python(BLOCK_RAY + "import runtime, runtime.cli, runtime.render\nprint(runtime.Pipeline.__name__)")
    assert imported.returncode == 0 and imported.stdout.strip() == "Pipeline", imported.stderr
    generated = python(cli, "generate", "--artifacts", str(directory), "--prompt", "a", "--out",
                       str(tmp_path / "a.mp4"), "--progress", "off")
    assert generated.returncode == 0 and (tmp_path / "a.mp4").exists(), generated.stderr
    jobs = _jobs(tmp_path)
    for args in (["render", "--jobs", str(jobs), "--out-dir", str(tmp_path / "out"), "--ray"], ["serve"]):
        result = python(cli, *args, "--artifacts", str(directory))
        assert result.returncode == 1 and result.stderr.strip().splitlines() == [
            "python -m runtime: error: ray is not installed: pip install 'walt-export[ray]'"], result.stderr
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.mp4"))
