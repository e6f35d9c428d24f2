"""The cascade, written once against the runner protocol: text -> base -> SR1 -> SR2 -> causal decode -> frames.

    pipeline = Pipeline.from_artifacts("artifacts/tiny")          # onnxruntime on the CPU by default
    video = pipeline.generate("a corgi surfing a wave", seed=0)   # video.frames (T, H, W, 3) uint8, video.fps
    video.save("corgi.mp4")
    videos = pipeline.generate(["a corgi", "a cat"], seed=[0, 1])  # a batch: one denoiser call for both
    for frame in pipeline.stream("a corgi", seed=0):             # frames (H, W, 3) as the decoder makes them
        ...

Per denoiser (docs/model_spec.md §4): DDIM from pure noise over the trailing timesteps; classifier-free guidance
runs the conditional and unconditional halves as one 2B batch; self-conditioning feeds the previous x0 estimate; SR
denoisers get the previous denoiser's latent noise-augmented to their configured level (upsampled inside the model).

Modes: text-to-video, class-conditional (class presets), image-to-video (the image encoded as the first latent
frame, which conditions every denoiser), and long videos: after the first clip, its last 1 + f frames (f = the
tokenizer's temporal factor, 4: 5 frames) are re-encoded into 2 conditioning latent frames and the next clip
continues from them (docs/model_spec.md §1); the decoder continues its causal state across clips.

Batches: requests that share length, steps, guidance and whether they start from an image run together, every
model call on the whole batch (2B rows with guidance: B conditional, then B unconditional); each video's noise comes
from its own seed's generator, drawn in the order of a single generation, so a video does not depend on its batch
neighbours. A batch larger than the runners take (the stages' batch profile) is split; one smaller than a static
profile's batch is padded with copies of its last request, whose videos are dropped.

Streaming: the final latent is decoded `decode_chunk` latent frames at a time through the causal decoder's state
(the first chunk by `tokenizer_decoder`, the rest by `tokenizer_decoder_step`; equal to a whole-clip decode, as the
decoder is causal), and frames are handed on as each chunk is decoded: the first frame comes after one chunk, and
only a chunk of frames (and the last 1 + f frames that condition the next clip) is held at a time.

Low-memory mode (`low_memory=True`): each stage's runner is opened for its stage and closed after it (the text
encoder after encoding, each denoiser after its clip, the tokenizer after each call or clip), and onnxruntime keeps
no memory arena, so only one stage's weights and working memory are held at a time.

Decisions where the paper is silent: lower-resolution denoisers get frame conditioning from the full-resolution
latent average-pooled to their size; conditioned latent frames are written back into each denoiser's result.
Everything about the artifact comes from the manifest's typed fields (docs/architecture.md §2).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict

from runtime.errors import RequestError, UsageError, WaltExportError
from runtime.manifest import DenoiserInfo, Manifest, Precision, check_file, read_manifest, rows_per_video
from runtime.memory import MemoryMonitor
from runtime.request import Count, Request, check_setting
from runtime.runners import (
    DEFAULT_PRECISION,
    Runner,
    check_device,
    make_runner,
    onnxruntime_file,
    wants_memory_arena,
)
from runtime.scheduler import DDIMScheduler, classifier_free_guidance
from runtime.video import to_frames, to_video

log = logging.getLogger(__name__)

OVERLAP_LATENT_FRAMES = 2  # latent frames of the previous clip that condition the next (video continuation)
Progress = Callable[[str, int, int], None]  # (denoiser, step done, steps)
# Memory per value of a video `generate` returns (3 x T x H x W): its uint8 frames (decoded chunks are handed on, so
# only `generate`, which returns whole videos, holds them); a length whose videos need more than the machine's memory
# is refused there before anything runs.
BYTES_PER_VIDEO_VALUE = 1
DECODE_CHUNK = 1  # latent frames per decoder call: the first frame after one chunk (BENCHMARKS.md, streaming)
TEXT_ENCODER, ENCODER, DECODER, DECODER_STEP = "text_encoder", "tokenizer_encoder", "tokenizer_decoder", \
    "tokenizer_decoder_step"


@dataclass
class StageTime:
    """How often one stage's runner ran and the wall time inside its `infer`, in seconds (`Pipeline.timings`)."""

    calls: int = 0
    seconds: float = 0.0


class _TimedRunner:
    """A runner whose `infer` adds its calls and wall time to a StageTime (and runs inside `running()`, the memory
    monitor's sampling, when given)."""

    def __init__(self, runner: Runner, time_spent: StageTime,
                 running: Callable[[], contextlib.AbstractContextManager] | None = None):
        self.runner, self.time_spent, self.running = runner, time_spent, running or contextlib.nullcontext

    def __enter__(self) -> _TimedRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.runner.__exit__(*exc)

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        try:
            with self.running():
                return self.runner.infer(feeds)
        finally:
            self.time_spent.calls += 1
            self.time_spent.seconds += time.perf_counter() - start


class NumericalError(WaltExportError, FloatingPointError):
    """A model's output went non-finite (NaN or Inf): the fault FP16 overflow gives, which would otherwise be
    written as a black video. The message names the model and the step."""


def video_lengths(manifest: Manifest) -> tuple[int, int]:
    """(one, new): an artifact makes videos of `one + new * k` frames, k >= 0: one clip, then `new` frames per clip
    that continues it past its OVERLAP_LATENT_FRAMES conditioning latent frames (new = 0: one clip only)."""
    latent = manifest.latent
    return manifest.frames, (latent.frames - OVERLAP_LATENT_FRAMES) * latent.temporal_factor


