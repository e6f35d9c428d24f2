"""Checkpoints: a whole cascade or one part as `NAME.safetensors` with its config `NAME.json` beside it.

The JSON holds the format, the kind of model and its full config (latent statistics included); the safetensors
metadata repeats the kind and holds the sha256 of the JSON, so a pair that does not belong together is refused.
Both files are written under temporary names and renamed when complete. Loading checks every tensor name and
shape first and fails with one `CheckpointError` listing everything that is missing, unexpected or mis-shaped.

Also here: importing the weights of a local Hugging Face T5 directory into the text encoder.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from pydantic import BaseModel, ValidationError
from torch import Tensor, nn

from runtime.documents import read_document
from runtime.files import atomic_output
from walt_export.cascade import Cascade, build_denoiser
from walt_export.config import (
    CascadeConfig,
    ConfigError,
    DenoiserConfig,
    SuperResConfig,
    TextEncoderConfig,
    TokenizerConfig,
    validation_problems,
)
from walt_export.models.denoiser import WaltDenoiser
from walt_export.models.super_resolution import SuperResDenoiser
from walt_export.models.text_encoder import T5Encoder, convert_hf_state_dict
from walt_export.models.tokenizer import Tokenizer

log = logging.getLogger(__name__)

FORMAT = "walt-export-checkpoint"
FORMAT_VERSION = 1

# kind -> (module class, config class, constructor); subclasses before their base classes
KINDS: dict[str, tuple[type[nn.Module], type[BaseModel], Callable[[BaseModel], nn.Module]]] = {
    "cascade": (Cascade, CascadeConfig, Cascade),
    "tokenizer": (Tokenizer, TokenizerConfig, Tokenizer),
    "text_encoder": (T5Encoder, TextEncoderConfig, T5Encoder),
    "super_resolution": (SuperResDenoiser, SuperResConfig, build_denoiser),
    "denoiser": (WaltDenoiser, DenoiserConfig, build_denoiser),
}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded; the message says what is wrong and what to do."""


def config_path(path: str | Path) -> Path:
    """The config JSON that belongs to a `.safetensors` checkpoint."""
    return Path(path).with_suffix(".json")


def kind_of(module: nn.Module) -> str:
    for kind, (cls, _, _) in KINDS.items():
        if isinstance(module, cls):
            return kind
    raise TypeError(f"cannot checkpoint a {type(module).__name__}; expected one of: "
                    + ", ".join(cls.__name__ for cls, _, _ in KINDS.values()))


# ------------------------------------------------------------------------------------------------------- saving
def save(module: nn.Module, path: str | Path) -> Path:
    """Write `module` (a Cascade or one part) to `path` (`.safetensors`) and its config beside it.

    Returns the path of the weights file. Tensors are stored as they are (dtype and values), contiguous, on the CPU.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"checkpoint path {path} must end in .safetensors (the config goes beside it as .json)")
    if not path.parent.is_dir():
        raise CheckpointError(f"cannot write {path}: directory {path.parent} does not exist")
    kind = kind_of(module)
    if any(p.is_meta for p in module.parameters()):
        raise CheckpointError(f"cannot save a {kind} built on the meta device: it has no weights")
    document = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind,
                "config": module.config.model_dump(mode="json")}
    text = json.dumps(document, indent=2) + "\n"
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in module.state_dict().items()}
    metadata = {"format": FORMAT, "kind": kind, "config_sha256": hashlib.sha256(text.encode()).hexdigest()}
    try:
        with atomic_output(path) as tmp_weights, atomic_output(config_path(path)) as tmp_config:
            save_file(state, str(tmp_weights), metadata=metadata)
            tmp_config.write_text(text)
    except OSError as e:
        raise CheckpointError(f"cannot write checkpoint {path}: {e.strerror or e}") from e
    log.info("saved %s checkpoint %s (%d tensors)", kind, path, len(state))
    return path


# ------------------------------------------------------------------------------------------------------ loading
def read_config(path: str | Path) -> tuple[str, BaseModel]:
    """(kind, validated config) of a checkpoint, from the JSON beside it."""
    path = Path(path)
    cfg_file = config_path(path)
    if not cfg_file.is_file():
        raise CheckpointError(f"config {cfg_file} not found: a checkpoint is {path.name} with {cfg_file.name} beside it")
    document = read_document(cfg_file, FORMAT, FORMAT_VERSION, CheckpointError,
                             "re-save the checkpoint with this version of walt-export (walt_export.save)")
    kind = document.get("kind")
    if kind not in KINDS:
        raise CheckpointError(f"{cfg_file} has unknown kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    try:
        return kind, KINDS[kind][1].model_validate(document.get("config"))
    except (ValidationError, ConfigError) as e:
        problems = e.problems if isinstance(e, ConfigError) else validation_problems(e)
        raise CheckpointError(f"config in {cfg_file} is invalid:\n  - " + "\n  - ".join(problems)) from None


def load(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Build the model a checkpoint describes and load its weights (a `Cascade` or one part, in eval mode)."""
    kind, cfg = read_config(path)
    with torch.device("meta"):
        module = KINDS[kind][2](cfg)
    load_state_dict_checked(module, _read_safetensors(Path(path), kind), str(path))
    return module.to(device).eval()


