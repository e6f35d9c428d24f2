"""`render` runs sharing one output directory, killed runs, and jobs refused before anything renders."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runtime.video import read_video
from tests import kill_trials

ROOT = Path(__file__).resolve().parents[2]
JOBS = 6


def _render(directory, jobs, out):
    return subprocess.Popen(kill_trials._command("render", "--artifacts", str(directory), "--jobs", str(jobs),
                                                 "--out-dir", str(out), "--progress", "off"),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _jobs(tmp_path, steps=12):
    path = tmp_path / "jobs.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"clip {i}", "seed": i, "steps": steps, "output": f"c{i}.mp4"})
                            + "\n" for i in range(JOBS)))
    return path


def _check_every_job_done_once(out):
    for i in range(JOBS):
        frames, _, _ = read_video(out / f"c{i}.mp4")
        assert frames.shape[0] == 9, f"c{i}.mp4"
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]  # each a valid line
    done = sorted(Path(r["output"]).name for r in lines if r["status"] == "done")
    assert done == [f"c{i}.mp4" for i in range(JOBS)], done  # exactly once each, in all
    assert kill_trials._hidden(out, allowed=(".locks",)) == []


def test_two_runs_on_one_out_dir_render_each_job_once(micro_artifacts, tmp_path):
    directory, _ = micro_artifacts
    jobs, out = _jobs(tmp_path), tmp_path / "out"
    first = _render(directory, jobs, out)
    time.sleep(1.0)  # the second starts while the first renders (and may be encoding)
    second = _render(directory, jobs, out)
    outputs = [p.communicate(timeout=600) for p in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, outputs
    _check_every_job_done_once(out)
    summaries = [stdout.splitlines()[-1] for stdout, _ in outputs]
    assert sum(int(s.split()[0]) for s in summaries) == JOBS, summaries  # "N rendered, ..." adds up


def test_a_run_killed_while_another_renders_is_taken_over(micro_artifacts, tmp_path):
    directory, _ = micro_artifacts
    jobs, out = _jobs(tmp_path), tmp_path / "out"
    victim = _render(directory, jobs, out)
    survivor = _render(directory, jobs, out)
    deadline = time.monotonic() + 300
    while not list(out.glob("c*.mp4")) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(random.Random(0).uniform(0.1, 1.0))  # mid-job
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    survivor.communicate(timeout=600)
    assert survivor.returncode == 0
    rerun = _render(directory, jobs, out)  # takes what the victim held; its partial file is removed
    _, stderr = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, stderr
    _check_every_job_done_once(out)


def test_batches_of_compatible_jobs_render_each_job_once_and_resume_after_kill_9(micro_artifacts, tmp_path):
    """`render --batch 3` over 7 jobs, one of another length: lines 1, 2, 4 and 5, 6, 7 run as batches of 3, line 3
    alone. Killed during the second batch, the rerun redoes only its jobs, and every job is done once in all."""
    directory, _ = micro_artifacts
    jobs, out = tmp_path / "jobs.jsonl", tmp_path / "out"
    jobs.write_text("".join(json.dumps({"prompt": f"clip {i}", "seed": i, "steps": 150, "output": f"c{i}.mp4"}
                                       | ({"frames": 13} if i == 3 else {})) + "\n" for i in range(1, 8)))
    args = ["render", "--artifacts", str(directory), "--jobs", str(jobs), "--out-dir", str(out), "--progress", "off",
            "--batch", "3"]
    victim = subprocess.Popen(kill_trials._command(*args), cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, start_new_session=True)
    kill_trials.kill_once_written(victim, out / "c4.mp4", after=0.5, timeout=300)  # into the second batch
    first = sorted(p.name for p in out.glob("c*.mp4"))
    assert first == ["c1.mp4", "c2.mp4", "c4.mp4"], (first, victim.stderr.read())  # a batch is written whole
    mtimes = {name: (out / name).stat().st_mtime_ns for name in first}
    rerun = subprocess.run(kill_trials._command(*args), cwd=ROOT, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert {name: (out / name).stat().st_mtime_ns for name in first} == mtimes  # not redone
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    done = {Path(r["output"]).name: r for r in lines if r["status"] == "done"}
    assert sorted(done) == [f"c{i}.mp4" for i in range(1, 8)] and len(done) == 7 == len(
        [r for r in lines if r["status"] == "done"])  # each once, in all
    assert [done[f"c{i}.mp4"]["batch"] for i in range(1, 8)] == [3, 3, 1, 3, 3, 3, 3]
    for i in range(1, 8):
        assert read_video(out / f"c{i}.mp4")[0].shape[0] == (13 if i == 3 else 9), f"c{i}.mp4"
    assert kill_trials._hidden(out, allowed=(".locks",)) == []


def test_kill_trials_of_render_and_generate(micro_artifacts, tmp_path):
    directory, _ = micro_artifacts
    rng = random.Random(1)
    for trial in (kill_trials.render_trial, kill_trials.generate_trial):
        tally = kill_trials.Tally()
        trial(directory, tmp_path, rng, tally)
        assert (tally.corrupt, tally.leftovers, tally.redone, tally.failed_reruns, tally.notes) == (0, 0, 0, 0, []), \
            (trial.__name__, tally)


@pytest.mark.parametrize("line, says", [
    ({"seed": -1}, "seed: Input should be greater than or equal to 0 (got -1)"),
    ({"steps": 0}, "steps: Input should be greater than or equal to 1 (got 0)"),
    ({"guidance": "NaN"}, "guidance: Input should be a finite number"),
    ({"steps": {"bsae": 3}}, "steps: no denoiser 'bsae' in this artifact"),
    ({"image": "broken.png"}, "cannot read an image from"),
    ({"output": ".c9.abcd.tmp.mp4"}, "output: no part of it may start with '.'"),
    ({"frames": 0}, "frames: Input should be greater than or equal to 1"),
])
def test_every_value_of_every_line_is_checked_before_anything_renders(micro_artifacts, tmp_path, line, says):
    directory, _ = micro_artifacts
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    job = {"prompt": "x", "output": "c9.mp4"} | line
    text = json.dumps(job).replace('"NaN"', "NaN").replace("broken.png", str(tmp_path / "broken.png"))
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"prompt": "fine", "output": "c0.mp4"}) + "\n" + text + "\n")
    result = subprocess.run(kill_trials._command("render", "--artifacts", str(directory), "--jobs", str(jobs),
                                                 "--out-dir", str(tmp_path / "out")),
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 1 and f"line 2: {says}" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()  # line 1 was not rendered either


def test_the_results_file_is_one_valid_line_per_job_under_load(tmp_path):
    """Appends of many processes at once stay whole lines (the results lock)."""
    code = ("import sys\nfrom runtime.render import JobResult, append_result\nfrom pathlib import Path\n"
            "for i in range(50):\n    append_result(Path(sys.argv[1]), JobResult(line=i, output='x' * 5000, "
            "status='done', seed=int(sys.argv[2])))\n")
    processes = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path), str(k)], cwd=ROOT) for k in range(4)]
    for p in processes:
        assert p.wait(timeout=120) == 0
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert len(lines) == 200 and all(json.loads(line)["output"] == "x" * 5000 for line in lines)
