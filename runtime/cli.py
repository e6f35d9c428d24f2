"""`python -m runtime`: generate one video, or render a batch of jobs, from an artifact directory (no PyTorch).

    python -m runtime generate --artifacts DIR --prompt TEXT --out OUT.mp4 [--seed N] [--steps N] [--guidance S]
                               [--frames N] [--image PATH] [--class-id N] [--backend onnxruntime] [--device cpu]
                               [--low-memory] [--memory-report REPORT.json]
    python -m runtime render --artifacts DIR --jobs JOBS.jsonl --out-dir DIR [--batch N]
                             [--ray [ADDRESS] [--workers N] [--worker-cpus C] [--retries N]]
    python -m runtime serve --artifacts DIR [--host 127.0.0.1] [--port 8000] [--replicas N] [--ray ADDRESS]
                            [--token TOKEN] [--results-dir DIR] [--queue N] [--batch N] [--expire-after S]

`--ray` and `serve` run on a Ray cluster (the `ray` extra; docs/scaleout.md).

Videos are streamed into their mp4 as the decoder makes the frames, so no length is limited by memory.

Every value and every output location is checked before any model runs; a mistake is one line and exit 1 (a bad
flag value: argparse's line and exit 2), Ctrl-C exits 130 leaving no partial file.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, get_args

from pydantic import Field

from runtime.errors import UsageError, WaltExportError
from runtime.manifest import Precision
from runtime.pipeline import DECODE_CHUNK
from runtime.ray_cluster import LOCAL
from runtime.ray_render import RETRIES
from runtime.request import ClassId, Count, Frames, Guidance, Seed, Steps, Threads, parse_as
from runtime.runners import BACKENDS

PROG = "python -m runtime"
TOKEN_VARIABLE = "WALT_API_TOKEN"
Port = Annotated[int, Field(ge=1, le=65535)]
Seconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Cpus = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Retries = Annotated[int, Field(ge=0)]


def version() -> str:
    """walt-export's installed version."""
    import importlib.metadata

    try:
        return importlib.metadata.version("walt-export")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Run a W.A.L.T artifact.")
    parser.add_argument("--version", action="version", version=f"%(prog)s (walt-export) {version()}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log what the runtime does, and show the traceback of any error")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                       help="log what the runtime does, and show the traceback of any error")
        p.add_argument("--artifacts", required=True, help="an artifact directory (walt-export onnx)")
        p.add_argument("--backend", choices=BACKENDS, default="onnxruntime",
                       help="onnxruntime (default: the artifact's ONNX files) or tensorrt (the plans of "
                            "`walt-export engines`, on an NVIDIA GPU)")
        p.add_argument("--device", default="cpu", help="onnxruntime's device: cpu (default), cuda, or tensorrt "
                                                       "(its TensorRT execution provider)")
        p.add_argument("--precision", choices=get_args(Precision),
                       help="which files to run: default fp32 with onnxruntime (fp16: FP16 files, from an --fp16 "
                            "export or derived by `walt-export engines`; int8: calibrated with `walt-export "
                            "calibrate`), fp16 with tensorrt (its plans are fp16 or int8)")
        p.add_argument("--threads", type=parse_as(Threads), default=0,
                       help="CPU threads per model, >= 0 (default 0: onnxruntime decides)")
        p.add_argument("--low-memory", action="store_true",
                       help="hold one stage at a time: each model is opened for its stage and released after it "
                            "(for devices where the cascade's models do not fit together, e.g. Jetson Orin; slower)")
        p.add_argument("--decode-chunk", type=parse_as(Count), default=DECODE_CHUNK, metavar="N",
                       help=f"latent frames the decoder decodes per call (default {DECODE_CHUNK}: the first frames "
                            "soonest and the least memory; a whole clip's latent frames decode it in one call)")
        p.add_argument("--static-batch", type=parse_as(Count), metavar="N",
                       help="with --backend tensorrt: run the plans of `walt-export engines --profile static "
                            "--batch N` (N videos per call) instead of the dynamic ones")

    def local(p: argparse.ArgumentParser) -> None:
        """The options of the commands that write outputs from this process."""
        p.add_argument("--progress", choices=("auto", "on", "off"), default="auto",
                       help="progress bars on stderr, with steps per second and time left: auto (default: only "
                            "when stderr is a terminal), on, off")
        p.add_argument("-q", "--quiet", dest="progress", action="store_const", const="off",
                       help="no progress bars (--progress off)")
        p.add_argument("--memory-report", metavar="REPORT.json",
                       help="write what each stage held in memory (RSS; TensorRT: device memory) and the run's peak "
                            "to this JSON file, and print it as a table (not with --ray)")

    def cluster(p: argparse.ArgumentParser, default: str | None, workers: str) -> None:
        p.add_argument("--ray", nargs="?", const=LOCAL, default=default, metavar="ADDRESS",
                       help="the Ray cluster to run on: auto (the one `ray start` made here, or RAY_ADDRESS), "
                            "HOST:PORT or ray://HOST:PORT; without an address, a local one with this machine's CPUs "
                            "and GPUs" + (" (the default)" if default else ""))
        p.add_argument("--worker-cpus", type=parse_as(Cpus), default=1, metavar="C",
                       help=f"CPUs each CPU {workers} reserves and runs its models on (default 1; a GPU {workers} "
                            "reserves one GPU)")

    gen = sub.add_parser("generate", help="generate one video")
    common(gen)
    local(gen)
    gen.add_argument("--prompt", help="the text (text-to-video artifacts)")
    gen.add_argument("--class-id", type=parse_as(ClassId), help="the class (class-conditional artifacts)")
    gen.add_argument("--out", required=True, help="the .mp4 to write (replaced if it exists)")
    gen.add_argument("--png-dir", help="also write the frames as PNG files into this directory")
    gen.add_argument("--seed", type=parse_as(Seed), default=0,
                     help="seed of every noise draw, in [0, 2^63 - 1] (default 0)")
    gen.add_argument("--steps", type=parse_as(Steps), help="DDIM steps of every denoiser, >= 1 (default: the "
                                                           "manifest's, 50)")
    gen.add_argument("--guidance", type=parse_as(Guidance),
                     help="classifier-free guidance scale, finite and >= 0 (default: the manifest's; 1: none)")
    gen.add_argument("--frames", type=parse_as(Frames),
                     help="video length: one clip (default) or longer, e.g. 29 for 17-frame clips")
    gen.add_argument("--image", help="an image to start the video from (image-to-video; center-cropped to the "
                                     "video's aspect ratio)")

    render = sub.add_parser("render", help="render a JSONL file of jobs, resuming where a previous run stopped; "
                                           "several runs may share one --out-dir, or run it on a Ray cluster")
    common(render)
    local(render)
    render.add_argument("--jobs", required=True, help='one JSON object per line: {"prompt": ..., "seed": ..., '
                                                      '"output": "name.mp4"} (+ frames, steps, guidance, image, class_id)')
    render.add_argument("--out-dir", required=True, help="where the videos and results.jsonl go")
    render.add_argument("--batch", type=parse_as(Count), default=1,
                        help="generate up to N compatible jobs together (same frames, steps, guidance, image or "
                             "not), every model call on the whole batch (default 1)")
    cluster(render, None, "worker")
    render.add_argument("--workers", type=parse_as(Count), metavar="N",
                        help="with --ray: workers to start (default: one per GPU of the cluster, or its CPUs / "
                             "--worker-cpus for CPU runs)")
    render.add_argument("--retries", type=parse_as(Retries), default=RETRIES, metavar="N",
                        help=f"with --ray: times the jobs of a worker that died are given to another worker before "
                             f"they are recorded as failed (default {RETRIES})")

    serve = sub.add_parser("serve", help="serve an HTTP video API (POST /v1/videos) on Ray Serve")
    common(serve)
    cluster(serve, LOCAL, "replica")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every interface, "
                            "with --token)")
    serve.add_argument("--port", type=parse_as(Port), default=8000, help="port to listen on (default 8000)")
    serve.add_argument("--replicas", type=parse_as(Count), default=1,
                       help="generator replicas, each one Pipeline on one device (default 1)")
    serve.add_argument("--batch", type=parse_as(Count), default=1,
                       help="videos one replica generates together when requests arrive at once (default 1)")
    serve.add_argument("--queue", type=parse_as(Count), default=16,
                       help="videos waiting or in progress at most; more are refused with 429 (default 16)")
    serve.add_argument("--results-dir", default="walt-videos",
                       help="where the videos and their statuses go (default ./walt-videos); on a cluster, a path "
                            "every node shares")
    serve.add_argument("--expire-after", type=parse_as(Seconds), default=3600.0, metavar="SECONDS",
                       help="how long a finished video is kept (default 3600)")
    serve.add_argument("--token", default=os.environ.get(TOKEN_VARIABLE),
                       help=f"require 'Authorization: Bearer TOKEN' on every request (default: ${TOKEN_VARIABLE}, "
                            "which keeps it out of the process list; none: no token)")
    return parser


