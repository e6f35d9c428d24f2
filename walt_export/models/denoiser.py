"""The W.A.L.T denoiser: a window-attention transformer over latent patches that predicts v [P §4.2-4.4; spec §3].

    noisy latent | self-cond x0 | frame-cond latent, mask   (B, 3c+1, T, H, W)
      -> patchify (1 x p x p) + spatial and temporal position embeddings          (B, T, h, w, d)
      -> `depth` layers, spatial (whole frame) and spatiotemporal (window) alternating:
             x += gate * WindowAttention(AdaLN(x))       relative position bias, query-key norm
             x += CrossAttention(LN(x), text)            k = v = [window tokens, text]   (text presets)
             x += gate * MLP(AdaLN(x))
         AdaLN-LoRA: A_1 = Linear(SiLU(c + t_emb)), layer i > 1: A_i = A_1 + W_b^i W_a^i SiLU(c + t_emb)
      -> final AdaLN + linear to p*p*c, unpatchify -> v (B, c, T, H, W)

Images (T = 1) keep the spatial layers and pass the spatiotemporal ones with an identity attention mask.
The super-resolution subclass (`super_resolution.py`) adds the upsampled low-res latent as channels and its
noise-augmentation level to AdaLN.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from walt_export.config import DenoiserConfig
from walt_export.window_attention.op import SPATIAL_WINDOW, Window, merge, partition, window_attention


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features of (fractional) timesteps: (B,) -> (B, dim) as [cos, sin] (DiT / ADM)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features -> Linear -> SiLU -> Linear (DiT)."""

    def __init__(self, hidden: int, frequency_size: int):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: Tensor) -> Tensor:  # (B,) -> (B, d)
        return self.mlp(timestep_embedding(t, self.frequency_size).to(self.mlp[0].weight.dtype))


def relative_position_index(window: Window, device: torch.device | None = None) -> Tensor:
    """(L, L) index into a ((2wt-1)(2wh-1)(2ww-1), heads) table of every query/key offset inside a window (Swin)."""
    wt, wh, ww = window
    grids = torch.meshgrid(*(torch.arange(n, device=device) for n in window), indexing="ij")
    coords = torch.stack(grids).flatten(1)  # (3, L)
    rel = coords[:, :, None] - coords[:, None, :]  # (3, L, L), offsets in [-(w-1), w-1]
    return (rel[0] + wt - 1) * (2 * wh - 1) * (2 * ww - 1) + (rel[1] + wh - 1) * (2 * ww - 1) + (rel[2] + ww - 1)


def _qk_norm(cfg: DenoiserConfig) -> nn.Module:
    if cfg.qk_norm == "rmsnorm":
        return nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.head_dim, eps=cfg.norm_eps)


class WindowSelfAttention(nn.Module):
    """Multi-head self-attention inside non-overlapping windows, through the `wattn` op."""

    def __init__(self, cfg: DenoiserConfig, spatial: bool):
        super().__init__()
        self.config, self.spatial = cfg, spatial
        d = cfg.hidden_size
        self.qkv = nn.Linear(d, 3 * d)
        self.q_norm, self.k_norm = _qk_norm(cfg), _qk_norm(cfg)
        self.proj = nn.Linear(d, d)
        self.window = cfg.attention_window(spatial)
        self.relative_bias = None
        if cfg.relative_position_bias:
            wt, wh, ww = self.window
            self.relative_bias = nn.Parameter(torch.zeros((2 * wt - 1) * (2 * wh - 1) * (2 * ww - 1), cfg.num_heads))

    def bias(self) -> Tensor | None:
        """The (heads, L, L) relative position bias of this layer's window, or None."""
        if self.relative_bias is None:
            return None
        length = self.window[0] * self.window[1] * self.window[2]
        index = relative_position_index(self.window, self.relative_bias.device)  # (L, L)
        return self.relative_bias[index.flatten()].view(length, length, -1).permute(2, 0, 1)  # (heads, L, L)

    def forward(self, x: Tensor) -> Tensor:  # (B, T, h, w, d)
        b, t, h, w, d = x.shape
        heads, hd = self.config.num_heads, self.config.head_dim
        qkv = self.qkv(x).view(b, t, h, w, 3, heads, hd).permute(4, 0, 5, 1, 2, 3, 6)  # (3, B, heads, T, h, w, hd)
        q, k, v = qkv.reshape(3, b * heads, t, h, w, hd).unbind(0)  # (B*heads, T, h, w, hd), batch-major
        if not self.spatial and t == 1:
            out = v  # an image in a spatiotemporal layer: identity attention mask, each token sees itself
        else:
            window = SPATIAL_WINDOW if self.spatial else self.window
            out = window_attention(self.q_norm(q), self.k_norm(k), v, window, hd**-0.5, self.bias())
        out = out.view(b, heads, t, h, w, hd).permute(0, 2, 3, 4, 1, 5).reshape(b, t, h, w, d)  # (B, T, h, w, d)
        return self.proj(out)


