"""Calibration data from the denoising loop itself: what each stage of the FP32 cascade really sees.

The FP32 artifact runs in the runtime's own `Pipeline` (onnxruntime, CPU) with every runner wrapped in a
`RecordingRunner`, so the recorded feeds are exactly the stage inputs of a real generation: CFG's 2B batch,
self-conditioning, noise-augmented low-resolution latents. Per request and denoiser, the calls kept are
spread evenly over the whole schedule, first (pure noise) and last step included, since early and late steps
differ by orders of magnitude. The decoder gets the cascade's final latents (and its step model the same
latents continuing from the decoder's causal state); the encoder gets real video (`real_video`), or world clips
for a cascade trained on the world (`runtime.world`, whose captions are then also the default prompts).
Everything is seeded: the same requests give the same data.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from calibration.real_video import video_clips
from runtime.manifest import Manifest, check_file, read_manifest
from runtime.pipeline import OVERLAP_LATENT_FRAMES, Pipeline, Video
from runtime.runners import Runner, make_runner
from runtime.video import to_video
from runtime.world import sample_clips, scenes

log = logging.getLogger(__name__)

Feeds = dict[str, np.ndarray]
DEFAULT_PROMPTS = (
    "a corgi surfing a wave at sunset",
    "a busy city street at night, neon lights reflecting on wet asphalt",
    "a close-up of a hummingbird drinking from a red flower",
    "an astronaut riding a horse across the desert",
    "timelapse of clouds rolling over snowy mountains",
    "a chef slicing vegetables in a bright kitchen",
    "a sailboat on a calm lake, drone shot",
    "fireworks exploding over a river",
    "a cat playing with a ball of yarn on a wooden floor",
    "waves crashing against a lighthouse in a storm",
    "a steam train crossing a stone bridge in autumn",
    "an underwater coral reef with a school of fish",
)


@dataclass(frozen=True)
class Request:
    """One generation of the FP32 cascade: a prompt or a class (or neither) and its seed."""

    prompt: str | None
    class_id: int | None
    seed: int


class RecordingRunner:
    """A runner that keeps a copy of every feed (and output) it is given, in call order."""

    def __init__(self, runner: Runner, calls: list[tuple[Feeds, Feeds]]):
        self.runner, self.calls = runner, calls

    def __enter__(self) -> RecordingRunner:
        self.runner.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.runner.__exit__(*exc)

    def infer(self, feeds: Feeds) -> Feeds:
        outputs = self.runner.infer(feeds)
        self.calls.append(({k: np.array(v, copy=True) for k, v in feeds.items()}, outputs))
        return outputs


def default_prompts(manifest: Manifest) -> list[str]:
    """The prompts calibration uses unless given some: the world's captions (in the score's order, so the first
    few cover every colour, shape and direction) for a cascade trained on `runtime.world`, else DEFAULT_PROMPTS."""
    if manifest.trained_on == "world":
        from runtime.score import score_prompts

        return [scene.caption for scene in score_prompts(len(scenes()))]
    return list(DEFAULT_PROMPTS)


def encoder_clips(manifest: Manifest, count: int, seed: int) -> list[np.ndarray]:
    """`count` clips (1, 3, frames, H, W) float32 in [-1, 1] at the artifact's size for the tokenizer encoder: world
    clips (seeds `seed`, `seed` + 1, ...) for a cascade trained on `runtime.world`, else real video."""
    if manifest.trained_on == "world":
        return [to_video(clip.render(manifest.frames, manifest.height, manifest.width))
                for clip in sample_clips(count, seed, aspect=manifest.width / manifest.height)]
    return video_clips(count, manifest.frames, manifest.height, manifest.width, manifest.fps, seed)


def requests(manifest: Manifest, count: int, seed: int, prompts: list[str] | None = None,
             offset: int = 0) -> list[Request]:
    """`count` requests suited to the artifact (prompts, classes or none), seeds `seed + offset + i`.

    The i-th request takes prompt (or class) `offset + i`, so `offset` keeps held-out requests apart from the
    calibration ones.
    """
    base = manifest.stage("base").denoiser
    out = []
    for i in range(offset, offset + count):
        prompt = class_id = None
        if base.conditioning == "text":
            pool = prompts or default_prompts(manifest)
            prompt = pool[i % len(pool)]
        elif base.conditioning == "class":
            class_id = (i * 7919) % base.num_classes  # spread over the classes
        out.append(Request(prompt, class_id, seed + i))
    return out


def spread(n: int, k: int) -> list[int]:
    """Up to `k` indices into `n` steps, evenly spaced from the first to the last."""
    return sorted({int(round(x)) for x in np.linspace(0, n - 1, min(k, n))})


def capture(directory: str | Path, reqs: list[Request], timesteps: int = 8, threads: int = 0,
            progress: Callable[[str], None] | None = None) -> tuple[dict[str, list[Feeds]], list[Video]]:
    """Run the FP32 cascade for each request; returns (stage -> recorded feeds, the FP32 videos).

    Args:
        timesteps: calls kept per request and denoiser, spread over the schedule.
        progress: called with a line after each request.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    calls: dict[str, list[tuple[Feeds, Feeds]]] = defaultdict(list)

    def runner_for(name: str) -> Runner:
        path = check_file(directory, manifest.stage(name).file("fp32"))
        return RecordingRunner(make_runner("onnxruntime", path, threads=threads), calls[name])

    data: dict[str, list[Feeds]] = defaultdict(list)
    videos = []
    # The decoder gets each clip whole (one call), as its calibration data: the runtime's streaming chunks are
    # slices of the same activations.
    with Pipeline(manifest, runner_for, directory, decode_chunk=manifest.latent.frames) as pipeline:
        for request in reqs:
            videos.append(pipeline.generate(request.prompt, class_id=request.class_id, seed=request.seed))
            for name in pipeline.denoisers:
                steps = [feeds for feeds, _ in calls[name]]
                data[name] += [steps[i] for i in spread(len(steps), timesteps)]
            (latent, decoded), = [(f["latent"], out) for f, out in calls["tokenizer_decoder"]]
            data["tokenizer_decoder"].append({"latent": latent})
            if "tokenizer_decoder_step" in manifest.stages:  # a continuation: the same latents after the state
                state = {k.replace("next_", "", 1): v for k, v in decoded.items() if k.startswith("next_state")}
                data["tokenizer_decoder_step"].append({"latent": latent[:, :, OVERLAP_LATENT_FRAMES:], **state})
            for recorded in calls.values():  # each runner keeps appending to its own list
                recorded.clear()
            if progress is not None:
                progress(f"captured {request}")
    if "tokenizer_encoder" in manifest.stages:
        seed = reqs[0].seed if reqs else 0
        data["tokenizer_encoder"] = [{"video": clip} for clip in encoder_clips(manifest, len(reqs), seed)]
    return dict(data), videos