def overlap_frames(temporal_factor: int) -> int:
    """Frames of the previous clip re-encoded into the OVERLAP_LATENT_FRAMES conditioning latent frames:
    1 + f (t - 1) frames encode to t latent frames (causal tokenizer, docs/model_spec.md §2)."""
    return 1 + temporal_factor * (OVERLAP_LATENT_FRAMES - 1)


@dataclass(frozen=True)
class DenoiserPlan:
    """How one denoiser samples in every clip of a generation: its manifest facts and the request's settings."""

    name: str
    info: DenoiserInfo
    steps: int  # DDIM steps
    guidance: float  # classifier-free guidance scale (1.0: no guidance)

    @property
    def guided(self) -> bool:
        """Whether it runs classifier-free guidance (2 rows per video) where there is conditioning."""
        return self.guidance != 1.0

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        """(1, c, t, h, w) of the latent it samples."""
        return (1, self.info.latent_channels, *self.info.latent_size)


@dataclass(frozen=True)
class GenerationPlan:
    """What one checked request makes with an artifact (`Pipeline.check`)."""

    conditioning: str  # 'text', 'class' or 'none'
    frames: int  # video length
    denoisers: tuple[DenoiserPlan, ...]  # in sampling order
    image: np.ndarray | None  # the first frame (H, W, 3) uint8 at the artifact's size, read from the request's path

    def guides(self, stage: str) -> bool:
        """Whether a stage runs classifier-free guidance: a guided denoiser where there is conditioning."""
        return self.conditioning != "none" and any(d.name == stage and d.guided for d in self.denoisers)

    @property
    def batch_key(self) -> tuple:
        """Requests whose plans have the same key can run in one batch: the same conditioning kind, length, steps
        and guidance, and either all or none start from an image (`render --batch` groups jobs by it)."""
        return (self.conditioning, self.frames, tuple((d.name, d.steps, d.guidance) for d in self.denoisers),
                self.image is not None)


@dataclass(frozen=True)
class _Prepared:
    """A checked request of a batch, with its first frame as the tokenizer's video (1, 3, 1, H, W) or None."""

    plan: GenerationPlan
    request: Request
    first_frame: np.ndarray | None


@dataclass
class Video:
    """Generated frames (T, H, W, 3) uint8 at `fps`, and every denoiser's final latents (for checks)."""

    frames: np.ndarray
    fps: float
    latents: dict[str, list[np.ndarray]] = field(default_factory=dict)  # denoiser -> one latent per clip

    def save(self, path: str | Path) -> Path:
        """Write an H.264 mp4 (atomically) to `path`, which must end in .mp4; returns the path.

        Raises RequestError for another suffix (PNG frames come from `save_pngs`)."""
        from runtime.video import write_mp4

        path = Path(path)
        if path.suffix.lower() != ".mp4":
            raise RequestError(f"{path}: videos are written as .mp4; pass a path ending in .mp4 "
                               "(or use save_pngs(directory) for PNG frames)")
        return write_mp4(self.frames, path, self.fps)

    def save_pngs(self, directory: str | Path) -> list[Path]:
        """Write every frame as `directory/frame_0000.png`, ... (each atomically); returns the paths."""
        from runtime.video import write_pngs

        return write_pngs(self.frames, directory)


