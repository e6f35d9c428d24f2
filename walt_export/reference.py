"""The trained reference cascade: weights committed with the package (`walt_export/weights/`), made by `training/`
on the procedural world (`runtime.world`; docs/reference.md says how and what they score).

A preset with committed weights uses them wherever a user expects a working model (`walt-export onnx --preset
tiny`); `--seed N` still gives seeded random weights. The paper presets have none and stay random.
"""

from __future__ import annotations

from pathlib import Path

WEIGHTS = Path(__file__).parent / "weights"


def reference_checkpoint(preset: str) -> Path | None:
    """The committed trained checkpoint of `preset` (`weights/PRESET.safetensors`, its config beside it), or None."""
    path = WEIGHTS / f"{preset}.safetensors"
    return path if path.is_file() else None
