"""The manifest schema: reading, version and hash checks, named dims; and a failed export leaves nothing."""

import json

import pytest

from runtime.manifest import ArtifactError, check_file, parse_dim, read_manifest, resolve_dim


def test_named_dims():
    assert parse_dim("batch") == (1, "batch", 0)
    assert parse_dim("4*latent_frames - 3") == (4, "latent_frames", -3)
    assert resolve_dim("4*latent_frames - 3", {"latent_frames": 5}) == 17
    assert resolve_dim("2*t+1", {"t": 3}) == 7 and resolve_dim(8, {}) == 8
    with pytest.raises(ArtifactError, match="cannot read the dim"):
        parse_dim("t**2")


def edited(tmp_path, directory, **changes):
    data = json.loads((directory / "manifest.json").read_text())
    data.update(changes)
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    return tmp_path


def test_other_format_version_or_format_is_refused(tmp_path, micro_artifacts):
    directory, _ = micro_artifacts
    with pytest.raises(ArtifactError, match="format version 2, this version of walt-export reads version 1; re-export"):
        read_manifest(edited(tmp_path, directory, format_version=2))
    with pytest.raises(ArtifactError, match="not a walt-export-artifact document"):
        read_manifest(edited(tmp_path, directory, format="something-else"))
    with pytest.raises(ArtifactError, match="does not match the manifest schema: stages"):
        read_manifest(edited(tmp_path, directory, stages=[]))
    with pytest.raises(ArtifactError, match="no manifest.json"):
        read_manifest(tmp_path / "nowhere")


def test_missing_or_modified_files_are_refused(tmp_path, micro_artifacts):
    directory, manifest = micro_artifacts
    base = manifest.stage("base").file("fp32", "fallback")
    (tmp_path / base.file).write_bytes((directory / base.file).read_bytes()[:-10])
    with pytest.raises(ArtifactError, match="base.fallback.onnx does not match the manifest"):
        check_file(tmp_path, base)
    with pytest.raises(ArtifactError, match="sr2.onnx is missing"):
        check_file(tmp_path, manifest.stage("sr2").file())
    with pytest.raises(ArtifactError, match="no fp16/plugin file for tokenizer.encoder"):
        manifest.stage("tokenizer_encoder").file("fp16", "plugin")


def test_a_failed_export_leaves_nothing_behind(tmp_path, micro, monkeypatch):
    import walt_export.onnx_export as onnx_export

    calls = []
    real = onnx_export.export_model

    def fail_on_the_second(*args, **kwargs):
        calls.append(args[2])
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(onnx_export, "export_model", fail_on_the_second)
    with pytest.raises(RuntimeError, match="disk full"):
        onnx_export.export_artifacts(micro.config, lambda name: getattr(micro, name), tmp_path / "art",
                                     {"preset": "micro", "seed": 0})
    assert list(tmp_path.iterdir()) == []  # neither the artifact nor its temporary directory
