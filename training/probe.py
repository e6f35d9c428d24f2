"""Which parts of the caption a trained denoiser follows, without sampling: the diffusion classifier.

A denoiser that has learned an attribute (colour, shape, direction) predicts v best under the caption that names the
clip's true value: so for each training clip, noise it at a few timesteps, compute the v-loss under every caption
that differs from the true one in that attribute only, and pick the caption with the lowest loss (Li et al. 2023,
"Your Diffusion Model is Secretly a Zero-Shot Classifier"). The accuracy is at chance (1 / number of values) for an
attribute the model ignores. It takes a minute on the CPU where scoring sampled videos takes many, so it can follow
training (docs/reference.md §7). With `conditioning_frames` = 1, the clip's first latent frame is given, as in
image-to-video: then the object's place is known and only the caption tells where it goes.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from runtime.world import COLOURS, DIRECTIONS, SHAPES, scenes
from training.data import pool
from training.losses import DenoiserLoss, diffuse, step_generator
from walt_export.config import SuperResConfig

ATTRIBUTES = {"colour": COLOURS, "shape": SHAPES, "direction": DIRECTIONS}


@torch.no_grad()
def caption_accuracy(model: nn.Module, loss: DenoiserLoss, samples: int, timesteps: tuple[int, ...],
                     conditioning_frames: int = 0, seed: int = 0) -> dict[str, float]:
    """{attribute: the share of `samples` training clips whose true caption gives the lowest v-loss among the
    captions that differ from it in that attribute only}, the v-loss summed over `timesteps` (0 <= t < T).

    Args:
        model: a base denoiser (`walt_export.models.denoiser`), in eval mode; TypeError for a super-resolution one.
        loss: the denoiser's training loss: its latents, class ids, text states and schedule.
        conditioning_frames: clean leading latent frames given to the model (0: text-to-video, 1: image-to-video);
            the loss counts the other frames.
    """
    if isinstance(loss.config, SuperResConfig):
        raise TypeError("the probe reads a base denoiser: a super-resolution stage follows its low-resolution input")
    device = loss.latents.device
    g = step_generator(seed, 0, device)
    index = torch.randperm(len(loss.latents), generator=g, device=device)[:samples]
    x0 = pool(loss.latents[index].float(), loss.factor)
    n, frames = len(x0), x0.shape[2]
    frame_mask = (torch.arange(frames, device=device) < conditioning_frames).float().expand(n, -1)
    frame_cond = x0 * frame_mask[:, None, :, None, None]
    noisy = []  # (t, x_t, target v) per timestep
    for t in timesteps:
        x_t, target = diffuse(x0, torch.randn(x0.shape, generator=g, device=device), loss.alpha_bar[t])
        noisy.append((torch.full((n,), float(t), device=device), x_t, target))
    all_scenes = scenes()
    truth = [all_scenes[int(i)] for i in loss.class_ids[index]]

    def caption_loss(classes: Tensor) -> Tensor:
        out = torch.zeros(n, device=device)
        for t, x_t, target in noisy:
            v = model(x_t, t, torch.zeros_like(x0), frame_cond, frame_mask, text=loss.text_states[classes],
                      text_mask=loss.text_mask[classes])
            out += (v - target)[:, :, conditioning_frames:].square().mean(dim=(1, 2, 3, 4))
        return out

    accuracy = {}
    for attribute, values in ATTRIBUTES.items():
        losses = torch.stack([
            caption_loss(torch.tensor([all_scenes.index(s.model_copy(update={attribute: value})) for s in truth],
                                      device=device))
            for value in values], dim=1)  # (n, values)
        right = torch.tensor([values.index(getattr(s, attribute)) for s in truth], device=device)
        accuracy[attribute] = (losses.argmin(dim=1) == right).float().mean().item()
    return accuracy
