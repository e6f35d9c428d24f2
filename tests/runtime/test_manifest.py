"""The manifest schema: reading, version and hash checks, named dims; and a failed export leaves nothing."""

import hashlib
import json
import re
import shutil

import pytest

from runtime.engine_registry import BUILD_JSON, ENGINES, Target, check_plan, find_plan
from runtime.files import artifact_lock_file
from runtime.manifest import (
    ArtifactError,
    DataFile,
    check_file,
    parse_dim,
    read_manifest,
    resolve_dim,
    sha256_of,
)
from walt_export.config import CascadeConfig


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
    # neither the artifact nor its temporary directory; only the (empty, released) lock file of the artifact
    assert [p for p in tmp_path.iterdir() if p != artifact_lock_file(tmp_path / "art")] == []


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
    assert (old / "manifest.json").read_text() == "{}"
    assert not [p for p in tmp_path.iterdir() if p.name[0] == "." and p != artifact_lock_file(old)]  # nothing staged
    assert "replaces it as a whole: engines, verify.json will be gone" in caplog.text  # said, not silent
    (tmp_path / "other").mkdir()
    other = edited(tmp_path / "other", directory, format_version=1, source={"preset": "micro", "seed": 0})
    with pytest.raises(ArtifactError, match=r"already holds another artifact \(micro, preset=micro, seed=0\)"):
        with _staging(other, "micro", SourceInfo(preset="micro", seed=1)):
            pass


# ------------------------------------------------------------------------------- paths inside the artifact
def tampered(tmp_path, directory, edit):
    """A copy of the artifact in `directory` whose manifest document `edit` has changed."""
    copy = tmp_path / "copy"
    shutil.copytree(directory, copy)
    data = json.loads((copy / "manifest.json").read_text())
    edit(data)
    (copy / "manifest.json").write_text(json.dumps(data))
    return copy


@pytest.mark.parametrize("path", ["/etc/passwd", "../micro/base.plugin.onnx", "int8/../base.onnx", "a//b.onnx",
                                  "int8\\base.onnx"])
def test_a_manifest_path_outside_the_directory_is_refused(tmp_path, micro_artifacts, path):
    directory, _ = micro_artifacts

    def edit(data):
        data["stages"]["base"]["files"][0]["file"] = path

    with pytest.raises(ArtifactError, match=re.escape(
            "stages.base.files.0.file: must be a relative path inside the artifact directory")) as refused:
        read_manifest(tampered(tmp_path, directory, edit))
    assert repr(path) in str(refused.value)


def test_a_tokenizer_dir_outside_the_directory_is_refused(tmp_path, micro_artifacts):
    directory, _ = micro_artifacts

    def edit(data):
        data["text"].update(tokenizer_dir="../tokenizer",
                            tokenizer_files=[{"file": "../tokenizer/tokenizer.json", "sha256": "0" * 64}])

    with pytest.raises(ArtifactError, match=r"text\.tokenizer_dir: must be a relative path inside the artifact"):
        read_manifest(tampered(tmp_path, directory, edit))

    def unhashed(data):
        data["text"]["tokenizer_dir"] = "tokenizer"

    with pytest.raises(ArtifactError, match="tokenizer_dir 'tokenizer' needs tokenizer_files"):
        read_manifest(tampered(tmp_path / "unhashed", directory, unhashed))


def test_a_symlink_out_of_the_directory_is_refused_even_with_the_right_sha256(tmp_path, micro_artifacts):
    directory, manifest = micro_artifacts
    copy = tampered(tmp_path, directory, lambda data: None)
    plugin = manifest.stage("base").file("fp32", "plugin")
    outside = tmp_path / "outside.onnx"
    shutil.copyfile(directory / plugin.file, outside)  # the same bytes: refused for where it is, not for its hash
    (copy / plugin.file).unlink()
    (copy / plugin.file).symlink_to(outside)
    for check in (lambda: check_file(copy, plugin), lambda: read_manifest(copy).check_files(copy)):
        with pytest.raises(ArtifactError, match=re.escape(f"{copy / plugin.file} resolves outside {copy} (to "
                                                          f"{outside}); the artifact is refused")):
            check()
    (copy / plugin.file).unlink()
    (copy / plugin.file).symlink_to(copy / "base.onnx")  # inside: only its sha256 decides
    with pytest.raises(ArtifactError, match="base.plugin.onnx does not match the manifest"):
        check_file(copy, plugin)


