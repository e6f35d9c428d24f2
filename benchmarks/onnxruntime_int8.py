#!/usr/bin/env python3
"""onnxruntime CPU speed of each stage's INT8 Q/DQ model against its FP32 model, measured side by side.

    python -m benchmarks.onnxruntime_int8 --artifacts artifacts/tiny --out int8_speed.json

Needs an artifact calibrated with `walt-export calibrate`. Each repeat runs FP32 then INT8 on the same seeded
feeds (shapes from the manifest at --batch; 2 is what the cascade runs with guidance), so both see the same
machine state; the table gives medians and the FP32/INT8 ratio (above 1: INT8 is faster). Prints a table and
writes JSON. onnxruntime's CPU EP runs Q/DQ models with its int8 kernels where it fuses a DQ -> op -> Q group,
otherwise it dequantizes and runs float: the ratio is onnxruntime's, not TensorRT's.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from runtime.manifest import StageInfo, read_manifest
from runtime.runners import make_runner


def feeds_for(stage: StageInfo, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded inputs of the stage's shapes: normal latents, mid-schedule timesteps, all-ones masks, zero ids."""
    rng = np.random.default_rng(seed)
    dims = {name: bounds[1] for name, bounds in stage.profile.items()} | {"batch": batch}
    feeds = {}
    for t in stage.inputs:
        shape = t.concrete(dims)
        if t.dtype == "int64":
            feeds[t.name] = np.zeros(shape, np.int64)
        elif "timestep" in t.name:
            feeds[t.name] = np.full(shape, 500.0, np.float32)
        elif t.name.endswith("mask"):
            feeds[t.name] = np.ones(shape, np.float32)
        else:
            feeds[t.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifacts", required=True, help="a calibrated artifact directory")
    parser.add_argument("--stages", nargs="+", help="default: the denoisers")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", help="JSON file")
    args = parser.parse_args(argv)

    directory = Path(args.artifacts)
    manifest = read_manifest(directory)
    rows = []
    for name in args.stages or list(manifest.denoisers):
        stage = manifest.stage(name)
        if "int8" not in stage.precisions:
            print(f"{name}: no INT8 file (run walt-export calibrate)", file=sys.stderr)
            return 1
        feeds = feeds_for(stage, args.batch)
        times = {"fp32": [], "int8": []}
        with make_runner("onnxruntime", directory / stage.file("fp32").file, threads=args.threads) as fp32, \
                make_runner("onnxruntime", directory / stage.file("int8").file, threads=args.threads) as int8:
            runners = {"fp32": fp32, "int8": int8}
            for runner in runners.values():  # warm-up
                runner.infer(feeds)
            for _ in range(args.repeats):
                for precision, runner in runners.items():
                    start = time.perf_counter()
                    runner.infer(feeds)
                    times[precision].append(time.perf_counter() - start)
        medians = {p: statistics.median(t) for p, t in times.items()}
        rows.append({"stage": name, "batch": args.batch, "times_s": times, "median_s": medians,
                     "fp32_over_int8": medians["fp32"] / medians["int8"]})

    print(f"{'stage':<23} {'batch':>5} {'fp32 ms':>9} {'int8 ms':>9} {'fp32/int8':>9}")
    for row in rows:
        m = row["median_s"]
        print(f"{row['stage']:<23} {row['batch']:>5} {m['fp32'] * 1e3:>9.1f} {m['int8'] * 1e3:>9.1f} "
              f"{row['fp32_over_int8']:>9.2f}")
    if args.out:
        result = {"artifact": str(directory), "name": manifest.name, "threads": args.threads,
                  "repeats": args.repeats, "machine": platform.machine(), "python": platform.python_version(),
                  "rows": rows}
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
