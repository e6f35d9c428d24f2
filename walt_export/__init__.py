"""walt-export: the W.A.L.T video diffusion cascade in PyTorch, its ONNX export and TensorRT engines.

    import walt_export
    cascade = walt_export.build("tiny", seed=0)        # or a CascadeConfig; device="meta" for structure only
    latent = cascade.tokenizer.encode(video)           # (B, 3, 1+4k, H, W) in [-1, 1] -> (B, 8, 1+k, H/8, W/8)
    walt_export.save(cascade, "tiny.safetensors")      # + tiny.json beside it
    cascade = walt_export.load("tiny.safetensors")
"""

from walt_export.cascade import Cascade, build
from walt_export.checkpoint import CheckpointError, load, load_weights, save
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

__all__ = [
    "PRESETS", "Cascade", "CascadeConfig", "CheckpointError", "ConfigError", "DenoiserConfig", "DiffusionConfig",
    "SuperResConfig", "TextEncoderConfig", "TokenizerConfig", "UnknownPresetError", "build", "load", "load_weights",
    "save",
]