class WindowCrossAttention(nn.Module):
    """Each window attends to its own tokens and the text: q = window tokens, k = v = [window tokens, text]."""

    def __init__(self, cfg: DenoiserConfig, spatial: bool):
        super().__init__()
        self.config, self.spatial = cfg, spatial
        d = cfg.hidden_size
        self.q, self.k, self.v, self.proj = (nn.Linear(d, d) for _ in range(4))
        self.q_norm, self.k_norm = _qk_norm(cfg), _qk_norm(cfg)

    def forward(self, x: Tensor, text: Tensor, text_bias: Tensor) -> Tensor:
        """x (B, T, h, w, d), text (B, Lt, d) projected, text_bias (B, Lt) additive (0 or -inf) -> (B, T, h, w, d)."""
        b, t, h, w, d = x.shape
        heads, hd = self.config.num_heads, self.config.head_dim
        window = self.config.attention_window(self.spatial, t)
        xw = partition(x, window)  # (B*nWin, L, d)
        n, length, _ = xw.shape
        n_win = n // b

        def per_window(y: Tensor) -> Tensor:  # (B, Lt, d) -> (B*nWin, Lt, d)
            return y[:, None].expand(b, n_win, *y.shape[1:]).reshape(n, *y.shape[1:])

        def split_heads(y: Tensor) -> Tensor:  # (n, S, d) -> (n, heads, S, hd)
            return y.view(n, -1, heads, hd).transpose(1, 2)

        q = self.q_norm(split_heads(self.q(xw)))
        k = self.k_norm(split_heads(torch.cat([self.k(xw), per_window(self.k(text))], dim=1)))  # (n, heads, L+Lt, hd)
        v = split_heads(torch.cat([self.v(xw), per_window(self.v(text))], dim=1))
        mask = torch.cat([text_bias.new_zeros(b, length), text_bias], dim=1).to(q.dtype)  # (B, L + Lt)
        mask = per_window(mask[:, None])[:, None]  # (n, 1, 1, L + Lt)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=hd**-0.5)  # (n, heads, L, hd)
        out = merge(out.transpose(1, 2).reshape(n, length, d), window, (t, h, w))  # (B, T, h, w, d)
        return self.proj(out)


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


