import json

import pytest
import torch

import walt_export
from walt_export import CheckpointError
from walt_export.checkpoint import config_path, load_weights


def files_in(directory):
    return sorted(p.name for p in directory.iterdir())


@torch.no_grad()
def test_cascade_round_trip_is_exact(micro, tmp_path, generator):
    path = walt_export.save(micro, tmp_path / "micro.safetensors")
    assert files_in(tmp_path) == ["micro.json", "micro.safetensors"]
    loaded = walt_export.load(path)
    assert isinstance(loaded, walt_export.Cascade) and loaded.config == micro.config
    original, restored = micro.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    for name in original:
        assert torch.equal(original[name], restored[name]), name
    video = torch.rand(1, 3, 9, 32, 32, generator=generator) * 2 - 1
    assert torch.equal(loaded.tokenizer.encode(video), micro.tokenizer.encode(video))


@pytest.mark.parametrize("part", ["tokenizer", "text_encoder", "base", "sr1"])
def test_one_stage_round_trip(micro, tmp_path, part):
    module = getattr(micro, part)
    path = walt_export.save(module, tmp_path / f"{part}.safetensors")
    loaded = walt_export.load(path)
    assert type(loaded) is type(module) and loaded.config == module.config
    for name, tensor in module.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_config_json_holds_the_latent_statistics(tmp_path):
    cfg = walt_export.PRESETS["micro"]
    cfg = cfg.model_copy(update=dict(tokenizer=cfg.tokenizer.model_copy(update=dict(latent_mean=(0.5,) * 8,
                                                                                    latent_std=(2.0,) * 8))))
    path = walt_export.save(walt_export.build(cfg).tokenizer, tmp_path / "tok.safetensors")
    document = json.loads(config_path(path).read_text())
    assert document["kind"] == "tokenizer" and document["config"]["latent_std"] == [2.0] * 8
    assert walt_export.load(path).config.std == (2.0,) * 8


def test_mismatched_weights_are_listed_in_one_error(micro, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = walt_export.save(micro.base, tmp_path / "base.safetensors")
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()  # keeps the pairing with base.json, so only the tensors are wrong
    state = {k: v.clone() for k, v in micro.base.state_dict().items()}
    del state["final_linear.bias"]
    state["extra.weight"] = torch.zeros(1)
    state["patch_embed.weight"] = torch.zeros(3, 3)
    save_file(state, str(path), metadata=metadata)
    with pytest.raises(CheckpointError) as info:
        walt_export.load(path)
    message = str(info.value)
    assert "missing (1): final_linear.bias" in message
    assert "unexpected (1): extra.weight" in message
    assert "mis-shaped (1): patch_embed.weight: checkpoint (3, 3), model (32, 25, 1, 1, 1)" in message


def test_checkpoint_of_another_preset_is_refused_with_the_differences(tmp_path):
    walt_export.save(walt_export.build("micro").tokenizer, tmp_path / "micro_tok.safetensors")
    tiny = walt_export.build("tiny", device="meta")
    with pytest.raises(CheckpointError) as info:
        load_weights(tiny.tokenizer, tmp_path / "micro_tok.safetensors")
    message = str(info.value)
    assert "saved for a different config" in message and "base_channels: 4 != 8" in message


def test_wrong_kind_is_refused(micro, tmp_path):
    path = walt_export.save(micro.tokenizer, tmp_path / "tok.safetensors")
    with pytest.raises(CheckpointError, match="holds a tokenizer, not a denoiser"):
        load_weights(micro.base, path)


def test_truncated_checkpoint(micro, tmp_path):
    path = walt_export.save(micro.base, tmp_path / "base.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        walt_export.load(path)


def test_missing_files(micro, tmp_path):
    with pytest.raises(CheckpointError, match="config .*nothing.json not found"):
        walt_export.load(tmp_path / "nothing.safetensors")
    path = walt_export.save(micro.base, tmp_path / "base.safetensors")
    path.unlink()
    with pytest.raises(CheckpointError, match="checkpoint .*base.safetensors not found"):
        walt_export.load(path)


def test_weights_and_config_that_do_not_belong_together(micro, tmp_path):
    a = walt_export.save(micro.sr1, tmp_path / "a.safetensors")
    b = walt_export.save(micro.sr2, tmp_path / "b.safetensors")
    config_path(b).replace(config_path(a))
    with pytest.raises(CheckpointError, match="do not belong together"):
        walt_export.load(a)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(format_version=99), "has format version 99"),
    (lambda d: d.update(kind="vae"), "unknown kind 'vae'; valid kinds: cascade, tokenizer"),
    (lambda d: d["config"].update(depth=0), "config in .* is invalid:\n  - depth: Input should be greater than 0"),
    (lambda d: d["config"].update(colour="red"), "colour: Extra inputs are not permitted"),
])
def test_bad_config_json(micro, tmp_path, edit, message):
    path = walt_export.save(micro.base, tmp_path / "base.safetensors")
    document = json.loads(config_path(path).read_text())
    edit(document)
    config_path(path).write_text(json.dumps(document))
    with pytest.raises(CheckpointError, match=message):
        walt_export.load(path)


def test_failed_save_leaves_nothing_behind(micro, tmp_path):
    (tmp_path / "base.json").mkdir()  # the config cannot be renamed onto a directory
    with pytest.raises(CheckpointError, match="cannot write checkpoint"):
        walt_export.save(micro.base, tmp_path / "base.safetensors")
    assert files_in(tmp_path) == ["base.json"]


def test_save_refuses_bad_paths_and_meta_models(micro, tmp_path):
    with pytest.raises(CheckpointError, match="must end in .safetensors"):
        walt_export.save(micro.base, tmp_path / "base.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        walt_export.save(micro.base, tmp_path / "no" / "base.safetensors")
    with pytest.raises(CheckpointError, match="meta device"):
        walt_export.save(walt_export.build("micro", device="meta"), tmp_path / "m.safetensors")
