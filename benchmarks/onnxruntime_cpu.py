#!/usr/bin/env python3
"""Two onnxruntime CPU settings of the denoisers side by side: what each speed change of the runtime buys.

    python -m benchmarks.onnxruntime_cpu --artifacts artifacts/tiny --compare arena --out arena.json
    python -m benchmarks.onnxruntime_cpu --artifacts artifacts/tiny --compare attention --out attention.json
    python -m benchmarks.onnxruntime_cpu --artifacts artifacts/tiny --compare int8 --out int8.json

--compare arena: the canonical files without and with the CPU memory arena (shared by the process's sessions, as
`runtime.runners.wants_memory_arena` opens them). --compare attention: the canonical file against the attention
variant (the standard ONNX `Attention` operator), both with the arena. --compare int8: the FP32 attention variant
against the INT8 one (`walt-export calibrate`), as the runtime opens them; their profiles show which products run in
8 bits (MatMulIntegerToFloat, QLinearConv) and what the Q/DQ nodes around them cost.

Speed: one process opens every denoiser in both settings and times the two sessions interleaved on the same feeds
(`walt_export.bench.sample_feeds`, the batch of `generate`); median per stage and the ratio. Memory: one child
process per setting opens the denoisers alone, runs each `--repeats` times, and reports how far its resident memory
rose (VmRSS after against before the first call) and its peak (VmHWM). Profile: per setting, onnxruntime's own
profiler over `--repeats` calls of each stage, the share of node time per op type. Prints tables and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from runtime.cli import run_command
from runtime.files import atomic_output, check_output
from runtime.manifest import check_file, read_manifest
from runtime.memory import read_status
from runtime.request import Count, parse_as
from runtime.runners import OnnxRuntimeRunner
from walt_export.bench import sample_feeds
from walt_export.config import DENOISER_NAMES, CascadeConfig

COMPARISONS = {  # --compare -> {setting: (precision, variant, memory arena)}, the baseline first
    "arena": {"arena off": ("fp32", "canonical", False), "arena on": ("fp32", "canonical", True)},
    "attention": {"canonical": ("fp32", "canonical", True), "attention": ("fp32", "attention", True)},
    "int8": {"fp32": ("fp32", "attention", True), "int8": ("int8", "attention", True)},
}


def open_runners(directory: Path, stages: list[str], precision: str, variant: str, arena: bool
                 ) -> dict[str, OnnxRuntimeRunner]:
    manifest = read_manifest(directory)
    return {name: OnnxRuntimeRunner(check_file(directory, manifest.stages[name].file(precision, variant)),
                                    memory_arena=arena).__enter__() for name in stages}


def op_profile(path: Path, feeds: dict, arena: bool, calls: int) -> dict[str, float]:
    """Share of onnxruntime's node time per op type over `calls` calls of one model (its profiler's JSON)."""
    import collections
    import tempfile

    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.enable_profiling, options.profile_file_prefix = True, str(Path(tmp) / "profile")
        options.enable_cpu_mem_arena, options.log_severity_level = arena, 3
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for _ in range(calls + 1):
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    spent = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            spent[event["args"]["op_name"]] += event["dur"]
    total = sum(spent.values())
    return {op: us / total for op, us in spent.most_common()}


def memory_child(directory: Path, stages: list[str], precision: str, variant: str, arena: bool, repeats: int) -> dict:
    cfg = CascadeConfig.model_validate(read_manifest(directory).config)
    feeds = sample_feeds(cfg, stages, seed=0)
    runners = open_runners(directory, stages, precision, variant, arena)
    before = read_status("VmRSS")
    for _ in range(repeats):
        for name in stages:
            runners[name].infer(feeds[name])
    return {"rss_rise_gib": (read_status("VmRSS") - before) / 2**30, "peak_rss_gib": read_status("VmHWM") / 2**30}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.onnxruntime_cpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", type=Path, required=True, help="an artifact directory (walt-export onnx)")
    parser.add_argument("--compare", choices=list(COMPARISONS), required=True,
                        help="arena: memory arena off vs on; attention: canonical file vs attention variant; int8: "
                             "FP32 vs INT8 attention variant")
    parser.add_argument("--stages", nargs="+", choices=DENOISER_NAMES, help="denoisers to time (default: all)")
    parser.add_argument("--repeats", type=parse_as(Count), default=10,
                        help="interleaved calls per stage and setting, >= 1 (default 10)")
    parser.add_argument("--out", help="also write the results to this .json file")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)  # a setting of --compare, in a child process
    args = parser.parse_args(argv)
    return run_command(parser.prog, False, lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    if args.out:
        check_output(args.out, "--out", "file", suffix=".json")
    manifest = read_manifest(args.artifacts)
    stages = args.stages or list(manifest.denoisers)
    settings = COMPARISONS[args.compare]
    for name in stages:  # every file of both settings, before anything runs
        for precision, variant, _ in settings.values():
            manifest.stage(name).file(precision, variant)
    if args.memory_child:
        print(json.dumps(memory_child(args.artifacts, stages, *settings[args.memory_child], args.repeats)))
        return 0
    cfg = CascadeConfig.model_validate(manifest.config)
    feeds = sample_feeds(cfg, stages, seed=0)
    runners = {setting: open_runners(args.artifacts, stages, *how) for setting, how in settings.items()}
    seconds = {(name, setting): [] for name in stages for setting in settings}
    for repeat in range(args.repeats + 2):  # 2 warm-up rounds
        for name in stages:
            order = list(settings) if repeat % 2 == 0 else list(settings)[::-1]
            for setting in order:
                start = time.perf_counter()
                runners[setting][name].infer(feeds[name])
                if repeat >= 2:
                    seconds[(name, setting)].append(time.perf_counter() - start)
    profiles = {}
    for setting, (precision, variant, arena) in settings.items():
        for name in stages:
            path = check_file(args.artifacts, manifest.stages[name].file(precision, variant))
            profiles[f"{name} {setting}"] = op_profile(path, feeds[name], arena, args.repeats)
    memory = {}
    for setting in settings:
        child = subprocess.run([sys.executable, "-m", "benchmarks.onnxruntime_cpu", "--compare", args.compare,
                                "--artifacts", str(args.artifacts), "--memory-child", setting,
                                "--repeats", str(args.repeats), "--stages", *stages],
                               capture_output=True, text=True, check=True)
        memory[setting] = json.loads(child.stdout.strip().splitlines()[-1])
    rows = []
    base, new = settings
    print(f"{args.artifacts}: onnxruntime CPU, {args.repeats} interleaved calls per stage and setting")
    print(f"{'stage':<8}{base + ' ms':>16}{new + ' ms':>16}{'speed-up':>10}")  # stages: base, sr1, sr2
    for name in stages:
        before, after = (statistics.median(seconds[(name, s)]) * 1e3 for s in settings)
        rows.append({"stage": name, "ms": {base: before, new: after}, "speedup": before / after})
        print(f"{name:<8}{before:>16.1f}{after:>16.1f}{before / after:>9.2f}x")
    for setting, m in memory.items():
        print(f"{setting}: resident memory +{m['rss_rise_gib']:.2f} GiB after the calls, peak "
              f"{m['peak_rss_gib']:.2f} GiB (the stages timed, alone in one process)")
    print("share of onnxruntime's node time per op type (its profiler):")
    for key, shares in profiles.items():
        print(f"  {key:<22} " + ", ".join(f"{op} {share:.0%}" for op, share in list(shares.items())[:10]))
    if args.out:
        with atomic_output(args.out) as path:
            path.write_text(json.dumps({"artifacts": str(args.artifacts), "compare": args.compare,
                                        "repeats": args.repeats, "rows": rows, "memory": memory,
                                        "op_time_shares": profiles}, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
