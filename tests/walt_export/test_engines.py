"""TensorRT engines with TensorRT-RTX on the CPU: builds, the registry's reuse/rebuild/refuse decisions."""

import json
import shutil

import pytest

from runtime.engine_registry import BUILD_JSON, Target, check_plan, detect_target, find_plan
from runtime.manifest import ArtifactError
from walt_export.engines import build_engines
from walt_export.tensorrt_build import network_layers

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
    assert [d["decision"] for d in decisions] == ["built"] * 7
    assert not (artifact.parent / "timing.cache").exists()  # TensorRT-RTX has no timing cache: logged, ignored
    registry = json.loads((out / BUILD_JSON).read_text())["engines"]
    assert registry["base"]["source_file"] == "base.fp16.fallback.onnx" and registry["base"]["precision"] == "fp16"
    assert registry["tokenizer_decoder"]["source_file"] == "tokenizer_decoder.fp16.onnx"
    assert registry["base"]["profile"]["batch"] == [1, 2, 8] and registry["base"]["plugin_version"] == "1"
    assert all((out / entry["plan"]).stat().st_size > 10_000 for entry in registry.values())


def test_unchanged_engines_are_reused(built):
    artifact, _, _ = built
    _, again = build_engines(artifact, "fp16", trt=trt)
    assert [d["decision"] for d in again] == ["reused"] * 7


def test_plans_of_another_device_or_tensorrt_are_refused(built):
    _, out, _ = built
    assert check_plan(out / "base.fp16.plan", trt)["precision"] == "fp16"
    orin = Target("tensorrt", "10.3.0", "Orin", "8.7")
    with pytest.raises(ArtifactError, match=r"was built for cpu-aot-trtrtx.*this machine is orin-sm87-trt10.3.0; "
                                            r"rebuild with `walt-export engines"):
        check_plan(out / "base.fp16.plan", trt, orin)


def test_the_runtime_finds_the_plans_of_this_machine(built):
    artifact, out, _ = built
    assert find_plan(artifact, "base", "fp16", trt) == out / "base.fp16.plan"
    with pytest.raises(ArtifactError, match=r"no base\.int8\.plan in .* build it with `walt-export engines "
                                            r"--artifacts .* --precision int8`"):
        find_plan(artifact, "base", "int8", trt)


def test_int8_and_plugin_requests_are_explained(built):
    artifact, _, _ = built
    with pytest.raises(ArtifactError, match="no INT8 Q/DQ files; calibrate it first"):
        build_engines(artifact, "int8", trt=trt)
    with pytest.raises(ArtifactError, match="TensorRT-RTX has no plugins"):
        build_engines(artifact, "fp16", attention="plugin", trt=trt)


def test_parser_layers_of_the_fallback_fp16_denoiser(built):
    artifact, _, _ = built
    kinds = {kind for _, kind in network_layers(artifact / "base.fp16.fallback.onnx", trt)}
    assert {"MATRIX_MULTIPLY", "SOFTMAX", "SHUFFLE"} <= kinds, kinds


def test_changed_sources_and_damaged_plans_are_rebuilt(built):  # last: it edits the registry
    artifact, out, _ = built
    registry = json.loads((out / BUILD_JSON).read_text())["engines"]
    registry["sr1"]["source_sha256"] = "0" * 64  # as if sr1 had been re-exported
    (out / BUILD_JSON).write_text(json.dumps({"engines": registry}))
    (out / "sr2.fp16.plan").write_bytes(b"truncated")
    with pytest.raises(ArtifactError, match="does not match its build.json"):
        check_plan(out / "sr2.fp16.plan", trt)
    _, decisions = build_engines(artifact, "fp16", trt=trt)
    reasons = {d["stage"]: d.get("reason") for d in decisions if d["decision"] == "built"}
    assert reasons == {"sr1": "source_sha256 changed", "sr2": "the plan file is missing or modified"}
