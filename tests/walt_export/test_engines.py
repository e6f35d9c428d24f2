"""TensorRT engines with TensorRT-RTX on the CPU: builds (of an artifact exported without --fp16, whose FP16 files
are derived), the registry's reuse/rebuild/refuse decisions, the artifact lock, and runs that fail or are refused."""

import json
import logging
import math
import re
import shutil
from pathlib import Path

import pytest

from runtime.engine_registry import BUILD_JSON, Target, check_plan, detect_target, find_plan, read_registry
from runtime.errors import RequestError, UsageError
from runtime.files import BusyError, artifact_lock
from runtime.manifest import ArtifactError, check_file, read_manifest, sha256_of
from walt_export.engine_build import EngineBuildError, build_engines, network_layers

trt = pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX is not installed (extra trt-rtx)")


def _without_fp16(micro_artifacts, copy: Path) -> Path:
    """`copy` of the micro artifact as `walt-export onnx` writes it without --fp16 (`make demo`): FP32 files only."""
    directory, _ = micro_artifacts
    manifest = read_manifest(directory)
    shutil.copytree(directory, copy, ignore=lambda _, names: [n for n in names if ".fp16." in n or n == "engines"])
    stages = {name: stage.model_copy(update={"files": tuple(f for f in stage.files if f.precision == "fp32")})
              for name, stage in manifest.stages.items()}
    (copy / "manifest.json").write_text(manifest.model_copy(update={"stages": stages}).model_dump_json(indent=2))
    return copy


def _tree(directory: Path) -> set[Path]:
    return {p.relative_to(directory) for p in directory.rglob("*")}


@pytest.fixture(scope="module")
def built(micro_artifacts, tmp_path_factory):
    """The micro artifact exported without --fp16, with FP16 engines built once: (artifact, engine directory,
    decisions, the log records of the build)."""
    copy = _without_fp16(micro_artifacts, tmp_path_factory.mktemp("engines") / "micro")
    records = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    logger = logging.getLogger("walt_export.engine_build")
    level, logger.level = logger.level, logging.INFO
    logger.addHandler(handler)
    try:
        out, decisions = build_engines(copy, "fp16", trt=trt, timing_cache=copy.parent / "timing.cache")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return copy, out, decisions, records


def test_fp16_engines_per_stage_with_their_registry(built):
    artifact, out, decisions, records = built
    assert out.name == detect_target(trt).directory_name == f"cpu-aot-trtrtx{trt.__version__}"
    assert out.parent == artifact / "engines"
    assert [d.built for d in decisions] == [True] * 7
    assert not (artifact.parent / "timing.cache").exists()  # TensorRT-RTX has no timing cache: ignored, said
    assert any(r.levelno == logging.WARNING and r.getMessage().startswith("ignoring the timing cache")
               for r in records)
    registry = json.loads((out / BUILD_JSON).read_text())
    assert (registry["format"], registry["format_version"]) == ("walt-export-engines", 1)
    engines = registry["engines"]  # keyed by plan file
    assert engines["base.fp16.plan"]["source_file"] == "base.fp16.attention.onnx"  # auto: TensorRT-RTX >= 1.7, FP16
    assert engines["base.fp16.plan"]["attention"] == "attention"
    assert engines["base.fp16.plan"]["precision"] == "fp16"
    assert engines["tokenizer_decoder.fp16.plan"]["source_file"] == "tokenizer_decoder.fp16.onnx"
    assert engines["base.fp16.plan"]["profile"]["batch"] == [1, 2, 8]
    assert engines["base.fp16.plan"]["plugin_version"] == "1"
    assert all((out / entry["plan"]).stat().st_size > 10_000 for entry in engines.values())


def test_the_text_encoder_plan_is_fp32_from_the_fp32_source(built):
    """The precision policy: T5 runs in FP32 on every backend, so `--precision fp16` builds it from FP32 ONNX."""
    artifact, out, decisions, _ = built
    text = next(d for d in decisions if d.stage == "text_encoder")
    assert text.plan == out / "text_encoder.fp32.plan"
    entry = read_registry(out).engines["text_encoder.fp32.plan"]
    assert (entry.source_file, entry.precision) == ("text_encoder.onnx", "fp32")
    assert not (out / "text_encoder.fp16.plan").exists()
    assert find_plan(artifact, "text_encoder", "fp32", trt, requested="fp16") == text.plan


