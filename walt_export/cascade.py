"""A whole cascade as one module, and `build(preset_or_config, seed, device)`."""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from runtime.text_tokenizer import TextTokenizer, load_text_tokenizer
from walt_export.config import PRESETS, DENOISER_NAMES, CascadeConfig, DenoiserConfig, SuperResConfig
from walt_export.models.denoiser import WaltDenoiser
from walt_export.models.super_resolution import SuperResDenoiser
from walt_export.models.text_encoder import T5Encoder, load_pretrained_t5
from walt_export.models.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def build_denoiser(cfg: DenoiserConfig) -> WaltDenoiser:
    """The module of a denoiser config: `SuperResDenoiser` for a `SuperResConfig`."""
    return SuperResDenoiser(cfg) if isinstance(cfg, SuperResConfig) else WaltDenoiser(cfg)


# The modules a cascade holds; each is seeded on its own, so one can be built alone with the weights it has in
# the whole cascade (exporting a 3B denoiser must not need the other 3B of the cascade in memory).
COMPONENTS = ("tokenizer", "text_encoder", *DENOISER_NAMES)


def make_component(cfg: CascadeConfig, name: str) -> nn.Module | None:
    """One component of `COMPONENTS`, initialised from the current RNG on the default device, or None."""
    if name == "tokenizer":
        return Tokenizer(cfg.tokenizer)
    if name == "text_encoder":
        return T5Encoder(cfg.text_encoder) if cfg.text_encoder is not None else None
    if name in DENOISER_NAMES:
        denoiser = getattr(cfg, name)
        return build_denoiser(denoiser) if denoiser is not None else None
    raise ValueError(f"unknown component {name!r}; components: {', '.join(COMPONENTS)}")


def build_component(preset_or_config: str | CascadeConfig, name: str, seed: int = 0,
                    device: str | torch.device = "cpu") -> nn.Module | None:
    """One component with exactly the weights it has in `build(preset_or_config, seed)`, in eval mode.

    The weights are drawn on the CPU from a generator seeded by (seed, component) (the global RNG is left
    untouched) and moved; `device="meta"` builds the structure only. A configured pretrained T5 is loaded.
    """
    cfg = resolve_config(preset_or_config)
    device = torch.device(device)
    meta = device.type == "meta"
    with torch.random.fork_rng(devices=[]), torch.device("meta" if meta else "cpu"):
        torch.manual_seed(seed * len(COMPONENTS) + COMPONENTS.index(name))
        module = make_component(cfg, name)
    if module is None:
        return None
    if name == "text_encoder" and cfg.text_encoder.pretrained_dir is not None and not meta:
        load_pretrained_t5(module, cfg.text_encoder.pretrained_dir)
    return module.to(device).eval()


def count_parameters(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


class Cascade(nn.Module):
    """tokenizer, text_encoder (None for class presets), base, sr1 and sr2 (None where a preset has none)."""

    def __init__(self, cfg: CascadeConfig, components: dict[str, nn.Module | None] | None = None):
        """Args: components: the modules by name (`COMPONENTS`); None makes them from the current RNG."""
        super().__init__()
        self.config = cfg
        for name in COMPONENTS:
            setattr(self, name, components[name] if components is not None else make_component(cfg, name))
        self._text_tokenizer: TextTokenizer | None = None

    def denoisers(self) -> dict[str, WaltDenoiser]:
        """The denoisers present (base, sr1, sr2), in sampling order."""
        return {name: getattr(self, name) for name in self.config.denoisers()}

    @property
    def text_tokenizer(self) -> TextTokenizer:
        if self.config.text_encoder is None:
            raise ValueError(f"preset {self.config.name!r} is class-conditional and has no text encoder")
        if self._text_tokenizer is None:
            te = self.config.text_encoder
            self._text_tokenizer = load_text_tokenizer(te.pretrained_dir, te.max_length)
        return self._text_tokenizer

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Prompts -> (text states (B, L, d_model), mask (B, L)) on the text encoder's device."""
        ids, mask = self.text_tokenizer(prompts)
        device = next(self.text_encoder.parameters()).device
        ids, mask = torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)
        return self.text_encoder(ids, mask), mask

    def parameter_counts(self) -> dict[str, int]:
        parts = {"text_encoder": self.text_encoder, "tokenizer": self.tokenizer, **self.denoisers()}
        return {name: count_parameters(module) for name, module in parts.items() if module is not None}

    def summary(self) -> str:
        """A human-readable table: geometry, then every part with its parameters and latent sizes."""
        cfg = self.config
        c, t, h, w = cfg.tokenizer.latent_shape(cfg.frames, cfg.height, cfg.width)
        lines = [
            f"cascade {cfg.name!r}: {cfg.frames} frames x {cfg.height}x{cfg.width} px @ {cfg.fps:g} fps "
            f"({cfg.frames / cfg.fps:.3f} s); latent {c}x{t}x{h}x{w}",
            f"{'part':<13} {'parameters':>15}  details",
        ]
        counts = self.parameter_counts()
        for name, count in counts.items():
            lines.append(f"{name:<13} {count:>15,}  {self._details(name)}")
        lines.append(f"{'total':<13} {sum(counts.values()):>15,}")
        return "\n".join(lines)

    def _details(self, name: str) -> str:
        cfg = self.config
        if name == "text_encoder":
            te = cfg.text_encoder
            source = te.pretrained_dir or "random init, byte tokenizer"
            return f"T5 {te.num_layers} layers, d {te.d_model}, {te.max_length} tokens ({source})"
        if name == "tokenizer":
            tk = cfg.tokenizer
            return f"causal 3D CNN, channels {tk.channels}, {tk.num_res_blocks} blocks/level, c={tk.latent_channels}"
        s = cfg.denoisers()[name]
        text = f", cross-attention {s.cross_attention}" if s.conditioning == "text" else ""
        classes = f", {s.num_classes} classes" if s.conditioning == "class" else ""
        return (f"{s.depth} layers, d {s.hidden_size}, {s.num_heads} heads, p {s.patch_size}, latent "
                f"{'x'.join(map(str, s.latent_size))}, tokens {'x'.join(map(str, s.token_grid))}, window "
                f"{'x'.join(map(str, s.window))}{text}{classes}")


def resolve_config(preset_or_config: str | CascadeConfig) -> CascadeConfig:
    """A preset name (KeyError listing the valid ones if unknown) or a config, as a `CascadeConfig`."""
    if isinstance(preset_or_config, CascadeConfig):
        return preset_or_config
    if isinstance(preset_or_config, str):
        return PRESETS[preset_or_config]
    raise TypeError(f"expected a preset name or a CascadeConfig, got {type(preset_or_config).__name__}")


def build(preset_or_config: str | CascadeConfig, seed: int = 0, device: str | torch.device = "cpu") -> Cascade:
    """Build a cascade with seeded random weights (or a pretrained T5 where the config names one), in eval mode.

    The weights depend on the seed only, not on the device (see `build_component`, which builds one part alone
    with the same weights). `device="meta"` builds the structure without memory, e.g. to count parameters.
    """
    cfg = resolve_config(preset_or_config)
    cascade = Cascade(cfg, {name: build_component(cfg, name, seed, device) for name in COMPONENTS})
    log.info("built %s (%s parameters) on %s", cfg.name, f"{sum(cascade.parameter_counts().values()):,}", device)
    return cascade.eval()
