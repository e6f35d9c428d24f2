"""`walt-export` (also `python export.py`): command-line entry point.

    walt-export summary [--preset tiny] [--checkpoint PATH] [--meta]   build a cascade and print its parts
    walt-export init --preset NAME --out PATH.safetensors [--seed N]   write a seeded random-init checkpoint
    walt-export onnx --preset NAME --out DIR [--checkpoint PATH] [--fp16]   export every model to an artifact
    walt-export verify --artifacts DIR [--checkpoint PATH]   onnxruntime vs PyTorch for every model and variant
    walt-export calibrate --artifacts DIR [--samples 4] [--method percentile]   INT8 Q/DQ files + quality report
    walt-export engines --artifacts DIR [--precision fp16] [--attention auto]   TensorRT engines + registry
    walt-export score --artifacts DIR [--backend onnxruntime] [--prompts 8] [--json OUT]   prompt adherence (world)
    walt-export bench --artifacts DIR [--backends torch,onnxruntime] [--repeats 5] [--json OUT]   speed, side by side
    walt-export bench --paper [--preset t2v] [--steps 50]   FLOPs per clip and the lower bound at H100/H200 peaks
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path
from typing import get_args

from runtime.cli import run_command, version
from runtime.engine_registry import ATTENTION, ENGINE_PRECISIONS
from runtime.errors import UsageError
from runtime.manifest import Precision
from runtime.request import Count, Gigabytes, Seed, Steps, Threads, parse_as
from runtime.score import MODES, Backend
from walt_export.bench import BENCH_BACKENDS, DEFAULT_BACKENDS
from walt_export.config import PRESETS

DEFAULT_PRESET = "tiny"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="walt-export", description="Build, export and compile W.A.L.T cascades.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    verbose = {"action": "store_true", "help": "log what the library does, and show the traceback of any error"}
    parser.add_argument("-v", "--verbose", **verbose)
    sub = parser.add_subparsers(dest="command", required=True)
    seed = {"type": parse_as(Seed), "default": 0, "help": "seed of the random weights, in [0, 2^63 - 1] (default 0)"}

    summary = sub.add_parser("summary", help="build a cascade (preset or checkpoint) and print its parts")
    source = summary.add_mutually_exclusive_group()
    source.add_argument("--preset", choices=list(PRESETS), default=None, help=f"default: {DEFAULT_PRESET}")
    source.add_argument("--checkpoint", help="a .safetensors cascade checkpoint (its .json beside it)")
    summary.add_argument("--meta", action="store_true", help="build on the meta device (no memory; paper presets)")
    random_seed = seed | {"default": None, "help": "seeded random weights, in [0, 2^63 - 1], instead of the preset's "
                                                   "trained reference weights (tiny has them; others: default 0)"}
    summary.add_argument("--seed", **random_seed)

    init = sub.add_parser("init", help="write a checkpoint of a preset with seeded random weights")
    init.add_argument("--preset", choices=list(PRESETS), default=DEFAULT_PRESET, help=f"default: {DEFAULT_PRESET}")
    init.add_argument("--out", required=True, help="path ending in .safetensors; the config goes beside it as .json")
    init.add_argument("--seed", **seed)

    onnx = sub.add_parser("onnx", help="export every model of a cascade to ONNX in an artifact directory")
    onnx.add_argument("--preset", choices=list(PRESETS), default=None,
                      help=f"default: {DEFAULT_PRESET}, or the checkpoint's own")
    onnx.add_argument("--checkpoint", help="a .safetensors cascade checkpoint (default: the preset's trained reference "
                                           "weights where it has them, else seeded random weights)")
    onnx.add_argument("--out", required=True, help="the artifact directory (new, empty, or the same artifact)")
    onnx.add_argument("--fp16", action="store_true", help="also write FP16 variants of every model")
    onnx.add_argument("--seed", **random_seed)

    verify = sub.add_parser("verify", help="compare every model of an artifact with PyTorch (onnxruntime, CPU)")
    verify.add_argument("--artifacts", required=True, help="an artifact directory written by `walt-export onnx`")
    verify.add_argument("--checkpoint", help="the checkpoint it was exported from, if it moved")
    verify.add_argument("--batches", type=parse_as(Count), nargs="+", default=[1, 2],
                        help="batch sizes to run, each >= 1 (default 1 2)")

    calibrate = sub.add_parser("calibrate", help="INT8 Q/DQ files of every stage, calibrated on the denoising loop, "
                                                 "with quality gates")
    calibrate.add_argument("--artifacts", required=True, help="an artifact directory written by `walt-export onnx`")
    calibrate.add_argument("--samples", type=parse_as(Count), default=4,
                           help="calibration generations, >= 1 (default 4)")
    calibrate.add_argument("--held-out", type=parse_as(Count), default=2,
                           help="held-out generations for the gates, >= 1 (default 2)")
    calibrate.add_argument("--prompts", help="a text file, one prompt per line (text artifacts; default: built in)")
    calibrate.add_argument("--method", choices=["minmax", "entropy", "percentile"], default="percentile",
                           help="activation ranges of the denoisers (the tokenizer uses minmax)")
    calibrate.add_argument("--timesteps", type=parse_as(Count), default=8,
                           help="denoiser steps kept per generation, spread over the schedule, in [1, the "
                                "schedule's steps] (default 8)")
    calibrate.add_argument("--seed", **seed | {"help": "seed of the calibration and held-out generations (default 0)"})
    calibrate.add_argument("--gate", action="append", default=[], metavar="NAME=VALUE",
                           help="override a gate (calibration.report.Gates): denoiser_min_cosine, denoiser_min_psnr_db, "
                                "tokenizer_min_cosine, tokenizer_min_psnr_db, min_video_psnr_db, max_flicker_ratio")
    calibrate.add_argument("--threads", type=parse_as(Threads), default=0,
                           help="onnxruntime CPU threads, >= 0 (0: it decides)")

    engines = sub.add_parser("engines", help="build one TensorRT engine per stage (reused while nothing changed)")
    engines.add_argument("--artifacts", required=True, help="an artifact directory written by `walt-export onnx`")
    engines.add_argument("--precision", choices=ENGINE_PRECISIONS, default="fp16",
                         help="default fp16 (FP16 ONNX files are derived from the FP32 ones when the artifact has "
                              "none); int8 needs `walt-export calibrate` first; the text encoder's plan is FP32 for "
                              "both")
    engines.add_argument("--attention", choices=ATTENTION, default="auto",
                         help="denoisers: auto (default: the standard ONNX Attention variant for FP16 plans where the "
                              "parser maps it, TensorRT >= 10.14 or TensorRT-RTX >= 1.7, else fallback), attention, "
                              "fallback (the inlined MatMul/Softmax body) or plugin (the wattn plugin)")
    engines.add_argument("--workspace-gb", type=parse_as(Gigabytes),
                         help="TensorRT workspace limit in GiB, > 0 (default: TensorRT's; Jetson: keep it small)")
    engines.add_argument("--timing-cache",
                         help="a timing-cache file, read and updated (full TensorRT; TensorRT-RTX has none)")
    engines.add_argument("--profile", choices=("dynamic", "static"), default="dynamic",
                         help="dynamic (default: batch 1..8 rows, the manifest's profile) or static: min = opt = max "
                              "at --batch N videos per call (2N rows for the denoisers and the text encoder, N for the "
                              "tokenizer), less activation memory, for edge devices; run them with `python -m runtime "
                              "... --backend tensorrt --static-batch N`")
    engines.add_argument("--batch", type=parse_as(Count), metavar="N",
                         help="videos per call of a static profile (with --profile static)")

    score = sub.add_parser("score", help="prompt adherence: generate world prompts with fixed seeds and print the "
                                         "colour, shape and direction accuracy, and the tokenizer's PSNR",
                           description="The world is the procedural video world the reference cascade is trained on "
                                       "(runtime/world.py, docs/reference.md): one red, green, blue or yellow circle, "
                                       "square or triangle moving left, right, up or down over a grey background, "
                                       "captioned like 'a red circle moving left'. Each video is read back by an "
                                       "analytic detector (runtime/detector.py).")
    score.add_argument("--artifacts", required=True, help="a text-to-video artifact directory (walt-export onnx)")
    score.add_argument("--backend", choices=get_args(Backend), default="onnxruntime",
                       help="onnxruntime (default, CPU), tensorrt (the plans of `walt-export engines`), or torch "
                            "(the PyTorch modules the artifact was exported from)")
    score.add_argument("--precision", choices=get_args(Precision),
                       help="default fp32 with onnxruntime and torch (torch runs fp32 only), fp16 with tensorrt")
    score.add_argument("--prompts", type=parse_as(Count), default=8,
                       help="world prompts per mode, >= 1; prompt i has seed i (default 8: every colour, shape and "
                            "direction twice or more)")
    score.add_argument("--clips", type=parse_as(Count), default=2,
                       help="held-out world clips for the tokenizer's PSNR, >= 1 (default 2)")
    score.add_argument("--steps", type=parse_as(Steps), help="DDIM steps of every denoiser, >= 1 (default: the "
                                                             "artifact's)")
    score.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                       help=f"what to score (default all): {', '.join(MODES)}")
    score.add_argument("--json", help="also write the report (every decision) to this .json file")
    score.add_argument("--threads", type=parse_as(Threads), default=0,
                       help="CPU threads per model, >= 0 (default 0: onnxruntime or PyTorch decides)")
    bench = sub.add_parser("bench", help="latency of every stage on every backend side by side, with FLOPs, a "
                                         "matmul peak measured in the same run, and generate end to end",
                           description="Measures an artifact (walt_export/bench.py says how), or with --paper reports "
                                       "the FLOP model's cost of one clip of a preset and its lower bound in seconds.")
    target = bench.add_mutually_exclusive_group(required=True)
    target.add_argument("--artifacts", type=Path, help="an artifact directory written by `walt-export onnx`")
    target.add_argument("--paper", action="store_true",
                        help="no measurement: the FLOPs of one clip of --preset (CFG, --steps per denoiser) and the "
                             "seconds it takes at least at H100/H200 dense peaks")
    bench.add_argument("--preset", choices=list(PRESETS), help="with --paper only (default t2v); an artifact has its "
                                                              "own cascade")
    bench.add_argument("--backends", type=_backend_list, default=None,
                       help=f"comma-separated, of {','.join(BENCH_BACKENDS)} (default: all; tensorrt needs a GPU "
                            "and `walt-export engines`: a backend that cannot run is listed as skipped, with why)")
    bench.add_argument("--stages", nargs="+", type=_stage_list,
                       help="stages to time, separated by spaces or commas (default: every stage of the artifact: "
                            "text_encoder, base, sr1, sr2, tokenizer_encoder, tokenizer_decoder, "
                            "tokenizer_decoder_step)")
    bench.add_argument("--repeats", type=parse_as(Count), help="counted calls per stage and backend, >= 1 (default 5)")
    bench.add_argument("--warmup", type=parse_as(Count), help="uncounted calls first, >= 1 (default 2)")
    bench.add_argument("--generate-repeats", type=parse_as(Threads),
                       help="end-to-end generate runs on onnxruntime and on PyTorch each (whatever --backends says), "
                            ">= 0 (default 1; 0: none)")
    bench.add_argument("--steps", type=parse_as(Steps),
                       help="DDIM steps of every denoiser end to end (default: the artifact's; with --paper 50)")
    bench.add_argument("--threads", type=parse_as(Threads),
                       help="CPU threads of onnxruntime and PyTorch, >= 0 (default 0: each decides; on a busy machine "
                            "PyTorch's default threads can make its rows swing several-fold: pin them)")
    bench.add_argument("--json", help="also write the report to this .json file")
    for command in sub.choices.values():  # -v after the command too
        command.add_argument("-v", "--verbose", **verbose, default=argparse.SUPPRESS)
    return parser


def _backend_list(value: str) -> tuple[str, ...]:
    backends = tuple(dict.fromkeys(b.strip() for b in value.split(",") if b.strip()))  # in order, once each
    unknown = [b for b in backends if b not in BENCH_BACKENDS]
    if unknown or not backends:
        raise argparse.ArgumentTypeError(f"unknown backends {', '.join(unknown) or '(none given)'}; choose from "
                                         f"{','.join(BENCH_BACKENDS)}")
    return backends


def _stage_list(value: str) -> list[str]:
    return [s.strip() for s in value.split(",") if s.strip()]


def _bench(args: argparse.Namespace) -> int:
    from runtime.files import check_output
    from walt_export.bench import BenchOptions, bench, format_paper, format_report, paper_report

    counts = {"repeats": args.repeats, "warmup": args.warmup, "generate_repeats": args.generate_repeats,
              "threads": args.threads}  # BenchOptions fields; None: not given, the default holds
    measuring = {"--backends": args.backends, "--stages": args.stages,
                 **{"--" + name.replace("_", "-"): value for name, value in counts.items()}}
    if args.paper and (given := [name for name, value in measuring.items() if value is not None]):
        raise UsageError(f"{', '.join(given)} measure an artifact; --paper measures nothing: drop them, or pass "
                         "--artifacts DIR instead of --paper")
    if args.artifacts and args.preset:
        raise UsageError("--preset goes with --paper; an artifact has its own cascade: drop --preset")
    if args.json:
        check_output(args.json, "--json", "file", suffix=".json")
    if args.paper:
        cfg = PRESETS[args.preset or "t2v"]
        report = paper_report(cfg, args.steps or 50)
        print(format_paper(report, cfg))
    else:
        stages = tuple(dict.fromkeys(s for group in args.stages for s in group)) if args.stages else None
        options = BenchOptions(artifacts=args.artifacts, backends=args.backends or DEFAULT_BACKENDS, stages=stages,
                               steps=args.steps, **{name: value for name, value in counts.items() if value is not None})
        report = bench(options, progress=print)
        print(format_report(report))
    if args.json:
        _write_report(args.json, report)
    return 0


def _write_report(path: str, report) -> None:
    """Write a command's pydantic report as JSON to `path` (already checked by `check_output`), atomically."""
    from runtime.files import atomic_output

    with atomic_output(path) as tmp:
        tmp.write_text(report.model_dump_json(indent=1) + "\n")
    print(f"wrote {path}")