def test_check_files_hashes_every_file_of_every_variant(tmp_path, micro_artifacts):
    directory, manifest = micro_artifacts
    paths = manifest.check_files(directory)
    assert set(paths) == {f.file for stage in manifest.stages.values() for f in stage.files}
    assert paths["sr2.fp16.plugin.onnx"] == directory / "sr2.fp16.plugin.onnx"
    copy = tampered(tmp_path, directory, lambda data: None)
    (copy / "sr2.fp16.plugin.onnx").write_bytes(b"")
    with pytest.raises(ArtifactError, match="sr2.fp16.plugin.onnx does not match the manifest"):
        manifest.check_files(copy)


def with_tokenizer(tmp_path, directory, content=b'{"model": "t5"}'):
    """A copy of the artifact whose text encoder uses a pretrained tokenizer: tokenizer/tokenizer.json, hashed."""
    def edit(data):
        data["text"].update(tokenizer_dir="tokenizer", tokenizer_files=[
            {"file": "tokenizer/tokenizer.json", "sha256": hashlib.sha256(content).hexdigest()}])

    copy = tampered(tmp_path, directory, edit)
    (copy / "tokenizer").mkdir()
    (copy / "tokenizer" / "tokenizer.json").write_bytes(content)
    return copy


def test_tokenizer_files_are_hashed(tmp_path, micro_artifacts):
    directory, manifest = micro_artifacts
    assert manifest.check_tokenizer(directory) is None  # the byte tokenizer
    copy = with_tokenizer(tmp_path, directory)
    manifest = read_manifest(copy)
    assert manifest.check_tokenizer(copy) == copy / "tokenizer"
    (copy / "tokenizer" / "spiece.model").write_bytes(b"unlisted")  # the loader would read what nobody hashed
    with pytest.raises(ArtifactError, match=r"tokenizer holds files its manifest does not list \(spiece\.model\)"):
        manifest.check_files(copy)
    (copy / "tokenizer" / "spiece.model").unlink()
    (copy / "tokenizer" / "tokenizer.json").write_bytes(b'{"model": "evil"}')
    with pytest.raises(ArtifactError, match="tokenizer/tokenizer.json does not match the manifest"):
        manifest.check_tokenizer(copy)
    (copy / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(ArtifactError, match="tokenizer/tokenizer.json is missing"):
        manifest.check_files(copy)


def test_a_tokenizer_dir_linked_out_of_the_directory_is_refused(tmp_path, micro_artifacts):
    directory, _ = micro_artifacts
    copy = with_tokenizer(tmp_path, directory)
    shutil.move(copy / "tokenizer", tmp_path / "elsewhere")  # the same files, hashes right, outside
    (copy / "tokenizer").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ArtifactError, match=f"{re.escape(str(copy / 'tokenizer'))} resolves outside"):
        read_manifest(copy).check_tokenizer(copy)


def test_the_exporter_records_the_tokenizer_files_it_copies(tmp_path, micro_artifacts):
    from walt_export.onnx_export import _manifest

    _, manifest = micro_artifacts
    cfg = CascadeConfig.model_validate(manifest.config)
    pretrained = tmp_path / "t5"
    pretrained.mkdir()
    (pretrained / "tokenizer.json").write_text('{"model": "t5"}')
    cfg = cfg.model_copy(update={"text_encoder": cfg.text_encoder.model_copy(update={"pretrained_dir":
                                                                                     str(pretrained)})})
    (tmp_path / "art").mkdir()
    written = _manifest(cfg, manifest.source, manifest.stages, tmp_path / "art")
    assert written.text.tokenizer_files == (DataFile(file="tokenizer/tokenizer.json",
                                                     sha256=sha256_of(pretrained / "tokenizer.json")),)
    assert written.check_tokenizer(tmp_path / "art") == tmp_path / "art" / "tokenizer"
    (pretrained / "tokenizer.json").unlink()
    (tmp_path / "other").mkdir()
    with pytest.raises(ArtifactError, match="has no tokenizer.json or spiece.model"):
        _manifest(cfg, manifest.source, manifest.stages, tmp_path / "other")


