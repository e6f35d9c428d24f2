#!/usr/bin/env python3
"""onnxruntime's CPU memory arena on and off for the denoisers, side by side: what `wants_memory_arena` buys.

    python -m benchmarks.onnxruntime_arena --artifacts artifacts/tiny --out arena.json

Speed: one process opens every denoiser twice (arena off; on, sharing the process's arena as the runtime does) and
times the two sessions interleaved on the same feeds (`walt_export.bench.sample_feeds`, the batch of `generate`);
median per stage and the ratio. Memory: one child process per setting opens the denoisers alone, runs each
`--repeats` times, and reports how far its resident memory rose (VmRSS after against before the first call) and
its peak (VmHWM). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from runtime.manifest import check_file, read_manifest
from runtime.runners import OnnxRuntimeRunner
from walt_export.bench import rss_kib, sample_feeds
from walt_export.config import CascadeConfig

SETTINGS = {"off": False, "on": True}


def open_runners(directory: Path, stages: list[str], arena: bool) -> dict[str, OnnxRuntimeRunner]:
    manifest = read_manifest(directory)
    return {name: OnnxRuntimeRunner(check_file(directory, manifest.stages[name].file("fp32")),
                                    memory_arena=arena).__enter__() for name in stages}


def memory_child(directory: Path, stages: list[str], arena: bool, repeats: int) -> dict:
    cfg = CascadeConfig.model_validate(read_manifest(directory).config)
    feeds = sample_feeds(cfg, stages, seed=0)
    runners = open_runners(directory, stages, arena)
    before = rss_kib("VmRSS")
    for _ in range(repeats):
        for name in stages:
            runners[name].infer(feeds[name])
    return {"rss_rise_gb": (rss_kib("VmRSS") - before) / 2**20, "peak_rss_gb": rss_kib("VmHWM") / 2**20}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifacts", type=Path, required=True)
    parser.add_argument("--stages", nargs="+", help="default: the artifact's denoisers")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--memory-child", choices=list(SETTINGS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    manifest = read_manifest(args.artifacts)
    stages = args.stages or list(manifest.denoisers)
    if args.memory_child:
        print(json.dumps(memory_child(args.artifacts, stages, SETTINGS[args.memory_child], args.repeats)))
        return 0
    cfg = CascadeConfig.model_validate(manifest.config)
    feeds = sample_feeds(cfg, stages, seed=0)
    runners = {setting: open_runners(args.artifacts, stages, arena) for setting, arena in SETTINGS.items()}
    seconds = {(name, setting): [] for name in stages for setting in SETTINGS}
    for repeat in range(args.repeats + 2):  # 2 warm-up rounds
        for name in stages:
            order = list(SETTINGS) if repeat % 2 == 0 else list(SETTINGS)[::-1]
            for setting in order:
                start = time.perf_counter()
                runners[setting][name].infer(feeds[name])
                if repeat >= 2:
                    seconds[(name, setting)].append(time.perf_counter() - start)
    memory = {}
    for setting in SETTINGS:
        child = subprocess.run([sys.executable, "-m", "benchmarks.onnxruntime_arena",
                                "--artifacts", str(args.artifacts), "--memory-child", setting, "--repeats", str(args.repeats), "--stages", *stages],
                               capture_output=True, text=True, check=True)
        memory[setting] = json.loads(child.stdout.strip().splitlines()[-1])
    rows = []
    print(f"{args.artifacts}: onnxruntime CPU, {args.repeats} interleaved calls per stage and setting")
    print(f"{'stage':<8}{'arena off ms':>14}{'arena on ms':>13}{'speed-up':>10}")
    for name in stages:
        off, on = (statistics.median(seconds[(name, s)]) * 1e3 for s in SETTINGS)
        rows.append({"stage": name, "off_ms": off, "on_ms": on, "speedup": off / on})
        print(f"{name:<8}{off:>14.1f}{on:>13.1f}{off / on:>9.2f}x")
    for setting, m in memory.items():
        print(f"arena {setting}: resident memory +{m['rss_rise_gb']:.2f} GiB after the calls, peak "
              f"{m['peak_rss_gb']:.2f} GiB (denoisers alone, one process)")
    if args.out:
        args.out.write_text(json.dumps({"artifacts": str(args.artifacts), "repeats": args.repeats, "rows": rows,
                                        "memory": memory}, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
