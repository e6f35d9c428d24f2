"""The prompt-adherence score: does a cascade draw what its prompt says? (numpy and pydantic; no PyTorch)

It renders a fixed set of world prompts (`score_prompts`, e.g. 'a red circle moving left') with fixed seeds (prompt
i: seed i) and reads every video back with the analytic detector (`runtime.detector`), in three modes:

- text-to-video: the caption alone; every frame is read.
- image-to-video: the caption and, as the first frame, frame 0 of a held-out world clip of the same scene; only
  the generated frames (1 ..) are read: are the direction, colour and shape kept?
- long-video: one clip continued once (`Pipeline.lengths`: one + new frames, 29 for 17-frame clips); only the
  continuation's frames (one ..) are read: is the direction kept across the continuation? Skipped (with a warning)
  for an artifact that makes one clip only.

It prints colour, shape and direction accuracy per mode, plus the tokenizer's reconstruction PSNR on held-out world
clips (`runtime.world`: the world the reference cascade is trained on, `training/`).

    with Pipeline.from_artifacts("artifacts/tiny") as pipeline:
        report = score_pipeline(pipeline, 8)
    print(format_table(report))              # also `walt-export score --artifacts DIR`
    agreement(report, torch_report)          # same decisions on two backends: fraction of prompts

Everything is seeded, so two runs of one artifact on one backend make the same decisions, and two backends (PyTorch
and onnxruntime) can be compared decision by decision (`agreement`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal, get_args

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, computed_field, model_validator

from runtime.compare import psnr
from runtime.detector import detect
from runtime.errors import UsageError
from runtime.manifest import Precision
from runtime.pipeline import Pipeline
from runtime.request import Seed, Steps
from runtime.video import to_video
from runtime.world import COLOURS, DIRECTIONS, SHAPES, Clip, Colour, Direction, Scene, Shape, sample_clips

log = logging.getLogger(__name__)

Mode = Literal["text-to-video", "image-to-video", "long-video"]
MODES: tuple[str, ...] = get_args(Mode)
Backend = Literal["onnxruntime", "tensorrt", "torch"]  # torch: `walt_export.torch_runner.torch_pipeline`
Accuracy = Annotated[float, Field(ge=0.0, le=1.0)]

# Seeds of the held-out world clips (image-to-video first frames, tokenizer PSNR): HELD_OUT_SEED + i. Training draws
# its tokenizer crops from seeds in [0, 2**62) (`training.data.tokenizer_crop`) and its latent clips from small seeds
# (`sample_clips(count, seed)`), so these clips are none of the training clips.
HELD_OUT_SEED = 2**62


class Decision(BaseModel):
    """What the detector read in one generation, against the scene its caption names.

    mode: how it was generated; seed: its seed; expected: the scene prompted (its `caption` is the prompt);
    colour, shape, direction: what `runtime.detector.detect` read in the frames scored (None: not found). The
    caption and the `*_correct` flags are derived: written to JSON for readers, recomputed (never read) on load.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: Mode
    seed: Seed
    expected: Scene
    colour: Colour | None
    shape: Shape | None
    direction: Direction | None

    @model_validator(mode="before")
    @classmethod
    def _drop_derived(cls, data: Any) -> Any:
        """JSON of `model_dump` carries the computed fields below; they are recomputed, so dropped here."""
        derived = ("caption", "colour_correct", "shape_correct", "direction_correct")
        return {k: v for k, v in data.items() if k not in derived} if isinstance(data, dict) else data

    @computed_field
    @property
    def caption(self) -> str:
        """The prompt: `expected.caption`."""
        return self.expected.caption

    @computed_field
    @property
    def colour_correct(self) -> bool:
        return self.colour == self.expected.colour

    @computed_field
    @property
    def shape_correct(self) -> bool:
        return self.shape == self.expected.shape

    @computed_field
    @property
    def direction_correct(self) -> bool:
        return self.direction == self.expected.direction

    @property
    def key(self) -> tuple[str, str, int]:
        """(mode, caption, seed): the same generation in another report (`agreement`)."""
        return self.mode, self.caption, self.seed


class ModeScore(BaseModel):
    """Accuracy of one mode over its `prompts` decisions: the fraction (0 .. 1) whose colour, shape or direction
    the detector read as prompted."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: Mode
    prompts: int = Field(ge=1)
    colour: Accuracy
    shape: Accuracy
    direction: Accuracy


class ScoreReport(BaseModel):
    """One scoring run of an artifact on a backend (`score_pipeline`), as `walt-export score --json` writes it.

    steps: DDIM steps of every denoiser (None: the artifact's schedule). modes: per mode scored, in `MODES` order.
    tokenizer_psnr_db: the mean over `tokenizer_clips` held-out world clips of each clip's PSNR in dB (uint8
    frames, peak 255) after the tokenizer's round trip (`Pipeline.reconstruct`). decisions: every generation's,
    mode by mode, prompt by prompt. seconds: wall time of the whole run.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    artifacts: str
    backend: Backend
    precision: Precision
    steps: Steps | None
    modes: list[ModeScore]
    tokenizer_psnr_db: float
    tokenizer_clips: int = Field(ge=1)
    decisions: list[Decision]
    seconds: float = Field(ge=0.0)