def test_an_export_without_fp16_gets_the_fp16_files_of_an_fp16_export(built, micro_artifacts):
    """`make demo`'s artifact: the FP16 files TensorRT-RTX needs are derived from its FP32 files and listed, exactly
    as `walt-export onnx --fp16` writes them; the text encoder, FP32 only by its policy, gets none."""
    artifact, _, _, records = built
    manifest = read_manifest(artifact)
    _, exported = micro_artifacts  # the same cascade exported with --fp16
    assert manifest.stages == exported.stages
    fp16 = [f for stage in manifest.stages.values() for f in stage.files if f.precision == "fp16"]
    assert len(fp16) == 3 * 4 + 3  # three denoisers x four variants, three tokenizer models
    for f in fp16:
        check_file(artifact, f)
    assert manifest.stage("text_encoder").precisions == {"fp32"}
    (derived,) = [r.getMessage() for r in records if r.levelno == logging.INFO and "derived FP16" in r.getMessage()]
    assert "base.fp16.fallback.onnx" in derived and "text_encoder" not in derived
    assert not list(artifact.glob(".*"))  # no staging directory left


def test_unchanged_engines_are_reused(built):
    """Reused, FP16 files included (nothing derived again); what killed runs left is removed."""
    artifact, out, _, _ = built
    stale = [out / ".base.fp16.k2j3ab.tmp.plan", out / ".build.x8d1cd.tmp.json", artifact / ".manifest.a1b2.tmp.json"]
    for path in stale:
        path.write_bytes(b"left by a killed run")
    (artifact / ".fp16.q9w8ef.tmp").mkdir()
    (artifact / ".fp16.q9w8ef.tmp" / "base.fp16.onnx").write_bytes(b"half written")
    manifest = (artifact / "manifest.json").read_bytes()
    _, again = build_engines(artifact, "fp16", trt=trt)
    assert [d.built for d in again] == [False] * 7
    assert (artifact / "manifest.json").read_bytes() == manifest
    assert [p for p in stale if p.exists()] == [] and not (artifact / ".fp16.q9w8ef.tmp").exists()


def test_plans_of_another_device_or_tensorrt_are_refused(built):
    _, out, _, _ = built
    assert check_plan(out / "base.fp16.plan", trt).precision == "fp16"
    orin = Target(tensorrt="tensorrt", version="10.3.0", device="Orin", compute_capability="8.7")
    with pytest.raises(ArtifactError, match=r"was built for cpu-aot-trtrtx.*this machine is orin-sm87-trt10.3.0; "
                                            r"rebuild with `walt-export engines"):
        check_plan(out / "base.fp16.plan", trt, orin)


def test_the_runtime_finds_the_plans_of_this_machine(built):
    artifact, out, _, _ = built
    assert find_plan(artifact, "base", "fp16", trt) == out / "base.fp16.plan"
    with pytest.raises(ArtifactError, match=r"no base\.int8\.plan in .* build it with `walt-export engines "
                                            r"--artifacts .* --precision int8`"):
        find_plan(artifact, "base", "int8", trt)


def test_static_profile_plans_sit_beside_the_dynamic_ones_and_fix_the_batch(built):
    """`--profile static --batch 2`: 4 rows (2 videos with guidance) in the denoisers and the text encoder, 2 in the
    tokenizer, min = opt = max; own file names and registry entries, so the dynamic plans stay and are reused."""
    from runtime.pipeline import Pipeline
    from runtime.request import Request

    artifact, out, _, _ = built
    dynamic = {p.name: sha256_of(p) for p in out.glob("*.plan")}
    _, decisions = build_engines(artifact, "fp16", trt=trt, static_batch=2)
    assert [d.plan.name for d in decisions if d.built] == [
        "text_encoder.fp32.static-b2.plan", "base.fp16.static-b2.plan", "sr1.fp16.static-b2.plan",
        "sr2.fp16.static-b2.plan", "tokenizer_encoder.fp16.static-b2.plan", "tokenizer_decoder.fp16.static-b2.plan",
        "tokenizer_decoder_step.fp16.static-b2.plan"]
    assert {p.name: sha256_of(p) for p in out.glob("*.plan") if "static" not in p.name} == dynamic
    registry = read_registry(out).engines
    assert registry["base.fp16.static-b2.plan"].profile["batch"] == (4, 4, 4)
    assert registry["text_encoder.fp32.static-b2.plan"].profile["batch"] == (4, 4, 4)
    assert registry["tokenizer_decoder.fp16.static-b2.plan"].profile == {"batch": (2, 2, 2), "latent_frames": (1, 3, 6)}
    assert [d.built for d in build_engines(artifact, "fp16", trt=trt, static_batch=2)[1]] == [False] * 7
    with pytest.raises(ArtifactError, match=r"no text_encoder\.fp32\.static-b3\.plan .* build it with "
                                            r"`walt-export engines "
                                            r"--artifacts .* --precision fp16 --profile static --batch 3`"):
        Pipeline.from_artifacts(artifact, "tensorrt", static_batch=3)

    # The runtime takes the batch from the plans' registry, before any engine runs (no GPU needed up to there).
    pipe = Pipeline.from_artifacts(artifact, "tensorrt", static_batch=2)
    guided, unguided = pipe.check(Request(prompt="x")), pipe.check(Request(prompt="x", guidance=1.0))
    assert pipe.videos_per_batch(guided) == (2, 2)
    assert Pipeline.from_artifacts(artifact, "tensorrt").videos_per_batch(guided) == (1, 4)
    with pytest.raises(RequestError, match=r"take no batch of these videos \(rows per video: text_encoder 2, base 1, "
                                           r".*walt-export engines --artifacts .* --profile static --batch N"):
        pipe.generate("x", guidance=1.0)
    assert pipe.videos_per_batch(unguided) == (4, 2) and pipe._runners == {}