def _engines(args: argparse.Namespace) -> int:
    from runtime.manifest import read_manifest
    from walt_export.engine_build import build_engines

    if args.profile == "static" and args.batch is None:
        raise UsageError("--profile static needs --batch N: the videos per call its plans are fixed to")
    if args.profile == "dynamic" and args.batch is not None:
        raise UsageError("--batch N sets the batch of a static profile: add --profile static (dynamic plans take "
                         "the manifest's batch range)")
    before = read_manifest(args.artifacts).precisions
    out, decisions = build_engines(args.artifacts, args.precision, args.attention, args.workspace_gb,
                                   args.timing_cache, static_batch=args.batch)
    if "fp16" in read_manifest(args.artifacts).precisions - before:
        print(f"derived FP16 ONNX files from the FP32 ones (the artifact was exported without --fp16) and listed "
              f"them in {Path(args.artifacts) / 'manifest.json'}")
    for d in decisions:
        why = f"  ({d.reason})" if d.built else ""
        memory = "" if d.entry.activation_bytes is None else f"  activations {d.entry.activation_bytes / 2**20:.1f} MiB"
        print(f"{d.stage:<23} {'built' if d.built else 'reused':<6} {d.plan.name}{memory}{why}")
    reported = [d.entry.activation_bytes for d in decisions]
    if all(a is not None for a in reported):
        print(f"activation memory of these plans, as the builder reported it: {sum(reported) / 2**30:.2f} GiB "
              "(one execution context each)")
    print(f"engines in {out}")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from calibration.calibrate import INT8_DIR, REPORT, calibrate_artifacts
    from calibration.report import Gates, format_report

    gates = Gates.parse(args.gate)
    prompts = None
    if args.prompts:
        path = Path(args.prompts)
        if not path.is_file():
            raise UsageError(f"no prompts file at {path}")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    report = calibrate_artifacts(args.artifacts, samples=args.samples, held_out=args.held_out, prompts=prompts,
                                 method=args.method, seed=args.seed, timesteps=args.timesteps, gates=gates,
                                 threads=args.threads, progress=print)
    print(format_report(report))
    print(f"wrote {Path(args.artifacts) / INT8_DIR / REPORT}")
    if report["failures"]:
        print("walt-export: INT8 gates missed; the INT8 files were not added to the manifest", file=sys.stderr)
        return 1
    print(f"INT8 files added to the manifest: run with `python -m runtime generate --artifacts {args.artifacts} "
          "--precision int8 ...`")
    return 0


