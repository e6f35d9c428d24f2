"""The FLOP model (walt_export/flops.py) against torch's FLOP counter, on the meta device, exactly."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from walt_export.cascade import build_component
from walt_export.config import PRESETS
from walt_export.export_specs import BATCH, LATENT_FRAMES, export_specs
from walt_export.flops import PEAKS, attention_shapes, cascade_flops, generate_batch, stage_flops


def counted(cfg, name: str, **dims: int) -> int:
    """torch's count of one call of stage `name` at `dims`; on meta, attention decomposes into counted matmuls."""
    spec = export_specs(cfg)[name]
    module = spec.module_of(build_component(cfg, spec.component, 0, "meta"))
    inputs = [x.to("meta") for x in spec.sample_inputs(torch.Generator().manual_seed(0), **dims)]
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        spec.call(module, *inputs)
    return counter.get_total_flops()


@pytest.mark.parametrize("preset", ["micro", "tiny", "t2v", "walt-l"])
def test_every_stage_matches_torch_counter(preset):
    cfg = PRESETS[preset]
    model = stage_flops(cfg)
    assert list(model) == list(export_specs(cfg))
    for name, flops in model.items():
        assert flops == counted(cfg, name, **{BATCH: generate_batch(cfg, name)}), name


def test_batch_and_latent_frames_are_counted():
    cfg = PRESETS["micro"]
    model = stage_flops(cfg, batch={"base": 3, "tokenizer_decoder_step": 2}, latent_frames=2)
    assert model["base"] == counted(cfg, "base", **{BATCH: 3})
    for name, batch in (("tokenizer_decoder_step", 2), ("tokenizer_decoder", 1), ("tokenizer_encoder", 1)):
        assert model[name] == counted(cfg, name, **{BATCH: batch, LATENT_FRAMES: 2}), name


def test_paper_cascade_cost():
    cost = cascade_flops(PRESETS["t2v"], steps=50)
    per_call = stage_flops(PRESETS["t2v"])
    by_stage = {s.stage: s for s in cost.stages}
    assert list(by_stage) == ["text_encoder", "base", "sr1", "sr2", "tokenizer_decoder"]
    assert by_stage["base"].calls == 50 and by_stage["base"].flops == 50 * per_call["base"]
    assert cost.flops == sum(s.flops for s in cost.stages)
    # docs/model_spec.md §5: ~15 TFLOP per base forward at batch 1, the guided pair twice that
    assert 25e12 < by_stage["base"].flops_per_call < 35e12
    assert cost.seconds_at(PEAKS["H100/H200 SXM dense FP16/BF16"]) == pytest.approx(cost.flops / 989e12)
    unguided = cascade_flops(PRESETS["t2v"], steps=50, guidance=False)
    assert unguided.flops < cost.flops and {s.batch for s in unguided.stages} == {1}


def test_attention_shapes_of_the_t2v_base():
    """docs/model_spec.md §3: spatial windows are whole 16x28 frames, spatiotemporal ones 5x8x14; text
    cross-attention adds the prompt's tokens to the keys."""
    cfg = PRESETS["t2v"]
    shapes = attention_shapes(cfg.base, batch=2, text_length=cfg.text_encoder.max_length)
    self_attention = [s for s in shapes if s.kind != "cross"]
    assert [s.layer for s in self_attention] == list(range(cfg.base.depth))
    spatial = next(s for s in shapes if s.kind == "spatial")
    assert (spatial.windows, spatial.query_length, spatial.key_length) == (2 * 5, 16 * 28, 16 * 28)
    temporal = next(s for s in shapes if s.kind == "spatiotemporal")
    assert (temporal.windows, temporal.query_length) == (2 * (5 // 5) * (16 // 8) * (28 // 14), 5 * 8 * 14)
    for cross in (s for s in shapes if s.kind == "cross"):
        assert cross.key_length == cross.query_length + cfg.text_encoder.max_length
        assert cross.flops == 4 * cross.windows * cross.heads * cross.query_length * cross.key_length * cross.head_dim
