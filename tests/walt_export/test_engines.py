"""TensorRT engines with TensorRT-RTX on the CPU: builds, the registry's reuse/rebuild/refuse decisions."""

import json
import re
import shutil

import pytest

from runtime.engine_registry import BUILD_JSON, Target, check_plan, detect_target, find_plan, read_registry
from runtime.manifest import ArtifactError, read_manifest
from walt_export.engine_build import build_engines, network_layers

trt = pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX is not installed (extra trt-rtx)")


@pytest.fixture(scope="module")
def built(micro_artifacts, tmp_path_factory):
    """A copy of the micro artifact with FP16 engines built once: (artifact, engine directory, decisions, log)."""
    directory, _ = micro_artifacts
    copy = tmp_path_factory.mktemp("engines") / "micro"
    shutil.copytree(directory, copy)
    out, decisions = build_engines(copy, "fp16", trt=trt, timing_cache=copy.parent / "timing.cache")
    return copy, out, decisions


def test_fp16_engines_per_stage_with_their_registry(built):
    artifact, out, decisions = built
    assert out.name == detect_target(trt).directory_name == f"cpu-aot-trtrtx{trt.__version__}"
    assert out.parent == artifact / "engines"
    assert [d.built for d in decisions] == [True] * 7
    assert not (artifact.parent / "timing.cache").exists()  # TensorRT-RTX has no timing cache: logged, ignored
    registry = json.loads((out / BUILD_JSON).read_text())
    assert (registry["format"], registry["format_version"]) == ("walt-export-engines", 1)
    engines = registry["engines"]  # keyed by plan file
    assert engines["base.fp16.plan"]["source_file"] == "base.fp16.fallback.onnx"
    assert engines["base.fp16.plan"]["precision"] == "fp16"
    assert engines["tokenizer_decoder.fp16.plan"]["source_file"] == "tokenizer_decoder.fp16.onnx"
    assert engines["base.fp16.plan"]["profile"]["batch"] == [1, 2, 8]
    assert engines["base.fp16.plan"]["plugin_version"] == "1"
    assert all((out / entry["plan"]).stat().st_size > 10_000 for entry in engines.values())


def test_the_text_encoder_plan_is_fp32_from_the_fp32_source(built):
    """The precision policy: T5 runs in FP32 on every backend, so `--precision fp16` builds it from FP32 ONNX."""
    artifact, out, decisions = built
    text = next(d for d in decisions if d.stage == "text_encoder")
    assert text.plan == out / "text_encoder.fp32.plan"
    entry = read_registry(out).engines["text_encoder.fp32.plan"]
    assert (entry.source_file, entry.precision) == ("text_encoder.onnx", "fp32")
    assert not (out / "text_encoder.fp16.plan").exists()
    assert find_plan(artifact, "text_encoder", "fp32", trt, requested="fp16") == text.plan


def test_unchanged_engines_are_reused(built):
    artifact, _, _ = built
    _, again = build_engines(artifact, "fp16", trt=trt)
    assert [d.built for d in again] == [False] * 7


def test_plans_of_another_device_or_tensorrt_are_refused(built):
    _, out, _ = built
    assert check_plan(out / "base.fp16.plan", trt).precision == "fp16"
    orin = Target(tensorrt="tensorrt", version="10.3.0", device="Orin", compute_capability="8.7")
    with pytest.raises(ArtifactError, match=r"was built for cpu-aot-trtrtx.*this machine is orin-sm87-trt10.3.0; "
                                            r"rebuild with `walt-export engines"):
        check_plan(out / "base.fp16.plan", trt, orin)


def test_the_runtime_finds_the_plans_of_this_machine(built):
    artifact, out, _ = built
    assert find_plan(artifact, "base", "fp16", trt) == out / "base.fp16.plan"
    with pytest.raises(ArtifactError, match=r"no base\.int8\.plan in .* build it with `walt-export engines "
                                            r"--artifacts .* --precision int8`"):
        find_plan(artifact, "base", "int8", trt)


def test_fp16_engines_of_an_artifact_without_fp16_files_name_the_re_export(built, tmp_path):
    """TensorRT-RTX is strongly typed: FP16 engines come from FP16 files, which `make demo`'s export lacks."""
    artifact, _, _ = built
    manifest = read_manifest(artifact)
    copy = tmp_path / "fp32-only"
    shutil.copytree(artifact, copy, ignore=shutil.ignore_patterns("engines"))
    stages = {name: stage.model_copy(update={"files": tuple(f for f in stage.files if f.precision == "fp32")})
              for name, stage in manifest.stages.items()}
    (copy / "manifest.json").write_text(manifest.model_copy(update={"stages": stages}).model_dump_json())
    with pytest.raises(ArtifactError, match=rf"has no fp16 files to build fp16 engines from with tensorrt_rtx .*; "
                                            rf"re-export it with `walt-export onnx --preset micro --seed 0 --out "
                                            rf"{re.escape(str(copy))} --fp16`"):
        build_engines(copy, "fp16", trt=trt)


def test_int8_and_plugin_requests_are_explained(built):
    artifact, _, _ = built
    with pytest.raises(ArtifactError, match=r"has no int8 files to build int8 engines from .*; calibrate it with "
                                            r"`walt-export calibrate"):
        build_engines(artifact, "int8", trt=trt)
    with pytest.raises(ArtifactError, match="TensorRT-RTX has no plugins"):
        build_engines(artifact, "fp16", attention="plugin", trt=trt)


def test_parser_layers_of_the_fallback_fp16_denoiser(built):
    artifact, _, _ = built
    kinds = {kind for _, kind in network_layers(artifact / "base.fp16.fallback.onnx", trt)}
    assert {"MATRIX_MULTIPLY", "SOFTMAX", "SHUFFLE"} <= kinds, kinds


def test_a_corrupt_registry_is_refused_naming_it_and_the_rebuild(built, tmp_path):
    artifact, out, _ = built
    copy = tmp_path / "engines"
    shutil.copytree(out, copy)
    (copy / BUILD_JSON).write_text('{"engines": {"base": ')  # truncated
    with pytest.raises(ArtifactError, match=r"build\.json is not readable JSON .*delete it and rebuild the engines "
                                            r"with `walt-export engines --artifacts"):
        read_registry(copy)
    (copy / BUILD_JSON).write_text(json.dumps({"engines": {}}))  # the unversioned registry of earlier releases
    with pytest.raises(ArtifactError, match="is not a walt-export-engines document"):
        check_plan(copy / "base.fp16.plan", trt)


def test_changed_sources_and_damaged_plans_are_rebuilt(built):  # last: it edits the registry
    artifact, out, _ = built
    registry = json.loads((out / BUILD_JSON).read_text())
    registry["engines"]["sr1.fp16.plan"]["source_sha256"] = "0" * 64  # as if sr1 had been re-exported
    (out / BUILD_JSON).write_text(json.dumps(registry))
    (out / "sr2.fp16.plan").write_bytes(b"truncated")
    with pytest.raises(ArtifactError, match="does not match its build.json"):
        check_plan(out / "sr2.fp16.plan", trt)
    _, decisions = build_engines(artifact, "fp16", trt=trt)
    reasons = {d.stage: d.reason for d in decisions if d.built}
    assert reasons == {"sr1": "source_sha256 changed", "sr2": "the plan file is missing or modified"}