def _score(args: argparse.Namespace) -> int:
    from runtime.files import check_output
    from runtime.pipeline import Pipeline
    from runtime.score import format_table, score_pipeline

    if args.json:
        check_output(args.json, "--json", "file", suffix=".json")
    if args.backend == "torch":
        if args.precision not in (None, "fp32"):
            raise UsageError(f"--backend torch runs the float32 PyTorch modules: pass --precision fp32 or leave it "
                             f"out, not {args.precision}")
        import torch

        from walt_export.torch_runner import torch_pipeline

        if args.threads:
            torch.set_num_threads(args.threads)
        pipeline = torch_pipeline(args.artifacts)
    else:
        pipeline = Pipeline.from_artifacts(args.artifacts, args.backend, precision=args.precision,
                                           threads=args.threads)
    with pipeline:
        report = score_pipeline(pipeline, args.prompts, clips=args.clips, steps=args.steps, modes=args.modes,
                                progress=print)
    print(format_table(report))
    if args.json:
        _write_report(args.json, report)
    return 0


def _checkpoint(args: argparse.Namespace) -> str | None:
    """The checkpoint a command's weights come from: --checkpoint, else the preset's trained reference weights
    unless --seed asks for random ones (`walt_export.reference`), else None (seeded random weights)."""
    from walt_export.reference import reference_checkpoint

    if args.checkpoint or args.seed is not None:
        return args.checkpoint
    trained = reference_checkpoint(args.preset or DEFAULT_PRESET)
    return str(trained) if trained else None


