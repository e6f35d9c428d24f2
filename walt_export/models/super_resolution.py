"""The super-resolution denoiser: W.A.L.T plus the previous denoiser's latent, upsampled inside the model [P §4.5].

The low-res latent (B, c, T, H/f, W/f) is upsampled x f by a learned depth-to-space convolution and joins the
input channels; its noise-augmentation timestep t_sr is embedded like the diffusion timestep and added to the
AdaLN-LoRA conditioning. Everything else is the base denoiser.
"""

from __future__ import annotations

from torch import Tensor, nn

from walt_export.config import SuperResConfig
from walt_export.models.denoiser import TimestepEmbedder, WaltDenoiser, init_weights


class SuperResDenoiser(WaltDenoiser):
    """W.A.L.T with the low-res latent upsampled x f by a learned depth-to-space conv and its noise level in AdaLN."""

    def __init__(self, cfg: SuperResConfig):
        super().__init__(cfg)
        c, f = cfg.latent_channels, cfg.upsample_factor
        self.lowres_upsample = nn.Conv3d(c, c * f * f, (1, 3, 3), padding=(0, 1, 1))
        self.noise_embedder = TimestepEmbedder(cfg.hidden_size, cfg.frequency_embedding_size)
        self.lowres_upsample.apply(init_weights)
        self.noise_embedder.apply(init_weights)

    def forward(self, x: Tensor, timestep: Tensor, self_cond: Tensor, frame_cond: Tensor, frame_mask: Tensor,
                lowres: Tensor, lowres_timestep: Tensor, text: Tensor | None = None,
                text_mask: Tensor | None = None) -> Tensor:
        """As `WaltDenoiser.forward`, plus the noise-augmented low-res latent (B, c, T, H/f, W/f) and its (B,)
        noise-augmentation timestep."""
        f = self.config.upsample_factor
        if lowres.dim() != 5 or tuple(lowres.shape[3:]) != tuple(s // f for s in x.shape[3:]):
            raise ValueError(f"lowres must be (B, c, T, H/{f}, W/{f}) for x {tuple(x.shape)}, got {tuple(lowres.shape)}")
        b, c, t, h, w = lowres.shape
        up = self.lowres_upsample(lowres).view(b, c, f, f, t, h, w)  # (B, c, f, f, T, h, w)
        up = up.permute(0, 1, 4, 5, 2, 6, 3).reshape(b, c, t, h * f, w * f)  # (B, c, T, H, W)
        return self._denoise([x, self_cond, frame_cond, up], frame_mask, timestep, None, text, text_mask,
                             extra_cond=self.noise_embedder(lowres_timestep))
