#!/usr/bin/env python3
"""`generate` in its throughput and memory modes: peak memory (whole-clip decode, streaming, low-memory), a long
video's memory, time to first frame, and videos per hour at batch 1, 2 and 4.

    python -m benchmarks.generate_cpu --artifacts artifacts/tiny --out generate.json [--steps 25] [--repeats 2]

memory: `python -m runtime generate` in child processes, interleaved over `--repeats` rounds: the decoder given a
whole clip per call (`--decode-chunk` = the clip's latent frames: how `generate` decoded before streaming), the
default (streaming, one latent frame per call) and `--low-memory`. Peak RSS is the child's ru_maxrss (os.wait4), with
its `--memory-report` per stage.
long: the default command at one clip, two clips and `--long-frames` (at 1 step per denoiser: the decode is what
holds frames), peak RSS of each; from two clips on the encoder runs too (the overlap), so the long video is compared
with two clips: a video whose frames were all held would add its frames' bytes.
first-frame: in this process, `Pipeline.stream` timed to its first frame, against the denoisers' time of the same
run and today's whole-clip decode of the same latent (`tokenizer_decoder` on the clip), interleaved.
batch: the same 4 prompts generated at batch 1 (4 calls), 2 (2 calls) and 4 (1 call), interleaved per round;
videos per hour from the median.

Prints tables and writes JSON (`--out`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from runtime.cli import run_command
from runtime.files import atomic_output, check_output
from runtime.manifest import read_manifest
from runtime.request import Count, Steps, parse_as

SECTIONS = ("memory", "long", "first-frame", "batch")
PROMPTS = ("a red circle moving left", "a green square moving up", "a blue triangle moving right",
           "a yellow circle moving down")  # captions of the world tiny is trained on (docs/reference.md)
GIB = 2**30
T, R = TypeVar("T"), TypeVar("R")


def child_generate(artifacts: Path, out_dir: Path, steps: int, extra: list[str], frames: int | None = None) -> dict:
    """One `python -m runtime generate` in a child process: its wall time, peak RSS (ru_maxrss) and memory report."""
    report = out_dir / "memory.json"
    command = [sys.executable, "-m", "runtime", "generate", "--artifacts", str(artifacts), "--prompt", PROMPTS[0],
               "--out", str(out_dir / "video.mp4"), "--steps", str(steps), "--memory-report", str(report), "-q",
               *(["--frames", str(frames)] if frames else []), *extra]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    stdout, stderr = process.communicate()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {stderr}")
    return {"seconds": seconds, "max_rss_gib": usage.ru_maxrss * 1024 / GIB,
            "report": json.loads(report.read_text()), "stdout": stdout.strip().splitlines()[0]}


def interleaved(settings: Sequence[T], repeats: int, run: Callable[[T], R]) -> dict[T, list[R]]:
    """setting -> `run(setting)` of each of `repeats` rounds, every round over all settings, in alternating order
    (forward, then backward), so that no setting always runs first."""
    runs = {setting: [] for setting in settings}
    for repeat in range(repeats):
        for setting in (settings if repeat % 2 == 0 else settings[::-1]):
            runs[setting].append(run(setting))
    return runs


def memory_section(args: argparse.Namespace, tmp: Path) -> dict:
    clip = read_manifest(args.artifacts).latent.frames
    configs = {"whole-clip decode": ["--decode-chunk", str(clip)], "default (streaming)": [],
               "--low-memory": ["--low-memory"]}
    runs = interleaved(list(configs), args.repeats,
                       lambda name: child_generate(args.artifacts, tmp, args.steps, configs[name]))
    default = statistics.median(r["max_rss_gib"] for r in runs["default (streaming)"])
    whole = statistics.median(r["max_rss_gib"] for r in runs["whole-clip decode"])
    print(f"\nPeak memory of one `generate` ({args.steps} steps per denoiser, {args.repeats} runs each, interleaved)")
    print("| setting | peak RSS GiB (median) | runs | vs default | vs whole-clip decode | seconds (median) |\n"
          "|---|---|---|---|---|---|")
    result = {}
    for name, rs in runs.items():
        peak = statistics.median(r["max_rss_gib"] for r in rs)
        seconds = statistics.median(r["seconds"] for r in rs)
        listed = ", ".join(f"{r['max_rss_gib']:.2f}" for r in rs)
        print(f"| {name} | {peak:.2f} | {listed} | {peak / default:.0%} | {peak / whole:.0%} | {seconds:.1f} |")
        result[name] = {"peak_rss_gib": peak, "runs_gib": [r["max_rss_gib"] for r in rs], "seconds": seconds,
                        "stages": rs[-1]["report"]["stages"]}
    print("\nPer stage (the last run of each setting): RSS growth while opening its runner / highest RSS while it "
          "ran, MiB")
    names = list(configs)
    print("| stage | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
    stages = [s["stage"] for s in result["default (streaming)"]["stages"]]
    for stage in stages:
        cells = []
        for name in names:
            s = next((s for s in result[name]["stages"] if s["stage"] == stage), None)
            cells.append("-" if s is None else f"{(s['opened'] or 0) / 2**20:.0f} / {(s['peak'] or 0) / 2**20:.0f}")
        print(f"| {stage} | " + " | ".join(cells) + " |")
    return result


def long_section(args: argparse.Namespace, tmp: Path) -> dict:
    from runtime.pipeline import video_lengths

    manifest = read_manifest(args.artifacts)
    one, new = video_lengths(manifest)
    lengths = (one, one + new, args.long_frames)  # one clip; two (the encoder runs from the second on); long
    runs = interleaved(lengths, args.repeats, lambda frames: child_generate(args.artifacts, tmp, 1, [], frames))
    clip_bytes = one * 3 * manifest.height * manifest.width * 4  # one clip's float32 frames
    print(f"\nA long video's memory (default settings, 1 step per denoiser, {args.repeats} runs each)")
    print("| frames | peak RSS GiB (median) | runs | highest RSS per stage, MiB (last run) | seconds (median) |\n"
          "|---|---|---|---|---|")
    result = {}
    for frames, rs in runs.items():
        peak = statistics.median(r["max_rss_gib"] for r in rs)
        listed = ", ".join(f"{r['max_rss_gib']:.3f}" for r in rs)
        stages = {s["stage"]: (s["peak"] or 0) / 2**20 for s in rs[-1]["report"]["stages"]}
        per_stage = ", ".join(f"{name} {mib:.0f}" for name, mib in stages.items() if name.startswith("tokenizer"))
        print(f"| {frames} | {peak:.3f} | {listed} | {per_stage} | {statistics.median(r['seconds'] for r in rs):.1f} |")
        result[frames] = {"peak_rss_gib": peak, "runs_gib": [r["max_rss_gib"] for r in rs], "stage_peaks_mib": stages}
    grown = result[lengths[2]]["peak_rss_gib"] - result[lengths[1]]["peak_rss_gib"]
    whole = lengths[2] * 3 * manifest.height * manifest.width / GIB  # its uint8 frames alone
    print(f"{lengths[2]} frames against {lengths[1]}: {grown * 1024:+.0f} MiB; one clip's float32 frames are "
          f"{clip_bytes / 2**20:.0f} MiB, the whole video's uint8 frames {whole * 1024:.0f} MiB")
    return {"runs": result, "growth_gib": grown, "clip_float32_gib": clip_bytes / GIB, "video_uint8_gib": whole}


def first_frame_section(args: argparse.Namespace) -> dict:
    from runtime.pipeline import DECODER, Pipeline

    rows = []
    with Pipeline.from_artifacts(args.artifacts) as pipe:
        latent = pipe.generate(PROMPTS[0], seed=0, steps=args.steps).latents[pipe.denoisers[-1]][0]  # + warm-up
        for _ in range(args.repeats):
            pipe.timings.clear()
            start = time.perf_counter()
            frames = pipe.stream(PROMPTS[0], seed=0, steps=args.steps)
            next(frames)
            first = time.perf_counter() - start
            rest = sum(1 for _ in frames)
            total = time.perf_counter() - start
            denoise = sum(pipe.timings[name].seconds for name in pipe.denoisers)
            streamed = sum(t.seconds for name, t in pipe.timings.items() if name.startswith("tokenizer_decoder"))
            start = time.perf_counter()
            pipe.runner(DECODER).infer({"latent": latent})
            whole = time.perf_counter() - start
            rows.append({"first_frame_s": first, "total_s": total, "frames": rest + 1, "denoise_s": denoise,
                         "streamed_decode_s": streamed, "whole_clip_decode_s": whole,
                         "target_s": denoise + 0.25 * whole})
    print(f"\nTime to first frame ({args.steps} steps per denoiser; per run)")
    print("| run | first frame s | denoisers s | whole-clip decode s | target: denoisers + 25% decode | "
          "streamed decode s | total s |\n|---|---|---|---|---|---|---|")
    for i, r in enumerate(rows):
        print(f"| {i + 1} | {r['first_frame_s']:.2f} | {r['denoise_s']:.2f} | {r['whole_clip_decode_s']:.2f} | "
              f"{r['target_s']:.2f} ({'met' if r['first_frame_s'] <= r['target_s'] else 'missed'}) | "
              f"{r['streamed_decode_s']:.2f} | {r['total_s']:.2f} |")
    return {"runs": rows}


def batch_section(args: argparse.Namespace) -> dict:
    from runtime.pipeline import Pipeline

    with Pipeline.from_artifacts(args.artifacts) as pipe:
        pipe.generate(list(PROMPTS), seed=[0, 1, 2, 3], steps=1)  # warm-up: every stage at batch 4

        def all_videos(size: int) -> float:
            start = time.perf_counter()
            for first in range(0, len(PROMPTS), size):
                pipe.generate(list(PROMPTS[first:first + size]), seed=list(range(first, first + size)),
                              steps=args.steps)
            return time.perf_counter() - start

        seconds = interleaved((1, 2, 4), args.repeats, all_videos)
    print(f"\nVideos per hour, {len(PROMPTS)} videos of {read_manifest(args.artifacts).frames} frames, "
          f"{args.steps} steps per denoiser ({args.repeats} rounds, interleaved)")
    print("| batch | seconds for 4 videos (median) | runs | videos per hour | vs batch 1 |\n|---|---|---|---|---|")
    base = statistics.median(seconds[1])
    result = {}
    for size, runs in seconds.items():
        median = statistics.median(runs)
        listed = ", ".join(f"{s:.1f}" for s in runs)
        print(f"| {size} | {median:.1f} | {listed} | {len(PROMPTS) * 3600 / median:.0f} | {base / median:.2f}x |")
        result[size] = {"seconds": runs, "videos_per_hour": len(PROMPTS) * 3600 / median}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.generate_cpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", type=Path, required=True, help="an artifact directory (walt-export onnx)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--steps", type=parse_as(Steps), default=25, help="DDIM steps per denoiser (default 25)")
    parser.add_argument("--repeats", type=parse_as(Count), default=2, help="runs per setting (default 2)")
    parser.add_argument("--long-frames", type=parse_as(Count), default=101,
                        help="the long video's length (default 101)")
    parser.add_argument("--out", help="also write the results to this .json file")
    args = parser.parse_args(argv)
    return run_command(parser.prog, False, lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    if args.out:
        check_output(args.out, "--out", "file", suffix=".json")
    read_manifest(args.artifacts)
    results = {"machine": f"{os.cpu_count()} CPUs", "steps": args.steps, "repeats": args.repeats}
    with tempfile.TemporaryDirectory() as tmp:
        for section in args.sections:
            if section == "memory":
                results[section] = memory_section(args, Path(tmp))
            elif section == "long":
                results[section] = long_section(args, Path(tmp))
            elif section == "first-frame":
                results[section] = first_frame_section(args)
            else:
                results[section] = batch_section(args)
    if args.out:
        with atomic_output(args.out) as path:
            path.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