class StepBars:
    """A `Progress` callback drawing one tqdm bar per denoiser (steps, steps per second, time left) on stderr; a
    context manager that closes an unfinished bar (an error or Ctrl-C) before the command's last line."""

    def __init__(self, disable: bool | None, prefix: str = ""):
        """disable: True (off), False (on), None (only when stderr is a terminal, tqdm's rule)."""
        self.disable, self.prefix, self._bar = disable, prefix, None

    def __call__(self, denoiser: str, step: int, steps: int) -> None:
        from tqdm import tqdm

        if self._bar is None:
            self._bar = tqdm(total=steps, desc=f"{self.prefix}{denoiser:<5}", unit="step", disable=self.disable,
                             file=sys.stderr, dynamic_ncols=True)
        self._bar.update(step - self._bar.n)
        if step == steps:
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> StepBars:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    return run_command(PROG, args.verbose, lambda: _run(args))


def run_command(prog: str, verbose: bool, command: Callable[[], int]) -> int:
    """`command()`'s exit status under both CLIs' contract for failures (docs/architecture.md §8): a
    WaltExportError (a user mistake) is one line `PROG: error: ...` and 1, with its traceback under -v; Ctrl-C is one
    line and 130 (outputs are written atomically or staged, so nothing partial is left); anything else is a bug and
    keeps its traceback."""
    try:
        return command()
    except WaltExportError as e:
        if verbose:
            traceback.print_exc()
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    from runtime.files import check_output
    from runtime.pipeline import Pipeline, PipelineSettings

    settings = PipelineSettings(artifacts=args.artifacts, backend=args.backend, device=args.device,
                                precision=args.precision, threads=args.threads, low_memory=args.low_memory,
                                static_batch=args.static_batch, decode_chunk=args.decode_chunk)
    if args.command == "serve":
        return _serve(args, settings)
    disable = {"auto": None, "on": False, "off": True}[args.progress]
    if args.command == "generate":
        check_output(args.out, "--out", "file", suffix=".mp4")
        if args.png_dir:
            check_output(args.png_dir, "--png-dir", "directory")
    else:
        check_output(args.out_dir, "--out-dir", "directory")
        if args.ray is None:
            given = [flag for flag, value in (("--workers", args.workers), ("--retries", args.retries != RETRIES),
                                              ("--worker-cpus", args.worker_cpus != 1)) if value]
            if given:
                raise UsageError(f"{', '.join(given)}: only with --ray (a render on a Ray cluster)")
        elif args.memory_report:
            raise UsageError("--memory-report measures this process; with --ray the models run in the Ray workers")
        else:
            settings.check_files()  # a bad artifact is one line before Ray starts
            return _render_on_ray(args, settings, Pipeline.for_checks(args.artifacts), disable)
    if args.memory_report:
        check_output(args.memory_report, "--memory-report", "file", suffix=".json")
    with settings.open(memory_report=bool(args.memory_report)) as pipe:
        code = _generate(args, pipe, disable) if args.command == "generate" else _render(args, pipe, disable)
        if pipe.memory is not None:
            from runtime.files import atomic_output

            report = pipe.memory.report()
            with atomic_output(args.memory_report) as tmp:
                tmp.write_text(report.model_dump_json(indent=2) + "\n")
            print(report.table())
        return code


