"""The manifest schema: reading, version and hash checks, named dims; and a failed export leaves nothing."""

import json
import re

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


def test_a_manifest_of_the_previous_version_is_refused_with_the_re_export_command(tmp_path, micro_artifacts):
    directory, _ = micro_artifacts
    previous = edited(tmp_path, directory, format_version=1, source={"preset": "micro", "seed": 0})
    with pytest.raises(ArtifactError, match=re.escape(
            f"format version 1, this version of walt-export reads version 2; re-export it with this version of "
            f"walt-export: `walt-export onnx --preset micro --seed 0 --out {tmp_path} --fp16`")):
        read_manifest(previous)
    from_checkpoint = edited(tmp_path, directory, format_version=1, source={"checkpoint": "/c/m.safetensors",
                                                                           "sha256": "ab"})
    with pytest.raises(ArtifactError, match=re.escape(f"`walt-export onnx --checkpoint /c/m.safetensors --out "
                                                      f"{tmp_path} --fp16`")):
        read_manifest(from_checkpoint)


def test_other_format_version_or_format_is_refused(tmp_path, micro_artifacts):
    directory, _ = micro_artifacts
    with pytest.raises(ArtifactError, match="format version 3, this version of walt-export reads version 2; re-export"):
        read_manifest(edited(tmp_path, directory, format_version=3))
    with pytest.raises(ArtifactError, match="not a walt-export-artifact document"):
        read_manifest(edited(tmp_path, directory, format="something-else"))
    with pytest.raises(ArtifactError, match="does not match the walt-export-artifact schema: stages"):
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


def test_the_re_export_command_may_replace_an_artifact_of_the_previous_version(tmp_path, micro_artifacts, caplog):
    """The command the refusal names writes into the same directory: the exporter accepts an old artifact of the
    same weights there, and refuses one of other weights."""
    from runtime.manifest import SourceInfo
    from walt_export.onnx_export import _staging

    directory, _ = micro_artifacts
    old = tmp_path / "old"
    old.mkdir()
    edited(old, directory, format_version=1, source={"preset": "micro", "seed": 0})
    (old / "engines").mkdir()
    (old / "verify.json").write_text("{}")
    with _staging(old, "micro", SourceInfo(preset="micro", seed=0)) as staged:
        (staged / "manifest.json").write_text("{}")
    assert (old / "manifest.json").read_text() == "{}" and not [p for p in tmp_path.iterdir() if p.name[0] == "."]
    assert "replaces it as a whole: engines, verify.json will be gone" in caplog.text  # said, not silent
    (tmp_path / "other").mkdir()
    other = edited(tmp_path / "other", directory, format_version=1, source={"preset": "micro", "seed": 0})
    with pytest.raises(ArtifactError, match=r"already holds another artifact \(micro, preset=micro, seed=0\)"):
        with _staging(other, "micro", SourceInfo(preset="micro", seed=1)):
            pass
