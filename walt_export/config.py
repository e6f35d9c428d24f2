"""Typed configs for every part of a W.A.L.T cascade, the named presets, and all validation.

Every default here is the paper's value or the decision recorded in `docs/model_spec.md`; a preset is a plain
function returning a `CascadeConfig`. Single-model invariants live on each config, cross-model invariants
(channels chain, SR factors chain, geometry of the last denoiser matches the tokenizer) on `CascadeConfig`, so a
config that validates can always be built.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping
from typing import Literal

from pydantic import BaseModel, ConfigDict, NonNegativeInt, PositiveInt, ValidationError, model_validator

from runtime.errors import WaltExportError

Triple = tuple[int, int, int]
DENOISER_NAMES = ("base", "sr1", "sr2")  # the denoisers of a cascade, in sampling order


class ConfigError(WaltExportError, ValueError):
    """A config that cannot describe a model; the message lists every problem found."""

    def __init__(self, what: str, problems: list[str]):
        self.problems = problems
        super().__init__(f"invalid {what}:\n  - " + "\n  - ".join(problems))


class UnknownPresetError(WaltExportError, KeyError):
    """A preset name that does not exist; the message lists the valid ones."""

    def __str__(self) -> str:
        return str(self.args[0])


def validation_problems(error: ValidationError) -> list[str]:
    """One line per problem, prefixed with where it is (`base: window ...`), without pydantic's boilerplate."""
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"])
        cause = item.get("ctx", {}).get("error")
        if isinstance(cause, ConfigError):  # a nested config's own problems
            messages = cause.problems
        else:
            messages = item["msg"].removeprefix("Value error, ").splitlines()
        lines += [f"{where}: {m}" if where else m for m in messages]
    return lines