def load_weights(module: nn.Module, path: str | Path) -> None:
    """Load a checkpoint's weights into `module` of the same kind and config; every mismatch is one error.

    Works on modules built on the meta device (tensors are assigned, not copied); values are cast to the dtype
    of the module's tensors.
    """
    path = Path(path)
    kind, cfg = read_config(path)
    expected_kind = kind_of(module)
    if kind != expected_kind:
        raise CheckpointError(f"{path} holds a {kind}, not a {expected_kind}")
    differences = _differences(cfg.model_dump(), module.config.model_dump())
    if differences:
        name = getattr(cfg, "name", kind)
        raise CheckpointError(
            f"{path} was saved for a different config ({name!r}); differences (checkpoint vs model):\n  - "
            + "\n  - ".join(differences) + "\nbuild the model from the checkpoint's config, or pick the matching preset"
        )
    load_state_dict_checked(module, _read_safetensors(path, kind), str(path))


def _read_safetensors(path: Path, kind: str) -> dict[str, Tensor]:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    expected_sha = hashlib.sha256(config_path(path).read_bytes()).hexdigest()
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("config_sha256") != expected_sha or metadata.get("kind") != kind:
                raise CheckpointError(
                    f"{path} and {config_path(path).name} do not belong together (the weights were saved with another "
                    "config); re-save the checkpoint"
                )
            return {name: f.get_tensor(name) for name in f.keys()}
    except SafetensorError as e:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({e}); re-save or re-copy it") from e


def load_state_dict_checked(module: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """`module.load_state_dict(state, assign=True)` after checking names and shapes; lists every problem at once."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(
        f"{name}: checkpoint {tuple(state[name].shape)}, model {tuple(expected[name].shape)}"
        for name in set(state) & set(expected) if state[name].shape != expected[name].shape
    )
    problems = [f"{label} ({len(items)}): {', '.join(items[:20])}{' ...' if len(items) > 20 else ''}"
                for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
                if items]
    if problems:
        raise CheckpointError(f"{source} does not fit the {type(module).__name__}:\n  - " + "\n  - ".join(problems))
    state = {name: tensor.to(expected[name].dtype) for name, tensor in state.items()}
    module.load_state_dict(state, assign=True)


def _differences(saved: object, current: object, prefix: str = "") -> list[str]:
    """Paths where two config dumps differ, e.g. `base.hidden_size: 1024 != 1152`."""
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(saved) | set(current), key=str):
            out += _differences(saved.get(key), current.get(key), f"{prefix}{key}.")
        return out
    return [] if saved == current else [f"{prefix.rstrip('.')}: {saved!r} != {current!r}"]


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
    differences = _differences(found.model_dump(exclude={"pretrained_dir"}),
                               encoder.config.model_dump(exclude={"pretrained_dir"}))
    if differences:
        raise CheckpointError(f"T5 in {directory} does not match the text encoder config (checkpoint vs config):\n  - "
                              + "\n  - ".join(differences)
                              + "\nuse walt_export.checkpoint.read_pretrained_t5_config(dir) for the config")
    hf_state = _read_hf_weights(directory)
    state, unknown = convert_hf_state_dict(hf_state)
    if unknown:
        raise CheckpointError(f"{directory} has weights that are not T5 encoder weights: {', '.join(sorted(unknown)[:20])}")
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
