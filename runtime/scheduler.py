"""DDIM (eta = 0) for v-prediction on a zero-terminal-SNR schedule, in numpy (docs/model_spec.md §4).

Pure maths, no model: `set_timesteps(n)`, `.timesteps`, `step(model_output, t, sample)` (diffusers' interface).
The schedule is float64 and cast to the sample's dtype at use (DiT / improved-diffusion).

    betas linear in [beta_start, beta_end] over T steps; alpha_bar_t = prod_{s<=t} (1 - beta_s)
    zero terminal SNR [Lin et al. 2023, Alg. 1]: shift and scale sqrt(alpha_bar) so that its last value is 0 and
        its first unchanged
    v-prediction:  x0 = sqrt(a_t) x_t - sqrt(1 - a_t) v,   eps = sqrt(a_t) v + sqrt(1 - a_t) x_t
    DDIM, eta = 0 [Song et al. 2021, eq. 12]:  x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps
    trailing spacing [Lin et al. 2023, Table 2]: t = round(T - k T / n) - 1, k = 0..n-1 (starts at T - 1, where
        the SNR is zero); after the last step a_prev = 1 (the clean sample)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from runtime.manifest import ScheduleInfo


def zero_snr_alpha_bar(num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                       rescale_zero_terminal_snr: bool = True) -> np.ndarray:
    """alpha_bar_t (float64, length T) of the linear schedule, rescaled to zero terminal SNR."""
    betas = np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64)
    alpha_bar = np.cumprod(1.0 - betas)
    if not rescale_zero_terminal_snr:
        return alpha_bar
    root = np.sqrt(alpha_bar)
    first, last = root[0], root[-1]
    root = (root - last) * first / (first - last)  # Alg. 1: last -> 0, first unchanged
    return root**2


class DDIMScheduler:
    """DDIM, eta = 0, v-prediction, trailing timesteps; see the module docstring for the equations."""

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                 rescale_zero_terminal_snr: bool = True):
        self.num_train_timesteps = num_train_timesteps
        self.alphas_cumprod = zero_snr_alpha_bar(num_train_timesteps, beta_start, beta_end, rescale_zero_terminal_snr)
        self.timesteps = np.arange(num_train_timesteps - 1, -1, -1, dtype=np.int64)
        self.num_inference_steps = num_train_timesteps

    @classmethod
    def from_schedule(cls, schedule: ScheduleInfo) -> DDIMScheduler:
        """From a manifest's schedule, whose literal fields (linear betas, v-prediction, trailing spacing) are what
        this sampler does: the manifest schema refuses any other."""
        return cls(schedule.num_train_timesteps, schedule.beta_start, schedule.beta_end,
                   schedule.rescale_zero_terminal_snr)

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Trailing spacing: [T-1, ..., T/n - 1], descending."""
        if not 1 <= num_inference_steps <= self.num_train_timesteps:
            raise ValueError(f"steps must be in [1, {self.num_train_timesteps}], got {num_inference_steps}")
        step = self.num_train_timesteps / num_inference_steps
        self.timesteps = (np.round(np.arange(self.num_train_timesteps, 0, -step)) - 1).astype(np.int64)
        self.num_inference_steps = num_inference_steps

    def previous_timestep(self, t: int) -> int:
        """The timestep after `t` in the current sequence, or -1 after the last one."""
        found = np.flatnonzero(self.timesteps == t)
        if not found.size:
            raise ValueError(f"t={t} is not one of the {self.num_inference_steps} timesteps set; step through "
                             "`scheduler.timesteps` after `set_timesteps(n)`")
        index = int(found[0])
        return int(self.timesteps[index + 1]) if index + 1 < len(self.timesteps) else -1

    def alpha_bar(self, t: int) -> float:
        return 1.0 if t < 0 else float(self.alphas_cumprod[t])

    def step(self, model_output: np.ndarray, t: int, sample: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One DDIM step from x_t to x_prev with the predicted v; returns (x_prev, x0 estimate)."""
        a_t, a_prev = self.alpha_bar(t), self.alpha_bar(self.previous_timestep(t))
        dtype = sample.dtype
        x0 = np.sqrt(a_t) * sample - np.sqrt(1.0 - a_t) * model_output  # v-prediction
        eps = np.sqrt(a_t) * model_output + np.sqrt(1.0 - a_t) * sample
        prev = np.sqrt(a_prev) * x0 + np.sqrt(1.0 - a_prev) * eps  # eta = 0
        return prev.astype(dtype), x0.astype(dtype)

    def add_noise(self, x0: np.ndarray, noise: np.ndarray, t: int) -> np.ndarray:
        """q(x_t | x0) = sqrt(a_t) x0 + sqrt(1 - a_t) noise (also the SR denoisers' noise augmentation of the
        low-res latent)."""
        a_t = self.alpha_bar(t)
        return (np.sqrt(a_t) * x0 + np.sqrt(1.0 - a_t) * noise).astype(x0.dtype)

    def velocity(self, x0: np.ndarray, noise: np.ndarray, t: int) -> np.ndarray:
        """v = sqrt(a_t) eps - sqrt(1 - a_t) x0, the training target (tests, calibration)."""
        a_t = self.alpha_bar(t)
        return (np.sqrt(a_t) * noise - np.sqrt(1.0 - a_t) * x0).astype(x0.dtype)


def classifier_free_guidance(v_cond: np.ndarray, v_uncond: np.ndarray, scale: float) -> np.ndarray:
    """v = v_uncond + s (v_cond - v_uncond)."""
    return v_uncond + scale * (v_cond - v_uncond)