class WaltBlock(nn.Module):
    """One attention layer: window self-attention, optional text cross-attention, MLP; AdaLN-LoRA modulation."""

    def __init__(self, cfg: DenoiserConfig, layer: int):
        super().__init__()
        d = cfg.hidden_size
        spatial = cfg.is_spatial(layer)
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=cfg.norm_eps)
        self.attn = WindowSelfAttention(cfg, spatial)
        self.norm_cross = self.cross_attn = None
        if cfg.has_cross_attention(layer):
            self.norm_cross = nn.LayerNorm(d, eps=cfg.norm_eps)
            self.cross_attn = WindowCrossAttention(cfg, spatial)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=cfg.norm_eps)
        hidden = int(d * cfg.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, d))
        self.adaln_lora = None  # W_b^i W_a^i of AdaLN-LoRA; layer 0 uses A_1 as is
        if layer > 0:
            r = cfg.adaln_lora_rank
            self.adaln_lora = nn.Sequential(nn.Linear(d, r, bias=False), nn.Linear(r, 6 * d, bias=False))

    def forward(self, x: Tensor, shared_mod: Tensor, cond: Tensor, text: Tensor | None, text_bias: Tensor | None):
        """x (B, T, h, w, d); shared_mod A_1 (B, 6d); cond SiLU(c + t_emb) (B, d)."""
        mod = shared_mod if self.adaln_lora is None else shared_mod + self.adaln_lora(cond)
        shift1, scale1, gate1, shift2, scale2, gate2 = mod[:, None, None, None].chunk(6, dim=-1)  # (B, 1, 1, 1, d)
        x = x + gate1 * self.attn(_modulate(self.norm1(x), shift1, scale1))
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.norm_cross(x), text, text_bias)
        return x + gate2 * self.mlp(_modulate(self.norm2(x), shift2, scale2))


