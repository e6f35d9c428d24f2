"""The T5 encoder (T5-XL in the paper) that turns a prompt's token ids into the states the denoisers attend to.

Architecture of T5 / T5 v1.1 (Raffel et al. 2020): token embedding; per layer pre-RMSNorm self-attention without
score scaling, with a learned bucketed relative-position bias shared by all layers, and a pre-RMSNorm feed-forward
(ReLU, or gated GELU for v1.1); a final RMSNorm. Weights load from a local Hugging Face T5 directory
(`load_pretrained_t5`, at the end of this file) or from a walt-export checkpoint; the small presets initialise it at
random.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from walt_export.config import TextEncoderConfig
from walt_export.state_dict import CheckpointError, config_differences, load_state_dict_checked

log = logging.getLogger(__name__)


class T5RMSNorm(nn.Module):
    """x / rms(x) * weight, no mean subtraction and no bias; statistics in float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        variance = x.float().square().mean(-1, keepdim=True)
        return self.weight * (x.float() * torch.rsqrt(variance + self.eps)).to(x.dtype)


def relative_position_bucket(relative_position: Tensor, num_buckets: int, max_distance: int) -> Tensor:
    """Bidirectional T5 buckets of key - query offsets: half the buckets per direction, the first half of those
    exact offsets, the rest logarithmically spaced up to max_distance (beyond it: the last bucket)."""
    num_buckets //= 2
    buckets = (relative_position > 0).long() * num_buckets
    distance = relative_position.abs()
    max_exact = num_buckets // 2
    log_ratio = torch.log(distance.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact)
    large = (max_exact + (log_ratio * (num_buckets - max_exact)).long()).clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < max_exact, distance, large)


