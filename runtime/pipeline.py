"""The cascade, written once against the runner protocol: text -> base -> SR1 -> SR2 -> causal decode -> frames.

    pipeline = Pipeline.from_artifacts("artifacts/tiny")          # onnxruntime on the CPU by default
    video = pipeline.generate("a corgi surfing a wave", seed=0)   # video.frames (T, H, W, 3) uint8, video.fps
    video.save("corgi.mp4")

Per denoiser (docs/model_spec.md §4): DDIM from pure noise over the trailing timesteps; classifier-free guidance
runs the conditional and unconditional halves as one 2B batch; self-conditioning feeds the previous x0 estimate; SR
denoisers get the previous denoiser's latent noise-augmented to their configured level (upsampled inside the model).

Modes: text-to-video, class-conditional (class presets), image-to-video (the image encoded as the first latent
frame, which conditions every denoiser), and long videos: after the first clip, its last 1 + f frames (f = the
tokenizer's temporal factor, 4: 5 frames) are re-encoded into 2 conditioning latent frames and the next clip
continues from them (docs/model_spec.md §1); the decoder continues its causal state across clips.

Decisions where the paper is silent: lower-resolution denoisers get frame conditioning from the full-resolution
latent average-pooled to their size; conditioned latent frames are written back into each denoiser's result.
Everything about the artifact comes from the manifest's typed fields (docs/architecture.md §2).
"""

from __future__ import annotations

import copy
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runtime.errors import RequestError, WaltExportError
from runtime.manifest import DenoiserInfo, Manifest, Precision, check_file, read_manifest
from runtime.request import Request
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
# Memory per value of the decoded video (3 x T x H x W): the float32 clips, their float32 concatenation and the uint8
# frames; a length whose video needs more than the machine's memory is refused before anything runs.
BYTES_PER_VIDEO_VALUE = 4 + 4 + 1


@dataclass
class StageTime:
    """How often one stage's runner ran and the wall time inside its `infer`, in seconds (`Pipeline.timings`)."""

    calls: int = 0
    seconds: float = 0.0


class _TimedRunner:
    """A runner whose `infer` adds its calls and wall time to a StageTime."""

    def __init__(self, runner: Runner, time_spent: StageTime):
        self.runner, self.time_spent = runner, time_spent

    def __enter__(self) -> _TimedRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.runner.__exit__(*exc)

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        try:
            return self.runner.infer(feeds)
        finally:
            self.time_spent.calls += 1
            self.time_spent.seconds += time.perf_counter() - start


