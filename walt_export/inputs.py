"""Seeded sample inputs of the denoisers and the text encoder, shaped from their configs (the export specs build
every stage's sample inputs from these; tests use them directly)."""

from __future__ import annotations

import torch
from torch import Tensor

from walt_export.config import DenoiserConfig, SuperResConfig, TextEncoderConfig


def _padded_mask(batch: int, length: int) -> Tensor:
    """(batch, length) int64 attention mask: sample 0 is padded after its first half, the others are full."""
    mask = torch.ones(batch, length, dtype=torch.int64, device="cpu")
    mask[0, max(1, length // 2):] = 0
    return mask


def denoiser_inputs(cfg: DenoiserConfig, batch: int = 2, frames: int | None = None, text_length: int = 16,
                    generator: torch.Generator | None = None, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> tuple[list[Tensor], dict[str, Tensor]]:
    """(positional args, keyword conditioning) for a denoiser's forward, drawn on the CPU from `generator` (so
    every device gets the same values) and moved to `device`; latents in `dtype`.

    Timesteps are spread over the schedule, about half the latent frames are conditioning frames, and the text of
    sample 0 is padded after its first half (class presets: sample 0 gets class 0, the others the null class).
    """
    t, h, w = cfg.latent_size
    t = frames or t
    c = cfg.latent_channels

    def normal(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator, device="cpu").to(device, dtype)

    def uniform(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=generator, device="cpu")

    args = [normal(batch, c, t, h, w), (uniform(batch) * 999).to(device), normal(batch, c, t, h, w),
            normal(batch, c, t, h, w), (uniform(batch, t) > 0.5).to(device, dtype)]
    if isinstance(cfg, SuperResConfig):
        noise_timestep = torch.full((batch,), cfg.noise_aug_level * 1000.0, device=device)  # 1000 training steps
        args += [normal(batch, c, t, *cfg.lowres_size[1:]), noise_timestep]
    if cfg.conditioning == "text":
        text = normal(batch, text_length, cfg.text_dim)
        return args, dict(text=text, text_mask=_padded_mask(batch, text_length).to(device))
    if cfg.conditioning == "class":
        labels = torch.full((batch,), cfg.num_classes, dtype=torch.int64, device="cpu")
        labels[0] = 0
        return args, dict(class_labels=labels.to(device))
    return args, {}


def text_encoder_inputs(cfg: TextEncoderConfig, batch: int = 2, generator: torch.Generator | None = None,
                        device: str | torch.device = "cpu") -> tuple[Tensor, Tensor]:
    """(input_ids, attention_mask) of `cfg.max_length` tokens; sample 0 is padded after its first half."""
    ids = torch.randint(3, cfg.vocab_size, (batch, cfg.max_length), generator=generator, device="cpu")
    mask = _padded_mask(batch, cfg.max_length)
    return (ids * mask).to(device), mask.to(device)