def _load_cascade(checkpoint: str):
    """The Cascade of a whole-cascade checkpoint; CheckpointError when it holds one part."""
    import walt_export

    cascade = walt_export.load(checkpoint)
    if not isinstance(cascade, walt_export.Cascade):
        raise walt_export.CheckpointError(f"{checkpoint} holds one part, not a cascade; this command needs a "
                                          "whole-cascade checkpoint (walt-export init)")
    return cascade


def _export(args: argparse.Namespace) -> int:
    import walt_export
    from runtime.manifest import SourceInfo, sha256_of
    from walt_export.cascade import build_component
    from walt_export.onnx_export import export_artifacts

    checkpoint = _checkpoint(args)
    if checkpoint:
        cascade = _load_cascade(checkpoint)
        if args.preset is not None and cascade.config.name != args.preset:
            raise walt_export.CheckpointError(
                f"{checkpoint} is a checkpoint of {cascade.config.name!r}, not {args.preset!r}; "
                f"pass --preset {cascade.config.name} or leave --preset out")
        path = Path(checkpoint).resolve()
        cfg, source = cascade.config, SourceInfo(checkpoint=str(path), sha256=sha256_of(path))
        components = lambda name: getattr(cascade, name)  # noqa: E731
    else:
        preset, seed = args.preset or DEFAULT_PRESET, args.seed or 0
        cfg, source = walt_export.PRESETS[preset], SourceInfo(preset=preset, seed=seed)
        components = lambda name: build_component(cfg, name, seed=seed)  # noqa: E731 (one at a time)
    manifest = export_artifacts(cfg, components, args.out, source, fp16=args.fp16)
    files = [f for stage in manifest.stages.values() for f in stage.files]
    print(f"wrote {args.out}: {len(manifest.stages)} models, {len(files)} files "
          f"({', '.join(manifest.stages)}); check them with: walt-export verify --artifacts {args.out}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from walt_export.verify import VERIFY_JSON, format_table, verify_artifacts

    checks = verify_artifacts(args.artifacts, args.checkpoint, tuple(args.batches))
    print(format_table(checks))
    print(f"wrote {Path(args.artifacts) / VERIFY_JSON}")
    return 0 if all(c.passed for c in checks) else 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # torch's exporter warns about its own internals
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
    return run_command("walt-export", args.verbose, lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    import walt_export

    if args.command == "summary":
        checkpoint = None if args.meta else _checkpoint(args)
        if checkpoint:
            cascade = _load_cascade(checkpoint)
            print(f"weights: {checkpoint}")
        else:
            cascade = walt_export.build(args.preset or DEFAULT_PRESET, seed=args.seed or 0,
                                        device="meta" if args.meta else "cpu")
        print(cascade.summary())
    elif args.command == "init":
        cascade = walt_export.build(args.preset, seed=args.seed)
        path = walt_export.save(cascade, args.out)
        print(f"wrote {path} and {path.with_suffix('.json').name} ({args.preset}, seed {args.seed})")
    elif args.command == "onnx":
        return _export(args)
    elif args.command == "verify":
        return _verify(args)
    elif args.command == "calibrate":
        return _calibrate(args)
    elif args.command == "engines":
        return _engines(args)
    elif args.command == "score":
        return _score(args)
    elif args.command == "bench":
        return _bench(args)
    return 0