class WaltDenoiser(nn.Module):
    """The base denoiser; see the module docstring. `forward` returns v with the shape of `x`."""

    def __init__(self, cfg: DenoiserConfig):
        super().__init__()
        self.config = cfg
        d, p, c = cfg.hidden_size, cfg.patch_size, cfg.latent_channels
        t, h, w = cfg.token_grid
        self.patch_embed = nn.Conv3d(cfg.in_channels, d, (1, p, p), stride=(1, p, p))
        self.pos_spatial = nn.Parameter(torch.zeros(h, w, d))
        self.pos_temporal = nn.Parameter(torch.zeros(t, d))  # images use index 0
        self.t_embedder = TimestepEmbedder(d, cfg.frequency_embedding_size)
        if cfg.conditioning == "class":
            self.class_embed = nn.Embedding(cfg.num_classes + 1, d)  # + the null class for guidance
        elif cfg.conditioning == "text":
            self.text_proj = nn.Linear(cfg.text_dim, d)  # text tokens for cross-attention
            self.text_pool = nn.Linear(cfg.text_dim, d)  # masked mean of the text -> c
        self.adaln_shared = nn.Linear(d, 6 * d)  # A_1 = Linear(SiLU(c + t_emb))
        self.blocks = nn.ModuleList(WaltBlock(cfg, i) for i in range(cfg.depth))
        self.final_norm = nn.LayerNorm(d, elementwise_affine=False, eps=cfg.norm_eps)
        self.final_adaln = nn.Linear(d, 2 * d)
        self.final_linear = nn.Linear(d, p * p * c)
        self.apply(init_weights)
        for param in (self.pos_spatial, self.pos_temporal, *self._relative_biases()):
            nn.init.trunc_normal_(param, std=0.02)

    def _relative_biases(self) -> list[nn.Parameter]:
        return [block.attn.relative_bias for block in self.blocks if block.attn.relative_bias is not None]

    def forward(self, x: Tensor, timestep: Tensor, self_cond: Tensor, frame_cond: Tensor, frame_mask: Tensor,
                class_labels: Tensor | None = None, text: Tensor | None = None,
                text_mask: Tensor | None = None) -> Tensor:
        """Predict v.

        Args:
            x: noisy latent (B, c, T, H, W); T is the config's or 1 (an image).
            timestep: (B,) float timesteps in [0, num_train_timesteps).
            self_cond: previous x0 estimate (B, c, T, H, W), zeros on the first step.
            frame_cond: conditioning latent (B, c, T, H, W), zeros where unused.
            frame_mask: (B, T) 1 for conditioning latent frames, else 0.
            class_labels: (B,) int64, `num_classes` = null class (class presets).
            text, text_mask: text encoder states (B, Lt, text_dim) and mask (B, Lt) (text presets).
        """
        return self._denoise([x, self_cond, frame_cond], frame_mask, timestep, class_labels, text, text_mask)

    def _denoise(self, channels: list[Tensor], frame_mask: Tensor, timestep: Tensor, class_labels: Tensor | None,
                 text: Tensor | None, text_mask: Tensor | None, extra_cond: Tensor | None = None) -> Tensor:
        cfg = self.config
        x = channels[0]
        self._check_input(x, frame_mask)
        b, _, t, hh, ww = x.shape
        mask = frame_mask.to(x.dtype)[:, None, :, None, None].expand(b, 1, t, hh, ww)  # (B, 1, T, H, W)
        inp = torch.cat([*channels[:3], mask, *channels[3:]], dim=1)  # (B, in_channels, T, H, W)
        tokens = self.patch_embed(inp).permute(0, 2, 3, 4, 1)  # (B, T, h, w, d)
        tokens = tokens + self.pos_spatial[None, None] + self.pos_temporal[None, :t, None, None]

        cond = self.t_embedder(timestep)  # (B, d)
        text_tokens = text_bias = None
        if cfg.conditioning == "class":
            if class_labels is None:
                raise ValueError(f"this denoiser is class-conditional: pass class_labels (B,), {cfg.num_classes} = null")
            cond = cond + self.class_embed(class_labels)
        elif cfg.conditioning == "text":
            if text is None or text_mask is None:
                raise ValueError("this denoiser is text-conditioned: pass text (B, Lt, text_dim) and text_mask (B, Lt)")
            valid = text_mask.to(text.dtype)[..., None]  # (B, Lt, 1)
            pooled = (text * valid).sum(1) / valid.sum(1).clamp(min=1.0)  # (B, text_dim)
            cond = cond + self.text_pool(pooled)
            text_tokens = self.text_proj(text)  # (B, Lt, d)
            text_bias = torch.zeros_like(text_mask, dtype=tokens.dtype).masked_fill(text_mask == 0, float("-inf"))
        if extra_cond is not None:
            cond = cond + extra_cond
        cond = F.silu(cond)
        shared_mod = self.adaln_shared(cond)  # A_1 (B, 6d)

        for block in self.blocks:
            tokens = block(tokens, shared_mod, cond, text_tokens, text_bias)

        shift, scale = self.final_adaln(cond)[:, None, None, None].chunk(2, dim=-1)  # (B, 1, 1, 1, d)
        out = self.final_linear(_modulate(self.final_norm(tokens), shift, scale))  # (B, T, h, w, p*p*c)
        p, c = cfg.patch_size, cfg.latent_channels
        _, _, h, w, _ = out.shape
        out = out.view(b, t, h, w, p, p, c).permute(0, 6, 1, 2, 4, 3, 5)  # (B, c, T, h, p, w, p)
        return out.reshape(b, c, t, h * p, w * p)

    def _check_input(self, x: Tensor, frame_mask: Tensor) -> None:
        c, (t, h, w) = self.config.latent_channels, self.config.latent_size
        if x.dim() != 5 or x.shape[1] != c or tuple(x.shape[3:]) != (h, w) or x.shape[2] not in (1, t):
            raise ValueError(
                f"latent must be (B, {c}, {t}, {h}, {w}) or (B, {c}, 1, {h}, {w}) for an image, got {tuple(x.shape)}"
            )
        if tuple(frame_mask.shape) != (x.shape[0], x.shape[2]):
            raise ValueError(f"frame_mask must be (B, T) = {(x.shape[0], x.shape[2])}, got {tuple(frame_mask.shape)}")


def init_weights(module: nn.Module) -> None:
    """Random init that keeps an untrained model's outputs non-trivial (nothing zero-initialised)."""
    if isinstance(module, (nn.Linear, nn.Conv3d)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
