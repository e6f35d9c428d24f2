#!/usr/bin/env python3
"""PyTorch reference forward of every stage of a preset: FLOPs, median time and achieved TFLOP/s.

The baseline the exported engines are measured against, and a check of the spec's cost estimates
(docs/model_spec.md §5: base ~15 TFLOP per forward, SR1 ~5.6, SR2 ~1.8, decoding a 17x512x896 clip ~170).

    python -m benchmarks.reference_forward --preset tiny                       # CPU
    python -m benchmarks.reference_forward --preset t2v --device cuda --dtype bfloat16 --out t2v.json
    python -m benchmarks.reference_forward --preset t2v --device meta           # FLOPs only, no memory, seconds

The stages are the export specs' (`walt_export.export_specs`), called as exported, with their seeded sample inputs
at the given batch (the tokenizer stages on a whole clip). Each component is built with seeded random weights
(`build_component`: on the CPU, then moved; `--device meta` allocates nothing; timing does not depend on the
values). FLOPs count 2 per multiply-add, per call, from the FLOP model (`walt_export.flops`, checked against
torch.utils.flop_counter). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from walt_export.cascade import build_component, count_parameters
from walt_export.config import PRESETS
from walt_export.export_specs import BATCH, ExportSpec, export_specs
from walt_export.flops import stage_flops


def measure(spec: ExportSpec, module, inputs, device: str, warmup: int, repeats: int) -> list[float]:
    def call():
        spec.call(module, *inputs)
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=list(PRESETS), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--stages", nargs="+", help="default: every stage of the preset")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)

    cfg = PRESETS[args.preset]
    specs = export_specs(cfg)
    unknown = sorted(set(args.stages or ()) - set(specs))
    if unknown:
        parser.error(f"unknown stages {unknown}; {args.preset} has: {', '.join(specs)}")
    flops_of = stage_flops(cfg, batch={name: args.batch for name in specs})
    dtype = getattr(torch, args.dtype)
    timed = args.device != "meta"
    if args.device.startswith("cuda"):
        device_name = torch.cuda.get_device_name(args.device)
    else:
        device_name = f"{platform.machine()}, {os.cpu_count()} cores" if timed else "shapes only, FLOPs counted"
    rows = []
    print(f"{args.preset} on {args.device} ({device_name}), {args.dtype}, batch {args.batch}, torch {torch.__version__}")
    print(f"{'stage':<23} {'params':>14} {'GFLOP/call':>12} {'median ms':>11} {'min ms':>9} {'TFLOP/s':>8}")
    for name in args.stages or list(specs):
        spec = specs[name]
        module = spec.module_of(build_component(cfg, spec.component, args.seed, args.device)).to(dtype)
        generator = torch.Generator().manual_seed(args.seed)
        inputs = [x.to(args.device, dtype) if x.is_floating_point() else x.to(args.device)
                  for x in spec.sample_inputs(generator, **{BATCH: args.batch})]
        with torch.inference_mode():
            times = measure(spec, module, inputs, args.device, args.warmup * timed, args.repeats * timed)
        flops = flops_of[name]
        median = statistics.median(times) if times else None
        row = dict(stage=name, parameters=count_parameters(module), flops=flops, median_s=median,
                   min_s=min(times) if times else None, times_s=times,
                   tflops_per_s=flops / median / 1e12 if times else None)
        rows.append(row)
        cells = [f"{v * 1e3:.1f}" if v else "-" for v in (median, row["min_s"])]
        cells.append(f"{row['tflops_per_s']:.2f}" if times else "-")
        print(f"{name:<23} {row['parameters']:>14,} {flops / 1e9:>12.1f} {cells[0]:>11} {cells[1]:>9} {cells[2]:>8}")
        del module, inputs
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    if args.out:
        result = dict(preset=args.preset, device=args.device, device_name=device_name, dtype=args.dtype,
                      batch=args.batch, torch=torch.__version__, warmup=args.warmup, repeats=args.repeats, rows=rows)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
