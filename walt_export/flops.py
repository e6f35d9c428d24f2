"""The FLOP model: floating-point operations of one call of every stage, counted from the config alone.

Counted as torch.utils.flop_counter counts them, 2 FLOPs per multiply-add of every matrix product, convolution and
attention (Q K^T and the weighted sum of V); normalisations, softmax and elementwise ops are not counted (they are
memory-bound, a few percent of the work). `tests/walt_export/test_flops.py` checks every stage of several presets
against torch's counter, exactly, on the meta device (where attention decomposes into counted matmuls: on the CPU
torch's `scaled_dot_product_attention` has no FLOP formula, so the counter misses the text cross-attention).

    flops = stage_flops(PRESETS["t2v"])          # stage -> FLOPs of one call at the stage's usual batch
    report = cascade_flops(PRESETS["t2v"])       # per clip: every call of `generate` (CFG, the schedule's steps)

Used by `walt-export bench` (achieved GFLOP/s, fraction of the physical limit) and
`benchmarks/reference_forward.py`. Pure Python: no torch.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from walt_export.config import CascadeConfig, DenoiserConfig, SuperResConfig, TextEncoderConfig, TokenizerConfig

GUIDED_BATCH = 2  # a denoiser or the text encoder with classifier-free guidance: the prompt and the empty prompt


def _conv(cin: int, cout: int, kernel_volume: int, out_voxels: int) -> int:
    return 2 * cin * cout * kernel_volume * out_voxels


def _linear(tokens: int, fan_in: int, fan_out: int) -> int:
    return 2 * tokens * fan_in * fan_out


class AttentionShape(BaseModel):
    """One attention of one denoiser layer in one call: `windows` independent sequences (batch x windows per sample)
    of `heads` heads, `query_length` queries against `key_length` keys of `head_dim` channels. Self-attention
    attends inside its window (spatial: one whole frame; spatiotemporal: the config's window); text
    cross-attention's keys are the window's tokens and the text's (docs/model_spec.md §3)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    layer: int
    kind: Literal["spatial", "spatiotemporal", "cross"]
    windows: int
    heads: int
    query_length: int
    key_length: int
    head_dim: int

    @property
    def scores(self) -> int:
        """Elements of the attention matrix Q K^T, which softmax reads and writes."""
        return self.windows * self.heads * self.query_length * self.key_length

    @property
    def flops(self) -> int:
        """Q K^T and the weighted sum of V, 2 FLOPs per multiply-add each."""
        return 4 * self.scores * self.head_dim


def attention_shapes(cfg: DenoiserConfig, batch: int, text_length: int = 0) -> list[AttentionShape]:
    """Every attention of one call of a denoiser on `batch` latents (video, not image), in layer order."""
    t, h, w = cfg.token_grid
    shapes = []
    for layer in range(cfg.depth):
        spatial = cfg.is_spatial(layer)
        wt, wh, ww = cfg.attention_window(spatial)
        length = wt * wh * ww
        common = dict(layer=layer, windows=batch * t * h * w // length, heads=cfg.num_heads, query_length=length,
                      head_dim=cfg.head_dim)
        shapes.append(AttentionShape(kind="spatial" if spatial else "spatiotemporal", key_length=length, **common))
        if cfg.has_cross_attention(layer):
            shapes.append(AttentionShape(kind="cross", key_length=length + text_length, **common))
    return shapes


def denoiser_flops(cfg: DenoiserConfig, batch: int, text_length: int = 0) -> int:
    """One call of a base or super-resolution denoiser on `batch` latents of the config's size (video, not image),
    with `text_length` text tokens (text presets)."""
    d, p, c = cfg.hidden_size, cfg.patch_size, cfg.latent_channels
    t, h, w = cfg.token_grid
    tokens = t * h * w  # per sample
    flops = batch * _conv(cfg.in_channels, d, p * p, tokens)  # patch embedding
    embedders = 2 if isinstance(cfg, SuperResConfig) else 1  # the timestep MLP, and SR's noise-level MLP
    per_sample = embedders * (_linear(1, cfg.frequency_embedding_size, d) + _linear(1, d, d))
    if isinstance(cfg, SuperResConfig):
        f = cfg.upsample_factor
        lt, lh, lw = cfg.lowres_size
        flops += batch * _conv(c, c * f * f, 9, lt * lh * lw)  # the learned depth-to-space upsampling
    if cfg.conditioning == "text":
        per_sample += _linear(text_length, cfg.text_dim, d) + _linear(1, cfg.text_dim, d)  # text tokens, pooled
    per_sample += _linear(1, d, 6 * d) + _linear(1, d, 2 * d)  # shared AdaLN A_1, final AdaLN
    for layer in range(cfg.depth):
        if layer > 0:
            per_sample += _linear(1, d, cfg.adaln_lora_rank) + _linear(1, cfg.adaln_lora_rank, 6 * d)
        flops += batch * _linear(tokens, d, 4 * d)  # qkv, proj
        if cfg.has_cross_attention(layer):
            flops += batch * (_linear(tokens, d, 4 * d) + _linear(text_length, d, 2 * d))  # q k v proj; k v of text
        flops += batch * _linear(tokens, d, int(d * cfg.mlp_ratio)) * 2
    flops += sum(a.flops for a in attention_shapes(cfg, batch, text_length))
    flops += batch * _linear(tokens, d, p * p * c)
    return flops + batch * per_sample


def text_encoder_flops(cfg: TextEncoderConfig, batch: int) -> int:
    """One call of the T5 encoder on `batch` prompts of `max_length` tokens."""
    length, inner = cfg.max_length, cfg.num_heads * cfg.d_kv
    projections = 3 if cfg.feed_forward_proj == "gated-gelu" else 2
    layer = (_linear(length, cfg.d_model, inner) * 4 + 4 * length * length * inner
             + _linear(length, cfg.d_model, cfg.d_ff) * projections)
    return batch * cfg.num_layers * layer


def _res_block(cin: int, cout: int, voxels: int) -> int:
    shortcut = _conv(cin, cout, 1, voxels) if cin != cout else 0
    return _conv(cin, cout, 27, voxels) + _conv(cout, cout, 27, voxels) + shortcut


def tokenizer_encoder_flops(cfg: TokenizerConfig, batch: int, frames: int, height: int, width: int) -> int:
    """One call of the encoder on `batch` videos of frames x height x width (frames = 1 + 4k)."""
    ch = cfg.channels
    t, h, w = frames, height, width
    flops = _conv(cfg.in_channels, ch[0], 27, t * h * w)
    cin = ch[0]
    for i, cout in enumerate(ch):
        for j in range(cfg.num_res_blocks):
            flops += _res_block(cin if j == 0 else cout, cout, t * h * w)
        if i < len(cfg.temporal_downsample):
            st = 2 if cfg.temporal_downsample[i] else 1
            t, h, w = (t - 1) // st + 1, (h - 1) // 2 + 1, (w - 1) // 2 + 1  # causal pad kt-1, stride (st, 2, 2)
            flops += _conv(cout, cout, 27, t * h * w)
        cin = cout
    flops += cfg.num_mid_blocks * _res_block(ch[-1], ch[-1], t * h * w)
    return batch * (flops + _conv(ch[-1], cfg.latent_channels, 1, t * h * w))


def tokenizer_decoder_flops(cfg: TokenizerConfig, batch: int, latent_frames: int, latent_height: int,
                            latent_width: int, first: bool = True) -> int:
    """One call of the decoder on `batch` latents; `first`: the chunk starts the clip (1 + 4(t-1) frames out, the
    `tokenizer_decoder` stage), else it continues one (4t frames out, `tokenizer_decoder_step`)."""
    ch, c = cfg.channels, cfg.latent_channels
    t, h, w = latent_frames, latent_height, latent_width
    latent_area = h * w
    time_factor = 1

    def adaptive_block(channels: int, frames: int, area: int) -> int:  # ResBlock with two AdaGN projections
        z_frames = latent_frames * time_factor - (time_factor - 1) * first
        return _res_block(channels, channels, frames * area) + 2 * _conv(c, 2 * channels, 1, z_frames * latent_area)

    flops = _conv(c, ch[-1], 27, t * h * w)
    flops += cfg.num_mid_blocks * adaptive_block(ch[-1], t, h * w)
    for i in reversed(range(len(ch))):
        flops += cfg.num_res_blocks * adaptive_block(ch[i], t, h * w)
        if i > 0:
            st = 2 if cfg.temporal_downsample[i - 1] else 1
            flops += _conv(ch[i], ch[i - 1] * st * 4, 27, t * h * w)  # depth-to-space convolution
            t, h, w = t * st - (st - 1) * first, 2 * h, 2 * w
            time_factor *= st
    return batch * (flops + _conv(ch[0], cfg.in_channels, 27, t * h * w))


def generate_batch(cfg: CascadeConfig, stage: str) -> int:
    """The batch `generate` calls a stage with: GUIDED_BATCH for the text encoder and the denoisers (classifier-free
    guidance), 1 for the tokenizer stages."""
    return GUIDED_BATCH if stage in ("text_encoder", *cfg.denoisers()) else 1


def stage_flops(cfg: CascadeConfig, batch: dict[str, int] | None = None,
                latent_frames: int | None = None) -> dict[str, int]:
    """FLOPs of one call of every stage (the names of `walt_export.export_specs`), in pipeline order.

    `batch` overrides the batch per stage; by default the batch `generate` uses (`generate_batch`). The tokenizer
    stages run `latent_frames` latent frames (default: the
    cascade's clip), the encoder on the video they decode to."""
    batch = batch or {}

    def batch_of(stage: str) -> int:
        return batch.get(stage, generate_batch(cfg, stage))

    flops = {}
    text_length = cfg.text_encoder.max_length if cfg.text_encoder is not None else 0
    if cfg.text_encoder is not None:
        flops["text_encoder"] = text_encoder_flops(cfg.text_encoder, batch_of("text_encoder"))
    for name in cfg.denoisers():
        flops[name] = denoiser_flops(getattr(cfg, name), batch_of(name), text_length)
    tk = cfg.tokenizer
    _, t, h, w = tk.latent_shape(cfg.frames, cfg.height, cfg.width)
    t = latent_frames or t
    frames = 1 + tk.temporal_factor * (t - 1)
    flops["tokenizer_encoder"] = tokenizer_encoder_flops(tk, batch_of("tokenizer_encoder"), frames, cfg.height,
                                                         cfg.width)
    flops["tokenizer_decoder"] = tokenizer_decoder_flops(tk, batch_of("tokenizer_decoder"), t, h, w)
    flops["tokenizer_decoder_step"] = tokenizer_decoder_flops(tk, batch_of("tokenizer_decoder_step"), t, h, w,
                                                              first=False)
    return flops


class StageCost(BaseModel):
    """What one stage costs per generated clip."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    stage: str
    calls: int  # calls per clip
    batch: int  # samples per call
    flops_per_call: int
    flops: int  # per clip: calls x flops_per_call


class CascadeCost(BaseModel):
    """The FLOPs of generating one clip: every call `generate` makes, with guidance and the given steps."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    preset: str
    steps: int
    guidance: bool
    stages: tuple[StageCost, ...]

    @property
    def flops(self) -> int:
        return sum(s.flops for s in self.stages)

    def seconds_at(self, peak_flops_per_s: float) -> float:
        """The physical lower bound: the clip's FLOPs at `peak_flops_per_s` (every unit busy, no overhead)."""
        return self.flops / peak_flops_per_s


def cascade_flops(cfg: CascadeConfig, steps: int | None = None, guidance: bool = True) -> CascadeCost:
    """Per clip of text- (or class-) to-video: the text encoder once, `steps` calls of each denoiser (default: the
    schedule's; one call is the guided pair, batch 2, with `guidance`), and one whole-clip decode. Self-conditioning
    costs nothing extra at inference (it feeds the previous step's x0; docs/model_spec.md §4)."""
    steps = steps or cfg.diffusion.num_inference_steps
    pair = GUIDED_BATCH if guidance else 1
    batch = {name: pair for name in ("text_encoder", *cfg.denoisers())}
    per_call = stage_flops(cfg, batch)
    calls = {"text_encoder": 1, **{name: steps for name in cfg.denoisers()}, "tokenizer_decoder": 1}
    return CascadeCost(preset=cfg.name, steps=steps, guidance=guidance, stages=tuple(
        StageCost(stage=name, calls=n, batch=batch.get(name, 1), flops_per_call=per_call[name],
                  flops=n * per_call[name]) for name, n in calls.items() if name in per_call))


# Dense (no 2:4 sparsity) tensor-core peaks of NVIDIA's SXM data sheets, FLOP/s (INT8: OP/s). H200 has H100's
# compute at more memory bandwidth. Source: NVIDIA H100 Tensor Core GPU data sheet (SXM column, the sparsity
# figures halved); NVIDIA H200 data sheet.
PEAKS = {
    "H100/H200 SXM dense FP16/BF16": 989e12,
    "H100/H200 SXM dense FP8": 1979e12,
    "H100/H200 SXM dense INT8": 1979e12,
}
