import json

import pytest

import walt_export
from walt_export import PRESETS, CascadeConfig, ConfigError, DenoiserConfig, SuperResConfig, TokenizerConfig

# (preset, part) -> (the paper's parameter count [P Table 8], allowed relative deviation)
PAPER_PARAMETERS = {
    ("walt-l", "base"): (313e6, 0.03),
    ("walt-l-text", "base"): (419e6, 0.03),
    ("walt-xl", "base"): (460e6, 0.03),
    ("t2v", "base"): (3e9, 0.10),
    ("t2v", "sr1"): (1.3e9, 0.03),
    ("t2v", "sr2"): (419e6, 0.03),
}


@pytest.mark.parametrize("preset, part", list(PAPER_PARAMETERS))
def test_paper_parameter_counts_on_meta_device(preset, part):
    cascade = walt_export.build(preset, device="meta")
    count = cascade.parameter_counts()[part]
    paper, tolerance = PAPER_PARAMETERS[(preset, part)]
    deviation = count / paper - 1
    assert abs(deviation) <= tolerance, f"{preset}.{part}: {count:,} parameters, {deviation:+.1%} from the paper's {paper:,.0f}"
    assert all(p.is_meta for p in cascade.parameters())


def test_t5_xl_encoder_size():
    # T5 v1.1 XL's encoder has about 1.22B parameters
    count = walt_export.build("t2v", device="meta").parameter_counts()["text_encoder"]
    assert 1.2e9 < count < 1.25e9, count


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_are_consistent_and_json_round_trip(name):
    cfg = PRESETS[name]
    assert cfg.name == name
    assert CascadeConfig.model_validate_json(cfg.model_dump_json()) == cfg
    assert PRESETS[name] is not PRESETS[name]  # a fresh config per lookup


def test_paper_geometry_of_t2v_and_tiny():
    for name in ("t2v", "tiny"):
        cfg = PRESETS[name]
        assert (cfg.frames, cfg.height, cfg.width, cfg.fps) == (17, 512, 896, 8.0)
        assert cfg.tokenizer.latent_shape(17, 512, 896) == (8, 5, 64, 112)
        assert [s.latent_size for s in cfg.denoisers().values()] == [(5, 16, 28), (5, 32, 56), (5, 64, 112)]
        assert {s.token_grid for s in cfg.denoisers().values()} == {(5, 16, 28)}
        assert cfg.base.window == (5, 8, 14)


def test_unknown_preset_lists_valid_names():
    with pytest.raises(KeyError) as info:
        walt_export.build("walt-xxl")
    message = str(info.value)
    assert "walt-xxl" in message and all(name in message for name in PRESETS)


def test_unknown_field_is_rejected():
    with pytest.raises(ValueError, match="extra_field"):
        TokenizerConfig(extra_field=1)


def _base(**overrides):
    fields = dict(latent_size=(5, 16, 28), hidden_size=64, depth=2, num_heads=4, window=(5, 8, 14))
    return fields | overrides


@pytest.mark.parametrize("overrides, message", [
    (dict(window=(5, 8, 8)), "window (5, 8, 8) does not divide the token grid (5, 16, 28) along W"),
    (dict(window=(2, 8, 14)), "does not divide the token grid (5, 16, 28) along T"),
    (dict(patch_size=3), "patch_size=3 does not divide the latent 16x28"),
    (dict(hidden_size=66), "hidden_size=66 is not divisible by num_heads=4"),
    (dict(conditioning="class"), "conditioning='class' needs num_classes"),
    (dict(conditioning="text", text_dim=32), "needs cross_attention"),
    (dict(cross_attention="every"), "cross_attention/text_dim are set but conditioning is 'none'"),
    (dict(num_heads=0), "num_heads: Input should be greater than 0"),
])
def test_denoiser_config_errors_say_what_is_wrong(overrides, message):
    with pytest.raises(ConfigError) as info:
        DenoiserConfig(**_base(**overrides))
    assert message in str(info.value)


def test_super_resolution_factor_must_divide_latent():
    with pytest.raises(ConfigError, match="upsample_factor=3 does not divide"):
        SuperResConfig(**_base(upsample_factor=3))


@pytest.mark.parametrize("update, message", [
    (dict(frames=16), "frames=16 is not 1 + 4k"),
    (dict(height=500), "height=500 is not a positive multiple of 8"),
    (dict(sr1=None), "sr2 is set without sr1"),
    (dict(text_encoder=None), "base is text-conditioned but the cascade has no text_encoder"),
])
def test_cascade_config_errors(update, message):
    data = PRESETS["tiny"].model_dump() | update
    with pytest.raises(ConfigError) as info:
        CascadeConfig(**data)
    assert message in str(info.value)


def test_sr_chain_and_channels_are_checked():
    data = PRESETS["tiny"].model_dump()
    data["sr1"]["latent_size"] = (5, 48, 84)  # x3, but the factor is 2
    data["sr2"]["latent_channels"] = 4
    with pytest.raises(ConfigError) as info:
        CascadeConfig(**data)
    message = str(info.value)
    assert "sr1.latent_size=(5, 48, 84) is not base's (5, 16, 28) upsampled x2 (expected (5, 32, 56))" in message
    assert "sr2.latent_channels=4 but the tokenizer has 8" in message  # all problems in one message


def test_last_stage_must_match_the_video_geometry():
    data = PRESETS["tiny"].model_dump() | dict(width=512)
    with pytest.raises(ConfigError, match=r"sr2.latent_size=\(5, 64, 112\) but 17x512x512 video encodes to a 5x64x64"):
        CascadeConfig(**data)


def test_text_dim_must_match_text_encoder():
    data = PRESETS["tiny"].model_dump()
    data["text_encoder"]["d_model"] = 48
    with pytest.raises(ConfigError, match="base.text_dim=64 but text_encoder.d_model=48"):
        CascadeConfig(**data)


def test_tokenizer_config_checks():
    with pytest.raises(ConfigError) as info:
        TokenizerConfig(norm_groups=24, latent_mean=(0.0,) * 4, temporal_downsample=(True,))
    message = str(info.value)
    assert "temporal_downsample has 1 entries" in message
    assert "not divisible by norm_groups=24" in message
    assert "latent_mean has 4 entries, latent_channels is 8" in message


def test_text_encoder_config_checks():
    with pytest.raises(ConfigError) as info:
        walt_export.TextEncoderConfig(vocab_size=100, max_length=1, relative_attention_num_buckets=6,
                                      relative_attention_max_distance=1)
    message = str(info.value)
    assert "vocab_size=100 is below the byte tokenizer's 259" in message
    assert "max_length must be >= 2" in message
    assert "relative_attention_max_distance must exceed" in message


def test_configs_are_frozen_and_serialisable():
    cfg = PRESETS["micro"]
    with pytest.raises(ValueError):
        cfg.frames = 5
    assert json.loads(cfg.model_dump_json())["base"]["window"] == [3, 2, 2]
