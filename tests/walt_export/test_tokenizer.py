import pytest
import torch

import walt_export
from runtime.compare import Tolerance, assert_close
from walt_export.config import ConfigError, TokenizerConfig
from walt_export.models.tokenizer import Tokenizer

# float64 shows the maths is exact (chunked and whole-clip paths differ only in rounding); float32 is the real case
TOLERANCES = {torch.float64: Tolerance(atol=1e-10, rtol=1e-10), torch.float32: Tolerance(atol=2e-5, rtol=1e-5)}


def make_tokenizer(dtype=torch.float32, **overrides) -> Tokenizer:
    cfg = walt_export.PRESETS["micro"].tokenizer.model_copy(update=overrides)
    torch.manual_seed(0)
    return Tokenizer(cfg).to(dtype).eval()


def random_video(generator, frames=17, height=32, width=48, batch=2, dtype=torch.float32):
    return (torch.rand(batch, 3, frames, height, width, generator=generator, dtype=torch.float64) * 2 - 1).to(dtype)


@torch.no_grad()
def test_17_frames_give_5_latent_frames_and_back(generator):
    tok = make_tokenizer()
    video = random_video(generator)
    latent = tok.encode(video)
    assert latent.shape == (2, 8, 5, 4, 6)
    assert tok.decode(latent).shape == video.shape


@pytest.mark.parametrize("dtype", list(TOLERANCES))
@torch.no_grad()
def test_latent_frames_depend_only_on_their_past(generator, dtype):
    """Latent frame t covers input frames up to 4t: changing later frames leaves it unchanged."""
    tok = make_tokenizer(dtype)
    video = random_video(generator, dtype=dtype)
    latent = tok.encode(video)
    for t in range(5):
        changed = video.clone()
        changed[:, :, 4 * t + 1:] = random_video(generator, frames=16 - 4 * t, dtype=dtype)
        other = tok.encode(changed)
        assert_close(other[:, :, : t + 1], latent[:, :, : t + 1], TOLERANCES[dtype], f"latent frames 0..{t}")
        if t < 4:  # and the frames after do change: the test can fail
            assert (other[:, :, t + 1:] - latent[:, :, t + 1:]).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", list(TOLERANCES))
@torch.no_grad()
def test_image_encodes_like_the_first_frame_of_a_video(generator, dtype):
    tok = make_tokenizer(dtype)
    video = random_video(generator, dtype=dtype)
    image_latent = tok.encode(video[:, :, :1])
    assert image_latent.shape == (2, 8, 1, 4, 6)
    assert_close(image_latent, tok.encode(video)[:, :, :1], TOLERANCES[dtype], "image latent")
    assert tok.decode(image_latent).shape == (2, 3, 1, 32, 48)


@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize("chunks", [(1, 1, 1, 1, 1), (1, 4), (2, 3), (3, 2), (5,)])
@torch.no_grad()
def test_chunked_causal_decoding_equals_whole_clip(generator, dtype, chunks):
    tok = make_tokenizer(dtype)
    latent = torch.randn(2, 8, 5, 4, 6, generator=generator, dtype=torch.float64).to(dtype)
    whole = tok.decode(latent)
    pieces, state, start = [], None, 0
    for n in chunks:
        frames, state = tok.decoder(latent[:, :, start:start + n], state)
        expected_frames = 1 + 4 * (n - 1) if start == 0 else 4 * n
        assert frames.shape[2] == expected_frames
        pieces.append(frames)
        start += n
    assert_close(torch.cat(pieces, dim=2), whole, TOLERANCES[dtype], f"chunks {chunks}")


@torch.no_grad()
def test_decoder_state_is_explicit_tensors(generator):
    tok = make_tokenizer()
    latent = torch.randn(1, 8, 3, 4, 4, generator=generator)
    _, state = tok.decoder(latent[:, :, :1])
    assert all(isinstance(s, torch.Tensor) and s.shape[2] == 2 for s in state)  # kt - 1 = 2 cached frames each
    with pytest.raises(ValueError, match="fewer caches"):
        tok.decoder(latent[:, :, 1:], state[:-1])
    with pytest.raises(ValueError, match="more caches"):
        tok.decoder(latent[:, :, 1:], (*state, state[0]))


@torch.no_grad()
def test_latent_normalisation_uses_the_config_statistics(generator):
    mean, std = tuple(float(i) for i in range(8)), tuple(0.5 + i for i in range(8))
    plain = make_tokenizer()
    normalised = make_tokenizer(latent_mean=mean, latent_std=std)
    normalised.load_state_dict(plain.state_dict())
    video = random_video(generator)
    raw = plain.encode(video)
    expected = (raw - torch.tensor(mean).view(1, -1, 1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1, 1)
    assert_close(normalised.encode(video), expected, TOLERANCES[torch.float32], "normalised latent")
    assert_close(normalised.decode(expected), plain.decode(raw), TOLERANCES[torch.float32], "decoded video")


def test_zero_causal_padding_is_also_causal(generator):
    tok = make_tokenizer(causal_pad="zeros")
    with torch.no_grad():
        video = random_video(generator, frames=5)
        changed = video.clone()
        changed[:, :, 1:] = 0
        assert_close(tok.encode(changed)[:, :, 0], tok.encode(video)[:, :, 0], TOLERANCES[torch.float32], "latent 0")


@pytest.mark.parametrize("shape, message", [
    ((1, 3, 16, 32, 32), "frames=16 is not 1 \\+ 4k"),
    ((1, 3, 17, 30, 32), "height=30 is not a positive multiple of 8"),
    ((1, 4, 17, 32, 32), r"video must be \(B, 3, T, H, W\)"),
    ((3, 17, 32, 32), r"video must be \(B, 3, T, H, W\)"),
])
def test_bad_video_shapes_are_explained(shape, message):
    with pytest.raises((ValueError, ConfigError), match=message):
        make_tokenizer().encode(torch.zeros(shape))


def test_paper_tokenizer_geometry():
    cfg = TokenizerConfig()
    assert cfg.channels == (128, 256, 256, 512)
    assert cfg.latent_shape(17, 128, 128) == (8, 5, 16, 16)  # 17x128^2 -> 5x16^2 [spec §2]
    assert cfg.latent_shape(1, 512, 896) == (8, 1, 64, 112)


@pytest.mark.parametrize("affine", [True, False])
def test_frame_group_norm_trains_through_the_fused_kernel_with_the_same_values(generator, affine):
    """Training (module in train mode, gradients on) takes torch's fused group_norm; it must equal the per-frame
    statistics that inference and the export use, values and gradients."""
    from walt_export.models.tokenizer import FrameGroupNorm

    norm = FrameGroupNorm(2, 6, 1e-6, affine=affine)
    if affine:
        with torch.no_grad():
            norm.weight.normal_(generator=generator), norm.bias.normal_(generator=generator)
    x = torch.randn(2, 6, 3, 5, 7, generator=generator, dtype=torch.float64).requires_grad_()
    norm.double()
    results = []
    for training in (True, False):
        norm.train(training)
        out = norm(x)
        (grad,) = torch.autograd.grad(out.square().sum(), x)
        results.append((out.detach(), grad))
    assert_close(results[0][0], results[1][0], Tolerance(1e-10, 1e-10), "train vs eval output")
    assert_close(results[0][1], results[1][1], Tolerance(1e-9, 1e-9), "train vs eval gradient")