def registry_with(out, plan, key, name):
    """A build.json in `out` whose entry `key` names the plan file `name` (the file `plan` holds its bytes)."""
    target = Target(tensorrt="tensorrt", version="10.3.0", device="Orin", compute_capability="8.7")
    entry = {"stage": "base", "precision": "fp16", "source_file": "base.onnx", "source_sha256": "0" * 64,
             "attention": None, "profile": {"batch": [1, 2, 8]}, "plugin_version": None,
             "target": target.model_dump(), "plan": name, "plan_sha256": sha256_of(plan), "build_seconds": 0.1}
    (out / BUILD_JSON).write_text(json.dumps({"format": "walt-export-engines", "format_version": 1,
                                              "engines": {key: entry}}))
    return target


def test_a_registry_naming_a_plan_outside_its_directory_is_refused(tmp_path):
    out = tmp_path / "art" / ENGINES / "orin-sm87-trt10.3.0"
    out.mkdir(parents=True)
    plan = out / "base.fp16.plan"
    plan.write_bytes(b"a plan")
    for key, name in [("base.fp16.plan", "../x.plan"), ("../x.plan", "base.fp16.plan")]:
        target = registry_with(out, plan, key, name)
        with pytest.raises(ArtifactError, match="must be a file name in the engine directory") as refused:
            check_plan(plan, None, target)
        assert "'../x.plan'" in str(refused.value)
    target = registry_with(out, plan, "base.fp16.plan", "base.fp16.plan")
    assert check_plan(plan, None, target).plan == "base.fp16.plan"
    shutil.move(plan, tmp_path / "x.plan")  # the same bytes, outside the engine directory
    plan.symlink_to(tmp_path / "x.plan")
    with pytest.raises(ArtifactError, match=f"{re.escape(str(plan))} resolves outside {re.escape(str(out))}"):
        check_plan(plan, None, target)


def test_find_plan_refuses_a_stage_name_that_leaves_the_engine_directory(tmp_path, monkeypatch):
    from runtime import engine_registry

    target = Target(tensorrt="tensorrt", version="10.3.0", device="Orin", compute_capability="8.7")
    monkeypatch.setattr(engine_registry, "detect_target", lambda trt: target)
    (tmp_path / ENGINES / target.directory_name).mkdir(parents=True)
    with pytest.raises(ArtifactError, match=r"the stage name '\.\./\.\./base' gives a plan path outside"):
        find_plan(tmp_path, "../../base", "fp16", None)


@pytest.mark.parametrize("module, version, precision, chosen", [
    ("tensorrt", "10.3.0.30", "fp16", "fallback"),  # JetPack 6: no Attention in the parser
    ("tensorrt", "10.14.1.48", "fp16", "attention"),
    ("tensorrt", "11.4.1", "fp16", "attention"),
    ("tensorrt", "10.14.1.48", "int8", "fallback"),
    ("tensorrt_rtx", "1.7.1.116", "fp16", "attention"),
    ("tensorrt_rtx", "1.7.1.116", "fp32", "fallback"),  # no dedicated FP32 kernel: the build would fail
])
def test_auto_attention_takes_the_attention_variant_where_the_parser_maps_it(module, version, precision, chosen):
    from types import SimpleNamespace

    from runtime.engine_registry import resolve_attention

    trt = SimpleNamespace(__name__=module, __version__=version)  # the two attributes the rule reads
    assert resolve_attention("auto", trt, precision) == chosen
    assert resolve_attention("plugin", trt, precision) == "plugin"  # asked for: taken as given
