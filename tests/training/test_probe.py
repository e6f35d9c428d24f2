"""The diffusion-classifier probe (`training/probe.py`): an oracle that knows every clip is read at 100%, a model that
ignores the caption at chance, and `python -m training probe` on a trained micro run."""

import pytest
import torch
from torch import nn

from runtime.world import scenes
from training.losses import DenoiserLoss
from training.probe import ATTRIBUTES, caption_accuracy
from walt_export.config import PRESETS

CFG = PRESETS["micro"]


def _loss() -> DenoiserLoss:
    """One latent clip per scene, class k's text state holding the number k."""
    classes = len(scenes())
    latents = torch.randn((classes, CFG.base.latent_channels, *CFG.base.latent_size), generator=torch.Generator()
                          .manual_seed(0))
    states = torch.arange(classes + 1, dtype=torch.float32).view(-1, 1, 1).expand(-1, 2, 4)
    return DenoiserLoss(CFG.base, latents, torch.arange(classes), states, torch.ones(classes + 1, 2), CFG.diffusion,
                        batch=1, seed=0)


class Oracle(nn.Module):
    """Predicts v exactly when the caption names the clip (it knows each class's clean latent)."""

    def __init__(self, loss: DenoiserLoss, follows: bool = True):
        super().__init__()
        self.loss, self.follows = loss, follows

    def forward(self, x_t, t, self_cond, frame_cond, frame_mask, text, text_mask):
        if not self.follows:
            return torch.zeros_like(x_t)
        x0 = self.loss.latents[text[:, 0, 0].long()]
        a = self.loss.alpha_bar[t.long()].view(-1, 1, 1, 1, 1)
        noise = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
        return a.sqrt() * noise - (1 - a).sqrt() * x0


@pytest.mark.parametrize("frames", [0, 1])
def test_a_model_that_follows_the_caption_is_read_right_every_time(frames):
    loss = _loss()
    assert caption_accuracy(Oracle(loss), loss, 24, (300, 900), frames) == {name: 1.0 for name in ATTRIBUTES}


def test_a_model_that_ignores_the_caption_is_read_at_chance():
    loss = _loss()
    accuracy = caption_accuracy(Oracle(loss, follows=False), loss, 48, (500,))
    for name, values in ATTRIBUTES.items():  # every caption ties: the first value is picked, right for 1 in len
        assert accuracy[name] == pytest.approx(1 / len(values)), (name, accuracy)
