"""walt-export: the W.A.L.T video diffusion cascade in PyTorch, its ONNX export and TensorRT engines.

    import walt_export
    cascade = walt_export.build("tiny", seed=0)        # or a CascadeConfig; device="meta" for structure only
    latent = cascade.tokenizer.encode(video)           # (B, 3, 1+4k, H, W) in [-1, 1] -> (B, 8, 1+k, H/8, W/8)
    walt_export.save(cascade, "tiny.safetensors")      # + tiny.json beside it
    cascade = walt_export.load("tiny.safetensors")

The names below are imported on first use (PEP 562), so `import walt_export` and `walt-export --help` do not
import torch; the configs and presets need only pydantic.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from runtime.lazy_exports import lazy_exports

# public name -> the module that defines it
_EXPORTS = {
    "Cascade": "walt_export.cascade", "build": "walt_export.cascade",
    "CheckpointError": "walt_export.state_dict",
    "load": "walt_export.checkpoint", "load_weights": "walt_export.checkpoint", "save": "walt_export.checkpoint",
    "read_pretrained_t5_config": "walt_export.models.text_encoder",
    "PRESETS": "walt_export.config", "CascadeConfig": "walt_export.config", "ConfigError": "walt_export.config",
    "DenoiserConfig": "walt_export.config", "DiffusionConfig": "walt_export.config",
    "SuperResConfig": "walt_export.config", "TextEncoderConfig": "walt_export.config",
    "TokenizerConfig": "walt_export.config", "UnknownPresetError": "walt_export.config",
    "WaltExportError": "runtime.errors",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from runtime.errors import WaltExportError
    from walt_export.cascade import Cascade, build
    from walt_export.checkpoint import load, load_weights, save
    from walt_export.config import (
        PRESETS,
        CascadeConfig,
        ConfigError,
        DenoiserConfig,
        DiffusionConfig,
        SuperResConfig,
        TextEncoderConfig,
        TokenizerConfig,
        UnknownPresetError,
    )
    from walt_export.models.text_encoder import read_pretrained_t5_config
    from walt_export.state_dict import CheckpointError

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
