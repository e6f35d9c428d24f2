"""Export specs: what every exported model of a cascade takes and returns, defined once as data.

Every exported model is a "stage". A spec names the stage's inputs and outputs in order, their dtypes and shapes
(ints are fixed, strings are the dynamic dims), the min/opt/max of every dynamic dim (TensorRT profiles), its
precision policy, for a denoiser what it samples, how to call the PyTorch module with inputs in that order, and
seeded sample inputs. The ONNX exporter (which copies the data into the manifest), `verify`, the benchmarks and the
engine builder all read these specs; nothing else spells out an input name, a dynamic axis or a precision rule.

Fixed per artifact: the latent geometry (one artifact per aspect ratio) and the text length. Dynamic: the batch
(classifier-free guidance runs 2B through one call) and the frame axis of the tokenizer models (images, long
videos and chunked decoding).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from runtime.manifest import DenoiserInfo, PrecisionPolicy, TensorInfo
from walt_export.config import CascadeConfig, DenoiserConfig, SuperResConfig
from walt_export.inputs import denoiser_inputs, text_encoder_inputs

Dim = int | str  # a fixed size or the name of a dynamic dim
BATCH = "batch"
LATENT_FRAMES = "latent_frames"  # latent frames of a tokenizer call; the video has 1 + 4 (t - 1) or 4 t frames
PROFILE_BATCH = (1, 2, 8)  # min, opt (one prompt with guidance), max

# The precision policy (docs/architecture.md §5), decided here once and recorded in the manifest.
ANY_PRECISION = PrecisionPolicy(allowed=("fp32", "fp16", "int8"))
FP32_ONLY_T5 = PrecisionPolicy(
    allowed=("fp32",), fallback="fp32",
    reason="T5 overflows in FP16 (diffusers#8604) and is not quantized: it runs in FP32 on every backend",
)


@dataclass(frozen=True)
class ExportSpec:
    """One exported model: `name.onnx` holds `call(module, *inputs)` of the cascade's `module` attribute."""

    name: str
    module: str  # attribute path inside a `Cascade`
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    profile: dict[str, tuple[int, int, int]]  # dynamic dim -> (min, opt, max)
    call: Callable[..., tuple[Tensor, ...]]  # (module, *inputs in order) -> outputs in order
    sample: Callable[[dict[str, int], torch.Generator], tuple[Tensor, ...]] = field(repr=False)  # dims -> inputs
    precision: PrecisionPolicy = ANY_PRECISION
    denoiser: DenoiserInfo | None = None  # base, sr1, sr2: what the cascade needs to sample with it

    @property
    def component(self) -> str:
        """The cascade component the model is part of (`cascade.COMPONENTS`): 'tokenizer' for 'tokenizer.decoder'."""
        return self.module.split(".")[0]

    def module_of(self, component: nn.Module) -> nn.Module:
        """The exported module inside its component: `component.decoder` for 'tokenizer.decoder'."""
        return resolve_module(component, self.module.partition(".")[2])

    def opt_dims(self) -> dict[str, int]:
        return {dim: opt for dim, (_, opt, _) in self.profile.items()}

    def sample_inputs(self, generator: torch.Generator, **dims: int) -> tuple[Tensor, ...]:
        """Seeded inputs at the profile's opt dims, overridden by `dims` (e.g. batch=1)."""
        return self.sample({**self.opt_dims(), **dims}, generator)

    def wrap(self, module: nn.Module) -> nn.Module:
        """The module with a positional forward in this spec's input order (what the exporter traces)."""
        return _Positional(module, self.call)


class _Positional(nn.Module):
    def __init__(self, module: nn.Module, call: Callable[..., tuple[Tensor, ...]]):
        super().__init__()
        self.module, self.call = module, call

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        return self.call(self.module, *inputs)


def _f32(name: str, *shape: Dim) -> TensorInfo:
    return TensorInfo(name=name, dtype="float32", shape=shape)


def _i64(name: str, *shape: Dim) -> TensorInfo:
    return TensorInfo(name=name, dtype="int64", shape=shape)


# ------------------------------------------------------------------------------------------------------- specs
def _text_encoder_spec(cfg: CascadeConfig) -> ExportSpec:
    te = cfg.text_encoder
    length = te.max_length
    return ExportSpec(
        "text_encoder", "text_encoder",
        inputs=(_i64("input_ids", BATCH, length), _i64("attention_mask", BATCH, length)),
        outputs=(_f32("text_states", BATCH, length, te.d_model),),
        profile={BATCH: PROFILE_BATCH},
        call=lambda m, ids, mask: (m(ids, mask),),
        sample=lambda dims, g: text_encoder_inputs(te, dims[BATCH], g),
        precision=FP32_ONLY_T5,
    )


def _denoiser_info(s: DenoiserConfig) -> DenoiserInfo:
    sr = isinstance(s, SuperResConfig)
    return DenoiserInfo(latent_channels=s.latent_channels, latent_size=s.latent_size, conditioning=s.conditioning,
                        num_classes=s.num_classes, null_class=s.num_classes,  # the extra class embedding (CFG)
                        noise_aug_level=s.noise_aug_level if sr else None)