def score_prompts(count: int) -> list[Scene]:
    """The scenes of the first `count` prompts (prompt i has seed i), the same on every run.

    Scene i (i modulo 48) is colour i mod 4, shape i mod 3 and direction (i + i // 4) mod 4: the first 48 are the
    48 scenes of the world, each once (i mod 12 fixes colour and shape, and the direction takes all 4 values over
    i, i + 12, i + 24, i + 36); from 48 on they cycle. Every run of 12 prompts has each colour 3 times, each shape 4
    times and each direction 3 times, and every run of 16 pairs each colour with each direction once, so 8 prompts
    (the CLI's default) already cover every colour, shape and direction twice or more, uncorrelated.
    """
    cycle = len(COLOURS) * len(SHAPES) * len(DIRECTIONS)
    return [Scene(colour=COLOURS[i % len(COLOURS)], shape=SHAPES[i % len(SHAPES)],
                  direction=DIRECTIONS[(i + i // 4) % len(DIRECTIONS)]) for i in (j % cycle for j in range(count))]


def score_frames(frames: np.ndarray, scene: Scene, first: int = 0, *, mode: Mode, seed: int) -> Decision:
    """The detector's reading of `frames[first:]` against `scene`.

    frames: (T, H, W, 3) uint8 (a generated or rendered video); first: the first frame read (image-to-video: 1,
    a continuation: the first clip's length), 0 <= first < T. mode and seed label the decision.
    Raises ValueError (from `runtime.detector.detect`) for frames of another shape or dtype, or `first` out of range.
    """
    found = detect(frames, first=first)
    return Decision(mode=mode, seed=seed, expected=scene, colour=found.colour, shape=found.shape,
                    direction=found.direction)


def tokenizer_psnrs(reconstruct: Callable[[np.ndarray], np.ndarray], clips: int, frames: int, height: int,
                    width: int) -> list[float]:
    """PSNR in dB (uint8 frames, peak 255) of each of `clips` held-out world clips (seeds from HELD_OUT_SEED) of
    frames x height x width after `reconstruct`: video (1, 3, T, H, W) float32 in [-1, 1] -> frames (T, H, W, 3)
    uint8, the tokenizer's round trip (`Pipeline.reconstruct`, or PyTorch's in `python -m training psnr`)."""
    values = []
    for clip in sample_clips(clips, HELD_OUT_SEED, aspect=width / height):
        video = clip.render(frames, height, width)
        values.append(psnr(video, reconstruct(to_video(video)), peak=255.0))
    return values


def score_pipeline(pipeline: Pipeline, prompts: int, *, clips: int = 2, steps: int | None = None,
                   modes: Sequence[str] = MODES,
                   progress: Callable[[str], None] | None = None) -> ScoreReport:
    """Score a text-to-video cascade: `prompts` generations per mode (`score_prompts(prompts)`, prompt i with seed
    i) and the tokenizer's PSNR on `clips` held-out world clips of one clip's length at the artifact's size.

    The report records what `pipeline` runs (`pipeline.backend`, `pipeline.precision`). steps: DDIM steps of every
    denoiser (None: the artifact's schedule). modes: which of `MODES` to score. progress: called with one line per generation.

    Text-to-video and long videos share their generations when both are scored: a long video's first clip is the
    text-to-video video of the same seed (its noise is drawn first, in the same order, `Pipeline._generate`), so
    text-to-video reads that clip's frames and long-video the continuation's.

    Raises UsageError for an artifact that is not text-to-video, no mode or an unknown one, only long-video of an
    artifact that makes one clip only, or a count below 1;
    RequestError (before any model runs) for steps the artifact's schedule does not take; NumericalError when a
    model's output goes non-finite.
    """
    start = time.perf_counter()
    m = pipeline.manifest
    conditioning = m.stage("base").denoiser.conditioning
    if conditioning != "text":
        raise UsageError(f"the score prompts world captions, so it needs a text-to-video artifact; {m.name} is "
                         f"{'class-conditional' if conditioning == 'class' else 'unconditional'}")
    unknown = sorted(set(modes) - set(MODES))
    if unknown or not modes:
        raise UsageError(f"modes must be some of {', '.join(MODES)}, got {', '.join(map(repr, modes)) or 'none'}")
    if prompts < 1 or clips < 1:
        raise UsageError(f"prompts and clips must be >= 1, got {prompts} and {clips}")
    one, new = pipeline.lengths()
    scored = [mode for mode in MODES if mode in modes]
    if "long-video" in scored and new == 0:
        if scored == ["long-video"]:
            raise UsageError(f"{m.name} makes one clip only ({one} frames): it has no long videos to score")
        log.warning("long-video not scored: %s makes one clip only (%d frames)", m.name, one)
        scored.remove("long-video")

    decisions: list[Decision] = []

    def read(frames: np.ndarray, scene: Scene, seed: int, mode: Mode, first: int, began: float) -> None:
        decisions.append(decision := score_frames(frames, scene, first, mode=mode, seed=seed))
        if progress is not None:
            progress(f"{mode} {seed + 1}/{prompts}: {scene.caption!r} seed {seed}: read {decision.colour} "
                     f"{decision.shape} {decision.direction} ({time.perf_counter() - began:.1f} s)")

    for seed, scene in enumerate(score_prompts(prompts)):
        began = time.perf_counter()
        if "long-video" in scored:
            frames = pipeline.generate(scene.caption, seed=seed, steps=steps, frames=one + new).frames
            if "text-to-video" in scored:
                read(frames[:one], scene, seed, "text-to-video", 0, began)
            read(frames, scene, seed, "long-video", one, began)
        elif "text-to-video" in scored:
            read(pipeline.generate(scene.caption, seed=seed, steps=steps).frames, scene, seed, "text-to-video", 0,
                 began)
        if "image-to-video" in scored:
            began = time.perf_counter()
            clip = Clip.sample(HELD_OUT_SEED + seed, scene, aspect=m.width / m.height)
            frames = pipeline.generate(scene.caption, seed=seed, steps=steps,
                                       image=clip.render(1, m.height, m.width)[0]).frames
            read(frames, scene, seed, "image-to-video", 1, began)
    decisions.sort(key=lambda d: MODES.index(d.mode))  # stable: prompt order within each mode

    psnrs = tokenizer_psnrs(pipeline.reconstruct, clips, m.frames, m.height, m.width)
    log.info("tokenizer PSNR on %d held-out clips: %s dB", clips, [round(p, 2) for p in psnrs])

    return ScoreReport(artifacts=str(pipeline.directory), backend=pipeline.backend, precision=pipeline.precision,
                       steps=steps, modes=[_mode_score(mode, [d for d in decisions if d.mode == mode]) for mode in scored],
                       tokenizer_psnr_db=float(np.mean(psnrs)), tokenizer_clips=clips, decisions=decisions,
                       seconds=time.perf_counter() - start)


def _mode_score(mode: Mode, decisions: list[Decision]) -> ModeScore:
    """Accuracy of one mode's decisions (at least one)."""
    return ModeScore(mode=mode, prompts=len(decisions),
                     colour=float(np.mean([d.colour_correct for d in decisions])),
                     shape=float(np.mean([d.shape_correct for d in decisions])),
                     direction=float(np.mean([d.direction_correct for d in decisions])))


def format_table(report: ScoreReport) -> str:
    """The report as a table: per mode its prompts and colour, shape and direction accuracy in percent, then the
    tokenizer's PSNR and the run's settings."""
    steps = "the artifact's steps" if report.steps is None else f"{report.steps} steps"
    lines = [f"{'mode':<15} {'prompts':>7} {'colour':>7} {'shape':>7} {'direction':>9}"]
    lines += [f"{s.mode:<15} {s.prompts:>7} {s.colour:>7.1%} {s.shape:>7.1%} {s.direction:>9.1%}"
              for s in report.modes]
    lines.append(f"tokenizer reconstruction PSNR: {report.tokenizer_psnr_db:.2f} dB (mean of "
                 f"{report.tokenizer_clips} held-out world clips)")
    lines.append(f"{report.artifacts}: {report.backend} {report.precision}, {steps}, {report.seconds:.1f} s")
    return "\n".join(lines)


def agreement(a: ScoreReport, b: ScoreReport) -> float:
    """The fraction (0 .. 1) of the generations both reports scored (same mode, caption and seed) where the
    detector read the same colour, shape and direction in both (right or wrong): do two backends or precisions
    make the same decisions?

    Raises ValueError when the reports share no generation.
    """
    theirs = {d.key: d for d in b.decisions}
    pairs = [(d, theirs[d.key]) for d in a.decisions if d.key in theirs]
    if not pairs:
        raise ValueError("the reports share no generation (mode, caption and seed): score the same prompts and "
                         "modes on both")
    same = [(x.colour, x.shape, x.direction) == (y.colour, y.shape, y.direction) for x, y in pairs]
    return float(np.mean(same))
