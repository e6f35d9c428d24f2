"""`python -m runtime`: generate one video, or render a batch of jobs, from an artifact directory (no PyTorch).

    python -m runtime generate --artifacts DIR --prompt TEXT --out OUT.mp4 [--seed N] [--steps N] [--guidance S]
                               [--frames N] [--image PATH] [--class-id N] [--backend onnxruntime] [--device cpu]
    python -m runtime render --artifacts DIR --jobs JOBS.jsonl --out-dir DIR
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import traceback
from typing import get_args

from runtime.errors import WaltExportError
from runtime.manifest import Precision
from runtime.runners import BACKENDS


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m runtime", description="Run a W.A.L.T artifact.")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log what the runtime does, and show the traceback of any error")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--artifacts", required=True, help="an artifact directory (walt-export onnx)")
        p.add_argument("--backend", choices=BACKENDS, default="onnxruntime")
        p.add_argument("--device", default="cpu", help="cpu, cuda, or tensorrt (onnxruntime's TensorRT EP)")
        p.add_argument("--precision", choices=get_args(Precision), default="fp32",
                       help="which files to run, default fp32 (fp16: an artifact exported with --fp16; int8: one "
                            "calibrated with `walt-export calibrate`; the TensorRT backend runs fp16 or int8 plans)")
        p.add_argument("--threads", type=int, default=0, help="CPU threads per model (0: onnxruntime decides)")
        p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

    gen = sub.add_parser("generate", help="generate one video")
    common(gen)
    gen.add_argument("--prompt", help="the text (text-to-video artifacts)")
    gen.add_argument("--class-id", type=int, help="the class (class-conditional artifacts)")
    gen.add_argument("--out", required=True, help="the .mp4 to write")
    gen.add_argument("--png-dir", help="also write the frames as PNG files into this directory")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--steps", type=int, help="DDIM steps of every denoiser (default: the manifest's, 50)")
    gen.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the manifest's)")
    gen.add_argument("--frames", type=int, help="video length: one clip (default) or longer, e.g. 29 for 17-frame clips")
    gen.add_argument("--image", help="an image to start the video from (image-to-video)")

    render = sub.add_parser("render", help="render a JSONL file of jobs, resuming where a previous run stopped")
    common(render)
    render.add_argument("--jobs", required=True, help='one JSON object per line: {"prompt": ..., "seed": ..., '
                                                      '"output": "name.mp4"} (+ frames, steps, guidance, image, class_id)')
    render.add_argument("--out-dir", required=True, help="where the videos and results.jsonl go")
    return parser


class ProgressBar:
    """`base  [#####.....] 12/50` on stderr, one line per denoiser."""

    def __init__(self, prefix: str = ""):
        self.prefix = prefix

    def __call__(self, denoiser: str, step: int, steps: int) -> None:
        done = int(20 * step / steps)
        end = "\n" if step == steps else ""
        print(f"\r{self.prefix}{denoiser:<5} [{'#' * done}{'.' * (20 - done)}] {step}/{steps}", end=end, file=sys.stderr,
              flush=True)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from runtime.pipeline import Pipeline
    from runtime.render import read_jobs, render

    try:
        with Pipeline.from_artifacts(args.artifacts, args.backend, args.device, args.precision, args.threads) as pipe:
            if args.command == "generate":
                from runtime.video import read_image

                image = None if args.image is None else read_image(args.image, (pipe.manifest.height,
                                                                               pipe.manifest.width))
                start = time.perf_counter()
                video = pipe.generate(args.prompt, class_id=args.class_id, seed=args.seed, steps=args.steps,
                                      guidance=args.guidance, frames=args.frames, image=image,
                                      progress=None if args.quiet else ProgressBar())
                path = video.save(args.out)
                if args.png_dir:
                    video.save(args.png_dir)
                t, h, w, _ = video.frames.shape
                print(f"wrote {path}: {t} frames {w}x{h} @ {video.fps:g} fps in {time.perf_counter() - start:.1f} s")
                return 0
            jobs = read_jobs(args.jobs, pipe)
            progress = None if args.quiet else (lambda number, job: ProgressBar(f"line {number} "))
            results = render(pipe, jobs, args.out_dir, progress)
    except WaltExportError as e:  # a user mistake: one line (anything else is a bug and keeps its traceback)
        if args.verbose:
            traceback.print_exc()
        print(f"python -m runtime: error: {e}", file=sys.stderr)
        return 1
    counts = {status: sum(r["status"] == status for r in results) for status in ("done", "skipped", "failed")}
    print(f"{counts['done']} rendered, {counts['skipped']} already done, {counts['failed']} failed; "
          f"results in {args.out_dir}/results.jsonl")
    for r in results:
        if r["status"] == "failed":
            print(f"  line {r['line']}: {r['error']}", file=sys.stderr)
    return 1 if counts["failed"] else 0
