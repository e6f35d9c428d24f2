"""The causal 3D-CNN video tokenizer (MAGVIT-v2 style, no quantization) [P §4.1, App. A; spec §2].

x (B, 3, 1+4k, H, W) in [-1, 1]  ->  z (B, c, 1+k, H/8, W/8), normalised per channel  ->  x again.

Causality: every temporal convolution sees only the current and past frames (kt-1 frames padded in front, by
repeating the first frame), and every GroupNorm takes its statistics per frame, so latent frame t depends only on
input frames up to its own: an image (one frame) encodes like the first frame of a video.

The decoder carries its causal state explicitly: `decoder(z, state) -> (frames, state)`, where `state` holds the
last kt-1 input frames of each temporal convolution (None = start of the clip). Decoding a clip a few latent
frames at a time gives the frames of decoding it at once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from walt_export.config import TokenizerConfig

DecoderState = tuple[Tensor, ...]  # one cache (B, C, kt-1, H, W) per temporal convolution, in module order


class CausalState:
    """Threads the caches of one decode call through the convolutions: read the old, record the new."""

    def __init__(self, caches: Sequence[Tensor] | None):
        self.first = caches is None  # the chunk that starts the clip
        self._incoming = iter(caches or ())
        self.outgoing: list[Tensor] = []

    def read(self) -> Tensor:
        try:
            return next(self._incoming)
        except StopIteration:
            raise ValueError("decoder state has fewer caches than the decoder has temporal convolutions") from None

    def check_consumed(self) -> None:
        if next(self._incoming, None) is not None:
            raise ValueError("decoder state has more caches than the decoder has temporal convolutions")


class CausalConv3d(nn.Module):
    """Conv3d over (T, H, W) that sees the current and previous kt-1 frames; spatial padding is symmetric zeros."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: Sequence[int] = (1, 1, 1),
                 pad: str = "replicate"):
        super().__init__()
        self.time_pad = kernel - 1
        self.pad = pad
        self.conv = nn.Conv3d(cin, cout, kernel, stride=tuple(stride), padding=(0, kernel // 2, kernel // 2))

    def forward(self, x: Tensor, state: CausalState | None = None) -> Tensor:  # (B, C, T, H, W)
        if self.time_pad == 0:
            return self.conv(x)
        if state is None or state.first:
            first = x[:, :, :1]
            front = first if self.pad == "replicate" else torch.zeros_like(first)
            front = front.expand(-1, -1, self.time_pad, -1, -1)  # (B, C, kt-1, H, W)
        else:
            front = state.read()
        x = torch.cat([front, x], dim=2)  # (B, C, kt-1 + T, H, W)
        if state is not None:
            state.outgoing.append(x[:, :, -self.time_pad:])
        return self.conv(x)


class FrameGroupNorm(nn.Module):
    """GroupNorm with statistics per frame (over C/G x H x W, never across time)."""

    def __init__(self, groups: int, channels: int, eps: float, affine: bool = True):
        super().__init__()
        self.groups, self.eps = groups, eps
        self.weight = nn.Parameter(torch.ones(channels)) if affine else None
        self.bias = nn.Parameter(torch.zeros(channels)) if affine else None

    def forward(self, x: Tensor) -> Tensor:  # (B, C, T, H, W)
        b, c, t, h, w = x.shape
        if self.training and torch.is_grad_enabled():  # the same statistics through torch's fused kernel: 2.4x faster
            frames = x.transpose(1, 2).reshape(b * t, c, h, w)  # training on a CPU (1x16x5x256x448, fwd + bwd)
            out = F.group_norm(frames, self.groups, self.weight, self.bias, self.eps)
            return out.view(b, t, c, h, w).transpose(1, 2)
        g = x.view(b, self.groups, c // self.groups, t, h, w)
        mean = _group_mean(g)  # (B, G, 1, T, 1, 1)
        var = _group_mean((g - mean).square())
        x = ((g - mean) * torch.rsqrt(var + self.eps)).view(b, c, t, h, w)
        if self.weight is not None:
            x = x * self.weight.view(1, c, 1, 1, 1) + self.bias.view(1, c, 1, 1, 1)
        return x


def _group_mean(g: Tensor) -> Tensor:
    """Mean over (C/G, H, W) of (B, G, C/G, T, H, W), one axis at a time: the same value, but every sum is short,
    so runtimes that accumulate naively (onnxruntime's ReduceMean: 2e-4 off over 512x896 in float32, float16
    engines) stay as accurate as torch."""
    return g.mean(dim=5, keepdim=True).mean(dim=4, keepdim=True).mean(dim=2, keepdim=True)


class AdaptiveGroupNorm(nn.Module):
    """Per-frame GroupNorm whose scale and shift come from the latent (decision for the spec's "AdaGN").

    `z_t` is the latent already repeated causally in time to this level's frame count, at latent resolution;
    the 1x1x1 projection runs there and is broadcast over each s x s pixel block (nearest upsampling).
    """

    def __init__(self, groups: int, channels: int, latent_channels: int, eps: float):
        super().__init__()
        self.norm = FrameGroupNorm(groups, channels, eps, affine=False)
        self.proj = nn.Conv3d(latent_channels, 2 * channels, 1)

    def forward(self, x: Tensor, z_t: Tensor) -> Tensor:
        b, c, t, h, w = x.shape
        zh, zw = z_t.shape[-2:]
        scale, shift = self.proj(z_t).chunk(2, dim=1)  # (B, C, T, h, w) each
        scale, shift = (p.view(b, c, t, zh, 1, zw, 1) for p in (scale, shift))
        x = self.norm(x).view(b, c, t, zh, h // zh, zw, w // zw)  # (B, C, T, h, s, w, s)
        return (x * (1 + scale) + shift).view(b, c, t, h, w)


class ResBlock(nn.Module):
    """GN -> SiLU -> causal conv3 -> GN -> SiLU -> causal conv3, plus a 1x1x1 shortcut when channels change."""

    def __init__(self, cin: int, cout: int, cfg: TokenizerConfig, adaptive: bool = False):
        super().__init__()

        def norm(ch: int) -> nn.Module:
            if adaptive:
                return AdaptiveGroupNorm(cfg.norm_groups, ch, cfg.latent_channels, cfg.norm_eps)
            return FrameGroupNorm(cfg.norm_groups, ch, cfg.norm_eps)

        self.norm1, self.conv1 = norm(cin), CausalConv3d(cin, cout, pad=cfg.causal_pad)
        self.norm2, self.conv2 = norm(cout), CausalConv3d(cout, cout, pad=cfg.causal_pad)
        self.shortcut = nn.Conv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, z_t: Tensor | None = None, state: CausalState | None = None) -> Tensor:
        def norm(layer: nn.Module, h: Tensor) -> Tensor:
            return layer(h) if z_t is None else layer(h, z_t)

        h = self.conv1(F.silu(norm(self.norm1, x)), state)
        h = self.conv2(F.silu(norm(self.norm2, h)), state)
        return self.shortcut(x) + h


class DepthToSpaceUpsample(nn.Module):
    """Causal conv to C * st * sh * sw channels, then rearrange into (T*st, H*sh, W*sw).

    After a temporal x2 the first frame is dropped (1 + k frames -> 1 + 2k), at the start of the clip only.
    """

    def __init__(self, cin: int, cout: int, stride: tuple[int, int, int], pad: str):
        super().__init__()
        self.stride = stride
        self.conv = CausalConv3d(cin, cout * stride[0] * stride[1] * stride[2], pad=pad)

    def forward(self, x: Tensor, state: CausalState | None = None) -> Tensor:
        st, sh, sw = self.stride
        x = self.conv(x, state)
        b, _, t, h, w = x.shape
        x = x.view(b, -1, st, sh, sw, t, h, w)  # (B, C, st, sh, sw, T, H, W)
        x = x.permute(0, 1, 5, 2, 6, 3, 7, 4)  # (B, C, T, st, H, sh, W, sw)
        x = x.reshape(b, -1, t * st, h * sh, w * sw)  # (B, C, T*st, H*sh, W*sw)
        if st > 1 and (state is None or state.first):
            x = x[:, :, st - 1:]
        return x


def repeat_frames_causally(z: Tensor, factor: int, first: bool) -> Tensor:
    """Latent frame k -> the `factor` output frames it decodes to: (B, c, T, h, w) -> (B, c, T*f [-(f-1)], h, w).

    Latent frame 0 of a clip decodes to one frame, every later one to `factor` frames.
    """
    if factor == 1:
        return z
    b, c, t, h, w = z.shape
    z = z[:, :, :, None].expand(b, c, t, factor, h, w).reshape(b, c, t * factor, h, w)
    return z[:, :, factor - 1:] if first else z


class TokenizerEncoder(nn.Module):
    """(B, 3, 1+4k, H, W) -> normalised latent (B, c, 1+k, H/8, W/8)."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.config = cfg
        ch = cfg.channels
        self.conv_in = CausalConv3d(cfg.in_channels, ch[0], pad=cfg.causal_pad)
        self.levels = nn.ModuleList()
        cin = ch[0]
        for i, cout in enumerate(ch):
            level = nn.Module()
            level.blocks = nn.ModuleList(
                ResBlock(cin if j == 0 else cout, cout, cfg) for j in range(cfg.num_res_blocks)
            )
            level.downsample = None
            if i < len(cfg.temporal_downsample):
                stride = (2 if cfg.temporal_downsample[i] else 1, 2, 2)
                level.downsample = CausalConv3d(cout, cout, stride=stride, pad=cfg.causal_pad)
            self.levels.append(level)
            cin = cout
        self.mid = nn.ModuleList(ResBlock(ch[-1], ch[-1], cfg) for _ in range(cfg.num_mid_blocks))
        self.norm_out = FrameGroupNorm(cfg.norm_groups, ch[-1], cfg.norm_eps)
        self.conv_out = nn.Conv3d(ch[-1], cfg.latent_channels, 1)

    def forward(self, video: Tensor) -> Tensor:
        x = self.conv_in(video)
        for level in self.levels:
            for block in level.blocks:
                x = block(x)
            if level.downsample is not None:
                x = level.downsample(x)  # (1,2,2) then (2,2,2), (2,2,2): T 17 -> 17 -> 9 -> 5
        for block in self.mid:
            x = block(x)
        z = self.conv_out(F.silu(self.norm_out(x)))  # (B, c, 1+k, H/8, W/8)
        mean, std = _latent_stats(self.config, z)
        return (z - mean) / std


class TokenizerDecoder(nn.Module):
    """Normalised latent (B, c, t, h, w) + causal state -> frames (B, 3, T, 8h, 8w) + the next state.

    With `state=None` the chunk starts the clip and decodes t latent frames to 1 + 4(t-1) frames; with the state
    returned by the previous call it continues the clip and decodes to 4t frames.
    """

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.config = cfg
        ch = cfg.channels
        self.conv_in = CausalConv3d(cfg.latent_channels, ch[-1], pad=cfg.causal_pad)
        self.mid = nn.ModuleList(ResBlock(ch[-1], ch[-1], cfg, adaptive=True) for _ in range(cfg.num_mid_blocks))
        self.levels = nn.ModuleList()  # from the lowest resolution to the highest
        for i in reversed(range(len(ch))):
            level = nn.Module()
            level.blocks = nn.ModuleList(ResBlock(ch[i], ch[i], cfg, adaptive=True) for _ in range(cfg.num_res_blocks))
            level.upsample = None
            if i > 0:
                stride = (2 if cfg.temporal_downsample[i - 1] else 1, 2, 2)
                level.upsample = DepthToSpaceUpsample(ch[i], ch[i - 1], stride, cfg.causal_pad)
            self.levels.append(level)
        self.norm_out = FrameGroupNorm(cfg.norm_groups, ch[0], cfg.norm_eps)
        self.conv_out = CausalConv3d(ch[0], cfg.in_channels, pad=cfg.causal_pad)

    def forward(self, z: Tensor, state: Sequence[Tensor] | None = None) -> tuple[Tensor, DecoderState]:
        io = CausalState(state)
        mean, std = _latent_stats(self.config, z)
        z = z * std + mean
        x = self.conv_in(z, io)
        time_factor = 1  # frames per latent frame at the current level
        for block in self.mid:
            x = block(x, z, io)
        for level in self.levels:
            z_t = repeat_frames_causally(z, time_factor, io.first)
            for block in level.blocks:
                x = block(x, z_t, io)
            if level.upsample is not None:
                x = level.upsample(x, io)
                time_factor *= level.upsample.stride[0]
        x = self.conv_out(F.silu(self.norm_out(x)), io)
        io.check_consumed()
        return x, tuple(io.outgoing)


def _latent_stats(cfg: TokenizerConfig, like: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel latent mean and std as (1, c, 1, 1, 1) tensors [P Table 3e]."""
    mean = torch.tensor(cfg.mean, dtype=like.dtype, device=like.device).view(1, -1, 1, 1, 1)
    std = torch.tensor(cfg.std, dtype=like.dtype, device=like.device).view(1, -1, 1, 1, 1)
    return mean, std


class Tokenizer(nn.Module):
    """Encoder and decoder of the shared image/video latent space."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.config = cfg
        self.encoder = TokenizerEncoder(cfg)
        self.decoder = TokenizerDecoder(cfg)

    @torch.no_grad()
    def encode(self, video: Tensor) -> Tensor:
        """video (B, 3, 1+4k, H, W) in [-1, 1] -> normalised latent (B, c, 1+k, H/8, W/8) (inference, no grad)."""
        if video.dim() != 5 or video.shape[1] != self.config.in_channels:
            raise ValueError(
                f"video must be (B, {self.config.in_channels}, T, H, W), got {tuple(video.shape)}; "
                "add a frame axis for images: (B, 3, 1, H, W)"
            )
        self.config.latent_shape(*video.shape[2:])  # raises ConfigError naming the bad frame count or size
        return self.encoder(video)

    @torch.no_grad()
    def decode(self, latent: Tensor) -> Tensor:
        """Normalised latent (B, c, 1+k, h, w) -> video (B, 3, 1+4k, 8h, 8w), the whole clip at once (no grad)."""
        if latent.dim() != 5 or latent.shape[1] != self.config.latent_channels:
            raise ValueError(f"latent must be (B, {self.config.latent_channels}, t, h, w), got {tuple(latent.shape)}")
        return self.decoder(latent)[0]
