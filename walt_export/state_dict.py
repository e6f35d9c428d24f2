"""Loading weights into a module with every mismatch reported at once, and `CheckpointError`.

A leaf module (torch and the error base only), so that both the checkpoint files (`checkpoint.py`) and the import
of Hugging Face T5 weights (`models/text_encoder.py`) use it without importing each other.
"""

from __future__ import annotations

from torch import Tensor, nn

from runtime.errors import WaltExportError


class CheckpointError(WaltExportError, RuntimeError):
    """A checkpoint that cannot be loaded; the message says what is wrong and what to do."""


def load_state_dict_checked(module: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """`module.load_state_dict(state, assign=True)` after checking names and shapes.

    Works on modules built on the meta device (tensors are assigned, not copied); values are cast to the dtype of
    the module's tensors. Raises CheckpointError listing every missing, unexpected and mis-shaped tensor at once.
    """
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


def config_differences(saved: object, current: object, prefix: str = "") -> list[str]:
    """Paths where two config dumps differ, e.g. `base.hidden_size: 1024 != 1152`."""
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(saved) | set(current), key=str):
            out += config_differences(saved.get(key), current.get(key), f"{prefix}{key}.")
        return out
    return [] if saved == current else [f"{prefix.rstrip('.')}: {saved!r} != {current!r}"]
