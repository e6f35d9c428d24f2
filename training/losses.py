"""The training objective of every stage of the reference cascade, as `loss(model, step) -> scalar`.

Tokenizer: L1 + MSE reconstruction of world crops through encoder and decoder (no GAN or perceptual term: there is
no learned model to score with, and the world has no fine texture).

Denoisers (docs/model_spec.md §3-4, the runtime's sampling in `runtime/pipeline.py`):
- v-prediction on the zero-terminal-SNR schedule the runtime samples (`runtime.scheduler.zero_snr_alpha_bar`),
  t uniform over the training steps, or logit-normal (`timestep_logit_mean`: t / T = sigmoid(m + n), n ~ N(0, 1),
  Esser et al. 2024, "Scaling Rectified Flow Transformers" §3.1), which with m > 0 draws the noisy steps more often:
  there the caption decides the layout and the motion (docs/reference.md §6); MSE on v over the frames that are not
  conditioning frames.
- text: the frozen text encoder's states of the caption; the empty prompt (the runtime's unconditional half of
  classifier-free guidance) in CAPTION_DROPOUT of the samples.
- self-conditioning [Chen et al. 2022, "Analog Bits"]: in SELF_CONDITIONING of the steps a first pass without
  gradient predicts x0, which the second pass gets as `self_cond` (the runtime feeds the previous step's x0).
- frame conditioning over 0, 1 or 2 clean latent frames (FRAME_CONDITIONING): text-to-video, image-to-video (the
  first frame's latent) and the continuation of long videos (two latent frames of the previous clip).
- SR: the lower denoiser's latent (z pooled by one more factor), noise-augmented at a level drawn uniformly up to
  MAX_NOISE_AUG of the schedule; the runtime uses the config's fixed level (0.25) [P §4.5].
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from runtime.scheduler import zero_snr_alpha_bar
from training.data import pool
from walt_export.config import DiffusionConfig, SuperResConfig

CAPTION_DROPOUT = 0.1
SELF_CONDITIONING = 0.5
FRAME_CONDITIONING = (0.6, 0.2, 0.2)  # probability of 0, 1, 2 conditioning latent frames
MAX_NOISE_AUG = 0.5

Loss = Callable[[nn.Module, int], Tensor]


def tokenizer_loss(batches) -> Loss:
    """Reconstruction loss of the next batch (B, 3, T, S, S) from the iterator `batches`."""

    def loss(model: nn.Module, step: int) -> Tensor:
        video = next(batches).to(next(model.parameters()).device, non_blocking=True)
        recon, _ = model.decoder(model.encoder(video))
        return F.l1_loss(recon, video) + F.mse_loss(recon, video)

    return loss


def step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """The generator of every random draw of `step`: a resumed run draws what it would have drawn."""
    return torch.Generator(device).manual_seed(int(np.random.SeedSequence([seed, step]).generate_state(1)[0]))


def diffuse(x0: Tensor, noise: Tensor, alpha_bar: Tensor) -> tuple[Tensor, Tensor]:
    """(x_t, v): `x0` noised with `noise` to the cumulative signal level `alpha_bar` (broadcastable), and the
    v-prediction target sqrt(alpha_bar) noise - sqrt(1 - alpha_bar) x0 [Salimans & Ho 2022, "Progressive Distillation"]."""
    return (alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise,
            alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0)


class DenoiserLoss:
    """The v-prediction loss of one denoiser on the latent dataset (see the module docstring).

    Args:
        config: the denoiser's config (a SuperResConfig for SR1 and SR2).
        latents: (N, c, t, H, W) float16 normalised latents of full-resolution clips, on the training device.
        class_ids: (N,) int64, each clip's index into `text_states`.
        text_states, text_mask: (K + 1, L, d) and (K + 1, L) of the K captions and, last, the empty prompt.
        diffusion: the training schedule.
        batch, seed: samples per step; seed of every draw (with the step).
        timestep_logit_mean: None for t uniform over the training steps, else the location m of logit-normal t
            (see the module docstring).
    """

    def __init__(self, config, latents: Tensor, class_ids: Tensor, text_states: Tensor, text_mask: Tensor,
                 diffusion: DiffusionConfig, batch: int, seed: int, timestep_logit_mean: float | None = None):
        self.config, self.latents, self.class_ids = config, latents, class_ids
        self.timestep_logit_mean = timestep_logit_mean
        self.text_states, self.text_mask = text_states, text_mask
        self.batch, self.seed = batch, seed
        self.factor = latents.shape[-2] // config.latent_size[1]  # pooling of the full-resolution latent
        alpha_bar = zero_snr_alpha_bar(diffusion.num_train_timesteps, diffusion.beta_start, diffusion.beta_end,
                                       diffusion.rescale_zero_terminal_snr)
        self.alpha_bar = torch.tensor(alpha_bar, dtype=torch.float32, device=latents.device)
        self.num_train = diffusion.num_train_timesteps

    def timesteps(self, g: torch.Generator) -> Tensor:
        """(B,) int64 training timesteps in [0, T) drawn from `g` (uniform or logit-normal)."""
        device = self.latents.device
        if self.timestep_logit_mean is None:
            return torch.randint(self.num_train, (self.batch,), generator=g, device=device)
        u = torch.sigmoid(self.timestep_logit_mean + torch.randn(self.batch, generator=g, device=device))
        return (u * self.num_train).long().clamp(max=self.num_train - 1)

    def __call__(self, model: nn.Module, step: int) -> Tensor:
        device = self.latents.device
        g = step_generator(self.seed, step, device)
        b = self.batch

        def uniform() -> Tensor:
            return torch.rand(b, generator=g, device=device)

        def normal(like: Tensor) -> Tensor:
            return torch.randn(like.shape, generator=g, device=device)

        index = torch.randint(len(self.latents), (b,), generator=g, device=device)
        z = self.latents[index].float()
        x0 = pool(z, self.factor)
        t = self.timesteps(g)
        a = self.alpha_bar[t].view(b, 1, 1, 1, 1)
        x_t, target = diffuse(x0, normal(x0), a)

        frames = x0.shape[2]
        probabilities = torch.tensor(FRAME_CONDITIONING, device=device)
        k = torch.multinomial(probabilities.expand(b, -1), 1, generator=g)  # (B, 1): 0, 1 or 2
        frame_mask = (torch.arange(frames, device=device)[None] < k).float()  # (B, T)
        frame_cond = x0 * frame_mask[:, None, :, None, None]

        caption = torch.where(uniform() < CAPTION_DROPOUT, len(self.text_states) - 1, self.class_ids[index])
        feeds = {"text": self.text_states[caption], "text_mask": self.text_mask[caption]}
        if isinstance(self.config, SuperResConfig):
            lowres = pool(z, self.factor * self.config.upsample_factor)
            level = torch.randint(int(MAX_NOISE_AUG * self.num_train) + 1, (b,), generator=g, device=device)
            a_aug = self.alpha_bar[level.clamp(max=self.num_train - 1)].view(b, 1, 1, 1, 1)
            feeds |= {"lowres": a_aug.sqrt() * lowres + (1 - a_aug).sqrt() * normal(lowres),
                      "lowres_timestep": level.float()}

        def predict(self_cond: Tensor) -> Tensor:
            return model(x_t, t.float(), self_cond, frame_cond, frame_mask, **feeds)

        self_cond = torch.zeros_like(x0)
        if torch.rand((), generator=g, device=device) < SELF_CONDITIONING:  # per batch: half the steps skip the pass
            with torch.no_grad():
                self_cond = a.sqrt() * x_t - (1 - a).sqrt() * predict(self_cond)  # x0 from v
        weight = (1 - frame_mask)[:, None, :, None, None].expand_as(x0)  # no loss on conditioning frames
        return ((predict(self_cond) - target).square() * weight).sum() / weight.sum()
