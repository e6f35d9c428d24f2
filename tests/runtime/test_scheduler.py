"""The zero-SNR schedule and DDIM for v-prediction (numpy only)."""

import numpy as np
import pytest

from runtime.compare import Tolerance, assert_close
from runtime.scheduler import DDIMScheduler, classifier_free_guidance, zero_snr_alpha_bar

TOL = Tolerance(atol=1e-12, rtol=1e-12)  # float64 maths


def test_schedule_is_decreasing_with_exactly_zero_terminal_snr():
    alpha_bar = zero_snr_alpha_bar()
    plain = zero_snr_alpha_bar(rescale_zero_terminal_snr=False)
    assert alpha_bar.dtype == np.float64 and alpha_bar.shape == (1000,)
    assert np.all(np.diff(alpha_bar) < 0)
    assert alpha_bar[-1] == 0.0  # SNR = a / (1 - a) = 0 exactly
    assert alpha_bar[0] == pytest.approx(plain[0], rel=1e-12) and plain[-1] > 1e-5  # only the end moved
    assert alpha_bar[0] == pytest.approx(1 - 1e-4)


def test_trailing_timesteps():
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(50)
    assert len(scheduler.timesteps) == 50
    assert scheduler.timesteps[0] == 999 and scheduler.timesteps[-1] == 19
    assert np.all(np.diff(scheduler.timesteps) == -20)
    assert scheduler.previous_timestep(999) == 979 and scheduler.previous_timestep(19) == -1
    with pytest.raises(ValueError, match="steps must be in"):
        scheduler.set_timesteps(0)
    with pytest.raises(ValueError, match="t=500 is not one of the 50 timesteps"):
        scheduler.previous_timestep(500)


@pytest.mark.parametrize("t", [999, 499, 19])
def test_exact_v_recovers_x0_in_one_step(t):
    rng = np.random.default_rng(0)
    x0, noise = rng.standard_normal((2, 8, 3, 4, 4)), rng.standard_normal((2, 8, 3, 4, 4))
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(1 if t == 999 else 50)
    x_t = scheduler.add_noise(x0, noise, t)
    prev, x0_hat = scheduler.step(scheduler.velocity(x0, noise, t), t, x_t)
    assert_close(x0_hat, x0, TOL, f"x0 estimate at t={t}")
    if t == 999:  # one step from pure noise lands on the clean sample
        assert_close(prev, x0, TOL, "x_prev after the only step")
    else:  # DDIM keeps the same noise: x_prev = q(x_prev | x0) with it
        assert_close(prev, scheduler.add_noise(x0, noise, scheduler.previous_timestep(t)), TOL, "x_prev")


def test_from_schedule_reads_the_manifest_whose_schema_refuses_other_samplers():
    from pydantic import ValidationError

    from runtime.manifest import ScheduleInfo

    schedule = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                    rescale_zero_terminal_snr=True, prediction_type="v", timestep_spacing="trailing",
                    num_inference_steps=50, guidance_scale=7.5)
    assert DDIMScheduler.from_schedule(ScheduleInfo(**schedule)).alphas_cumprod[-1] == 0.0
    with pytest.raises(ValidationError, match="prediction_type"):
        ScheduleInfo(**schedule | {"prediction_type": "epsilon"})


def test_guidance():
    cond, uncond = np.array([2.0]), np.array([1.0])
    assert classifier_free_guidance(cond, uncond, 1.0) == 2.0 and classifier_free_guidance(cond, uncond, 7.5) == 8.5
