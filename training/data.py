"""Training data from the reference world (`runtime.world`): tokenizer crops, and the latent dataset of the denoisers.

The denoisers all learn latents of the full-resolution clip: SR2 the tokenizer's latent z of a 17x512x896 clip,
SR1 z average-pooled x2, the base z pooled x4. That is the runtime's own decision for lower-resolution frame
conditioning (`runtime.pipeline._pool_to`): the conditioning latent of image-to-video and of long videos is the
full-resolution latent pooled to each denoiser's size, so training every stage on pooled latents makes conditioning
and target the same quantity.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from runtime.video import to_video
from runtime.world import PATH_FRAMES, Clip, sample_clips, scenes

log = logging.getLogger(__name__)

OBJECT_CROPS = 0.5  # fraction of tokenizer crops centred near the object (the rest anywhere in the frame)


def tokenizer_crop(rng: np.random.Generator, frames: int, size: tuple[int, int], height: int,
                   width: int) -> np.ndarray:
    """One world crop (3, frames, h, w) float32 in [-1, 1] of `size` = (h, w): a random clip rendered at height x
    width, a random run of `frames` of its first PATH_FRAMES, cut at a random place (near the object in OBJECT_CROPS
    of the crops)."""
    clip = Clip.sample(int(rng.integers(2**62)), aspect=width / height)
    first = int(rng.integers(0, PATH_FRAMES - frames + 1))
    h, w = size
    if rng.random() < OBJECT_CROPS:
        cx, cy = clip.centre(first + frames / 2)
        s = min(height, width)
        top = int(cy * s + height / 2 - h / 2 + rng.normal(0, h / 4))
        left = int(cx * s + width / 2 - w / 2 + rng.normal(0, w / 4))
    else:
        top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
    top, left = min(max(top, 0), height - h), min(max(left, 0), width - w)
    return to_video(clip.render(frames, height, width, first, region=(top, left, h, w)))[0]


class TokenizerCrops(torch.utils.data.IterableDataset):
    """Batches of world crops for step `start`, `start` + 1, ...: batch i is drawn from numpy's generator seeded
    by (seed, i), so a resumed run sees the batches it would have seen, whatever the number of workers.

    Each batch takes one of `sizes` ((h, w) crops; the whole height x width frame among them) at random, with as
    many crops as make about `pixels` pixels per frame (at least two). The sizes must include the whole frame: the
    tokenizer's GroupNorm takes its statistics over each frame and its convolutions pad with zeros, so a model
    trained on small crops only does not reconstruct whole frames (measured: 38-40 dB on 64x64 crops, 18 dB on the
    512x896 frame after 800 steps of 64x64 crops).
    """

    def __init__(self, seed: int, start: int, pixels: int, frames: int, sizes: list[tuple[int, int]], height: int,
                 width: int):
        self.seed, self.start, self.pixels = seed, start, pixels
        self.frames, self.sizes, self.height, self.width = frames, sizes, height, width

    def __iter__(self) -> Iterator[Tensor]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        step = self.start + worker
        while True:
            rng = np.random.default_rng([self.seed, step])
            size = self.sizes[int(rng.integers(len(self.sizes)))]
            batch = max(2, round(self.pixels / (size[0] * size[1])))  # 2: PyTorch's CPU conv3d takes a slow
            # path (slow_conv3d, 4.6x slower measured at 256x256) for one small-channel video
            crops = [tokenizer_crop(rng, self.frames, size, self.height, self.width) for _ in range(batch)]
            yield torch.from_numpy(np.stack(crops))
            step += workers


def _render(args: tuple[Clip, int, int, int]) -> np.ndarray:
    clip, frames, height, width = args
    return clip.render(frames, height, width)


@torch.no_grad()
def build_latents(encoder: torch.nn.Module, count: int, seed: int, frames: int, height: int, width: int,
                  device: torch.device, workers: int, batch: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Encode `count` world clips (`sample_clips(count, seed)`: every scene in turn) at frames x height x width.

    Returns (latents (count, c, t, h, w) float32 as the encoder gives them, class ids (count,) int64)."""
    clips = sample_clips(count, seed, aspect=width / height)
    latents = []
    with multiprocessing.get_context("fork").Pool(max(workers, 1)) as pool:
        videos = pool.imap(_render, [(clip, frames, height, width) for clip in clips], chunksize=2)
        pending = []
        for i, video in enumerate(videos):
            pending.append(to_video(video)[0])
            if len(pending) == batch or i == count - 1:
                x = torch.from_numpy(np.stack(pending)).to(device)
                latents.append(encoder(x).float().cpu().numpy())
                pending = []
                if (i + 1) % 100 < batch:
                    log.info("encoded %d of %d clips", i + 1, count)
    ids = np.array([clip.scene.class_id for clip in clips], np.int64)
    return np.concatenate(latents), ids


def save_latents(directory: Path, latents: np.ndarray, ids: np.ndarray) -> None:
    """`latents.npy` (float16) and `latents.json` (class ids, captions) in `directory`."""
    np.save(directory / "latents.npy", latents.astype(np.float16))
    (directory / "latents.json").write_text(json.dumps({"class_ids": ids.tolist(),
                                                        "captions": [s.caption for s in scenes()]}))


def load_latents(directory: Path, device: torch.device) -> tuple[Tensor, Tensor]:
    """(latents (N, c, t, h, w) float16, class ids (N,) int64) on `device`, written by `save_latents`."""
    latents = torch.from_numpy(np.load(directory / "latents.npy")).to(device)
    ids = torch.tensor(json.loads((directory / "latents.json").read_text())["class_ids"], device=device)
    return latents, ids


def pool(latent: Tensor, factor: int) -> Tensor:
    """Average-pool (B, c, T, H, W) by `factor` in H and W (`runtime.pipeline._pool_to`)."""
    return latent if factor == 1 else F.avg_pool3d(latent, (1, factor, factor))
