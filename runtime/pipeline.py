"""The cascade, written once against the runner protocol: text -> base -> SR1 -> SR2 -> causal decode -> frames.

    pipeline = Pipeline.from_artifacts("artifacts/tiny")          # onnxruntime on the CPU by default
    video = pipeline.generate("a corgi surfing a wave", seed=0)   # video.frames (T, H, W, 3) uint8, video.fps
    video.save("corgi.mp4")

Per stage (walt-spec.md §4): DDIM from pure noise over the trailing timesteps; classifier-free guidance runs the
conditional and unconditional halves as one 2B batch; self-conditioning feeds the previous x0 estimate; SR stages
get the previous stage's latent noise-augmented to their configured level (upsampled inside the model).

Modes: text-to-video, class-conditional (class presets), image-to-video (the image encoded as the first latent
frame, which conditions every stage), and long videos: after the first clip, the last 1 + 4k frames are
re-encoded into k + 1 conditioning latent frames and the next clip continues from them; the decoder continues
its causal state across clips.

Decisions where the paper is silent: lower-resolution stages get frame conditioning from the full-resolution
latent average-pooled to their size; conditioned latent frames are written back into each stage's result.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runtime.manifest import ArtifactError, Manifest, StageInfo, check_file, read_manifest
from runtime.runners import Runner, make_runner
from runtime.scheduler import DDIMScheduler, classifier_free_guidance

log = logging.getLogger(__name__)

STAGES = ("base", "sr1", "sr2")
OVERLAP_FRAMES = 5  # frames of the previous clip re-encoded to condition the next
OVERLAP_LATENT_FRAMES = 2  # ... into these latent frames (1 + 4k frames -> k + 1 latent frames)
Progress = Callable[[str, int, int], None]  # (stage, step done, steps)


@dataclass
class Video:
    """Generated frames (T, H, W, 3) uint8 at `fps`, and every stage's final latents (for checks)."""

    frames: np.ndarray
    fps: float
    latents: dict[str, list[np.ndarray]] = field(default_factory=dict)  # stage -> one latent per clip

    def save(self, path: str | Path) -> Path:
        """Write an H.264 mp4 (atomically), or PNG frames into `path` when it is a directory name without suffix."""
        from runtime.video import write_mp4, write_pngs

        path = Path(path)
        if path.suffix.lower() == ".mp4":
            return write_mp4(self.frames, path, self.fps)
        write_pngs(self.frames, path)
        return path


