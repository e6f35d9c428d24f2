import pytest
import torch

import walt_export
from runtime.compare import Tolerance, assert_close
from walt_export.cascade import build_denoiser
from walt_export.config import PRESETS, DenoiserConfig
from walt_export.inputs import denoiser_inputs
from walt_export.models.denoiser import WindowSelfAttention, relative_position_index

TOL = Tolerance(atol=1e-5, rtol=1e-5)


def stage_inputs(stage, generator, batch=2, frames=None):
    return denoiser_inputs(stage.config, batch=batch, frames=frames, text_length=7, generator=generator)


def class_denoiser():
    cfg = PRESETS["micro"].base.model_copy(update=dict(conditioning="class", num_classes=10, text_dim=None,
                                                       cross_attention="none"))
    torch.manual_seed(0)
    return build_denoiser(DenoiserConfig(**cfg.model_dump())).eval()


@pytest.mark.parametrize("name", ["base", "sr1", "sr2"])
@pytest.mark.parametrize("frames", [None, 1])
@torch.no_grad()
def test_output_is_v_with_the_latent_shape(micro, generator, name, frames):
    stage = getattr(micro, name)
    args, kwargs = stage_inputs(stage, generator, frames=frames)
    v = stage(*args, **kwargs)
    assert v.shape == args[0].shape and torch.isfinite(v).all()
    assert v.std() > 1e-3


@pytest.mark.parametrize("name", ["base", "sr2"])
@torch.no_grad()
def test_samples_are_independent_of_their_batch(micro, generator, name):
    """What CFG relies on: running 2B in one call gives each sample's own output."""
    stage = getattr(micro, name)
    args, kwargs = stage_inputs(stage, generator)
    together = stage(*args, **kwargs)
    for i in range(2):
        alone = stage(*(a[i:i + 1] for a in args), **{k: v[i:i + 1] for k, v in kwargs.items()})
        assert_close(alone, together[i:i + 1], TOL, f"sample {i}")


@torch.no_grad()
def test_masked_text_tokens_are_ignored(micro, generator):
    stage = micro.sr1
    args, kwargs = stage_inputs(stage, generator)
    out = stage(*args, **kwargs)
    text = kwargs["text"].clone()
    assert kwargs["text_mask"][0].tolist() == [1, 1, 1, 0, 0, 0, 0]
    text[0, 3:] = 100.0  # padding of sample 0
    assert_close(stage(*args, **(kwargs | dict(text=text))), out, TOL, "output with changed padding")
    text[0, 0] = 100.0  # a real token
    assert (stage(*args, **(kwargs | dict(text=text)))[0] - out[0]).abs().max() > 1e-4


@pytest.mark.parametrize("index", [1, 2, 3, 4, 5, 6])
@torch.no_grad()
def test_every_conditioning_input_matters(micro, generator, index):
    """self-cond, frame-cond, frame mask, timestep, low-res latent and its noise level all reach the output."""
    stage = micro.sr1
    args, kwargs = stage_inputs(stage, generator)
    out = stage(*args, **kwargs)
    changed = list(args)
    changed[index] = args[index] + 1.0 if index != 4 else 1.0 - args[index]
    assert (stage(*changed, **kwargs) - out).abs().max() > 1e-5  # a disconnected input changes nothing (0.0)


@torch.no_grad()
def test_class_conditioning_with_a_null_class(generator):
    model = class_denoiser()
    assert model.class_embed.num_embeddings == 11  # 10 classes + the null class
    args, kwargs = stage_inputs(model, generator)
    out = model(*args, class_labels=torch.tensor([3, 3]))
    assert (model(*args, class_labels=torch.tensor([3, 10])) - out)[1].abs().max() > 1e-4
    with pytest.raises(ValueError, match="class-conditional: pass class_labels"):
        model(*args)


@torch.no_grad()
def test_images_pass_spatiotemporal_layers_with_identity_attention(generator):
    cfg = PRESETS["micro"].base
    layer = WindowSelfAttention(cfg, spatial=False)
    x = torch.randn(2, 1, 4, 4, cfg.hidden_size, generator=generator)
    v = layer.qkv(x)[..., 2 * cfg.hidden_size:]
    assert_close(layer(x), layer.proj(v), TOL, "image through a spatiotemporal layer")


def test_layers_alternate_and_text_attention_follows_the_config():
    t2v = walt_export.build("t2v", device="meta")
    base = t2v.base
    assert [b.attn.spatial for b in base.blocks[:4]] == [True, False, True, False]
    assert [b.cross_attn is not None for b in base.blocks[:4]] == [True, False, True, False]  # spatial only
    assert all(b.cross_attn is not None for b in t2v.sr1.blocks)
    assert base.blocks[0].adaln_lora is None  # layer 1 uses A_1
    lora = base.blocks[1].adaln_lora
    assert (lora[0].weight.shape, lora[1].weight.shape) == ((2, 2048), (6 * 2048, 2))  # rank r = 2
    assert (base.patch_embed.in_channels, t2v.sr1.patch_embed.in_channels) == (3 * 8 + 1, 4 * 8 + 1)
    assert base.blocks[1].attn.window == (5, 8, 14) and base.blocks[0].attn.window == (1, 16, 28)


def test_relative_position_index_is_a_bijection_of_offsets():
    window = (2, 3, 4)
    index = relative_position_index(window)
    assert index.shape == (24, 24)
    coords = torch.stack(torch.meshgrid(*(torch.arange(n) for n in window), indexing="ij")).flatten(1)  # (3, L)
    offsets = (coords[:, :, None] - coords[:, None, :]).reshape(3, -1).T.tolist()  # (L*L, 3)
    table_row = {}
    for offset, row in zip(offsets, index.flatten().tolist(), strict=True):
        assert table_row.setdefault(tuple(offset), row) == row, f"offset {offset} maps to two rows"
    assert sorted(table_row.values()) == list(range(3 * 5 * 7))  # every offset its own row, the table exactly


@pytest.mark.parametrize("change, message", [
    (lambda a, k: ([a[0][:, :, :2]] + a[1:], k), r"latent must be \(B, 8, 3, 4, 4\) or \(B, 8, 1, 4, 4\)"),
    (lambda a, k: (a[:4] + [a[4][:, :1]], k), r"frame_mask must be \(B, T\) = \(2, 3\)"),
    (lambda a, k: (a, {}), "text-conditioned: pass text"),
])
def test_bad_inputs_are_explained(micro, generator, change, message):
    args, kwargs = stage_inputs(micro.base, generator)
    args, kwargs = change(args, kwargs)
    with pytest.raises(ValueError, match=message):
        micro.base(*args, **kwargs)


def test_bad_lowres_is_explained(micro, generator):
    args, kwargs = stage_inputs(micro.sr1, generator)
    args[5] = args[5][..., :2]
    with pytest.raises(ValueError, match="lowres must be"):
        micro.sr1(*args, **kwargs)