class Pipeline:
    """A cascade over one artifact directory; runners are opened on first use and kept until `close()` (in
    low-memory mode: closed after their stage).

    `timings` holds, per stage, its calls and the seconds spent inside its runner (`walt-export bench` reports the
    time of `generate` outside them: the host's share). With `memory_report=True`, `memory.report()` gives what each
    stage held (`runtime.memory`).

    Thread-safe: generations from several threads run one at a time (docs/architecture.md §10).
    """

    def __init__(self, manifest: Manifest, runner_for: Callable[[str], Runner], directory: str | Path | None = None,
                 backend: str = "onnxruntime", precision: Precision = "fp32", *, low_memory: bool = False,
                 batch_profile: Mapping[str, tuple[int, int]] | None = None, decode_chunk: int = DECODE_CHUNK,
                 memory_report: bool = False):
        """Args:
            manifest: the artifact's manifest.
            runner_for: stage name -> a runner (entered here, exited by `close`).
            directory: the artifact directory (the pretrained text tokenizer lives there).
            backend, precision: what the runners run (`onnxruntime`, `tensorrt`, `torch`; the requested precision),
                recorded for reports.
            low_memory: open each stage's runner for its stage only (module docstring).
            batch_profile: stage -> (min, max) batch its runner takes; default: the manifest's profile (what the
                artifact was exported for). TensorRT plans give their own (`engine_registry.batch_profile`).
            decode_chunk: latent frames per decoder call, >= 1.
            memory_report: record each stage's memory (`runtime.memory.MemoryMonitor`, in `self.memory`).
        """
        check_setting(Count, decode_chunk, "decode_chunk is the latent frames per decoder call")
        self.manifest, self.directory = manifest, Path(directory) if directory else None
        self.backend, self.precision = backend, precision
        self.low_memory, self.decode_chunk = low_memory, decode_chunk
        self.batch_profile = dict(batch_profile) if batch_profile is not None else {
            name: (stage.profile["batch"][0], stage.profile["batch"][2]) for name, stage in manifest.stages.items()}
        self._runner_for, self._runners = runner_for, {}
        self.scheduler = DDIMScheduler.from_schedule(manifest.schedule)
        self.denoisers = list(manifest.denoisers)  # names, in sampling order
        self._text_tokenizer = None
        self.timings: dict[str, StageTime] = {}  # stage -> time inside its runner since opened; clear() to reset
        self.memory = MemoryMonitor(low_memory) if memory_report else None
        # One generation at a time: runners and their buffers are shared. A plain lock, which a stream's generator
        # may release from another thread than the one that took it; the runner cache has its own.
        self._lock = threading.Lock()
        self._owner: int | None = None  # the thread that took `_lock` (`_generation`)
        self._runners_lock = threading.Lock()

    @classmethod
    def from_artifacts(cls, directory: str | Path, backend: str = "onnxruntime", device: str = "cpu",
                       precision: Precision | None = None, threads: int = 0, *, low_memory: bool = False,
                       static_batch: int | None = None, decode_chunk: int = DECODE_CHUNK,
                       memory_report: bool = False) -> Pipeline:
        """Open an artifact directory with a backend on a device: `onnxruntime` runs its ONNX files (sha256
        checked), `tensorrt` the plans `walt-export engines --precision P` built for this machine (build.json
        checked). Each stage runs in the precision its policy resolves `precision` to (the text encoder: FP32).

        `precision` defaults to fp32 on onnxruntime and fp16 on TensorRT (`DEFAULT_PRECISION`). `static_batch`
        (TensorRT): run the plans of `walt-export engines --profile static --batch N` instead of the dynamic ones.
        `low_memory`, `decode_chunk` and `memory_report`: see `Pipeline`; in low-memory mode onnxruntime keeps no
        memory arena.

        Raises ArtifactError (naming the command that makes them) when the files or plans are missing, UsageError
        for a device this onnxruntime cannot run on, or a static batch without the TensorRT backend.
        """
        directory = Path(directory)
        precision = precision or DEFAULT_PRECISION.get(backend, "fp32")
        manifest = read_manifest(directory)
        batch_profile = None
        if backend == "tensorrt":
            from runtime import engine_registry as engines

            engines.check_engine_precision(precision)
            trt = engines.import_tensorrt()
            profile = engines.EngineProfile(static_batch=static_batch)
            files = {name: engines.find_plan(directory, name, stage.precision.resolve(precision), trt,
                                             requested=precision, profile=profile)
                     for name, stage in manifest.stages.items()}
            batch_profile = engines.batch_profile(files)
        else:
            if static_batch is not None:
                raise UsageError("a static batch selects TensorRT plans (`walt-export engines --profile static`); "
                                 "use it with --backend tensorrt")
            check_device(device)
            files = onnxruntime_files(manifest, directory, precision, device)

        def runner_for(name: str) -> Runner:
            return make_runner(backend, files[name], device, threads,
                               wants_memory_arena(manifest.stages[name], low_memory))

        return cls(manifest, runner_for, directory, backend, precision, low_memory=low_memory,
                   batch_profile=batch_profile, decode_chunk=decode_chunk, memory_report=memory_report)

    @classmethod
    def for_checks(cls, directory: str | Path) -> Pipeline:
        """A pipeline over an artifact's manifest that checks requests (`check`, `videos_per_batch` against the
        manifest's profile) and runs no model: for the driver of `render --ray` and the front end of `serve`, which
        may run where the models cannot (no GPU, no TensorRT). Raises ArtifactError for a bad manifest."""
        def no_models(name: str) -> Runner:
            raise RuntimeError(f"Pipeline.for_checks runs no model (asked for {name}); open one with from_artifacts")

        return cls(read_manifest(directory), no_models, directory)

    # --------------------------------------------------------------------------------------------- lifecycle
    def runner(self, name: str) -> Runner:
        """The stage's runner, opened on first use; its calls count in `timings[name]`."""
        with self._runners_lock:
            if name not in self._runners:
                with self.memory.opening(name) if self.memory else contextlib.nullcontext():
                    self._runners[name] = runner = self._runner_for(name).__enter__()
                device = getattr(runner, "device_memory", None)
                if self.memory and device is not None:
                    self.memory.device(name, *device)
            return _TimedRunner(self._runners[name], self.timings.setdefault(name, StageTime()),
                                self.memory and functools.partial(self.memory.running, name))

    def _release(self, *names: str) -> None:
        """Low-memory mode: close these stages' runners (reopened when next used)."""
        if self.low_memory:
            with self._runners_lock:
                for name in names:
                    runner = self._runners.pop(name, None)
                    if runner is not None:
                        runner.__exit__(None, None, None)

    def close(self) -> None:
        """Close every runner (after a generation running in another thread has finished)."""
        with self._generation(), self._runners_lock:
            for runner in self._runners.values():
                runner.__exit__(None, None, None)
            self._runners.clear()

    @contextlib.contextmanager
    def _generation(self) -> Iterator[None]:
        """Hold the pipeline for one generation (or `close`); other threads wait. A stream suspended between frames
        holds it too: the same thread asking again would wait for itself, so that raises RuntimeError instead."""
        if self._owner == threading.get_ident():
            raise RuntimeError("a stream of this pipeline is still open in this thread (suspended between frames): "
                               "exhaust it or call its close() before the next generation or closing the pipeline")
        with self._lock:
            self._owner = threading.get_ident()
            try:
                yield
            finally:
                self._owner = None

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------------ requests
    def lengths(self) -> tuple[int, int]:
        """(one, new): this artifact makes videos of `one + new * k` frames, k >= 0 (`video_lengths`)."""
        return video_lengths(self.manifest)

    def check(self, request: Request) -> GenerationPlan:
        """What `request` makes with this artifact, after checking that it fits, before any model runs.

        Checks the conditioning (text or class, class id range), the length (a length this artifact makes), the
        per-denoiser settings (known denoiser names, steps within the training schedule), and reads the first-frame
        image (decodable; resized to the artifact's size).

        Raises RequestError saying what this artifact takes.
        """
        m = self.manifest
        kind = self._check_conditioning(request.prompt, request.class_id)
        frames = m.frames if request.frames is None else request.frames
        self._check_frames(frames)
        denoisers = [DenoiserPlan(name, info, _per_denoiser(request.steps, name, m.schedule.num_inference_steps),
                                  _per_denoiser(request.guidance, name, m.schedule.guidance_scale))
                     for name, info in m.denoisers.items()]
        for setting in ("steps", "guidance"):
            value = getattr(request, setting)
            unknown = sorted(set(value) - set(m.denoisers)) if isinstance(value, Mapping) else []
            if unknown:
                raise RequestError(f"{setting}: no denoiser {', '.join(map(repr, unknown))} in this artifact; its "
                                   f"denoisers are {', '.join(m.denoisers)}")
        for plan in denoisers:
            if plan.steps > m.schedule.num_train_timesteps:
                raise RequestError(f"steps={plan.steps} for {plan.name} is not in [1, "
                                   f"{m.schedule.num_train_timesteps}] (the training schedule's length)")
        image = None
        if request.image is not None:
            from runtime.video import read_image

            image = read_image(request.image, (m.height, m.width))
        return GenerationPlan(kind, frames, tuple(denoisers), image)

    def _check_frames(self, frames: int) -> None:
        """Raises RequestError unless `frames` is a length this artifact makes."""
        one, new = self.lengths()
        if not (frames == one or (new > 0 and frames > one and (frames - one) % new == 0)):
            more = f", {one + new}, {one + 2 * new}, ... ({one} + {new}k)" if new > 0 else " only"
            raise RequestError(f"frames={frames} is not a length this artifact makes: {one}{more}")

    def _check_fits(self, frames: int, videos: int) -> None:
        """Raises RequestError when `videos` whole videos of `frames` frames (what `generate` returns) need more than
        this machine's memory; `stream` and the CLIs, which hand frames on as they come, have no such limit."""
        one, new = self.lengths()
        per_frame = 3 * self.manifest.height * self.manifest.width * BYTES_PER_VIDEO_VALUE * videos
        available = _memory_bytes()
        if frames * per_frame > available:
            most = available // per_frame
            longest = one + (most - one) // new * new if new > 0 and most >= one else one
            raise RequestError(
                f"frames={frames} for {videos} video(s) needs about {frames * per_frame / 2**30:.1f} GiB for the "
                f"frames generate returns at {self.manifest.width}x{self.manifest.height}, more than this machine's "
                f"{available / 2**30:.1f} GiB of memory; the longest that fits is about {longest} frames, or use "
                "stream() (or the CLI), which writes frames as they come")

    def rows(self, plan: GenerationPlan, stage: str) -> int:
        """Batch rows one video of `plan` takes in a stage (`runtime.manifest.rows_per_video`)."""
        return rows_per_video(self.manifest.stages[stage], plan.guides(stage))

    def videos_per_batch(self, plan: GenerationPlan) -> tuple[int, int]:
        """(min, max) videos of this kind one batch may hold: every stage's batch profile (`batch_profile`) divided
        by the rows a video takes in it (`rows`); min > max when no batch fits every stage."""
        bounds = [(-(-least // self.rows(plan, name)), most // self.rows(plan, name))
                  for name, (least, most) in self.batch_profile.items()]
        return max([1, *(low for low, _ in bounds)]), min(high for _, high in bounds)

    def _prepare(self, requests: Sequence[Request], images: Sequence[np.ndarray | None]) -> list[_Prepared]:
        """Each request checked (`check`), with its first frame as the tokenizer's video; RequestError when they
        cannot share a batch (`GenerationPlan.batch_key`) or the stages' batch profile takes none of this kind."""
        if not requests:
            raise RequestError("no requests: a batch needs at least one video")
        prepared = []
        for request, array in zip(requests, images, strict=True):
            plan = self.check(request)
            if array is not None:
                plan = dataclasses.replace(plan, image=array)
            first = None if plan.image is None else _image_to_video(plan.image, self.manifest)
            prepared.append(_Prepared(plan, request, first))
        keys = {p.plan.batch_key for p in prepared}
        if len(keys) > 1:
            raise RequestError("the videos of one batch share their length, steps, guidance and whether they start "
                               f"from an image; these differ ({len(keys)} kinds): generate them in separate calls")
        low, high = self.videos_per_batch(prepared[0].plan)
        if low > high:
            rows = ", ".join(f"{name} {self.rows(prepared[0].plan, name)}" for name in self.batch_profile)
            raise RequestError(f"the stages' batch profiles ({self._profiles()}) take no batch of these videos "
                               f"(rows per video: {rows}); {self._rebuild_hint()}")
        return prepared

    def _profiles(self) -> str:
        return ", ".join(f"{name} {lo}..{hi}" for name, (lo, hi) in self.batch_profile.items())

    def _rebuild_hint(self) -> str:
        return ("build plans for this batch with `walt-export engines --artifacts "
                f"{self.directory or 'DIR'} --profile static --batch N` (N videos per call) or the dynamic profile "
                "(`--profile dynamic`)" if self.backend == "tensorrt" else "re-export the artifact for this batch")

    # ------------------------------------------------------------------------------------------------ generate
    def generate(self, prompt: str | Sequence[str] | None = None, *, class_id: int | Sequence[int] | None = None,
                 seed: int | Sequence[int] = 0, steps: int | Mapping[str, int] | None = None,
                 guidance: float | Mapping[str, float] | None = None, frames: int | None = None,
                 image: Image | Sequence[Image] | None = None,
                 progress: Progress | None = None) -> Video | list[Video]:
        """Generate one video, or a batch of videos when `prompt`, `class_id`, `seed` or `image` is a list.

        A batch: the lists give one value per video (of one length), a single value is shared by every video;
        steps, guidance and frames are shared. Every model call runs on the whole batch (split when larger than the
        stages' batch profile, `videos_per_batch`); each video equals what a single call with its seed makes, within
        the backend's rounding.

        Safe to call from several threads: calls on one Pipeline run one at a time (each holds the pipeline's
        lock while its models run); for parallel generations use one Pipeline per thread or process
        (docs/architecture.md §10).

        Args:
            prompt: the text (text presets); class_id: the class (class presets).
            seed: seeds every noise draw, in [0, 2**63 - 1].
            steps, guidance: for every denoiser, or per denoiser ({"base": 50, "sr1": 20}); default: the
                manifest's schedule. Steps in [1, the training schedule's length]; guidance finite and >= 0.
            frames: the video length (see `lengths`); default: one clip.
            image: the first frame (image-to-video): a path of an image file (center-cropped and resized to the
                artifact's size), or an (H, W, 3) uint8 array at the artifact's size.
            progress: called with (denoiser, step, steps) after every denoising step.
        Returns:
            a Video (one request) or a list of Videos in the order of the requests (a batch).
        Raises RequestError when a request does not fit the artifact or the others of its batch (checked before any
        model runs), and NumericalError when a model's output goes non-finite (no video is returned).
        """
        requests, images, batched = _requests(prompt, class_id, seed, steps, guidance, frames, image)
        prepared = self._prepare(requests, images)
        self._check_fits(prepared[0].plan.frames, len(prepared))
        chunks: list[list[np.ndarray]] = [[] for _ in prepared]
        latents: list[dict[str, list[np.ndarray]]] = [{name: [] for name in self.denoisers} for _ in prepared]
        for index, frames_made in self._stream(prepared, progress, latents):
            chunks[index].append(frames_made)
        videos = [Video(np.concatenate(frames_of), self.manifest.fps, latents_of)
                  for frames_of, latents_of in zip(chunks, latents, strict=True)]
        return videos if batched else videos[0]

    def stream(self, prompt: str | None = None, *, class_id: int | None = None, seed: int = 0,
               steps: int | Mapping[str, int] | None = None, guidance: float | Mapping[str, float] | None = None,
               frames: int | None = None, image: Image | None = None,
               progress: Progress | None = None) -> Iterator[np.ndarray]:
        """Generate one video, yielding its frames (H, W, 3) uint8 in order as the decoder makes them: the first
        after the denoisers and one decoder chunk, not after the whole decode (for apps and servers that forward
        frames; `Pipeline.fps` frames per second). Arguments as for `generate`; no length limit (nothing is held).

        The request is checked when this is called (RequestError before anything runs); the pipeline's lock is held
        from the first frame asked for until the iterator is exhausted or closed (`close()`, or dropping it), so
        finish or close it before the next generation on this pipeline.
        """
        requests, images, batched = _requests(prompt, class_id, seed, steps, guidance, frames, image)
        if batched:
            raise RequestError("stream() makes one video; for several use stream_batch() or generate()")
        prepared = self._prepare(requests, images)
        return (frame for _, chunk in self._stream(prepared, progress) for frame in chunk)

    def stream_batch(self, requests: Sequence[Request | Mapping[str, object]],
                     progress: Progress | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Generate a batch of requests (see `generate`), yielding (request index, frames (n, H, W, 3) uint8) as
        each decoder chunk is made: in order for each video, the videos of a batch interleaved.

        requests: `runtime.request.Request`s, or mappings of their fields ({"prompt": ..., "seed": ...}).
        The requests are checked when this is called (RequestError before anything runs); the lock as for `stream`.
        """
        requests = [r if isinstance(r, Request) else Request.parse(**_fields(r)) for r in requests]
        return self._stream(self._prepare(requests, [None] * len(requests)), progress)

    @property
    def fps(self) -> float:
        return self.manifest.fps

    def _stream(self, prepared: list[_Prepared], progress: Progress | None,
                latents: list[dict[str, list[np.ndarray]]] | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """(index into `prepared`, frames) as decoded, batch after batch (split and padded to `videos_per_batch`),
        under the pipeline's lock; each video's denoisers' final latents are appended to `latents[index]`."""
        low, high = self.videos_per_batch(prepared[0].plan)
        with self._generation():
            start = 0
            for size, padded in split_batch(len(prepared), low, high):
                batch = prepared[start:start + size]
                if padded > size:
                    log.info("padding a batch of %d videos to %d (the stages' batch profile: %s)", size, padded,
                             self._profiles())
                for index, chunk in self._generate(batch + [batch[-1]] * (padded - size), progress,
                                                   latents and latents[start:start + size]):
                    if index < size:
                        yield start + index, chunk
                start += size

    def _generate(self, batch: list[_Prepared], progress: Progress | None,
                  latents: list[dict[str, list[np.ndarray]]] | None) -> Iterator[tuple[int, np.ndarray]]:
        m, plan = self.manifest, batch[0].plan
        conditioning = self._conditioning(plan.conditioning, batch)
        rngs = [np.random.default_rng(p.request.seed) for p in batch]
        images = [p.first_frame for p in batch]
        cond_latent = None if images[0] is None else self._encode(np.concatenate(images))  # (B, c, 1, h, w)
        overlap = overlap_frames(m.latent.temporal_factor)
        made, state, tail = 0, None, None
        while True:
            clip = self._sample_clip(list(plan.denoisers), conditioning, rngs, cond_latent, progress)
            for index, video_latents in enumerate(latents or ()):
                for name, latent in clip.items():
                    video_latents[name].append(latent[index:index + 1])
            final = clip[self.denoisers[-1]]
            for video, state in self._decode(final[:, :, 0 if state is None else OVERLAP_LATENT_FRAMES:], state):
                tail = video if tail is None else np.concatenate([tail, video], axis=2)[:, :, -overlap:]
                for index in range(len(batch)):
                    yield index, to_frames(video[index:index + 1])
                made += video.shape[2]
            if made >= plan.frames:
                return
            cond_latent = self._encode(tail)  # (B, c, 2, h, w)

    def _decode(self, latent: np.ndarray, state: dict[str, np.ndarray] | None
                ) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
        """(video (B, 3, n, H, W) in [-1, 1], the decoder's state after it) per chunk of `decode_chunk` latent
        frames of `latent` (B, c, t, h, w); `state` None starts a clip (the first chunk by the whole-clip decoder)."""
        for start in range(0, latent.shape[2], self.decode_chunk):
            part = latent[:, :, start:start + self.decode_chunk]
            if state is None:
                out = self.runner(DECODER).infer({"latent": part})
            else:
                out = self.runner(DECODER_STEP).infer({"latent": part, **state})
            state = {k.replace("next_", "", 1): v for k, v in out.items() if k.startswith("next_state")}
            yield _finite(out["video"], "the tokenizer decoder"), state
        self._release(DECODER, DECODER_STEP)

    def reconstruct(self, video: np.ndarray) -> np.ndarray:
        """The tokenizer's round trip: `video` encoded to latents and decoded again, as the frames a generation
        gives (T, H, W, 3) uint8.

        video: (1, 3, T, H, W) float32 in [-1, 1] (`world.to_video` of uint8 frames) at the artifact's H x W, with
        T = 1 + f k frames (f = the tokenizer's temporal factor, k >= 0: one clip, a single image).
        Raises RequestError for a video of another shape, NumericalError when the encoder or decoder output goes
        non-finite.
        """
        m = self.manifest
        factor = m.latent.temporal_factor
        if video.ndim != 5 or video.shape[:2] != (1, 3) or video.shape[3:] != (m.height, m.width) \
                or (video.shape[2] - 1) % factor:
            raise RequestError(f"the tokenizer takes a (1, 3, 1 + {factor}k, {m.height}, {m.width}) video, got "
                               f"{video.shape}")
        with self._generation():
            decoded = self.runner(DECODER).infer({"latent": self._encode(video)})["video"]
            self._release(DECODER)
            return to_frames(_finite(decoded, "the tokenizer decoder"))

    def _check_conditioning(self, prompt: str | None, class_id: int | None) -> str:
        """'text', 'class' or 'none' (the base denoiser's conditioning), after checking the request fits it.

        Raises RequestError saying what this artifact takes."""
        base = self.manifest.stage("base").denoiser
        if base.conditioning == "text":
            if prompt is None or class_id is not None:
                raise RequestError("this artifact is text-to-video: pass a prompt (and no class id)")
        elif base.conditioning == "class":
            if class_id is None or prompt is not None or not 0 <= class_id < base.num_classes:
                raise RequestError(f"this artifact is class-conditional: pass a class id in [0, {base.num_classes})")
        elif prompt is not None or class_id is not None:
            raise RequestError("this artifact is unconditional: pass no prompt and no class id")
        return base.conditioning

    def _conditioning(self, kind: str, batch: list[_Prepared]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per conditioning input: (conditional, unconditional) arrays of batch B. Text: one text encoder call on
        the B prompts and B empty ones (2B rows, so that a static profile sees the denoisers' batch)."""
        if kind == "text":
            ids, mask = self.text_tokenizer([p.request.prompt for p in batch] + [""] * len(batch))
            states = self.runner(TEXT_ENCODER).infer({"input_ids": ids, "attention_mask": mask})["text_states"]
            self._release(TEXT_ENCODER)
            states, b = _finite(states, "the text encoder"), len(batch)
            return {"text": (states[:b], states[b:]), "text_mask": (mask[:b], mask[b:])}
        if kind == "class":
            null = self.manifest.stage("base").denoiser.null_class
            return {"class_labels": (np.array([p.request.class_id for p in batch], np.int64),
                                     np.full(len(batch), null, np.int64))}
        return {}

    @property
    def text_tokenizer(self):
        if self._text_tokenizer is None:
            from runtime.text_tokenizer import load_text_tokenizer

            text = self.manifest.text
            directory = None if text.tokenizer_dir is None else self.manifest.check_tokenizer(self.directory)
            self._text_tokenizer = load_text_tokenizer(directory, text.max_length)
        return self._text_tokenizer

    def _encode(self, video: np.ndarray) -> np.ndarray:
        latent = self.runner(ENCODER).infer({"video": video.astype(np.float32)})["latent"]
        self._release(ENCODER)
        return _finite(latent, "the tokenizer encoder")

    def _sample_clip(self, plans: list[DenoiserPlan], conditioning: dict[str, tuple[np.ndarray, np.ndarray]],
                     rngs: list[np.random.Generator], cond_latent: np.ndarray | None,
                     progress: Progress | None) -> dict[str, np.ndarray]:
        """Every denoiser's final latent (B, c, t, h, w) for one clip of B videos, conditioned on the first latent
        frames `cond_latent` (B, c, k, H, W) if given. Video i's noise comes from rngs[i], in the order of a
        single generation (the SR noise augmentation, then the initial noise)."""
        results, previous = {}, None
        num_train = self.scheduler.num_train_timesteps
        for plan in plans:
            _, c, t, h, w = plan.shape
            shape = (len(rngs), c, t, h, w)
            frame_cond = np.zeros(shape, np.float32)
            frame_mask = np.zeros((len(rngs), t), np.float32)
            if cond_latent is not None:
                k = cond_latent.shape[2]
                frame_cond[:, :, :k] = _pool_to(cond_latent, (h, w))
                frame_mask[:, :k] = 1.0
            fixed = {"frame_cond": frame_cond, "frame_mask": frame_mask}
            if previous is not None:  # an SR denoiser: the previous latent, noise-augmented (docs/model_spec.md §3)
                level = plan.info.noise_aug_level * num_train
                noise = _draw(rngs, previous.shape[1:])
                fixed |= {"lowres": self.scheduler.add_noise(previous, noise, min(int(round(level)), num_train - 1)),
                          "lowres_timestep": np.full(len(rngs), level, np.float32)}
            latent = self._denoise(plan, conditioning, fixed, _draw(rngs, shape[1:]), progress)
            self._release(plan.name)
            if cond_latent is not None:
                latent[:, :, :cond_latent.shape[2]] = frame_cond[:, :, :cond_latent.shape[2]]
            results[plan.name] = previous = latent
        return results

    def _denoise(self, plan: DenoiserPlan, conditioning: dict[str, tuple[np.ndarray, np.ndarray]],
                 fixed: dict[str, np.ndarray], x: np.ndarray, progress: Progress | None) -> np.ndarray:
        """DDIM from the noise `x` (B, c, t, h, w) with one denoiser; `fixed` are its feeds that stay the same
        every step."""
        runner, scheduler = self.runner(plan.name), copy.copy(self.scheduler)  # set_timesteps sets its state
        scheduler.set_timesteps(plan.steps)
        guided = plan.guided and bool(conditioning)  # as GenerationPlan.guides
        fixed = fixed | {k: cond for k, (cond, _) in conditioning.items()}
        if guided:  # one 2B call: the B conditional rows first
            fixed = {k: np.concatenate([v, v]) for k, v in fixed.items()}
            fixed |= {k: np.concatenate([cond, uncond]) for k, (cond, uncond) in conditioning.items()}
        for array in fixed.values():  # the same every step: a TensorRT runner keeps frozen feeds on the GPU
            array.flags.writeable = False
        copies, b = 2 if guided else 1, len(x)
        x0 = np.zeros_like(x)
        for i, t in enumerate(scheduler.timesteps):
            feeds = {"latent": np.concatenate([x] * copies), "self_cond": np.concatenate([x0] * copies),
                     "timestep": np.full((copies * b,), t, np.float32), **fixed}
            v = runner.infer(feeds)["v"]
            if guided:
                v = classifier_free_guidance(v[:b], v[b:], plan.guidance)
            x, x0 = scheduler.step(v, int(t), x)
            _finite(x, f"the {plan.name} denoiser", f" at step {i + 1} of {plan.steps}")
            if progress is not None:
                progress(plan.name, i + 1, plan.steps)
        return x


Image = np.ndarray | str | Path  # a first frame: an (H, W, 3) uint8 array, or the path of an image file


class PipelineSettings(BaseModel):
    """How to open an artifact, as one typed value (the arguments of `Pipeline.from_artifacts`): what the CLIs
    parse, and what each Ray worker and serving replica is given to open its own pipeline (`runtime.ray_cluster`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    artifacts: str  # the artifact directory; on a cluster, the same path on every node
    backend: str = "onnxruntime"
    device: str = "cpu"
    precision: Precision | None = None
    threads: int = 0
    low_memory: bool = False
    static_batch: int | None = None
    decode_chunk: int = DECODE_CHUNK

    def check_files(self) -> None:
        """Check here, before any worker starts, what the workers of `render --ray` and `serve` will open: the
        manifest, and for onnxruntime that the files of this precision exist (each worker checks their sha256 as it
        opens them; TensorRT plans too, as this machine may have no TensorRT). Raises ArtifactError."""
        manifest = read_manifest(self.artifacts)
        if self.backend == "onnxruntime":
            onnxruntime_files(manifest, self.artifacts, self.precision or DEFAULT_PRECISION[self.backend],
                              self.device, hashed=False)

    def open(self, memory_report: bool = False) -> Pipeline:
        """`Pipeline.from_artifacts` with these settings (its errors)."""
        return Pipeline.from_artifacts(self.artifacts, self.backend, self.device, self.precision, self.threads,
                                       low_memory=self.low_memory, static_batch=self.static_batch,
                                       decode_chunk=self.decode_chunk, memory_report=memory_report)


def onnxruntime_files(manifest: Manifest, directory: str | Path, precision: Precision, device: str,
                      hashed: bool = True) -> dict[str, Path]:
    """stage -> the ONNX file onnxruntime runs for it on `device` (`onnxruntime_file`) in the precision its policy
    gives `precision`, after checking that the artifact has files of that precision and that each one exists (and,
    `hashed`, matches its sha256). Raises ArtifactError naming the file, or the command that makes them."""
    manifest.require_files(precision, directory)
    return {name: check_file(directory, onnxruntime_file(stage, stage.precision.resolve(precision), device), hashed)
            for name, stage in manifest.stages.items()}


def split_batch(videos: int, low: int, high: int) -> list[tuple[int, int]]:
    """(videos, rows run) per batch when `videos` videos run in batches of `low` to `high` videos: batches of
    `high`, the last one padded up to `low`. Raises ValueError when low > high or either is < 1."""
    if not 1 <= low <= high:
        raise ValueError(f"no batch size fits [{low}, {high}]")
    sizes = [min(high, videos - start) for start in range(0, videos, high)]
    return [(size, max(size, low)) for size in sizes]


def _requests(prompt, class_id, seed, steps, guidance, frames, image) -> tuple[list[Request], list[np.ndarray | None],
                                                                             bool]:
    """(requests, first-frame arrays, batched) of `generate`'s arguments: one request per element of the lists
    among prompt, class_id, seed and image (a single value is shared); an image array is kept aside (a Request names
    files). Raises RequestError for lists of different lengths, an empty list, or a bad value."""
    lists = {name: value for name, value in (("prompt", prompt), ("class_id", class_id), ("seed", seed),
                                              ("image", image)) if isinstance(value, (list, tuple))}
    lengths = {len(value) for value in lists.values()}
    if 0 in lengths:
        raise RequestError(f"{', '.join(name for name, value in lists.items() if not value)} is an empty list: a "
                           "batch needs at least one video")
    if len(lengths) > 1:
        given = ", ".join(f"{name} has {len(value)}" for name, value in lists.items())
        raise RequestError(f"a batch takes lists of one length, one value per video ({given})")
    count = lengths.pop() if lengths else 1
    each = {name: lists.get(name, [value] * count) for name, value in (("prompt", prompt), ("class_id", class_id),
                                                                       ("seed", seed), ("image", image))}
    requests, arrays = [], []
    for i in range(count):
        first = each["image"][i]
        array = first if isinstance(first, np.ndarray) else None
        requests.append(Request.parse(prompt=each["prompt"][i], class_id=each["class_id"][i], seed=each["seed"][i],
                                      steps=steps, guidance=guidance, frames=frames,
                                      image=None if first is None or array is not None else str(first)))
        arrays.append(array)
    return requests, arrays, bool(lists)


def _fields(request: object) -> Mapping[str, object]:
    """The fields of a request given as a mapping; RequestError for anything else."""
    if not isinstance(request, Mapping) or not all(isinstance(k, str) for k in request):
        raise RequestError(f"a request is a runtime.request.Request or a mapping of its fields, got "
                           f"{type(request).__name__}")
    return request


def _draw(rngs: list[np.random.Generator], shape: tuple[int, ...]) -> np.ndarray:
    """Standard normal noise (B, *shape) float32, row i drawn from rngs[i] as a single generation draws (1, *shape)."""
    return np.concatenate([rng.standard_normal((1, *shape)).astype(np.float32) for rng in rngs])


def _per_denoiser(value, name: str, default):
    """A setting given for every denoiser, per denoiser ({"base": 50}), or not at all (the manifest's default)."""
    if value is None:
        return default
    if isinstance(value, Mapping):
        return value.get(name, default)
    return value


def _finite(array: np.ndarray, model: str, when: str = "") -> np.ndarray:
    """`array`, or NumericalError naming the model whose output it is when it holds NaN or Inf."""
    if not np.isfinite(array).all():
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise NumericalError(f"the output of {model} went non-finite{when} ({bad} of {array.size} values NaN or "
                             "Inf): with --precision fp16 or int8 this is an overflow of the reduced precision; run "
                             "with --precision fp32, or re-check the files with `walt-export verify`")
    return array


def _memory_bytes() -> int:
    """This machine's physical memory in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _pool_to(latent: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Average-pool (B, c, T, H, W) to (B, c, T, h, w) with integer factors."""
    b, c, t, hh, ww = latent.shape
    h, w = size
    return latent.reshape(b, c, t, h, hh // h, w, ww // w).mean(axis=(4, 6))


def _image_to_video(image: np.ndarray, manifest: Manifest) -> np.ndarray:
    """(H, W, 3) uint8 -> (1, 3, 1, H, W) in [-1, 1], checked against the artifact's size."""
    image = np.asarray(image)
    if image.shape != (manifest.height, manifest.width, 3) or image.dtype != np.uint8:
        raise RequestError(f"the image must be ({manifest.height}, {manifest.width}, 3) uint8, got "
                         f"{image.shape} {image.dtype}; `runtime.video.read_image(path, size)` resizes one")
    return to_video(image[None])
