"""One resumable, seeded training loop for every stage: AdamW with warm-up and an optional cool-down, gradient
clipping, an EMA of the weights.

`DIR/STAGE.state.safetensors` holds what a resumed run needs (weights, EMA, AdamW moments; step, wall time and the
optimizer's settings in its metadata; no pickle); `DIR/STAGE.safetensors` (+ `.json`) holds the EMA weights as a
walt-export checkpoint, the stage's result. Both are rewritten atomically every `save_minutes` and at the end, so a
killed run resumes from its last save. Every random draw of step i depends on (seed, i) alone (`losses.py`,
`data.py`), so a resumed run continues the sequence it would have drawn.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

import walt_export
from runtime.files import atomic_output
from training.losses import Loss

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Schedule:
    """How long and how fast one stage trains."""

    steps: int | None  # stop after this many steps in all (None: only the time limit)
    minutes: float | None  # stop after this much wall time in all, resumed runs included (None: only steps)
    lr: float
    warmup: int = 200  # linear warm-up steps
    cooldown_minutes: float = 0.0  # the learning rate falls linearly to 0 over the time limit's last minutes
    ema_decay: float = 0.998
    clip: float = 1.0  # gradient norm
    save_minutes: float = 2.0
    log_every: int = 50


def learning_rate(schedule: Schedule, step: int, elapsed: float) -> float:
    """The learning rate of step `step` (0-based) after `elapsed` seconds of training: warm-up, stable, decay.

    Linear warm-up over `warmup` steps to the peak `lr`, constant, then a linear decay to 0 over the last
    `cooldown_minutes` of the time limit (`minutes`): the warmup-stable-decay schedule (Hu et al. 2024, MiniCPM
    §4.1; Hägele et al. 2024), which lets a run of unknown length be extended from its stable phase and still end
    cooled down. It counts wall time, as the time limit does, so a resumed run decays where it left off.
    """
    rate = schedule.lr * min(1.0, (step + 1) / schedule.warmup)
    if schedule.cooldown_minutes > 0 and schedule.minutes is not None:
        left = max(schedule.minutes * 60 - elapsed, 0.0)
        rate *= min(1.0, left / (schedule.cooldown_minutes * 60))
    return rate


def state_path(directory: Path, stage: str) -> Path:
    return directory / f"{stage}.state.safetensors"


def save_state(path: Path, model: nn.Module, ema: nn.Module, optimizer: torch.optim.Optimizer, step: int,
               elapsed: float) -> None:
    """Write the resumable state of a run (atomically) as safetensors: `model.*`, `ema.*` and `optimizer.I.KEY`
    tensors (I: the parameter's index), the rest as JSON metadata."""
    from safetensors.torch import save_file

    optimizer_state = optimizer.state_dict()
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()} | \
        {f"ema.{k}": v for k, v in ema.state_dict().items()} | \
        {f"optimizer.{i}.{key}": value for i, state in optimizer_state["state"].items()
         for key, value in state.items()}
    metadata = {"step": str(step), "elapsed": repr(elapsed), "param_groups": json.dumps(optimizer_state["param_groups"])}
    with atomic_output(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def load_state(path: Path, model: nn.Module, ema: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, float]:
    """Load `save_state`'s file into the model, EMA and optimizer; returns (step, elapsed seconds)."""
    from safetensors import safe_open

    device = next(model.parameters()).device
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        metadata = f.metadata()
        tensors: dict[str, Tensor] = {name: f.get_tensor(name) for name in f.keys()}

    def part(prefix: str) -> dict[str, Tensor]:
        return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}

    model.load_state_dict(part("model."))
    ema.load_state_dict(part("ema."))
    state: dict[int, dict[str, Tensor]] = {}
    for name, value in part("optimizer.").items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(metadata["param_groups"])})
    return int(metadata["step"]), float(metadata["elapsed"])


def weights_path(directory: Path, stage: str) -> Path:
    return directory / f"{stage}.safetensors"


def train(stage: str, model: nn.Module, loss: Loss, directory: Path, schedule: Schedule) -> nn.Module:
    """Train `model` (on its device) on `loss` until the schedule's steps or minutes; returns the EMA model.

    Resumes from `directory/STAGE.state.safetensors` when it exists (the model must have the same structure)."""
    directory.mkdir(parents=True, exist_ok=True)
    model.train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=schedule.lr, weight_decay=0.01, betas=(0.9, 0.99))
    step, elapsed = 0, 0.0
    if state_path(directory, stage).is_file():
        step, elapsed = load_state(state_path(directory, stage), model, ema, optimizer)
        log.info("%s: resumed at step %d after %.1f min", stage, step, elapsed / 60)

    def done() -> bool:
        return (schedule.steps is not None and step >= schedule.steps) or \
            (schedule.minutes is not None and elapsed >= schedule.minutes * 60)

    def save() -> None:
        save_state(state_path(directory, stage), model, ema, optimizer, step, elapsed)
        walt_export.save(ema, weights_path(directory, stage))
        log.info("%s: saved step %d (%.1f min) to %s", stage, step, elapsed / 60, directory)

    started, last_save, running = time.perf_counter() - elapsed, time.perf_counter(), []
    interval = (time.perf_counter(), step)  # (time, step) of the last log line
    while not done():
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(schedule, step, elapsed)
        value = loss(model, step)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, schedule.clip)
        optimizer.step()
        decay = min(schedule.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)
        step += 1
        running.append(value.detach())
        elapsed = time.perf_counter() - started
        if step % schedule.log_every == 0 or done():
            mean = torch.stack(running).mean().item()
            running.clear()
            if not math.isfinite(mean):
                raise FloatingPointError(f"{stage}: the loss went non-finite at step {step}")
            seconds = (time.perf_counter() - interval[0]) / (step - interval[1])
            interval = (time.perf_counter(), step)
            log.info("%s: step %d  loss %.5f  grad-norm %.3f  %.3f s/step  %.1f min", stage, step, mean,
                     float(norm), seconds, elapsed / 60)
        if time.perf_counter() - last_save >= schedule.save_minutes * 60:
            save()
            last_save = time.perf_counter()
    save()
    return ema
