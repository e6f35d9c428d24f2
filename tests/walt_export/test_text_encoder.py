import pytest
import torch

import walt_export
from runtime.compare import Tolerance, assert_close
from tests.t5_fixtures import write_t5_directory
from walt_export.models.text_encoder import load_pretrained_t5, read_pretrained_t5_config
from walt_export.state_dict import CheckpointError
from walt_export.models.text_encoder import T5Encoder, relative_position_bucket

TOL = Tolerance(atol=1e-5, rtol=1e-5)
PROMPTS = ["a cat running in the park", "video of a dog", ""]


def cascade_with_t5(directory, max_length=16):
    cfg = walt_export.PRESETS["micro"]
    text_encoder = read_pretrained_t5_config(directory, max_length=max_length)
    return walt_export.build(cfg.model_copy(update=dict(text_encoder=text_encoder)))


@pytest.mark.parametrize("feed_forward", ["gated-gelu", "relu"])
@torch.no_grad()
def test_pretrained_t5_matches_hugging_face(tmp_path, feed_forward):
    reference = write_t5_directory(tmp_path, feed_forward)
    cascade = cascade_with_t5(tmp_path)
    states, mask = cascade.encode_text(PROMPTS)
    expected = reference(input_ids=torch.from_numpy(cascade.text_tokenizer(PROMPTS)[0]),
                         attention_mask=mask).last_hidden_state
    assert states.shape == (3, 16, 32)
    assert_close(states, expected, TOL, f"T5 states ({feed_forward})")
    assert mask.sum(1).tolist() == [7, 5, 1]  # words + </s>; the empty prompt is just </s>


@torch.no_grad()
def test_padding_does_not_change_the_valid_states(tmp_path):
    write_t5_directory(tmp_path)
    short, long = cascade_with_t5(tmp_path, 8), cascade_with_t5(tmp_path, 16)
    a, mask = short.encode_text(PROMPTS[:1])
    b, _ = long.encode_text(PROMPTS[:1])
    valid = int(mask.sum())
    assert_close(a[:, :valid], b[:, :valid], TOL, "valid states")


def test_t5_config_mismatch_is_listed(tmp_path):
    write_t5_directory(tmp_path)
    encoder = T5Encoder(walt_export.PRESETS["micro"].text_encoder)
    with pytest.raises(CheckpointError) as info:
        load_pretrained_t5(encoder, tmp_path)
    message = str(info.value)
    assert "does not match the text encoder config" in message
    assert "vocab_size: 64 != 300" in message and "d_ff: 48 != 64" in message


def test_t5_directory_problems_are_explained(tmp_path):
    with pytest.raises(CheckpointError, match="config.json is missing"):
        read_pretrained_t5_config(tmp_path)
    write_t5_directory(tmp_path)
    encoder = T5Encoder(read_pretrained_t5_config(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_pretrained_t5(encoder, tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no T5 weights"):
        load_pretrained_t5(encoder, tmp_path)


def test_incomplete_t5_weights_are_listed(tmp_path):
    from safetensors.torch import load_file, save_file

    write_t5_directory(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["encoder.block.1.layer.1.DenseReluDense.wo.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing \(1\): layers.1.ff.wo.weight"):
        load_pretrained_t5(T5Encoder(read_pretrained_t5_config(tmp_path)), tmp_path)


@pytest.mark.parametrize("buckets, max_distance", [(32, 128), (8, 20)])
def test_relative_position_buckets_match_hugging_face(buckets, max_distance):
    from transformers.models.t5.modeling_t5 import T5Attention

    offsets = torch.arange(-300, 301)
    expected = T5Attention._relative_position_bucket(offsets, True, buckets, max_distance)
    assert torch.equal(relative_position_bucket(offsets, buckets, max_distance), expected)