def _denoiser_spec(cfg: CascadeConfig, name: str) -> ExportSpec:
    s = getattr(cfg, name)
    c, (t, h, w) = s.latent_channels, s.latent_size
    latent = (BATCH, c, t, h, w)
    inputs = [_f32("latent", *latent), _f32("timestep", BATCH), _f32("self_cond", *latent),
              _f32("frame_cond", *latent), _f32("frame_mask", BATCH, t)]
    sr = isinstance(s, SuperResConfig)
    if sr:
        inputs += [_f32("lowres", BATCH, c, *s.lowres_size), _f32("lowres_timestep", BATCH)]
    text_length = cfg.text_encoder.max_length if cfg.text_encoder is not None else 0
    if s.conditioning == "text":
        inputs += [_f32("text", BATCH, text_length, s.text_dim), _i64("text_mask", BATCH, text_length)]
    elif s.conditioning == "class":
        inputs += [_i64("class_labels", BATCH)]
    keywords = [spec.name for spec in inputs[7 if sr else 5:]]
    positional = len(inputs) - len(keywords)

    def call(module: nn.Module, *args: Tensor) -> tuple[Tensor]:
        return (module(*args[:positional], **dict(zip(keywords, args[positional:], strict=True))),)

    def sample(dims: dict[str, int], generator: torch.Generator) -> tuple[Tensor, ...]:
        args, kwargs = denoiser_inputs(s, dims[BATCH], text_length=text_length, generator=generator)
        return (*args, *(kwargs[name] for name in keywords))

    return ExportSpec(name, name, tuple(inputs), (_f32("v", *latent),), {BATCH: PROFILE_BATCH}, call, sample,
                      denoiser=_denoiser_info(s))


def _tokenizer_specs(cfg: CascadeConfig) -> list[ExportSpec]:
    tk = cfg.tokenizer
    c, t, h, w = tk.latent_shape(cfg.frames, cfg.height, cfg.width)
    f = tk.temporal_factor
    frames_in = f"{f}*{LATENT_FRAMES} - {f - 1}"  # 1 + f (t - 1): a clip's first chunk
    frames_step = f"{f}*{LATENT_FRAMES}"  # a continuation chunk
    video = lambda frames: _f32("video", BATCH, 3, frames, cfg.height, cfg.width)  # noqa: E731
    latent = _f32("latent", BATCH, c, LATENT_FRAMES, h, w)
    profile = {BATCH: PROFILE_BATCH, LATENT_FRAMES: (1, t, 2 * t)}
    state_shapes = _decoder_state_shapes(cfg)
    states_in = tuple(_f32(f"state.{i}", BATCH, *shape) for i, shape in enumerate(state_shapes))
    states_out = tuple(_f32(f"next_state.{i}", BATCH, *shape) for i, shape in enumerate(state_shapes))

    def sample_video(dims: dict[str, int], g: torch.Generator) -> tuple[Tensor]:
        frames = 1 + f * (dims[LATENT_FRAMES] - 1)
        return (torch.rand(dims[BATCH], 3, frames, cfg.height, cfg.width, generator=g) * 2 - 1,)

    def sample_latent(dims: dict[str, int], g: torch.Generator) -> tuple[Tensor]:
        return (torch.randn(dims[BATCH], c, dims[LATENT_FRAMES], h, w, generator=g),)

    def sample_step(dims: dict[str, int], g: torch.Generator) -> tuple[Tensor, ...]:
        states = tuple(torch.randn(dims[BATCH], *shape, generator=g) for shape in state_shapes)
        return (*sample_latent(dims, g), *states)

    return [
        ExportSpec("tokenizer_encoder", "tokenizer.encoder", (video(frames_in),), (latent,), profile,
                   call=lambda m, x: (m(x),), sample=sample_video),
        # The whole clip, which is also the first chunk of a chunked decode: it returns the causal state too.
        ExportSpec("tokenizer_decoder", "tokenizer.decoder", (latent,), (video(frames_in), *states_out), profile,
                   call=lambda m, z: _flat(*m(z)), sample=sample_latent),
        # A later chunk: the state of the previous call in, 4 frames per latent frame and the next state out.
        ExportSpec("tokenizer_decoder_step", "tokenizer.decoder", (latent, *states_in), (video(frames_step), *states_out),
                   profile, call=lambda m, z, *state: _flat(*m(z, state)),
                   sample=sample_step),
    ]


def _flat(video: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """The decoder's (video, state) as the exported model's outputs: video, next_state.0, next_state.1, ..."""
    return (video, *state)


def _decoder_state_shapes(cfg: CascadeConfig) -> list[tuple[int, ...]]:
    """Shapes (C, kt-1, H, W) of the decoder's causal caches, read off a one-latent-frame decode on `meta`."""
    from walt_export.models.tokenizer import TokenizerDecoder

    tk = cfg.tokenizer
    _, _, h, w = tk.latent_shape(cfg.frames, cfg.height, cfg.width)
    with torch.device("meta"):
        _, state = TokenizerDecoder(tk)(torch.empty(1, tk.latent_channels, 1, h, w))
    return [tuple(s.shape[1:]) for s in state]


def export_specs(cfg: CascadeConfig) -> dict[str, ExportSpec]:
    """Every stage (exported model) of a cascade, in pipeline order, by name."""
    specs = [_text_encoder_spec(cfg)] if cfg.text_encoder is not None else []
    specs += [_denoiser_spec(cfg, name) for name in cfg.denoisers()]
    specs += _tokenizer_specs(cfg)
    return {spec.name: spec for spec in specs}


def resolve_module(root: nn.Module, path: str) -> nn.Module:
    """`root.tokenizer.decoder` for the path 'tokenizer.decoder'; `root` itself for ''."""
    module = root
    for attr in filter(None, path.split(".")):
        module = getattr(module, attr)
    return module