class Pipeline:
    """A cascade over one artifact directory; runners are opened on first use and kept until `close()`."""

    def __init__(self, manifest: Manifest, runner_for: Callable[[str], Runner], directory: str | Path | None = None):
        """Args:
            manifest: the artifact's manifest.
            runner_for: stage name -> a runner (entered here, exited by `close`).
            directory: the artifact directory (the pretrained text tokenizer lives there).
        """
        self.manifest, self.directory = manifest, Path(directory) if directory else None
        self._runner_for, self._runners = runner_for, {}
        self.scheduler = DDIMScheduler.from_schedule(manifest.schedule)
        self.stages = [name for name in STAGES if name in manifest.stages]
        self._text_tokenizer = None

    @classmethod
    def from_artifacts(cls, directory: str | Path, backend: str = "onnxruntime", device: str = "cpu",
                       precision: str = "fp32", threads: int = 0) -> Pipeline:
        """Open an artifact directory with a backend on a device: `onnxruntime` runs its ONNX files (sha256
        checked), `tensorrt` the plans `walt-export engines --precision P` built for this machine (build.json
        checked)."""
        directory = Path(directory)
        manifest = read_manifest(directory)
        if backend == "tensorrt":  # every plan is <stage>.P.plan, whatever precision its source file had
            from runtime.engine_registry import find_plan, import_tensorrt

            trt = import_tensorrt()
            files = {name: find_plan(directory, name, precision, trt) for name in manifest.stages}
        else:
            if precision not in manifest.precisions:
                how = {"fp16": "export it with `walt-export onnx ... --fp16`",
                       "int8": f"calibrate it with `walt-export calibrate --artifacts {directory}`"}.get(precision, "")
                raise ArtifactError(f"{directory} has no {precision} files; {how or 'choose fp32'}")
            files = {name: check_file(directory, stage.file(_precision_of(stage, precision)))
                     for name, stage in manifest.stages.items()}

        def runner_for(name: str) -> Runner:
            return make_runner(backend, files[name], device, threads)

        return cls(manifest, runner_for, directory)

    # --------------------------------------------------------------------------------------------- lifecycle
    def runner(self, name: str) -> Runner:
        if name not in self._runners:
            self._runners[name] = self._runner_for(name).__enter__()
        return self._runners[name]

    def close(self) -> None:
        for runner in self._runners.values():
            runner.__exit__(None, None, None)
        self._runners.clear()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------------ generate
    def check_frames(self, frames: int) -> None:
        """Lengths this artifact makes: one clip, plus any number of continuations of `new` frames each."""
        one = self.manifest.frames
        new = (self.manifest.latent.frames - OVERLAP_LATENT_FRAMES) * 4  # 4 frames per new latent frame
        if frames == one or (new > 0 and frames > one and (frames - one) % new == 0):
            return
        more = f", {one + new}, {one + 2 * new}, ... ({one} + {new}k)" if new > 0 else " only"
        raise ValueError(f"frames={frames} is not a length this artifact makes: {one}{more}")

    def generate(self, prompt: str | None = None, *, class_id: int | None = None, seed: int = 0,
                 steps: int | Mapping[str, int] | None = None, guidance: float | Mapping[str, float] | None = None,
                 frames: int | None = None, image: np.ndarray | None = None,
                 progress: Progress | None = None) -> Video:
        """Generate one video.

        Args:
            prompt: the text (text presets); class_id: the class (class presets).
            seed: seeds every noise draw.
            steps, guidance: for every stage, or per stage ({"base": 50, "sr1": 20}); default: the manifest's.
            frames: the video length (see `check_frames`); default: one clip.
            image: (H, W, 3) uint8 at the artifact's size, the first frame (image-to-video).
            progress: called with (stage, step, steps) after every denoising step.
        """
        m = self.manifest
        frames = frames or m.frames
        self.check_frames(frames)
        conditioning = self._conditioning(prompt, class_id)
        rng = np.random.default_rng(seed)
        latents: dict[str, list[np.ndarray]] = {name: [] for name in self.stages}
        cond_latent = None if image is None else self._encode(_image_to_video(image, m))  # (1, c, 1, h, w)
        video, state = [], None
        while True:
            clip = self._sample_clip(conditioning, rng, steps, guidance, cond_latent, progress)
            for name, latent in clip.items():
                latents[name].append(latent)
            final = clip[self.stages[-1]]
            if state is None:
                out = self.runner("tokenizer_decoder").infer({"latent": final})
                video.append(out["video"])
            else:  # continue the causal decode past the conditioning latent frames
                out = self.runner("tokenizer_decoder_step").infer({"latent": final[:, :, OVERLAP_LATENT_FRAMES:],
                                                                   **state})
                video.append(out["video"])
            state = {k.replace("next_", "", 1): v for k, v in out.items() if k.startswith("next_state")}
            if sum(v.shape[2] for v in video) >= frames:
                break
            cond_latent = self._encode(np.concatenate(video, axis=2)[:, :, -OVERLAP_FRAMES:])  # (1, c, 2, h, w)
        pixels = np.concatenate(video, axis=2)[0]  # (3, T, H, W) in [-1, 1]
        uint8 = np.clip(np.round((pixels.transpose(1, 2, 3, 0) + 1.0) * 127.5), 0, 255).astype(np.uint8)
        return Video(uint8, m.fps, latents)

    def check_conditioning(self, prompt: str | None, class_id: int | None) -> str | None:
        """'text', 'class' or None (unconditional), after checking the request fits this artifact."""
        names = {t.name for t in self.manifest.stage("base").inputs}
        if "text" in names:
            if prompt is None or class_id is not None:
                raise ValueError("this artifact is text-to-video: pass a prompt (and no class id)")
            return "text"
        if "class_labels" in names:
            num_classes = self.manifest.config["base"]["num_classes"]
            if class_id is None or prompt is not None or not 0 <= class_id < num_classes:
                raise ValueError(f"this artifact is class-conditional: pass a class id in [0, {num_classes})")
            return "class"
        return None

    def _conditioning(self, prompt: str | None, class_id: int | None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per conditioning input: (conditional, unconditional) arrays of batch 1."""
        kind = self.check_conditioning(prompt, class_id)
        if kind == "text":
            ids, mask = self.text_tokenizer([prompt, ""])
            states = self.runner("text_encoder").infer({"input_ids": ids, "attention_mask": mask})["text_states"]
            return {"text": (states[:1], states[1:]), "text_mask": (mask[:1], mask[1:])}
        if kind == "class":
            null = self.manifest.config["base"]["num_classes"]
            return {"class_labels": (np.array([class_id], np.int64), np.array([null], np.int64))}
        return {}

    @property
    def text_tokenizer(self):
        if self._text_tokenizer is None:
            from runtime.text_tokenizer import load_text_tokenizer

            text = self.manifest.text
            directory = None if text.tokenizer_dir is None else self.directory / text.tokenizer_dir
            self._text_tokenizer = load_text_tokenizer(directory, text.max_length)
        return self._text_tokenizer

    def _encode(self, video: np.ndarray) -> np.ndarray:
        return self.runner("tokenizer_encoder").infer({"video": video.astype(np.float32)})["latent"]

    def _sample_clip(self, conditioning, rng, steps, guidance, cond_latent, progress) -> dict[str, np.ndarray]:
        """Every stage's final latent (1, c, T, h, w) for one clip, conditioned on the first latent frames if given."""
        results, previous = {}, None
        for name in self.stages:
            stage_cfg = self.manifest.config[name]
            c, (t, h, w) = stage_cfg["latent_channels"], stage_cfg["latent_size"]
            frame_cond = np.zeros((1, c, t, h, w), np.float32)
            frame_mask = np.zeros((1, t), np.float32)
            if cond_latent is not None:
                k = cond_latent.shape[2]
                frame_cond[:, :, :k] = _pool_to(cond_latent, (h, w))
                frame_mask[:, :k] = 1.0
            extra = {}
            if previous is not None:
                level = stage_cfg["noise_aug_level"] * self.scheduler.num_train_timesteps
                t_aug = int(round(level))
                noise = rng.standard_normal(previous.shape).astype(np.float32)
                extra = {"lowres": self.scheduler.add_noise(previous, noise, min(t_aug, self.scheduler.num_train_timesteps - 1)),
                         "lowres_timestep": np.array([level], np.float32)}
            latent = self._denoise(name, (1, c, t, h, w), conditioning, frame_cond, frame_mask, extra, rng,
                                   _per_stage(steps, name, self.manifest.schedule["num_inference_steps"]),
                                   _per_stage(guidance, name, self.manifest.schedule["guidance_scale"]), progress)
            if cond_latent is not None:
                latent[:, :, :cond_latent.shape[2]] = frame_cond[:, :, :cond_latent.shape[2]]
            results[name] = previous = latent
        return results

    def _denoise(self, name, shape, conditioning, frame_cond, frame_mask, extra, rng, steps, guidance, progress):
        runner, scheduler = self.runner(name), self.scheduler
        scheduler.set_timesteps(steps)
        guided = guidance != 1.0 and bool(conditioning)
        fixed = {"frame_cond": frame_cond, "frame_mask": frame_mask, **extra}
        fixed |= {k: cond for k, (cond, _) in conditioning.items()}
        if guided:  # one 2B call: conditional half first
            fixed = {k: np.concatenate([v, v]) for k, v in fixed.items()}
            fixed |= {k: np.concatenate([cond, uncond]) for k, (cond, uncond) in conditioning.items()}
        for array in fixed.values():  # the same every step: a TensorRT runner keeps frozen feeds on the GPU
            array.flags.writeable = False
        batch = 2 if guided else 1
        x = rng.standard_normal(shape).astype(np.float32)
        x0 = np.zeros_like(x)
        for i, t in enumerate(scheduler.timesteps):
            feeds = {"latent": np.concatenate([x] * batch), "self_cond": np.concatenate([x0] * batch),
                     "timestep": np.full((batch,), t, np.float32), **fixed}
            v = runner.infer(feeds)["v"]
            if guided:
                v = classifier_free_guidance(v[:1], v[1:], guidance)
            x, x0 = scheduler.step(v, int(t), x)
            if progress is not None:
                progress(name, i + 1, steps)
        return x


def _precision_of(stage: StageInfo, precision: str) -> str:
    """The requested precision where the stage has it, else FP32; the text encoder stays FP32 (T5 overflows in
    FP16 and is not quantized)."""
    if stage.module == "text_encoder" or precision not in stage.precisions:
        return "fp32"
    return precision


def _per_stage(value, stage: str, default):
    if value is None:
        return default
    if isinstance(value, Mapping):
        return value.get(stage, default)
    return value


def _pool_to(latent: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Average-pool (B, c, T, H, W) to (B, c, T, h, w) with integer factors."""
    b, c, t, hh, ww = latent.shape
    h, w = size
    return latent.reshape(b, c, t, h, hh // h, w, ww // w).mean(axis=(4, 6))


def _image_to_video(image: np.ndarray, manifest: Manifest) -> np.ndarray:
    """(H, W, 3) uint8 -> (1, 3, 1, H, W) in [-1, 1], checked against the artifact's size."""
    image = np.asarray(image)
    if image.shape != (manifest.height, manifest.width, 3) or image.dtype != np.uint8:
        raise ValueError(f"the image must be ({manifest.height}, {manifest.width}, 3) uint8, got "
                         f"{image.shape} {image.dtype}; `runtime.video.read_image(path, size)` resizes one")
    return (image.astype(np.float32) / 127.5 - 1.0).transpose(2, 0, 1)[None, :, None]
