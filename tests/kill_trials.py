"""Kill -9 trials: `render`, `generate` and `walt-export onnx` killed at a random moment, then run again.

    python -m tests.kill_trials [--trials 10] [--commands render generate onnx] [--steps 20] [--json kill_trials.json]

Each trial starts the command, sends SIGKILL to its process group after a random delay (uniform over the time an
uninterrupted run takes, measured first), checks what the kill left (every output under its final name must be
complete), runs the command again to completion and checks again. It prints a table and writes JSON with, per
command: trials, corrupt outputs (a final-named output that is incomplete, after the kill or the rerun), leftovers
(hidden temporary files or directories after the rerun; lock files excepted), redone jobs (render: a finished video
rendered again) and failed reruns. tests/runtime/test_render.py runs one trial per command in the suite.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FRAMES = 9  # of one micro clip


@dataclass
class Tally:
    trials: int = 0
    corrupt: int = 0  # final-named outputs that are incomplete
    leftovers: int = 0  # hidden temporaries after the rerun
    redone: int = 0  # finished jobs rendered again
    failed_reruns: int = 0
    notes: list[str] = field(default_factory=list)


def _command(*args: str) -> list[str]:
    """`walt-export ARGS...` when args[0] is "walt-export", else `python -m runtime ARGS...`, in this checkout."""
    if args[0] == "walt-export":
        return [sys.executable, "-c", "import sys\nfrom walt_export.cli import main\nraise SystemExit(main())",
                *args[1:]]
    return [sys.executable, "-c", "import sys\nfrom runtime.cli import main\nraise SystemExit(main())", *args]


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, cwd=ROOT)


def kill_once_written(process: subprocess.Popen, path: Path, after: float, timeout: float) -> None:
    """SIGKILL `process`'s process group (started with start_new_session) `after` seconds once `path` exists (or
    once `timeout` seconds passed, or it exited, without it), and wait for it."""
    deadline = time.monotonic() + timeout
    while not path.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    time.sleep(after)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _kill_after(args: list[str], delay: float) -> None:
    process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        process.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _complete_video(path: Path) -> bool:
    from runtime.video import read_video

    try:
        return read_video(path)[0].shape[0] == FRAMES
    except Exception:  # noqa: BLE001 (any decoding failure means an incomplete file)
        return False


def _final_videos(directory: Path) -> list[Path]:
    """The videos under their final names in `directory` (pathlib's glob also matches the hidden temporaries that a
    kill leaves mid-write, `.c0.<random>.tmp.mp4`, which are not outputs: the rerun removes them)."""
    return sorted(p for p in directory.glob("*.mp4") if not p.name.startswith(".")) if directory.is_dir() else []


def _hidden(directory: Path, allowed: tuple[str, ...] = ()) -> list[Path]:
    """Hidden entries (temporaries) under `directory`, except lock files and the names in `allowed`."""
    return [p for p in directory.rglob(".*") if not p.name.endswith(".lock") and p.name not in allowed]


def export_micro(directory: Path) -> Path:
    result = _run(_command("walt-export", "onnx", "--preset", "micro", "--out", str(directory)))
    if result.returncode:
        raise RuntimeError(result.stderr)
    return directory


def timed(args: list[str]) -> float:
    start = time.monotonic()
    result = _run(args)
    if result.returncode:
        raise RuntimeError(result.stderr)
    return time.monotonic() - start


def render_trial(artifacts: Path, work: Path, rng: random.Random, tally: Tally, jobs: int = 4,
                 duration: float | None = None, steps: int = 20) -> float:
    """One kill of `render` (4 jobs of `steps` steps per denoiser) and its rerun; returns the uninterrupted duration
    it measured or was given."""
    jobs_file = work / "jobs.jsonl"
    jobs_file.write_text("".join(json.dumps({"prompt": f"clip {i}", "seed": i, "steps": steps, "output": f"c{i}.mp4"})
                                 + "\n" for i in range(jobs)))
    out = work / f"out{tally.trials}"
    args = _command("render", "--artifacts", str(artifacts), "--jobs", str(jobs_file), "--out-dir", str(out),
                    "--progress", "off")
    if duration is None:
        duration = timed(args + ["--out-dir", str(work / "timing-render")])
    _kill_after(args, rng.uniform(0.5, duration))
    tally.trials += 1
    finished = {p: p.stat().st_mtime_ns for p in _final_videos(out)}
    tally.corrupt += sum(not _complete_video(p) for p in finished)
    rerun = _run(args)
    tally.failed_reruns += rerun.returncode != 0
    videos = _final_videos(out)
    tally.corrupt += sum(not _complete_video(p) for p in videos) + (jobs - len(videos))
    tally.redone += sum(p.stat().st_mtime_ns != mtime for p, mtime in finished.items() if p.exists())
    tally.leftovers += len(_hidden(out, allowed=(".locks",)))
    done = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    if sum(r["status"] == "done" for r in done) != jobs:
        tally.notes.append(f"render trial {tally.trials}: {sum(r['status'] == 'done' for r in done)} done lines")
    return duration


def generate_trial(artifacts: Path, work: Path, rng: random.Random, tally: Tally,
                   duration: float | None = None, steps: int = 30) -> float:
    out = work / f"g{tally.trials}" / "video.mp4"
    args = _command("generate", "--artifacts", str(artifacts), "--prompt", "waves", "--steps", str(steps),
                    "--out", str(out),
                    "--progress", "off")
    if duration is None:
        duration = timed(args[:-4] + ["--out", str(work / "timing-generate.mp4"), "--progress", "off"])
    _kill_after(args, rng.uniform(0.5, duration))
    tally.trials += 1
    tally.corrupt += out.exists() and not _complete_video(out)
    rerun = _run(args)
    tally.failed_reruns += rerun.returncode != 0
    tally.corrupt += not _complete_video(out)
    tally.leftovers += len(_hidden(out.parent))
    return duration


def onnx_trial(work: Path, rng: random.Random, tally: Tally, duration: float | None = None) -> float:
    from runtime.manifest import ArtifactError, check_file, read_manifest

    out = work / f"a{tally.trials}" / "micro"
    args = _command("walt-export", "onnx", "--preset", "micro", "--out", str(out))
    if duration is None:
        duration = timed(_command("walt-export", "onnx", "--preset", "micro", "--out", str(work / "timing-onnx")))
    _kill_after(args, rng.uniform(1.0, duration))
    tally.trials += 1

    def complete() -> bool:
        try:
            manifest = read_manifest(out)
            for stage in manifest.stages.values():
                for model in stage.files:
                    check_file(out, model)
        except ArtifactError:
            return False
        return True

    tally.corrupt += out.exists() and not complete()
    rerun = _run(args)
    tally.failed_reruns += rerun.returncode != 0
    tally.corrupt += not complete()
    tally.leftovers += len(_hidden(out.parent))
    return duration


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--commands", nargs="+", choices=("render", "generate", "onnx"),
                        default=["render", "generate", "onnx"])
    parser.add_argument("--steps", type=int, default=20,
                        help="DDIM steps per denoiser of render's and generate's jobs (more: longer jobs to kill)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="kill_trials.json")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    tallies: dict[str, Tally] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        artifacts = export_micro(work / "artifacts") if {"render", "generate"} & set(args.commands) else None
        for command in args.commands:
            tally, duration = tallies.setdefault(command, Tally()), None
            for _ in range(args.trials):
                if command == "render":
                    duration = render_trial(artifacts, work, rng, tally, duration=duration, steps=args.steps)
                elif command == "generate":
                    duration = generate_trial(artifacts, work, rng, tally, duration=duration, steps=args.steps)
                else:
                    duration = onnx_trial(work, rng, tally, duration=duration)
            print(f"{command}: {tally.trials} trials (an uninterrupted run: {duration:.1f} s)", flush=True)
    print(f"{'command':<9} {'trials':>6} {'corrupt':>8} {'leftovers':>9} {'redone':>7} {'failed reruns':>13}")
    for command, t in tallies.items():
        print(f"{command:<9} {t.trials:>6} {t.corrupt:>8} {t.leftovers:>9} {t.redone:>7} {t.failed_reruns:>13}")
        for note in t.notes:
            print(f"  {note}")
    Path(args.json).write_text(json.dumps({c: asdict(t) for c, t in tallies.items()}, indent=2) + "\n")
    print(f"wrote {args.json}")
    bad = any(t.corrupt or t.leftovers or t.redone or t.failed_reruns or t.notes for t in tallies.values())
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
