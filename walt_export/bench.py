"""`walt-export bench`: the latency of every stage on every backend, side by side, against the FLOP model and a
matmul peak measured in the same run, and `generate` end to end on onnxruntime against PyTorch.

    report = bench(BenchOptions(artifacts="artifacts/tiny", backends=("torch", "onnxruntime")))
    print(format_report(report))

How it measures (these machines are noisy: only ratios measured side by side mean anything):
- Every runner of every (stage, backend) is opened first. Each repeat then calls every stage on every backend once,
  the backends in a rotated order (repeat r starts with backend r mod n), so each backend sees the same machine
  state; `warmup` repeats run first and are not counted. Latency: median, p10 and p90 of the counted calls.
- Feeds are the export spec's seeded sample inputs at the batch `generate` uses (2 for the text encoder and the
  guided denoisers, 1 for the tokenizer stages), the same for every backend.
- FLOPs per call come from the FLOP model (`walt_export.flops`); achieved GFLOP/s = FLOPs / median latency.
- The matmul peak: one float32 2048 x 2048 x 2048 `torch.mm` per repeat (PyTorch's CPU BLAS, all threads),
  between the stages; its median GFLOP/s is the peak each stage's rate is a fraction of.
- Peak resident memory: the process's peak RSS during the last warm-up call of each (stage, backend) (Linux: the
  high-water mark reset through /proc/self/clear_refs before the call), and how far it rose above the RSS before
  it (that call's own working memory). Where the reset is not allowed, None.
- End to end: `generate` of one prompt (same seed and steps) through `Pipeline.from_artifacts` (onnxruntime FP32)
  and through `torch_pipeline` (the PyTorch modules), interleaved, after one uncounted generation of one step each
  (which opens every runner and makes its first calls); the time outside the runners' `infer`
  (`Pipeline.timings`) is the host's share (scheduler, guidance, tokenizer, copies).

Backends: torch (eager, the modules the artifact was exported from), torch-compile (`torch.compile`, inductor; its
compilation runs in the warm-up), onnxruntime, onnxruntime-fp16 and onnxruntime-int8 (the FP32, FP16 and INT8 Q/DQ
files the runtime runs on onnxruntime's CPU EP, opened as it opens them: `onnxruntime_file`, `wants_memory_arena`),
tensorrt (the plans of `walt-export engines`, on a CUDA GPU). A backend or stage that cannot run here is listed in
`skipped` with the reason, never silently left out.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Literal, get_args

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from runtime.errors import UsageError, WaltExportError
from runtime.manifest import ArtifactError, Manifest, Precision, check_file, read_manifest
from runtime.memory import read_status, reset_peak
from runtime.runners import Runner, make_runner, onnxruntime_file, wants_memory_arena
from walt_export.config import CascadeConfig
from walt_export.flops import PEAKS, CascadeCost, cascade_flops, generate_batch, stage_flops

log = logging.getLogger(__name__)

BenchBackend = Literal["torch", "torch-compile", "onnxruntime", "onnxruntime-fp16", "onnxruntime-int8", "tensorrt"]
BENCH_BACKENDS: tuple[str, ...] = get_args(BenchBackend)
DEFAULT_BACKENDS = BENCH_BACKENDS  # tensorrt too: where it cannot run, the report says why
_ONNXRUNTIME_PRECISION: dict[str, Precision] = {"onnxruntime": "fp32", "onnxruntime-fp16": "fp16",
                                                "onnxruntime-int8": "int8"}
MATMUL_SIZE = 2048  # the peak's square float32 matmul


class _Schema(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BenchOptions(_Schema):
    """What to measure. `stages`: None for every stage of the artifact; `generate_repeats` 0 skips end to end;
    `steps`: the DDIM steps of every denoiser end to end (None: the artifact's)."""

    artifacts: Path
    backends: tuple[BenchBackend, ...] = DEFAULT_BACKENDS
    stages: tuple[str, ...] | None = None
    repeats: int = Field(default=5, ge=1)
    warmup: int = Field(default=2, ge=1)
    generate_repeats: int = Field(default=1, ge=0)
    steps: int | None = Field(default=None, ge=1)
    threads: int = Field(default=0, ge=0)  # onnxruntime's intra-op threads and torch's; 0: each decides
    seed: int = 0


class Latency(_Schema):
    """Milliseconds of the counted calls: median, 10th and 90th percentile, and each call."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    calls_ms: tuple[float, ...]

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Latency:
        ms = [s * 1e3 for s in seconds]
        return cls(median_ms=statistics.median(ms), p10_ms=float(np.percentile(ms, 10)),
                   p90_ms=float(np.percentile(ms, 90)), calls_ms=tuple(ms))


class StageResult(_Schema):
    """One stage on one backend.

    flops: per call (FLOP model); gflops_per_s: flops / median; vs_torch: PyTorch eager's median / this median
    (above 1: faster than eager; None without a torch row); peak_fraction: gflops_per_s / the run's matmul peak;
    peak_rss_gib / call_rss_gib: the process's peak resident memory during one call (every runner of the run open),
    and its rise over the call, in GiB.
    """

    stage: str
    backend: BenchBackend
    batch: int
    file: str | None  # the model file run, as the manifest names it ('int8/base.onnx'), or the plan; torch: None
    latency: Latency
    flops: int
    gflops_per_s: float
    vs_torch: float | None
    peak_fraction: float
    peak_rss_gib: float | None
    call_rss_gib: float | None


class Skipped(_Schema):
    """A backend (stage None: every stage) or one stage of it that was not measured, and why."""

    backend: BenchBackend
    stage: str | None
    reason: str


class GenerateResult(_Schema):
    """`generate` end to end on one backend: wall seconds per run, the seconds inside the runners' `infer`, the
    rest (the host's share), calls per stage of one run, and the process's peak resident memory (GiB) over the
    runs."""

    backend: Literal["onnxruntime", "torch"]
    prompt: str | None
    calls: dict[str, int]
    seconds: tuple[float, ...]
    infer_seconds: tuple[float, ...]
    median_s: float
    outside_infer_fraction: float  # of the median run
    peak_rss_gib: float | None


class BenchReport(_Schema):
    artifacts: str
    preset: str
    machine: str
    versions: dict[str, str]
    threads: int
    repeats: int
    warmup: int
    matmul_gflops_per_s: float  # median of the run's float32 matmuls
    rows: tuple[StageResult, ...]
    skipped: tuple[Skipped, ...]
    generate: tuple[GenerateResult, ...]
    generate_speedup: float | None  # torch's median generate / onnxruntime's


# ------------------------------------------------------------------------------------------------------ memory
def _measure_memory(call: Callable[[], object]) -> tuple[float | None, float | None]:
    """(peak RSS during `call()`, its rise over the RSS before) in GiB, or (None, None) where unmeasurable."""
    before = read_status("VmRSS")
    if before is None or not reset_peak():
        call()
        return None, None
    call()
    peak = read_status("VmHWM")
    return peak / 2**30, max(peak - before, 0) / 2**30


# ----------------------------------------------------------------------------------------------------- runners
class _Target:
    """One (stage, backend) to time: an open runner and the feeds of its calls."""

    def __init__(self, stage: str, backend: str, runner: Runner, file: str | None):
        self.stage, self.backend, self.runner, self.file = stage, backend, runner, file
        self.seconds: list[float] = []
        self.memory: tuple[float | None, float | None] = (None, None)


def _torch_runner(backend: str, spec, module) -> Runner:
    import torch

    from walt_export.torch_runner import TorchRunner

    if backend == "torch-compile":
        module = torch.compile(module.eval())
    return TorchRunner(module, spec)


def _compile_unavailable() -> str | None:
    """Why torch.compile cannot run here, or None."""
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        return f"torch.compile's CPU backend (inductor) needs a C++ compiler; {compiler} is not on PATH"
    return None


def _open_targets(options: BenchOptions, manifest: Manifest, stages: list[str], stack: ExitStack
                  ) -> tuple[list[_Target], list[Skipped]]:
    from walt_export.export_specs import export_specs
    from walt_export.torch_runner import reference_components

    targets, skipped = [], []
    cfg, components = reference_components(manifest)
    specs = export_specs(cfg)
    modules: dict[str, object] = {}
    for backend in options.backends:
        if backend == "torch-compile" and (reason := _compile_unavailable()):
            skipped.append(Skipped(backend=backend, stage=None, reason=reason))
            continue
        if backend in _ONNXRUNTIME_PRECISION:
            try:
                manifest.require_files(_ONNXRUNTIME_PRECISION[backend], options.artifacts)
            except ArtifactError as e:
                skipped.append(Skipped(backend=backend, stage=None, reason=str(e)))
                continue
        if backend == "tensorrt":
            if shutil.which("nvidia-smi") is None:
                skipped.append(Skipped(backend=backend, stage=None,
                                       reason="no CUDA GPU here (no nvidia-smi): TensorRT plans run on a GPU; run the "
                                              "bench on the GPU machine, after `walt-export engines` there"))
                continue
            try:
                from runtime.engine_registry import find_plan, import_tensorrt

                trt = import_tensorrt()
                plans = {name: find_plan(options.artifacts, name, manifest.stage(name).precision.resolve("fp16"), trt,
                                         requested="fp16") for name in stages}
            except WaltExportError as e:  # no TensorRT, no GPU, no plans: say so, measure the rest
                skipped.append(Skipped(backend=backend, stage=None, reason=str(e)))
                continue
        for name in stages:
            stage = manifest.stage(name)
            if backend in ("torch", "torch-compile"):
                spec = specs[name]
                if spec.component not in modules:
                    modules[spec.component] = components(spec.component)
                runner, file = _torch_runner(backend, spec, spec.module_of(modules[spec.component])), None
            elif backend == "tensorrt":
                runner, file = make_runner("tensorrt", plans[name]), plans[name].name
            else:
                precision = _ONNXRUNTIME_PRECISION[backend]
                runs = stage.precision.resolve(precision)
                if runs != precision:
                    skipped.append(Skipped(backend=backend, stage=name,
                                           reason=f"runs {runs} by its precision policy: {stage.precision.reason}"))
                    continue
                entry = onnxruntime_file(stage, precision)
                path = check_file(options.artifacts, entry)
                runner = make_runner("onnxruntime", path, "cpu", options.threads, wants_memory_arena(stage))
                file = entry.file
            targets.append(_Target(name, backend, stack.enter_context(runner), file))
    return targets, skipped


def sample_feeds(cfg: CascadeConfig, stages: list[str], seed: int) -> dict[str, dict[str, np.ndarray]]:
    """Per stage, its export spec's seeded sample inputs at the batch `generate` uses, as numpy arrays by input name."""
    import torch

    from walt_export.export_specs import BATCH, export_specs

    specs, feeds = export_specs(cfg), {}
    for name in stages:
        inputs = specs[name].sample_inputs(torch.Generator().manual_seed(seed), **{BATCH: generate_batch(cfg, name)})
        feeds[name] = {t.name: x.numpy() for t, x in zip(specs[name].inputs, inputs, strict=True)}
    return feeds


def matmul_seconds(size: int = MATMUL_SIZE) -> float:
    """Seconds of one float32 size x size x size `torch.mm` (PyTorch's CPU BLAS, all threads), after one untimed;
    2 size^3 / seconds is the matmul peak stage rates are judged against."""
    import torch

    a = torch.randn(size, size, generator=torch.Generator().manual_seed(0))
    b = torch.randn(size, size, generator=torch.Generator().manual_seed(1))
    torch.mm(a, b)
    start = time.perf_counter()
    torch.mm(a, b)
    return time.perf_counter() - start


# ------------------------------------------------------------------------------------------------------- bench
def bench(options: BenchOptions, progress: Callable[[str], None] | None = None) -> BenchReport:
    """Measure what `options` asks (see the module docstring).

    Raises ArtifactError for a missing or modified artifact, UsageError for an unknown stage."""
    import torch

    manifest = read_manifest(options.artifacts)
    cfg = CascadeConfig.model_validate(manifest.config)
    stages = list(options.stages or manifest.stages)
    unknown = [s for s in stages if s not in manifest.stages]
    if unknown:
        raise UsageError(f"unknown stages {', '.join(unknown)}; this artifact has: {', '.join(manifest.stages)}")
    if options.threads:
        torch.set_num_threads(options.threads)
    flops = stage_flops(cfg)
    feeds = sample_feeds(cfg, stages, options.seed)
    say = progress or (lambda message: log.info("%s", message))
    matmuls: list[float] = []
    with ExitStack() as stack:
        targets, skipped = _open_targets(options, manifest, stages, stack)
        if not targets:
            raise UsageError("nothing to time: every backend was skipped (" + "; ".join(
                f"{s.backend}{'' if s.stage is None else ' ' + s.stage}: {s.reason}" for s in skipped) + ")")
        for repeat in range(options.warmup + options.repeats):
            counted = repeat >= options.warmup
            matmuls.append(matmul_seconds())
            for name in stages:
                row = [t for t in targets if t.stage == name]
                shift = repeat % max(len(row), 1)
                for target in row[shift:] + row[:shift]:
                    call = lambda t=target: t.runner.infer(feeds[t.stage])  # noqa: E731
                    if repeat == options.warmup - 1:  # after any compilation
                        target.memory = _measure_memory(call)
                        continue
                    start = time.perf_counter()
                    call()
                    if counted:
                        target.seconds.append(time.perf_counter() - start)
            say(f"repeat {repeat + 1} of {options.warmup + options.repeats}" + ("" if counted else " (warm-up)"))
    peak = 2 * MATMUL_SIZE**3 / statistics.median(matmuls[options.warmup:]) / 1e9
    rows = _rows(targets, flops, cfg, peak)
    generate = _generate(options, manifest, say) if options.generate_repeats else ()
    by_backend = {g.backend: g.median_s for g in generate}
    return BenchReport(
        artifacts=str(options.artifacts), preset=cfg.name, machine=f"{platform.machine()}, {os.cpu_count()} cores",
        versions=_versions(), threads=options.threads, repeats=options.repeats, warmup=options.warmup,
        matmul_gflops_per_s=peak, rows=rows, skipped=tuple(skipped), generate=generate,
        generate_speedup=by_backend["torch"] / by_backend["onnxruntime"] if len(by_backend) == 2 else None)


def _rows(targets: list[_Target], flops: dict[str, int], cfg: CascadeConfig, peak: float) -> tuple[StageResult, ...]:
    eager = {t.stage: statistics.median(t.seconds) for t in targets if t.backend == "torch"}
    rows = []
    for t in targets:
        latency = Latency.of(t.seconds)
        rate = flops[t.stage] / (latency.median_ms / 1e3) / 1e9
        rows.append(StageResult(
            stage=t.stage, backend=t.backend, batch=generate_batch(cfg, t.stage), file=t.file, latency=latency,
            flops=flops[t.stage], gflops_per_s=rate,
            vs_torch=eager[t.stage] / (latency.median_ms / 1e3) if t.stage in eager else None,
            peak_fraction=rate / peak, peak_rss_gib=t.memory[0], call_rss_gib=t.memory[1]))
    return tuple(rows)


def _generate(options: BenchOptions, manifest: Manifest, say: Callable[[str], None]) -> tuple[GenerateResult, ...]:
    """`generate` interleaved on onnxruntime and PyTorch; see the module docstring."""
    from runtime.pipeline import Pipeline
    from walt_export.torch_runner import torch_pipeline

    text = manifest.text is not None
    prompt = (("a red circle moving left" if manifest.trained_on == "world" else "a corgi surfing a wave")
              if text else None)
    request = {"prompt": prompt} if text else {"class_id": 0}
    pipelines = {"onnxruntime": Pipeline.from_artifacts(options.artifacts, threads=options.threads),
                 "torch": torch_pipeline(options.artifacts)}
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in pipelines}
    peaks: dict[str, float | None] = {}
    calls = {}
    with ExitStack() as stack:
        for pipeline in pipelines.values():  # open every runner and make its first calls, uncounted
            stack.enter_context(pipeline).generate(**request, seed=options.seed, steps=1)
        for repeat in range(options.generate_repeats):
            order = list(pipelines) if repeat % 2 == 0 else list(pipelines)[::-1]
            for name in order:
                pipeline = pipelines[name]
                pipeline.timings.clear()
                start = time.perf_counter()
                peak, _ = _measure_memory(lambda p=pipeline: p.generate(**request, seed=options.seed,
                                                                        steps=options.steps))
                seconds = time.perf_counter() - start
                peaks[name] = max(filter(None, (peaks.get(name), peak)), default=None)
                runs[name].append((seconds, sum(t.seconds for t in pipeline.timings.values())))
                calls[name] = {stage: time_spent.calls for stage, time_spent in pipeline.timings.items()}
                say(f"generate on {name}: {seconds:.1f} s")
    results = []
    for name, measured in runs.items():
        seconds = [s for s, _ in measured]
        median = statistics.median(seconds)
        index = seconds.index(min(seconds, key=lambda s: abs(s - median)))
        results.append(GenerateResult(
            backend=name, prompt=prompt, calls=calls[name], seconds=tuple(seconds),
            infer_seconds=tuple(i for _, i in measured), median_s=median,
            outside_infer_fraction=1 - measured[index][1] / measured[index][0], peak_rss_gib=peaks[name]))
    return tuple(results)


def _versions() -> dict[str, str]:
    import importlib.metadata

    versions = {}
    for package in ("torch", "onnxruntime", "numpy", "tensorrt", "tensorrt_rtx"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


# ------------------------------------------------------------------------------------------------------ report
def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def format_report(report: BenchReport) -> str:
    """The report as the CLI prints it: one table of stages x backends, skipped backends, end to end."""
    lines = [f"{report.artifacts} ({report.preset}) on {report.machine}; "
             + ", ".join(f"{k} {v}" for k, v in report.versions.items()),
             f"{_count(report.repeats, 'repeat')} after {_count(report.warmup, 'warm-up')}, backends interleaved; "
             f"threads {report.threads or 'default'}; float32 matmul peak {report.matmul_gflops_per_s:.1f} GFLOP/s "
             "(median)",
             "",
             f"{'stage':<23}{'backend':<18}{'batch':>5}{'median ms':>11}{'p10':>9}{'p90':>9}{'GFLOP':>9}"
             f"{'GFLOP/s':>9}{'of peak':>8}{'vs torch':>9}{'RSS GiB':>9}{'call +':>8}"]
    for r in report.rows:
        gb = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        lines.append(f"{r.stage:<23}{r.backend:<18}{r.batch:>5}{r.latency.median_ms:>11.1f}{r.latency.p10_ms:>9.1f}"
                     f"{r.latency.p90_ms:>9.1f}{r.flops / 1e9:>9.2f}{r.gflops_per_s:>9.1f}{r.peak_fraction:>8.0%}"
                     f"{'-' if r.vs_torch is None else f'{r.vs_torch:.2f}x':>9}{gb(r.peak_rss_gib):>9}"
                     f"{gb(r.call_rss_gib):>8}")
    for s in report.skipped:
        lines.append(f"skipped {s.backend}{'' if s.stage is None else ' ' + s.stage}: {s.reason}")
    for g in report.generate:
        peak = "-" if g.peak_rss_gib is None else f"{g.peak_rss_gib:.2f} GiB"
        lines.append(f"generate on {g.backend}: median {g.median_s:.2f} s over {_count(len(g.seconds), 'run')}, "
                     f"{g.outside_infer_fraction:.1%} outside infer, peak RSS {peak}")
    if report.generate_speedup is not None:
        lines.append(f"generate: onnxruntime is {report.generate_speedup:.2f}x PyTorch eager end to end")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------- paper
class PaperReport(_Schema):
    """The FLOP model's cost of one clip (`walt_export.flops.cascade_flops`) and the seconds it takes at least at
    each peak of `walt_export.flops.PEAKS` (every FLOP at the peak rate; no memory traffic, no overhead)."""

    cost: CascadeCost
    pflop_per_clip: float
    lower_bound_s: dict[str, float]


def paper_report(cfg: CascadeConfig, steps: int) -> PaperReport:
    cost = cascade_flops(cfg, steps)
    return PaperReport(cost=cost, pflop_per_clip=cost.flops / 1e15,
                       lower_bound_s={name: cost.seconds_at(peak) for name, peak in PEAKS.items()})


def format_paper(report: PaperReport, cfg: CascadeConfig) -> str:
    cost = report.cost
    big = cost.flops >= 1e15  # paper scale: TFLOP per call, PFLOP per clip; else GFLOP and TFLOP
    (call_unit, per_call), (clip_unit, per_clip) = (("TFLOP", 1e12), ("PFLOP", 1e15)) if big else \
        (("GFLOP", 1e9), ("TFLOP", 1e12))
    lines = [f"{cost.preset}: one {cfg.frames}x{cfg.height}x{cfg.width} clip, {cost.steps} steps per denoiser, "
             f"classifier-free guidance {'on (batch 2 per call)' if cost.guidance else 'off'}, the decoder on the "
             "whole clip (FLOP model, walt_export/flops.py)",
             f"{'stage':<20}{'calls':>6}{'batch':>6}{call_unit + '/call':>12}{clip_unit + '/clip':>12}{'share':>7}"]
    for s in cost.stages:
        lines.append(f"{s.stage:<20}{s.calls:>6}{s.batch:>6}{s.flops_per_call / per_call:>12.4g}"
                     f"{s.flops / per_clip:>12.4g}{s.flops / cost.flops:>7.1%}")
    lines.append(f"{'total':<44}{cost.flops / per_clip:>12.4g}")
    for name, seconds in report.lower_bound_s.items():
        bound = f"{seconds:.3g} s" if seconds >= 1 else f"{seconds * 1e3:.3g} ms"
        lines.append(f"lower bound at {name} ({PEAKS[name] / 1e12:.0f} TFLOP/s): {bound} per clip")
    return "\n".join(lines)