class T5Attention(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.heads, self.d_kv = cfg.num_heads, cfg.d_kv
        inner = cfg.num_heads * cfg.d_kv
        self.q, self.k, self.v = (nn.Linear(cfg.d_model, inner, bias=False) for _ in range(3))
        self.o = nn.Linear(inner, cfg.d_model, bias=False)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:  # x (B, L, d), bias (B, heads, L, L)
        b, length, _ = x.shape
        q, k, v = (proj(x).view(b, length, self.heads, self.d_kv).transpose(1, 2) for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)  # T5: no 1/sqrt(d)
        return self.o(out.transpose(1, 2).reshape(b, length, -1))  # (B, L, d)


class T5FeedForward(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.gated = cfg.feed_forward_proj == "gated-gelu"
        if self.gated:
            self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
            self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        else:
            self.wi = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.gated:
            return self.wo(F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x))
        return self.wo(F.relu(self.wi(x)))


class T5Layer(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.attn_norm = T5RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.attn = T5Attention(cfg)
        self.ff_norm = T5RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.ff = T5FeedForward(cfg)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        x = x + self.attn(self.attn_norm(x), bias)
        return x + self.ff(self.ff_norm(x))


class T5Encoder(nn.Module):
    """(input_ids (B, L) int64, attention_mask (B, L)) -> states (B, L, d_model)."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.relative_attention_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)
        self.layers = nn.ModuleList(T5Layer(cfg) for _ in range(cfg.num_layers))
        self.final_norm = T5RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        for module in self.modules():  # fan-in scaled random init (untrained presets); trained weights replace it
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=module.weight.shape[-1] ** -0.5)

    def position_bias(self, length: int, device: torch.device) -> Tensor:
        """(1, heads, L, L) learned bias of every key - query offset."""
        position = torch.arange(length, device=device)
        buckets = relative_position_bucket(position[None, :] - position[:, None], self.config.relative_attention_num_buckets,
                                           self.config.relative_attention_max_distance)  # (L, L)
        return self.relative_attention_bias(buckets).permute(2, 0, 1)[None]

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        x = self.embed(input_ids)  # (B, L, d)
        padding = (attention_mask == 0)[:, None, None, :]  # (B, 1, 1, L): padded keys are not attended
        bias = self.position_bias(input_ids.shape[1], x.device).to(x.dtype)  # (1, heads, L, L)
        bias = bias.masked_fill(padding, torch.finfo(x.dtype).min)  # (B, heads, L, L)
        for layer in self.layers:
            x = layer(x, bias)
        return self.final_norm(x)


# Hugging Face T5 parameter names -> ours (encoder only; decoder and lm_head weights are skipped)
_HF_KEYS = [
    (r"shared\.weight", "embed.weight"),
    (r"encoder\.block\.0\.layer\.0\.SelfAttention\.relative_attention_bias\.weight", "relative_attention_bias.weight"),
    (r"encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.([qkvo])\.weight", r"layers.\1.attn.\2.weight"),
    (r"encoder\.block\.(\d+)\.layer\.0\.layer_norm\.weight", r"layers.\1.attn_norm.weight"),
    (r"encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.(wi|wi_0|wi_1|wo)\.weight", r"layers.\1.ff.\2.weight"),
    (r"encoder\.block\.(\d+)\.layer\.1\.layer_norm\.weight", r"layers.\1.ff_norm.weight"),
    (r"encoder\.final_layer_norm\.weight", "final_norm.weight"),
]
_HF_SKIPPED = re.compile(r"(decoder\.|lm_head\.|encoder\.embed_tokens\.weight$)")  # the last one aliases `shared`


def convert_hf_state_dict(hf_state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Rename a Hugging Face T5 (or T5EncoderModel) state dict; returns (ours, names it did not recognise)."""
    ours, unknown = {}, []
    if "shared.weight" not in hf_state and "encoder.embed_tokens.weight" in hf_state:
        hf_state = {**hf_state, "shared.weight": hf_state["encoder.embed_tokens.weight"]}
    for name, tensor in hf_state.items():
        for pattern, target in _HF_KEYS:
            if re.fullmatch(pattern, name):
                ours[re.sub(pattern, target, name)] = tensor
                break
        else:
            if not _HF_SKIPPED.match(name):
                unknown.append(name)
    return ours, unknown


# ------------------------------------------------------------------------------------------ Hugging Face T5 import
def read_pretrained_t5_config(directory: str | Path, max_length: int = 128) -> TextEncoderConfig:
    """The `TextEncoderConfig` of a local Hugging Face T5 directory (its `config.json`)."""
    directory = Path(directory)
    cfg_file = directory / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{directory} is not a T5 checkpoint directory: {cfg_file.name} is missing")
    hf = json.loads(cfg_file.read_text())
    ff = hf.get("feed_forward_proj", "relu")
    if ff not in ("relu", "gated-gelu"):
        raise CheckpointError(f"{cfg_file}: feed_forward_proj {ff!r} is not supported (relu, gated-gelu)")
    fields = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads", "relative_attention_num_buckets",
              "relative_attention_max_distance", "layer_norm_epsilon")
    return TextEncoderConfig(**{k: hf[k] for k in fields if k in hf}, feed_forward_proj=ff, max_length=max_length,
                             pretrained_dir=str(directory))


def load_pretrained_t5(encoder: T5Encoder, directory: str | Path) -> None:
    """Load the encoder weights of a local Hugging Face T5 directory (`*.safetensors` or `pytorch_model*.bin`)."""
    directory = Path(directory)
    found = read_pretrained_t5_config(directory, encoder.config.max_length)
    differences = config_differences(found.model_dump(exclude={"pretrained_dir"}),
                               encoder.config.model_dump(exclude={"pretrained_dir"}))
    if differences:
        raise CheckpointError(f"T5 in {directory} does not match the text encoder config (checkpoint vs config):\n  - "
                              + "\n  - ".join(differences)
                              + "\nuse walt_export.models.text_encoder.read_pretrained_t5_config(dir) for the config")
    hf_state = _read_hf_weights(directory)
    state, unknown = convert_hf_state_dict(hf_state)
    if unknown:
        raise CheckpointError(f"{directory} has weights that are not T5 encoder weights: "
                              f"{', '.join(sorted(unknown)[:20])}")
    load_state_dict_checked(encoder, state, str(directory))
    log.info("loaded T5 encoder weights from %s", directory)


def _read_hf_weights(directory: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = sorted(directory.glob("*.safetensors"))
    try:
        if files:
            return {k: v for f in files for k, v in load_file(str(f)).items()}
    except SafetensorError as e:
        raise CheckpointError(f"T5 weights in {directory} are truncated or corrupt ({e})") from e
    files = sorted(directory.glob("pytorch_model*.bin"))
    if not files:
        raise CheckpointError(f"no T5 weights in {directory}: expected *.safetensors or pytorch_model*.bin")
    return {k: v for f in files for k, v in torch.load(f, map_location="cpu", weights_only=True).items()}