def _generate(args: argparse.Namespace, pipe, disable: bool | None) -> int:
    """One video, streamed into the mp4 (and PNGs) frame by frame as the decoder makes them."""
    from runtime.video import mp4_writer, write_pngs

    start = time.perf_counter()
    first, made = None, 0
    with StepBars(disable) as bars, mp4_writer(args.out, pipe.fps) as write:
        for frame in pipe.stream(args.prompt, class_id=args.class_id, seed=args.seed, steps=args.steps,
                                 guidance=args.guidance, frames=args.frames, image=args.image, progress=bars):
            first = first or time.perf_counter() - start
            write(frame[None])
            if args.png_dir:
                write_pngs(frame[None], args.png_dir, start=made)
            made += 1
    h, w, _ = frame.shape
    print(f"wrote {args.out}: {made} frames {w}x{h} @ {pipe.fps:g} fps in {time.perf_counter() - start:.1f} s "
          f"(the first frame after {first:.1f} s)")
    return 0


def _render(args: argparse.Namespace, pipe, disable: bool | None) -> int:
    from tqdm import tqdm

    from runtime.render import read_jobs, render

    jobs = read_jobs(args.jobs, pipe)
    results = []
    with tqdm(total=len(jobs), desc="jobs", unit="job", disable=disable, file=sys.stderr) as bar, \
            StepBars(disable) as bars:
        def per_batch(numbers: list[int]) -> StepBars:
            bars.prefix = f"line{'s' if len(numbers) > 1 else ''} {','.join(map(str, numbers))} "
            return bars

        for result in render(pipe, jobs, args.out_dir, per_batch, args.batch):
            results.append(result)
            bar.update()
    return _summary(results, args.out_dir)


