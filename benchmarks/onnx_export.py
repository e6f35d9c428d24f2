#!/usr/bin/env python3
"""Export a preset to an artifact directory and record time, peak memory and file sizes per component.

    python -m benchmarks.onnx_export --preset walt-l --out /tmp/walt-l [--fp16] [--json walt-l.json]

Components are built one at a time with seeded random weights (the same as `walt-export onnx --preset`), so the
peak is that of the largest component, not of the whole cascade. Resident memory is sampled every 0.2 s from
/proc/self/statm (Linux) and attributed to the component being exported; the overall peak is the kernel's
(getrusage). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import threading
import time
from pathlib import Path

from walt_export.cascade import build_component, count_parameters
from walt_export.config import PRESETS
from walt_export.onnx_export import export_artifacts

PAGE = os.sysconf("SC_PAGE_SIZE")


class MemorySampler(threading.Thread):
    """Peak resident set size per phase, sampled from /proc/self/statm."""

    def __init__(self, interval: float = 0.2):
        super().__init__(daemon=True)
        self.interval, self.phase, self.peaks = interval, "start", {}
        self._done = threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE

    def run(self) -> None:
        while not self._done.wait(self.interval):
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), self.rss())

    def stop(self) -> None:
        self._done.set()
        self.join()


class ModelTimes(logging.Handler):
    """Collects the exporter's 'exported NAME (...) in S s' records."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.seconds: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg.startswith("exported %s"):
            self.seconds[Path(record.args[0]).stem] = float(record.args[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=list(PRESETS), default="tiny")
    parser.add_argument("--out", required=True, help="the artifact directory to write")
    parser.add_argument("--fp16", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)

    cfg = PRESETS[args.preset]
    sampler, times = MemorySampler(), ModelTimes()
    logger = logging.getLogger("walt_export.onnx_export")
    logger.setLevel(logging.INFO)
    logger.addHandler(times)
    parameters: dict[str, int] = {}

    def component(name: str):
        sampler.phase = name
        module = build_component(cfg, name, seed=args.seed)
        parameters[name] = count_parameters(module)
        return module

    sampler.start()
    start = time.perf_counter()
    manifest = export_artifacts(cfg, component, args.out, {"preset": args.preset, "seed": args.seed}, fp16=args.fp16)
    total = time.perf_counter() - start
    sampler.stop()
    logger.removeHandler(times)

    rows = []
    for name, stage in manifest.stages.items():
        files = {f.file: sum((Path(args.out) / p).stat().st_size for p in [f.file, *(d.file for d in f.external_data)])
                 for f in stage.files}
        comp = stage.module.split(".")[0]
        rows.append({"model": name, "component": comp, "parameters": parameters[comp],
                     "export_s": times.seconds.get(name), "component_peak_rss_gb": sampler.peaks.get(comp, 0) / 2**30,
                     "files": len(files), "canonical_mb": files[f"{name}.onnx"] / 2**20})
    print(f"{'model':<23} {'comp. params':>14} {'export s':>9} {'peak GB':>8} {'files':>5} {'canonical MB':>13}")
    for r in rows:
        print(f"{r['model']:<23} {r['parameters']:>14,} {r['export_s'] or 0:>9.1f} {r['component_peak_rss_gb']:>8.2f} "
              f"{r['files']:>5} {r['canonical_mb']:>13.1f}")
    peak = max(max(sampler.peaks.values()), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30
    print(f"{args.preset}: {total:.0f} s in all, peak resident memory {peak:.2f} GB")
    if args.json:
        result = {"preset": args.preset, "fp16": args.fp16, "total_s": total, "peak_rss_gb": peak, "rows": rows,
                  "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}}
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