class NumericalError(WaltExportError, FloatingPointError):
    """A model's output went non-finite (NaN or Inf): the fault FP16 overflow gives, which would otherwise be
    written as a black video. The message names the model and the step."""


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
    """A cascade over one artifact directory; runners are opened on first use and kept until `close()`.

    `timings` holds, per stage, its calls and the seconds spent inside its runner (`walt-export bench` reports the
    time of `generate` outside them: the host's share).

    Thread-safe: `generate` calls from several threads run one at a time (docs/architecture.md §10).
    """

    def __init__(self, manifest: Manifest, runner_for: Callable[[str], Runner], directory: str | Path | None = None,
                 backend: str = "onnxruntime", precision: Precision = "fp32"):
        """Args:
            manifest: the artifact's manifest.
            runner_for: stage name -> a runner (entered here, exited by `close`).
            directory: the artifact directory (the pretrained text tokenizer lives there).
            backend, precision: what the runners run (`onnxruntime`, `tensorrt`, `torch`; the requested precision),
                recorded for reports.
        """
        self.manifest, self.directory = manifest, Path(directory) if directory else None
        self.backend, self.precision = backend, precision
        self._runner_for, self._runners = runner_for, {}
        self.scheduler = DDIMScheduler.from_schedule(manifest.schedule)
        self.denoisers = list(manifest.denoisers)  # names, in sampling order
        self._text_tokenizer = None
        self.timings: dict[str, StageTime] = {}  # stage -> time inside its runner since opened; clear() to reset
        self._lock = threading.RLock()  # one generation at a time: runners and their buffers are shared

    @classmethod
    def from_artifacts(cls, directory: str | Path, backend: str = "onnxruntime", device: str = "cpu",
                       precision: Precision | None = None, threads: int = 0) -> Pipeline:
        """Open an artifact directory with a backend on a device: `onnxruntime` runs its ONNX files (sha256
        checked), `tensorrt` the plans `walt-export engines --precision P` built for this machine (build.json
        checked). Each stage runs in the precision its policy resolves `precision` to (the text encoder: FP32).

        `precision` defaults to fp32 on onnxruntime and fp16 on TensorRT (`DEFAULT_PRECISION`).

        Raises ArtifactError (naming the command that makes them) when the files or plans are missing, UsageError
        for a device this onnxruntime cannot run on.
        """
        directory = Path(directory)
        precision = precision or DEFAULT_PRECISION.get(backend, "fp32")
        manifest = read_manifest(directory)
        if backend == "tensorrt":
            from runtime.engine_registry import check_engine_precision, find_plan, import_tensorrt

            check_engine_precision(precision)
            trt = import_tensorrt()
            files = {name: find_plan(directory, name, stage.precision.resolve(precision), trt, requested=precision)
                     for name, stage in manifest.stages.items()}
        else:
            check_device(device)
            manifest.require_files(precision, directory)
            files = {name: check_file(directory, onnxruntime_file(stage, stage.precision.resolve(precision),
                                                                  device))
                     for name, stage in manifest.stages.items()}

        def runner_for(name: str) -> Runner:
            return make_runner(backend, files[name], device, threads, wants_memory_arena(manifest.stages[name]))

        return cls(manifest, runner_for, directory, backend, precision)

    # --------------------------------------------------------------------------------------------- lifecycle
    def runner(self, name: str) -> Runner:
        """The stage's runner, opened on first use; its calls count in `timings[name]`."""
        with self._lock:
            if name not in self._runners:
                self._runners[name] = self._runner_for(name).__enter__()
            return _TimedRunner(self._runners[name], self.timings.setdefault(name, StageTime()))

    def close(self) -> None:
        """Close every runner (after a generation running in another thread has finished)."""
        with self._lock:
            for runner in self._runners.values():
                runner.__exit__(None, None, None)
            self._runners.clear()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------------ generate
    def lengths(self) -> tuple[int, int]:
        """(one, new): this artifact makes videos of `one + new * k` frames, k >= 0 (new = 0: one clip only)."""
        latent = self.manifest.latent
        return self.manifest.frames, (latent.frames - OVERLAP_LATENT_FRAMES) * latent.temporal_factor

    def check(self, request: Request) -> GenerationPlan:
        """What `request` makes with this artifact, after checking that it fits, before any model runs.

        Checks the conditioning (text or class, class id range), the length (a length this artifact makes, and
        whose decoded video fits in this machine's memory), the per-denoiser settings (known denoiser names, steps
        within the training schedule), and reads the first-frame image (decodable; resized to the artifact's size).

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
        """Raises RequestError unless `frames` is a length this artifact makes and its video fits in memory."""
        one, new = self.lengths()
        if not (frames == one or (new > 0 and frames > one and (frames - one) % new == 0)):
            more = f", {one + new}, {one + 2 * new}, ... ({one} + {new}k)" if new > 0 else " only"
            raise RequestError(f"frames={frames} is not a length this artifact makes: {one}{more}")
        pixels = 3 * self.manifest.height * self.manifest.width
        available = _memory_bytes()
        if frames * pixels * BYTES_PER_VIDEO_VALUE > available:
            most = available // (pixels * BYTES_PER_VIDEO_VALUE)
            longest = one + (most - one) // new * new if new > 0 and most >= one else one
            raise RequestError(
                f"frames={frames} needs about {frames * pixels * BYTES_PER_VIDEO_VALUE / 2**30:.1f} GiB for the "
                f"decoded video at {self.manifest.width}x{self.manifest.height} ({BYTES_PER_VIDEO_VALUE} bytes per "
                f"pixel value), more than this machine's {available / 2**30:.1f} GiB of memory; the longest that fits "
                f"is about {longest} frames")

    def generate(self, prompt: str | None = None, *, class_id: int | None = None, seed: int = 0,
                 steps: int | Mapping[str, int] | None = None, guidance: float | Mapping[str, float] | None = None,
                 frames: int | None = None, image: np.ndarray | str | Path | None = None,
                 progress: Progress | None = None) -> Video:
        """Generate one video.

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
        Raises RequestError when the request does not fit the artifact (checked before any model runs), and
        NumericalError when a model's output goes non-finite (no video is returned).
        """
        array = image if isinstance(image, np.ndarray) else None
        request = Request.parse(prompt=prompt, class_id=class_id, seed=seed, steps=steps, guidance=guidance,
                                frames=frames, image=None if image is None or array is not None else str(image))
        plan = self.check(request)
        first_frame = plan.image if array is None else array
        first_frame = None if first_frame is None else _image_to_video(first_frame, self.manifest)  # (1, 3, 1, H, W)
        with self._lock:
            return self._generate(plan, request, first_frame, progress)

    def _generate(self, plan: GenerationPlan, request: Request, first_frame: np.ndarray | None,
                  progress: Progress | None) -> Video:
        m = self.manifest
        conditioning = self._conditioning(plan.conditioning, request.prompt, request.class_id)
        rng = np.random.default_rng(request.seed)
        latents: dict[str, list[np.ndarray]] = {name: [] for name in self.denoisers}
        cond_latent = None if first_frame is None else self._encode(first_frame)  # (1, c, 1, h, w)
        overlap = overlap_frames(m.latent.temporal_factor)
        video, state = [], None
        while True:
            clip = self._sample_clip(list(plan.denoisers), conditioning, rng, cond_latent, progress)
            for name, latent in clip.items():
                latents[name].append(latent)
            final = clip[self.denoisers[-1]]
            if state is None:
                out = self.runner("tokenizer_decoder").infer({"latent": final})
            else:  # continue the causal decode past the conditioning latent frames
                out = self.runner("tokenizer_decoder_step").infer({"latent": final[:, :, OVERLAP_LATENT_FRAMES:],
                                                                   **state})
            video.append(_finite(out["video"], "the tokenizer decoder"))
            state = {k.replace("next_", "", 1): v for k, v in out.items() if k.startswith("next_state")}
            if sum(v.shape[2] for v in video) >= plan.frames:
                break
            cond_latent = self._encode(np.concatenate(video, axis=2)[:, :, -overlap:])  # (1, c, 2, h, w)
        return Video(to_frames(np.concatenate(video, axis=2)), m.fps, latents)

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
        with self._lock:
            decoded = self.runner("tokenizer_decoder").infer({"latent": self._encode(video)})["video"]
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

    def _conditioning(self, kind: str, prompt: str | None,
                      class_id: int | None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per conditioning input: (conditional, unconditional) arrays of batch 1."""
        if kind == "text":
            ids, mask = self.text_tokenizer([prompt, ""])
            states = self.runner("text_encoder").infer({"input_ids": ids, "attention_mask": mask})["text_states"]
            states = _finite(states, "the text encoder")
            return {"text": (states[:1], states[1:]), "text_mask": (mask[:1], mask[1:])}
        if kind == "class":
            null = self.manifest.stage("base").denoiser.null_class
            return {"class_labels": (np.array([class_id], np.int64), np.array([null], np.int64))}
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
        return _finite(self.runner("tokenizer_encoder").infer({"video": video.astype(np.float32)})["latent"],
                       "the tokenizer encoder")

    def _sample_clip(self, plans: list[DenoiserPlan], conditioning: dict[str, tuple[np.ndarray, np.ndarray]],
                     rng: np.random.Generator, cond_latent: np.ndarray | None,
                     progress: Progress | None) -> dict[str, np.ndarray]:
        """Every denoiser's final latent (1, c, t, h, w) for one clip, conditioned on the first latent frames
        `cond_latent` (1, c, k, H, W) if given."""
        results, previous = {}, None
        num_train = self.scheduler.num_train_timesteps
        for plan in plans:
            _, c, t, h, w = plan.shape
            frame_cond = np.zeros(plan.shape, np.float32)
            frame_mask = np.zeros((1, t), np.float32)
            if cond_latent is not None:
                k = cond_latent.shape[2]
                frame_cond[:, :, :k] = _pool_to(cond_latent, (h, w))
                frame_mask[:, :k] = 1.0
            fixed = {"frame_cond": frame_cond, "frame_mask": frame_mask}
            if previous is not None:  # an SR denoiser: the previous latent, noise-augmented (docs/model_spec.md §3)
                level = plan.info.noise_aug_level * num_train
                noise = rng.standard_normal(previous.shape).astype(np.float32)
                fixed |= {"lowres": self.scheduler.add_noise(previous, noise, min(int(round(level)), num_train - 1)),
                          "lowres_timestep": np.array([level], np.float32)}
            latent = self._denoise(plan, conditioning, fixed, rng, progress)
            if cond_latent is not None:
                latent[:, :, :cond_latent.shape[2]] = frame_cond[:, :, :cond_latent.shape[2]]
            results[plan.name] = previous = latent
        return results

    def _denoise(self, plan: DenoiserPlan, conditioning: dict[str, tuple[np.ndarray, np.ndarray]],
                 fixed: dict[str, np.ndarray], rng: np.random.Generator, progress: Progress | None) -> np.ndarray:
        """DDIM from pure noise with one denoiser; `fixed` are its feeds that stay the same every step."""
        runner, scheduler = self.runner(plan.name), copy.copy(self.scheduler)  # set_timesteps sets its state
        scheduler.set_timesteps(plan.steps)
        guided = plan.guidance != 1.0 and bool(conditioning)
        fixed = fixed | {k: cond for k, (cond, _) in conditioning.items()}
        if guided:  # one 2B call: conditional half first
            fixed = {k: np.concatenate([v, v]) for k, v in fixed.items()}
            fixed |= {k: np.concatenate([cond, uncond]) for k, (cond, uncond) in conditioning.items()}
        for array in fixed.values():  # the same every step: a TensorRT runner keeps frozen feeds on the GPU
            array.flags.writeable = False
        batch = 2 if guided else 1
        x = rng.standard_normal(plan.shape).astype(np.float32)
        x0 = np.zeros_like(x)
        for i, t in enumerate(scheduler.timesteps):
            feeds = {"latent": np.concatenate([x] * batch), "self_cond": np.concatenate([x0] * batch),
                     "timestep": np.full((batch,), t, np.float32), **fixed}
            v = runner.infer(feeds)["v"]
            if guided:
                v = classifier_free_guidance(v[:1], v[1:], plan.guidance)
            x, x0 = scheduler.step(v, int(t), x)
            _finite(x, f"the {plan.name} denoiser", f" at step {i + 1} of {plan.steps}")
            if progress is not None:
                progress(plan.name, i + 1, plan.steps)
        return x


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