def _render_on_ray(args: argparse.Namespace, settings, checker, disable: bool | None) -> int:
    """The jobs over a Ray cluster's workers (`runtime.ray_render`); a progress bar over jobs here."""
    from tqdm import tqdm

    from runtime.ray_cluster import connect, worker_resources
    from runtime.ray_render import render_on_ray
    from runtime.render import read_jobs

    jobs = read_jobs(args.jobs, checker)
    ray = connect(args.ray, args.verbose)
    results, workers = [], []
    with tqdm(total=len(jobs), desc="jobs", unit="job", disable=disable, file=sys.stderr) as bar:
        def started(where: str) -> None:
            workers.append(where)
            bar.set_postfix_str(f"{len(workers)} workers started")

        for result in render_on_ray(ray, settings, checker, jobs, args.out_dir,
                                    worker_resources(settings, args.worker_cpus), batch=args.batch,
                                    workers=args.workers, retries=args.retries, started=started):
            results.append(result)
            bar.update()
    return _summary(results, args.out_dir)


def _summary(results: list, out_dir: str) -> int:
    """render's last lines: what happened to the jobs, each failure's reason; 1 when any failed."""
    counts = {status: sum(r.status == status for r in results) for status in ("done", "skipped", "failed", "busy")}
    print(f"{counts['done']} rendered, {counts['skipped']} already done, {counts['busy']} left to another run "
          f"that held them, {counts['failed']} failed; results in {out_dir}/results.jsonl")
    for r in results:
        if r.status == "failed":
            print(f"  line {r.line}: {r.error}", file=sys.stderr)
    return 1 if counts["failed"] else 0


def _serve(args: argparse.Namespace, settings) -> int:
    """The HTTP API (`runtime.serve`) until Ctrl-C or SIGTERM."""
    import signal

    from runtime.errors import import_optional
    from runtime.files import check_output
    from runtime.ray_cluster import RAY_EXTRA, connect, import_ray, worker_resources, worker_settings

    check_output(args.results_dir, "--results-dir", "directory")
    settings.check_files()  # a bad artifact is one line before Ray starts
    import_ray()
    import_optional("ray.serve", RAY_EXTRA)  # Ray without its Serve part
    if args.ray == LOCAL:
        _check_port(args.host, args.port)
    connect(args.ray, args.verbose)
    from runtime.serve import ServeSettings, serving

    resources = worker_resources(settings, args.worker_cpus)
    config = ServeSettings(pipeline=worker_settings(settings, resources), resources=resources,
                           replicas=args.replicas, batch=args.batch, queue=args.queue,
                           results_dir=str(Path(args.results_dir).absolute()), expire_after=args.expire_after,
                           token=args.token or None)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill`, `docker stop`: shut down as for Ctrl-C
    with serving(config, args.host, args.port) as url:
        print(f"serving {args.artifacts} at {url}/v1/videos ({args.replicas} replica(s), "
              f"{'a token required' if config.token else 'no token'}); Ctrl-C stops", flush=True)
        if not config.token and args.host not in ("127.0.0.1", "localhost", "::1"):
            print(f"{PROG}: warning: listening on {args.host} without a token: anyone who reaches this port can "
                  f"generate videos (set ${TOKEN_VARIABLE})", file=sys.stderr)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print(f"{PROG}: stopping", file=sys.stderr)
    return 0


def _check_port(host: str, port: int) -> None:
    """UsageError when host:port cannot be listened on here (in use, or not an address of this machine)."""
    import socket

    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError as e:
            raise UsageError(f"--host {host} --port {port}: cannot listen there ({e.strerror}); pick another "
                             "--port, or stop what uses it") from None
