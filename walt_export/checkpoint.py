"""Checkpoints: a whole cascade or one part as `NAME.safetensors` with its config `NAME.json` beside it.

The JSON holds the format, the kind of model and its full config (latent statistics included); the safetensors
metadata repeats the kind and holds the sha256 of the JSON, so a pair that does not belong together is refused.
Both files are written under temporary names and renamed when complete. Loading checks every tensor name and
shape first and fails with one `CheckpointError` listing everything that is missing, unexpected or mis-shaped
(`state_dict.py`). The weights of a Hugging Face T5 directory are imported by `models/text_encoder.py`.
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
from walt_export.models.text_encoder import T5Encoder
from walt_export.models.tokenizer import Tokenizer
from walt_export.state_dict import CheckpointError, config_differences, load_state_dict_checked

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
    differences = config_differences(cfg.model_dump(), module.config.model_dump())
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
