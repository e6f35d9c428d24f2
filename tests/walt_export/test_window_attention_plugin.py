"""The wattn TensorRT plugin: needs full TensorRT >= 10.9 (tensorrt.plugin) and a GPU, so it is skipped here."""

import shutil

import pytest

trt = pytest.importorskip("tensorrt", reason="full TensorRT is not installable on CPU machines (NVIDIA's index only)")
pytest.importorskip("tensorrt.plugin", reason="TensorRT < 10.9 has no Python plugins (QDP)")
if shutil.which("nvidia-smi") is None:
    pytest.skip("the plugin's kernel needs a GPU", allow_module_level=True)


def test_plugin_engines_build_for_the_plugin_variant(micro_artifacts, tmp_path):
    from walt_export.engine_build import build_engines
    from walt_export.window_attention.plugin import register_plugin

    directory, _ = micro_artifacts
    copy = tmp_path / "micro"
    shutil.copytree(directory, copy)
    register_plugin()
    register_plugin()  # idempotent
    _, decisions = build_engines(copy, "fp16", attention="plugin", trt=trt)
    assert [d.built for d in decisions] == [True] * 7