def test_int8_and_plugin_requests_are_explained(built):
    artifact, _, _, _ = built
    with pytest.raises(ArtifactError, match=r"has no int8 files to build int8 engines from .*; calibrate it with "
                                            r"`walt-export calibrate"):
        build_engines(artifact, "int8", trt=trt)
    with pytest.raises(ArtifactError, match="TensorRT-RTX has no plugins"):
        build_engines(artifact, "fp16", attention="plugin", trt=trt)


def test_a_bad_workspace_is_refused_before_anything(built, micro_artifacts, tmp_path):
    artifact, _, _, _ = built
    fresh = _without_fp16(micro_artifacts, tmp_path / "micro")
    before, engines = _tree(tmp_path), _tree(artifact)
    for gb in (-1, 0, math.nan, math.inf):
        for directory in (fresh, artifact):  # a first build, and one that would reuse every plan
            with pytest.raises(UsageError, match=rf"workspace_gb \(--workspace-gb\) is TensorRT's workspace limit in "
                                                 rf"GiB: Input should be (greater than 0|a finite number) \(got {gb}\)$"):
                build_engines(directory, "fp16", workspace_gb=gb, trt=trt)
    assert (_tree(tmp_path), _tree(artifact)) == (before, engines)  # no lock file, FP16 file or engine directory


def test_a_failed_build_leaves_nothing_new(micro_artifacts, tmp_path):
    directory, manifest = micro_artifacts
    copy = tmp_path / "micro"
    shutil.copytree(directory, copy)
    (copy / "text_encoder.onnx").write_bytes(b"not an ONNX model")  # the first stage built, listed as it is now
    text = manifest.stage("text_encoder")
    files = tuple(f.model_copy(update={"sha256": sha256_of(copy / f.file)}) for f in text.files)
    stages = {**manifest.stages, "text_encoder": text.model_copy(update={"files": files})}
    (copy / "manifest.json").write_text(manifest.model_copy(update={"stages": stages}).model_dump_json())
    before = _tree(tmp_path)
    with pytest.raises(EngineBuildError, match="TensorRT could not build an engine from text_encoder.onnx"):
        build_engines(copy, "fp16", trt=trt)
    assert not (copy / "engines").exists()
    assert _tree(tmp_path) - before <= {Path(".micro.lock")}  # the artifact's lock file may stay, by design


def test_engines_are_refused_while_another_command_writes_the_artifact(built):
    artifact, out, _, _ = built
    registry = (out / BUILD_JSON).read_bytes()
    with artifact_lock(artifact), pytest.raises(BusyError, match=rf"another walt-export command is writing "
                                                                 rf"{re.escape(str(artifact))}"):
        build_engines(artifact, "fp16", trt=trt)
    assert (out / BUILD_JSON).read_bytes() == registry
    assert [d.built for d in build_engines(artifact, "fp16", trt=trt)[1]] == [False] * 7  # free again


def test_parser_layers_of_the_fallback_fp16_denoiser(built):
    artifact, _, _, _ = built
    kinds = {kind for _, kind in network_layers(artifact / "base.fp16.fallback.onnx", trt)}
    assert {"MATRIX_MULTIPLY", "SOFTMAX", "SHUFFLE"} <= kinds, kinds


def test_a_corrupt_registry_is_refused_naming_it_and_the_rebuild(built, tmp_path):
    _, out, _, _ = built
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
    artifact, out, _, _ = built
    registry = json.loads((out / BUILD_JSON).read_text())
    registry["engines"]["sr1.fp16.plan"]["source_sha256"] = "0" * 64  # as if sr1 had been re-exported
    (out / BUILD_JSON).write_text(json.dumps(registry))
    (out / "sr2.fp16.plan").write_bytes(b"truncated")
    with pytest.raises(ArtifactError, match="does not match its build.json"):
        check_plan(out / "sr2.fp16.plan", trt)
    _, decisions = build_engines(artifact, "fp16", trt=trt)
    reasons = {d.stage: d.reason for d in decisions if d.built}
    assert reasons == {"sr1": "source_sha256 changed", "sr2": "the plan file is missing or modified"}
