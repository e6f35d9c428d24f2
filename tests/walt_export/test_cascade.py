import pytest
import torch

import walt_export


def test_public_api_of_a_text_cascade(micro):
    assert list(micro.denoisers()) == ["base", "sr1", "sr2"]
    assert micro.text_encoder is not None and not micro.training
    states, mask = micro.encode_text(["a cat", ""])
    assert states.shape == (2, 16, 32) and mask.tolist()[1][:2] == [1, 0]


def test_class_preset_has_no_text_encoder_and_no_sr():
    cascade = walt_export.build("walt-xl", device="meta")
    assert cascade.text_encoder is None and cascade.sr1 is None and cascade.sr2 is None
    assert cascade.base.class_embed.num_embeddings == 102
    with pytest.raises(ValueError, match="class-conditional and has no text encoder"):
        cascade.encode_text(["a cat"])


def test_weights_depend_only_on_the_seed():
    torch.manual_seed(7)
    before = torch.rand(1)
    torch.manual_seed(7)
    a, b, c = (walt_export.build("micro", seed=s) for s in (0, 0, 1))
    assert torch.equal(torch.rand(1), before)  # the global RNG is untouched
    for name, tensor in a.state_dict().items():
        assert torch.equal(tensor, b.state_dict()[name]), name
    assert not torch.equal(a.base.final_linear.weight, c.base.final_linear.weight)


def test_build_accepts_a_config_and_rejects_other_things():
    cfg = walt_export.PRESETS["micro"]
    assert walt_export.build(cfg).config == cfg
    with pytest.raises(TypeError, match="expected a preset name or a CascadeConfig, got int"):
        walt_export.build(3)


def test_summary_names_every_part(micro):
    text = micro.summary()
    for part in ("text_encoder", "tokenizer", "base", "sr1", "sr2", "total"):
        assert part in text
    assert "9 frames x 128x128 px @ 8 fps" in text
    assert f"{sum(p.numel() for p in micro.parameters()):,}" in text


# docs/model_spec.md §5: rough cost of one t2v forward at batch 1, TFLOP (2 per multiply-add), and the allowed deviation
SPEC_TFLOP = {"base": 15.0, "sr1": 5.6, "sr2": 1.8, "tokenizer_decoder": 170.0}
SPEC_TFLOP_TOLERANCE = 0.20


@pytest.mark.parametrize("stage", list(SPEC_TFLOP))
def test_t2v_compute_matches_the_spec_estimates(stage):
    """Counted on the meta device: window sizes, token grids and widths give the paper's cost."""
    from torch.utils.flop_counter import FlopCounterMode

    from walt_export.cascade import build_component
    from walt_export.export_specs import BATCH, export_specs

    cfg = walt_export.PRESETS["t2v"]
    spec = export_specs(cfg)[stage]
    module = spec.module_of(build_component(cfg, spec.component, device="meta"))
    inputs = [x.to("meta") for x in spec.sample_inputs(torch.Generator().manual_seed(0), **{BATCH: 1})]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        spec.call(module, *inputs)
    tflop = counter.get_total_flops() / 1e12
    deviation = tflop / SPEC_TFLOP[stage] - 1
    assert abs(deviation) <= SPEC_TFLOP_TOLERANCE, f"{stage}: {tflop:.2f} TFLOP, {deviation:+.0%} from ~{SPEC_TFLOP[stage]}"
