"""The reference cascade's training (`training/`) on the micro cascade: every stage runs and resumes exactly."""

import json
import re

import pytest
import torch

import walt_export
from runtime.compare import Tolerance, assert_close
from training import cli
from training.data import tokenizer_crop
from training.loop import Schedule, learning_rate, state_path, weights_path

RESUME_TOLERANCE = Tolerance(1e-6, 1e-5)  # a resumed run repeats the draws of an uninterrupted one (float32 CPU)
STAGE_ARGS = {"tokenizer": ["--batch", "2", "--frames", "5", "--crops", "32", "0"], "base": ["--batch", "2"],
              "sr1": ["--batch", "2"], "sr2": ["--batch", "2"]}


def train(stage: str, out, steps: int, *extra: str) -> None:
    assert cli.main([stage, "--preset", "micro", "--out", str(out), "--device", "cpu", "--workers", "0",
                     "--steps", str(steps), *STAGE_ARGS.get(stage, []), *extra]) == 0


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A micro run directory with every stage trained for 2 steps and the latents of 6 clips."""
    out = tmp_path_factory.mktemp("run")
    train("tokenizer", out, 2)
    assert cli.main(["latents", "--preset", "micro", "--out", str(out), "--device", "cpu", "--workers", "1",
                     "--count", "6"]) == 0
    for stage in ("base", "sr1", "sr2"):
        train(stage, out, 2)
    return out


def test_every_stage_writes_weights_and_the_cascade_holds_them(run, tmp_path):
    path = tmp_path / "cascade.safetensors"
    assert cli.main(["cascade", "--preset", "micro", "--out", str(run), "--to", str(path),
                     "--inference-steps", "7"]) == 0
    cascade = walt_export.load(path)
    stats = json.loads((run / cli.STATS_FILE).read_text())
    assert cascade.config.tokenizer.latent_mean == pytest.approx(tuple(stats["latent_mean"]))
    assert cascade.config.diffusion.num_inference_steps == 7
    for stage in ("tokenizer", "base", "sr1", "sr2"):
        trained = walt_export.load(weights_path(run, stage))
        for name, tensor in trained.state_dict().items():
            assert torch.equal(getattr(cascade, stage).state_dict()[name], tensor), f"{stage}.{name}"
    frozen = walt_export.build("micro", seed=cli.TEXT_ENCODER_SEED).text_encoder  # the text encoder is not trained
    for name, tensor in frozen.state_dict().items():
        assert torch.equal(cascade.text_encoder.state_dict()[name], tensor), name


@pytest.mark.parametrize("stage, extra", [("tokenizer", []), ("sr1", []), ("base", ["--timestep-logit-mean", "1"])])
def test_a_resumed_run_ends_where_an_uninterrupted_one_does(run, tmp_path, stage, extra):
    if stage != "tokenizer":  # the denoisers read the run's latents
        for name in ("latents.npy", "latents.json"):
            (tmp_path / "a").mkdir(exist_ok=True)
            (tmp_path / "b").mkdir(exist_ok=True)
            for d in ("a", "b"):
                (tmp_path / d / name).write_bytes((run / name).read_bytes())
    train(stage, tmp_path / "a", 3, *extra)
    train(stage, tmp_path / "b", 1, *extra)
    assert state_path(tmp_path / "b", stage).is_file()
    train(stage, tmp_path / "b", 3, *extra)
    a, b = (walt_export.load(weights_path(tmp_path / d, stage)).state_dict() for d in ("a", "b"))
    for name in a:
        assert_close(b[name], a[name], RESUME_TOLERANCE, f"{stage}.{name} after resuming")


@pytest.mark.parametrize("mean, expected", [(None, 0.5), (1.0, 0.697)])
def test_training_timesteps_are_uniform_or_logit_normal(mean, expected):
    """Uniform t has mean T/2; logit-normal around m = 1 has E[sigmoid(1 + N(0, 1))] = 0.697 (numerical integral)."""
    from training.losses import DenoiserLoss, step_generator
    from walt_export.config import PRESETS

    cfg = PRESETS["micro"]
    batch = 20_000
    loss = DenoiserLoss(cfg.base, torch.zeros(1, 1, 1, 1, 1), torch.zeros(1, dtype=torch.int64), torch.zeros(1, 1, 1),
                        torch.ones(1, 1), cfg.diffusion, batch, seed=0, timestep_logit_mean=mean)
    t = loss.timesteps(step_generator(0, 0, torch.device("cpu")))
    T = cfg.diffusion.num_train_timesteps
    assert t.shape == (batch,) and t.dtype == torch.int64 and 0 <= t.min() and t.max() < T
    assert abs(t.float().mean().item() / T - expected) < 0.01, t.float().mean().item() / T
    assert torch.equal(t, loss.timesteps(step_generator(0, 0, torch.device("cpu"))))  # seeded by (seed, step)


def test_tokenizer_crops_are_world_video_in_range():
    import numpy as np

    crop = tokenizer_crop(np.random.default_rng(0), 5, (32, 48), 128, 224)
    assert crop.shape == (3, 5, 32, 48) and crop.dtype == np.float32
    assert -1.0 <= crop.min() and crop.max() <= 1.0 and crop.std() > 0.01


def test_training_needs_a_length():
    with pytest.raises(SystemExit, match="--steps or --minutes"):
        cli.main(["base", "--preset", "micro", "--out", "/nonexistent"])


def test_learning_rate_warms_up_holds_and_cools_down_to_zero_at_the_time_limit():
    schedule = Schedule(steps=None, minutes=10.0, lr=1e-3, warmup=4, cooldown_minutes=2.0)
    assert learning_rate(schedule, 0, 0.0) == pytest.approx(2.5e-4)  # warm-up: (step + 1) / warmup
    assert learning_rate(schedule, 100, 7 * 60) == pytest.approx(1e-3)  # stable
    assert learning_rate(schedule, 100, 9 * 60) == pytest.approx(5e-4)  # half-way through the last 2 minutes
    assert learning_rate(schedule, 100, 10 * 60) == 0.0
    assert learning_rate(Schedule(steps=None, minutes=10.0, lr=1e-3, warmup=4), 100, 9.9 * 60) == 1e-3  # no decay


def test_cooldown_must_end_with_a_time_limit():
    with pytest.raises(SystemExit, match="--cooldown"):
        cli.main(["base", "--preset", "micro", "--out", "/nonexistent", "--steps", "3", "--cooldown", "1"])


def test_probe_prints_the_base_accuracy_per_attribute_and_mode(run, capsys):
    assert cli.main(["probe", "--preset", "micro", "--out", str(run), "--device", "cpu", "--samples", "4",
                     "--timesteps", "500"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line for line in lines if line.startswith(("text-to-video", "first frame given"))]
    assert len(rows) == 2 and all(word in row for row in rows for word in ("colour", "shape", "direction")), lines


@pytest.mark.parametrize("args, says", [
    (["--samples", "0"], "--samples must be at least 1 and --timesteps in [0, 1000): got --samples 0"),
    (["--timesteps", "500", "1000"], "--timesteps in [0, 1000): got --samples 32 --timesteps 500 1000"),
    (["--weights", "/nonexistent/base.safetensors"], "no base weights at /nonexistent/base.safetensors"),
])
def test_probe_refuses_bad_arguments_before_loading_anything(args, says):
    with pytest.raises(SystemExit, match=re.escape(says)):
        cli.main(["probe", "--preset", "micro", "--out", "/nonexistent", *args])
