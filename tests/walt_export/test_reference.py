"""Which weights a command uses: --checkpoint, else a preset's committed trained weights, else seeded random ones."""

import pytest

import walt_export
from walt_export import cli, reference


@pytest.fixture
def committed(tmp_path, monkeypatch):
    """A weights directory holding a micro checkpoint, as if micro had committed reference weights."""
    walt_export.save(walt_export.build("micro", seed=5), tmp_path / "micro.safetensors")
    monkeypatch.setattr(reference, "WEIGHTS", tmp_path)
    return tmp_path / "micro.safetensors"


@pytest.mark.parametrize("argv, expected", [
    (["onnx", "--preset", "micro", "--out", "x"], "committed"),
    (["onnx", "--preset", "micro", "--out", "x", "--seed", "0"], None),
    (["onnx", "--preset", "micro", "--out", "x", "--checkpoint", "c.safetensors"], "c.safetensors"),
    (["onnx", "--preset", "walt-l", "--out", "x"], None),
    (["summary", "--preset", "micro"], "committed"),
])
def test_a_preset_uses_its_committed_weights_unless_asked_for_random_ones(committed, argv, expected):
    found = cli._checkpoint(cli._parser().parse_args(argv))
    assert found == (str(committed) if expected == "committed" else expected)


def test_presets_without_committed_weights_have_none():
    assert reference.reference_checkpoint("walt-l") is None and reference.reference_checkpoint("micro") is None