class StrictModel(BaseModel):
    """Unknown fields are errors, instances are immutable, and invalid values raise one `ConfigError`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def __init__(self, **data: object):
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise ConfigError(type(self).__name__, validation_problems(e)) from None


def _report(problems: list[str]) -> None:
    """In a validator: report every problem at once (StrictModel turns it into a ConfigError)."""
    if problems:
        raise ValueError("\n".join(problems))


# ----------------------------------------------------------------------------------------------------- tokenizer
class TokenizerConfig(StrictModel):
    """MAGVIT-v2 style causal 3D-CNN autoencoder without quantization [P §4.1, App. A]."""

    in_channels: PositiveInt = 3  # RGB
    latent_channels: PositiveInt = 8  # c [P Table 3f]
    base_channels: PositiveInt = 128  # channels of level 0
    channel_multipliers: tuple[PositiveInt, ...] = (1, 2, 2, 4)  # per level: 128, 256, 256, 512
    num_res_blocks: PositiveInt = 4  # ResBlocks per level
    num_mid_blocks: NonNegativeInt = 2  # ResBlocks at the lowest resolution (decision)
    temporal_downsample: tuple[bool, ...] = (False, True, True)  # per downsampling step: "late temporal downsampling"
    norm_groups: PositiveInt = 32  # GroupNorm groups; statistics per frame (causality decision)
    norm_eps: float = 1e-6
    causal_pad: Literal["replicate", "zeros"] = "replicate"  # how the kt-1 frames in front are filled (decision)
    latent_mean: tuple[float, ...] | None = None  # per-channel latent normalisation; None = identity
    latent_std: tuple[float, ...] | None = None

    @property
    def channels(self) -> tuple[int, ...]:
        return tuple(self.base_channels * m for m in self.channel_multipliers)

    @property
    def spatial_factor(self) -> int:
        return 2 ** len(self.temporal_downsample)

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.temporal_downsample)

    @property
    def mean(self) -> tuple[float, ...]:
        return self.latent_mean or (0.0,) * self.latent_channels

    @property
    def std(self) -> tuple[float, ...]:
        return self.latent_std or (1.0,) * self.latent_channels

    def geometry_problems(self, frames: int, height: int, width: int) -> list[str]:
        """Why a (3, frames, height, width) video has no latent, or []."""
        problems = []
        if (frames - 1) % self.temporal_factor or frames < 1:
            problems.append(f"frames={frames} is not 1 + {self.temporal_factor}k (e.g. 1, 5, 9, 13, 17)")
        for name, size in (("height", height), ("width", width)):
            if size % self.spatial_factor or size <= 0:
                problems.append(f"{name}={size} is not a positive multiple of {self.spatial_factor}")
        return problems

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(c, t, h, w) of the latent of a (3, frames, height, width) video; raises ConfigError if it has none."""
        problems = self.geometry_problems(frames, height, width)
        if problems:
            raise ConfigError("video geometry for this tokenizer", problems)
        f = self.spatial_factor
        return (self.latent_channels, 1 + (frames - 1) // self.temporal_factor, height // f, width // f)

    @model_validator(mode="after")
    def _validate(self) -> TokenizerConfig:
        problems = []
        if len(self.temporal_downsample) != len(self.channel_multipliers) - 1:
            problems.append(
                f"temporal_downsample has {len(self.temporal_downsample)} entries; one per downsampling step "
                f"({len(self.channel_multipliers) - 1} for {len(self.channel_multipliers)} levels) is needed"
            )
        for ch in sorted(set(self.channels)):
            if ch % self.norm_groups:
                problems.append(f"{ch} channels are not divisible by norm_groups={self.norm_groups}")
        for name in ("latent_mean", "latent_std"):
            value = getattr(self, name)
            if value is not None and len(value) != self.latent_channels:
                problems.append(f"{name} has {len(value)} entries, latent_channels is {self.latent_channels}")
        if self.latent_std is not None and min(self.latent_std) <= 0:
            problems.append("latent_std entries must be > 0")
        _report(problems)
        return self


# ----------------------------------------------------------------------------------------------------- denoiser
class DenoiserConfig(StrictModel):
    """The window-attention latent transformer [P §4.2-4.3, Table 8]."""

    latent_channels: PositiveInt = 8  # c, must equal the tokenizer's
    latent_size: Triple  # (T, H, W) of the latent this denoiser denoises
    patch_size: PositiveInt = 1  # p: tokens are 1 x p x p latent patches
    hidden_size: PositiveInt  # d
    depth: PositiveInt  # attention layers; spatial and spatiotemporal alternate
    num_heads: PositiveInt = 16
    mlp_ratio: float = 4.0  # GELU MLP width = mlp_ratio * d (decision)
    window: Triple  # spatiotemporal window (wt, wh, ww) in tokens; spatial layers use the whole frame
    first_layer: Literal["spatial", "spatiotemporal"] = "spatial"
    qk_norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    relative_position_bias: bool = True  # Swin-style learned table per layer
    adaln_lora_rank: PositiveInt = 2  # r of AdaLN-LoRA
    conditioning: Literal["none", "class", "text"] = "none"
    num_classes: PositiveInt | None = None  # class presets; index num_classes is the null class (CFG)
    text_dim: PositiveInt | None = None  # width of the text encoder's states (T5-XL: 2048)
    cross_attention: Literal["none", "every", "spatial"] = "none"  # which layers attend to the text
    norm_eps: float = 1e-6
    frequency_embedding_size: PositiveInt = 256  # sinusoidal timestep features fed to the timestep MLP

    @property
    def token_grid(self) -> Triple:
        t, h, w = self.latent_size
        return (t, h // self.patch_size, w // self.patch_size)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def in_channels(self) -> int:
        """noisy latent (c) + self-conditioning (c) + frame conditioning latent and mask (c + 1)."""
        return 3 * self.latent_channels + 1

    def is_spatial(self, layer: int) -> bool:
        return (layer % 2 == 0) == (self.first_layer == "spatial")

    def attention_window(self, spatial: bool, num_frames: int | None = None) -> Triple:
        """The (wt, wh, ww) token window of a spatial layer (one whole frame) or a spatiotemporal one (the config's
        window, its time extent capped at `num_frames` token frames; default: the config's)."""
        t, h, w = self.token_grid
        if spatial:
            return (1, h, w)
        wt, wh, ww = self.window
        return (min(wt, t if num_frames is None else num_frames), wh, ww)

    def has_cross_attention(self, layer: int) -> bool:
        return self.cross_attention == "every" or (self.cross_attention == "spatial" and self.is_spatial(layer))

    def _problems(self) -> list[str]:
        problems = []
        t, h, w = self.latent_size
        p = self.patch_size
        if min(self.latent_size) <= 0:
            problems.append(f"latent_size={self.latent_size} must be positive")
        if h % p or w % p:
            problems.append(f"patch_size={p} does not divide the latent {h}x{w}")
        elif min(self.latent_size) > 0:
            grid = self.token_grid
            for axis, win, size in zip("THW", self.window, grid, strict=True):
                if win <= 0 or size % win:
                    problems.append(f"window {self.window} does not divide the token grid {grid} along {axis}")
                    break
        if self.hidden_size % self.num_heads:
            problems.append(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if self.conditioning == "class" and not self.num_classes:
            problems.append("conditioning='class' needs num_classes")
        if self.conditioning != "class" and self.num_classes is not None:
            problems.append(f"num_classes is set but conditioning is {self.conditioning!r}")
        if self.conditioning == "text":
            if not self.text_dim:
                problems.append("conditioning='text' needs text_dim (the text encoder's d_model)")
            if self.cross_attention == "none":
                problems.append("conditioning='text' needs cross_attention 'every' or 'spatial'")
        elif self.cross_attention != "none" or self.text_dim is not None:
            problems.append(f"cross_attention/text_dim are set but conditioning is {self.conditioning!r}")
        return problems

    @model_validator(mode="after")
    def _validate(self) -> DenoiserConfig:
        _report(self._problems())
        return self


class SuperResConfig(DenoiserConfig):
    """A denoiser that also sees the previous denoiser's latent, upsampled inside the model [P §4.5]."""

    upsample_factor: PositiveInt = 2  # spatial factor from the previous denoiser's latent
    noise_aug_level: float = 0.25  # t_sr at inference, a fraction of the training schedule (decision)

    @property
    def in_channels(self) -> int:
        return super().in_channels + self.latent_channels  # + the upsampled low-res latent

    @property
    def lowres_size(self) -> Triple:
        t, h, w = self.latent_size
        return (t, h // self.upsample_factor, w // self.upsample_factor)

    def _problems(self) -> list[str]:
        problems = super()._problems()
        _, h, w = self.latent_size
        if h % self.upsample_factor or w % self.upsample_factor:
            problems.append(f"upsample_factor={self.upsample_factor} does not divide the latent {h}x{w}")
        if not 0.0 <= self.noise_aug_level < 1.0:
            problems.append(f"noise_aug_level={self.noise_aug_level} must be in [0, 1)")
        return problems


# ------------------------------------------------------------------------------------------------- text encoder
class TextEncoderConfig(StrictModel):
    """A T5 encoder (T5-XL in the paper). Field names follow Hugging Face's T5 `config.json`."""

    vocab_size: PositiveInt = 32128
    d_model: PositiveInt = 2048
    d_kv: PositiveInt = 64  # per-head width
    d_ff: PositiveInt = 5120
    num_layers: PositiveInt = 24
    num_heads: PositiveInt = 32
    relative_attention_num_buckets: PositiveInt = 32
    relative_attention_max_distance: PositiveInt = 128
    feed_forward_proj: Literal["gated-gelu", "relu"] = "gated-gelu"  # T5 v1.1 / original T5
    layer_norm_epsilon: float = 1e-6
    max_length: PositiveInt = 128  # prompt length in tokens, padded or truncated (decision)
    pretrained_dir: str | None = None  # local T5 directory (config.json, *.safetensors, tokenizer.json); None = random
    # init with the byte-level tokenizer, nothing downloaded

    @model_validator(mode="after")
    def _validate(self) -> TextEncoderConfig:
        from runtime.text_tokenizer import ByteTokenizer

        problems = []
        if self.pretrained_dir is None and self.vocab_size < ByteTokenizer.vocab_size:
            problems.append(
                f"vocab_size={self.vocab_size} is below the byte tokenizer's {ByteTokenizer.vocab_size} "
                "(set pretrained_dir to use a checkpoint's own tokenizer)"
            )
        if self.max_length < 2:
            problems.append("max_length must be >= 2 (at least one token and the end-of-sequence token)")
        if self.relative_attention_num_buckets < 4 or self.relative_attention_num_buckets % 2:
            problems.append("relative_attention_num_buckets must be even and >= 4 (half per direction, half of "
                            "those exact offsets)")
        elif self.relative_attention_max_distance <= self.relative_attention_num_buckets // 4:
            problems.append("relative_attention_max_distance must exceed relative_attention_num_buckets / 4")
        _report(problems)
        return self


# ---------------------------------------------------------------------------------------------------- diffusion
class DiffusionConfig(StrictModel):
    """Training schedule and sampling defaults [P §3, §5.2, Table 8]."""

    num_train_timesteps: PositiveInt = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    beta_schedule: Literal["linear"] = "linear"
    rescale_zero_terminal_snr: bool = True  # Lin et al. 2023, Algorithm 1
    prediction_type: Literal["v"] = "v"
    timestep_spacing: Literal["trailing"] = "trailing"
    num_inference_steps: PositiveInt = 50  # DDIM, eta 0
    guidance_scale: float = 7.5  # classifier-free guidance (decision; the paper does not report it)


# ------------------------------------------------------------------------------------------------------ cascade
class CascadeConfig(StrictModel):
    """A whole cascade: tokenizer, optional text encoder, base denoiser, optional two SR denoisers."""

    name: str
    frames: PositiveInt = 17  # output video frames, 1 + 4k
    height: PositiveInt  # output pixels
    width: PositiveInt
    fps: float = 8.0
    tokenizer: TokenizerConfig = TokenizerConfig()
    text_encoder: TextEncoderConfig | None = None
    base: DenoiserConfig
    sr1: SuperResConfig | None = None
    sr2: SuperResConfig | None = None
    diffusion: DiffusionConfig = DiffusionConfig()
    # What these weights were trained on: "world" = the procedural world of `runtime.world`, whose captions are the
    # prompts the model understands (the reference cascade, `training/`); None = random or external weights.
    trained_on: Literal["world"] | None = None

    def denoisers(self) -> dict[str, DenoiserConfig]:
        """The denoisers present (base, sr1, sr2), in sampling order."""
        return {name: cfg for name in DENOISER_NAMES if (cfg := getattr(self, name)) is not None}

    @model_validator(mode="after")
    def _validate(self) -> CascadeConfig:
        problems = self.tokenizer.geometry_problems(self.frames, self.height, self.width)
        latent = None if problems else self.tokenizer.latent_shape(self.frames, self.height, self.width)
        if self.fps <= 0:
            problems.append(f"fps={self.fps} must be > 0")
        if self.sr2 is not None and self.sr1 is None:
            problems.append("sr2 is set without sr1")
        if isinstance(self.base, SuperResConfig):
            problems.append("base must be a DenoiserConfig, not a SuperResConfig")
        denoisers = list(self.denoisers().items())
        for name, denoiser in denoisers:
            if denoiser.latent_channels != self.tokenizer.latent_channels:
                problems.append(f"{name}.latent_channels={denoiser.latent_channels} but the tokenizer has "
                                f"{self.tokenizer.latent_channels}")
            if denoiser.conditioning == "text":
                if self.text_encoder is None:
                    problems.append(f"{name} is text-conditioned but the cascade has no text_encoder")
                elif denoiser.text_dim != self.text_encoder.d_model:
                    problems.append(f"{name}.text_dim={denoiser.text_dim} but text_encoder.d_model={self.text_encoder.d_model}")
        for (low_name, low), (name, denoiser) in itertools.pairwise(denoisers):  # SR factors chain
            t, h, w = low.latent_size
            f = denoiser.upsample_factor
            if denoiser.latent_size != (t, h * f, w * f):
                problems.append(f"{name}.latent_size={denoiser.latent_size} is not {low_name}'s {low.latent_size} "
                                f"upsampled x{f} (expected {(t, h * f, w * f)})")
        if self.text_encoder is not None and not any(s.conditioning == "text" for _, s in denoisers):
            problems.append("a text_encoder is set but no denoiser is text-conditioned")
        last_name, last = denoisers[-1]
        if latent is not None and last.latent_size != latent[1:]:
            problems.append(f"{last_name}.latent_size={last.latent_size} but {self.frames}x{self.height}x{self.width} "
                            f"video encodes to a {'x'.join(map(str, latent[1:]))} latent")
        _report(problems)
        return self


# ------------------------------------------------------------------------------------------------------ presets
def t5_xl() -> TextEncoderConfig:
    """The T5 v1.1 XL encoder geometry (the field defaults); weights come from `pretrained_dir` or a checkpoint."""
    return TextEncoderConfig()


def _class_preset(name: str, depth: int, hidden: int, num_classes: int) -> CascadeConfig:
    """A 17x128x128 class-conditional model (latent 5x16x16, windows 5x8x8) [P Table 8]."""
    base = DenoiserConfig(
        latent_size=(5, 16, 16), hidden_size=hidden, depth=depth, window=(5, 8, 8),
        conditioning="class", num_classes=num_classes,
    )
    return CascadeConfig(name=name, height=128, width=128, base=base)


def walt_l() -> CascadeConfig:
    return _class_preset("walt-l", depth=24, hidden=1024, num_classes=600)  # Kinetics-600 / ablations, 313M


def walt_xl() -> CascadeConfig:
    return _class_preset("walt-xl", depth=28, hidden=1152, num_classes=101)  # UCF-101, 460M


def walt_l_text() -> CascadeConfig:
    t5 = t5_xl()
    base = DenoiserConfig(
        latent_size=(5, 16, 16), hidden_size=1024, depth=24, window=(5, 8, 8),
        conditioning="text", text_dim=t5.d_model, cross_attention="every",
    )
    return CascadeConfig(name="walt-l-text", height=128, width=128, base=base, text_encoder=t5)  # 419M


def t2v() -> CascadeConfig:
    """The 512x896 @ 8 fps text-to-video cascade: T5-XL, 3B base, 1.3B SR1, 419M SR2 [P §4.5, Table 8].

    All three denoisers see the same 5x16x28 token grid (p = 1, 2, 4); windows 5x8x14 (9:16 fine-tuning).
    The base attends to the text in spatial layers only (joint image-video training).
    """
    t5 = t5_xl()
    text = dict(conditioning="text", text_dim=t5.d_model)
    return CascadeConfig(
        name="t2v", height=512, width=896, text_encoder=t5,
        base=DenoiserConfig(latent_size=(5, 16, 28), hidden_size=2048, depth=52, window=(5, 8, 14),
                            cross_attention="spatial", **text),
        sr1=SuperResConfig(latent_size=(5, 32, 56), patch_size=2, hidden_size=1408, depth=40, window=(5, 8, 14),
                           cross_attention="every", **text),
        sr2=SuperResConfig(latent_size=(5, 64, 112), patch_size=4, hidden_size=1024, depth=24, window=(5, 8, 14),
                           cross_attention="every", **text),
    )


def _small_t2v(name: str, frames: int, height: int, width: int, window: Triple, tokenizer: TokenizerConfig,
               text_encoder: TextEncoderConfig, widths: Triple, heads: int, depths: Triple) -> CascadeConfig:
    """A three-denoiser text cascade; `widths` and `depths` are (base, sr1, sr2)'s hidden sizes and layers."""
    c, t, h, w = tokenizer.latent_shape(frames, height, width)
    common = dict(num_heads=heads, window=window, conditioning="text", text_dim=text_encoder.d_model)
    return CascadeConfig(
        name=name, frames=frames, height=height, width=width, tokenizer=tokenizer, text_encoder=text_encoder,
        base=DenoiserConfig(latent_size=(t, h // 4, w // 4), hidden_size=widths[0], depth=depths[0],
                            cross_attention="spatial", **common),
        sr1=SuperResConfig(latent_size=(t, h // 2, w // 2), patch_size=2, hidden_size=widths[1], depth=depths[1],
                           cross_attention="every", **common),
        sr2=SuperResConfig(latent_size=(t, h, w), patch_size=4, hidden_size=widths[2], depth=depths[2],
                           cross_attention="every", **common),
    )


def tiny() -> CascadeConfig:
    """The paper's t2v geometry (17 frames, base latent 5x16x28, 17x512x896 @ 8 fps) with tiny widths: the
    geometry of the trained reference cascade (`walt_export.reference`), sized to train on a 2-core CPU.

    SR2 is 128 wide, not 64: its 4x4 patches of 8 latent channels hold 128 values per token, and a narrower token
    makes the patch embedding and the output layer rank-deficient, so half of the noise could never be predicted
    and stays in every video (docs/reference.md §3)."""
    return _small_t2v(
        "tiny", frames=17, height=512, width=896, window=(5, 8, 14),
        tokenizer=TokenizerConfig(base_channels=8, num_res_blocks=1, num_mid_blocks=1, norm_groups=4),
        text_encoder=TextEncoderConfig(vocab_size=384, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                                       max_length=32),
        widths=(64, 64, 128), heads=4, depths=(4, 2, 2),
    )


def micro() -> CascadeConfig:
    """The unit-test cascade: 9 frames at 128x128 (base latent 3x4x4), widths of a few channels."""
    return _small_t2v(
        "micro", frames=9, height=128, width=128, window=(3, 2, 2),
        tokenizer=TokenizerConfig(base_channels=4, channel_multipliers=(1, 2, 2, 2), num_res_blocks=1,
                                  num_mid_blocks=1, norm_groups=2),
        text_encoder=TextEncoderConfig(vocab_size=300, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                       max_length=16),
        widths=(32, 32, 32), heads=2, depths=(2, 2, 2),
    )


class _Presets(Mapping[str, CascadeConfig]):
    """Preset name -> a fresh `CascadeConfig`; an unknown name raises a KeyError listing the valid ones."""

    def __init__(self, factories: dict[str, Callable[[], CascadeConfig]]):
        self._factories = factories

    def __getitem__(self, name: str) -> CascadeConfig:
        if name not in self._factories:
            raise UnknownPresetError(f"unknown preset {name!r}; valid presets: {', '.join(self._factories)}")
        return self._factories[name]()

    def __iter__(self) -> Iterator[str]:
        return iter(self._factories)

    def __len__(self) -> int:
        return len(self._factories)


PRESETS: Mapping[str, CascadeConfig] = _Presets({
    "walt-l": walt_l, "walt-l-text": walt_l_text, "walt-xl": walt_xl, "t2v": t2v, "tiny": tiny, "micro": micro,
})
