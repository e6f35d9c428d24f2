"""INT8 calibration of the micro artifact: data, structure, gates, proof of effect, and the runtime on INT8."""

import json
import math
import re
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from calibration.calibrate import INT8_DIR, REPORT, calibrate_artifacts
from calibration.capture import capture, requests, spread
from calibration.quantize import qdq_problems, qdq_summary, quantize_stage
from calibration.report import Gates, failures, report_json
from runtime.compare import PSNR_LIMIT_DB, psnr
from runtime.errors import UsageError
from runtime.files import BusyError, artifact_lock
from runtime.manifest import ArtifactError, read_manifest
from runtime.pipeline import Pipeline
from walt_export.cli import main as walt_export

SMALL = {"samples": 2, "held_out": 1, "timesteps": 4}  # the micro cascade: 50 steps per stage
LEFTOVERS = (".int8.k3j9ab.tmp", ".int8.x7w2cd.old")  # staging and swapped-out directories of killed runs


def _copy(micro_artifacts, tmp_path_factory, name: str):
    directory, _ = micro_artifacts
    copy = tmp_path_factory.mktemp(name) / "micro"
    shutil.copytree(directory, copy)
    return copy


@pytest.fixture(scope="module")
def calibrated(micro_artifacts, tmp_path_factory):
    """A copy of the micro artifact, with what killed calibrations left (`LEFTOVERS`), calibrated once at the
    default gates: (directory, report)."""
    copy = _copy(micro_artifacts, tmp_path_factory, "int8")
    for name in LEFTOVERS:
        (copy / name / "int8").mkdir(parents=True)
        (copy / name / "int8" / "base.onnx").write_bytes(b"half written")
    (copy / ".manifest.q1w2er.tmp.json").write_text("{")
    return copy, calibrate_artifacts(copy, **SMALL)


def test_a_killed_run_s_leftovers_are_removed_and_the_run_leaves_none(calibrated):
    directory, _ = calibrated
    assert sorted(p.name for p in directory.iterdir() if p.name.startswith(".")) == []
    assert (directory / INT8_DIR / REPORT).is_file()


def test_calibration_data_is_deterministic_and_spans_the_schedule(micro_artifacts):
    directory, manifest = micro_artifacts
    reqs = requests(manifest, 1, seed=3)
    first, videos = capture(directory, reqs, timesteps=5)
    again, _ = capture(directory, reqs, timesteps=5)
    other, _ = capture(directory, requests(manifest, 1, seed=4), timesteps=5)
    assert set(first) == {"base", "sr1", "sr2", "tokenizer_encoder", "tokenizer_decoder", "tokenizer_decoder_step"}
    for stage, feeds in first.items():
        for a, b, c in zip(feeds, again[stage], other[stage], strict=True):
            assert a.keys() == b.keys()
            assert all(np.array_equal(a[k], b[k]) for k in a), stage
            assert not all(np.array_equal(a[k], c[k]) for k in a if k != "timestep"), f"{stage}: seed ignored"
    timesteps = [float(f["timestep"][0]) for f in first["base"]]
    steps = manifest.schedule.num_inference_steps
    assert len(timesteps) == 5 and timesteps == sorted(timesteps, reverse=True)
    assert timesteps[0] >= 0.95 * 1000 and timesteps[-1] <= 1000 / steps  # pure noise to the last step
    assert first["base"][0]["latent"].shape[0] == 2  # the CFG batch, as the stage really runs
    latent = videos[0].latents["sr2"][0]
    assert np.array_equal(first["tokenizer_decoder"][0]["latent"], latent)  # the cascade's own latents
    assert first["tokenizer_encoder"][0]["video"].shape == (1, 3, manifest.frames, manifest.height, manifest.width)
    assert spread(50, 4) == [0, 16, 33, 49] and spread(3, 8) == [0, 1, 2]


def test_same_seed_gives_the_same_scales(calibrated, micro_artifacts, tmp_path_factory):
    directory, _ = calibrated
    again = _copy(micro_artifacts, tmp_path_factory, "again")
    calibrate_artifacts(again, **SMALL)
    for cache in sorted((directory / INT8_DIR).glob("*.calibration.json")):
        assert json.loads(cache.read_text()) == json.loads((again / INT8_DIR / cache.name).read_text()), cache.name
    scales = [_scales(d / INT8_DIR / "base.onnx") for d in (directory, again)]
    assert scales[0].keys() == scales[1].keys() and all(np.array_equal(scales[0][k], scales[1][k]) for k in scales[0])


def _scales(path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name.endswith("_scale")}


def test_qdq_structure_of_every_int8_file(calibrated):
    directory, _ = calibrated
    manifest = read_manifest(directory)
    checked = 0
    for name, stage in manifest.stages.items():
        for f in stage.files:
            if f.precision != "int8":
                continue
            model = onnx.load(str(directory / f.file))
            init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
            producers = {o: n for n in model.graph.node for o in n.output}
            dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
            assert dq, f"{f.file}: not quantized"
            for node in dq + [n for n in model.graph.node if n.op_type == "QuantizeLinear"]:
                assert init[node.input[2]].dtype == np.int8 and not init[node.input[2]].any(), node.name
                assert node.input[0] not in init or init[node.input[0]].dtype == np.int8, f"{node.name}: not int8"
            for node in model.graph.node:  # activation x activation MatMuls (attention) stay in float
                if node.op_type == "MatMul" and node.input[1] not in init and (
                        node.input[1] not in producers or producers[node.input[1]].op_type != "DequantizeLinear"
                        or producers[node.input[1]].input[0] not in init):
                    assert all(producers.get(i) is None or producers[i].op_type != "DequantizeLinear"
                               for i in node.input), f"{f.file}: {node.name} is a quantized batch-matmul"
            wattn = [n for n in model.graph.node if n.domain == "wattn"]
            assert len(wattn) == f.window_attention_nodes
            bodies = [fn for fn in model.functions if fn.domain == "wattn"]
            assert bool(bodies) == (f.variant == "canonical" and bool(wattn)), f.file
            if f.variant in ("fallback", "attention"):
                assert stage.file("fp32", f.variant).window_attention_nodes == 0 and not wattn
            assert qdq_problems(model, f.window_attention_nodes, f.variant == "canonical") == [], f.file
            checked += 1
    assert checked == 3 * 4 + 3  # three denoisers x four variants, three tokenizer models


def test_qdq_problems_names_what_tensorrt_would_reject(calibrated):
    directory, _ = calibrated
    model = onnx.load(str(directory / INT8_DIR / "sr1.onnx"))
    zero = next(t for t in model.graph.initializer if t.name.endswith("_zero_point"))
    zero.CopyFrom(numpy_helper.from_array(np.full(numpy_helper.to_array(zero).shape, 3, np.int8), zero.name))
    del model.functions[:]
    problems = qdq_problems(model, 2)
    assert any("zero point is not 0" in p for p in problems), problems
    assert any("wattn function body is missing" in p for p in problems), problems


def test_every_int8_stage_runs_in_onnxruntime_and_the_proof_of_effect(calibrated):
    directory, report = calibrated
    assert set(report["stages"]) == {"base", "sr1", "sr2", "tokenizer_encoder", "tokenizer_decoder",
                                     "tokenizer_decoder_step"}
    assert report["not_quantized"] == ["text_encoder"]
    for name, stage in report["stages"].items():
        q = stage["quantization"]
        assert q["quantized_nodes"] == q["quantizable_nodes"] > 0, name
        assert q["int8_weight_share"] > 0.9, name
        assert stage["quality"]["samples"] >= 1 and np.isfinite(stage["quality"]["psnr_db_min"])
        model = onnx.load(str(directory / INT8_DIR / f"{name}.onnx"))
        assert qdq_summary(model) == q
    assert [len(report["requests"][k]) for k in ("calibration", "held_out")] == [2, 1]
    held, calibration = report["requests"]["held_out"][0], report["requests"]["calibration"]
    assert held["prompt"] not in [r["prompt"] for r in calibration]  # held out: never calibrated on


def test_gates_pass_at_the_defaults_and_the_files_join_the_manifest(calibrated):
    directory, report = calibrated
    assert report["failures"] == [] and report["gates"] == vars(Gates())
    assert json.loads((directory / INT8_DIR / REPORT).read_text())["stages"].keys() == report["stages"].keys()
    manifest = read_manifest(directory)
    assert manifest.stage("base").file("int8", "fallback").file == "int8/base.fallback.onnx"
    assert not any(f.precision == "int8" for f in manifest.stage("text_encoder").files)


def test_the_runtime_runs_int8(calibrated):
    directory, report = calibrated
    held = report["requests"]["held_out"][0]
    with Pipeline.from_artifacts(directory, precision="int8") as pipe:
        int8 = pipe.generate(held["prompt"], seed=held["seed"]).frames
    with Pipeline.from_artifacts(directory) as pipe:
        fp32 = pipe.generate(held["prompt"], seed=held["seed"]).frames
    assert psnr(fp32, int8, peak=255.0) == pytest.approx(report["video"]["psnr_db_min"], abs=1e-6)
    assert not np.array_equal(fp32, int8)  # INT8 really ran


def test_an_impossible_gate_fails_naming_the_stage(micro_artifacts, tmp_path_factory, capsys):
    copy = _copy(micro_artifacts, tmp_path_factory, "tight")
    code = walt_export(["calibrate", "--artifacts", str(copy), "--samples", "1", "--held-out", "1",
                        "--timesteps", "2", "--method", "minmax", "--gate", "denoiser_min_psnr_db=200"])
    captured = capsys.readouterr()
    assert code == 1
    assert "base: PSNR" in captured.out and "< denoiser_min_psnr_db 200" in captured.out
    assert "not added to the manifest" in captured.err
    assert (copy / INT8_DIR / REPORT).is_file()
    assert not any(f.precision == "int8" for s in read_manifest(copy).stages.values() for f in s.files)
    with pytest.raises(ArtifactError, match="has no int8 files; calibrate it"):
        Pipeline.from_artifacts(copy, precision="int8")


def test_bad_requests_are_explained(micro_artifacts, tmp_path, capsys):
    directory, _ = micro_artifacts
    assert walt_export(["calibrate", "--artifacts", str(directory), "--gate", "max_cosine=1"]) == 1
    assert "bad gate 'max_cosine=1'" in capsys.readouterr().err
    assert walt_export(["calibrate", "--artifacts", str(tmp_path)]) == 1
    assert "not an artifact directory" in capsys.readouterr().err
    assert walt_export(["calibrate", "--artifacts", str(directory), "--prompts", str(tmp_path / "none.txt")]) == 1
    assert "no prompts file" in capsys.readouterr().err
    with pytest.raises(ValueError, match="bad gate 'denoiser_min_cosine=high'"):
        Gates.parse(["denoiser_min_cosine=high"])
    assert walt_export(["calibrate", "--artifacts", str(directory), "--gate", "tokenizer_min_cosine=nan"]) == 1
    assert "bad gate 'tokenizer_min_cosine=nan': a gate must be a finite number" in capsys.readouterr().err
    for gate in ("denoiser_min_cosine=nan", "max_flicker_ratio=inf", "min_video_psnr_db=-inf"):
        with pytest.raises(UsageError, match=rf"bad gate '{gate}': a gate must be a finite number \(default "):
            Gates.parse([gate])
    with pytest.raises(ValueError, match="not JSON compliant"):  # the report's guard: no NaN in report.json
        report_json({"gates": {"denoiser_min_cosine": math.nan}})
    assert psnr(np.ones(3), np.ones(3)) == -psnr(np.zeros(3), np.ones(3)) == PSNR_LIMIT_DB  # JSON has no infinity
    same = {"quality": {"cosine_min": 0.96, "psnr_db_min": 25.0}}  # each stage kind has its own gates
    report = {"stages": {"sr2": same, "tokenizer_decoder": same}, "video": {"psnr_db_min": 30.0,
                                                                           "flicker_ratio_max": 2.0}}
    gates = Gates(denoiser_min_psnr_db=20.0, tokenizer_min_cosine=0.95)
    assert failures(report, gates) == ["sr2: cosine 0.960000 < denoiser_min_cosine 0.975",
                                       "tokenizer_decoder: PSNR 25.00 dB < tokenizer_min_psnr_db 30.0",
                                       "video: flicker ratio 2.000 > max_flicker_ratio 1.3"]


@pytest.mark.parametrize(("settings", "message"), [
    ({"timesteps": 5000}, (r"timesteps must be in \[1, 50\] \(the denoising steps of this artifact's "
                           r"schedule\), got 5000")),
    ({"timesteps": 0}, r"timesteps: Input should be greater than or equal to 1 \(got 0\)"),
    ({"samples": 0}, r"samples: Input should be greater than or equal to 1 \(got 0\)"),
    ({"held_out": -1}, r"held_out: Input should be greater than or equal to 1 \(got -1\)"),
    ({"seed": -1}, r"seed: Input should be greater than or equal to 0 \(got -1\)"),
    ({"threads": -2}, r"threads: Input should be greater than or equal to 0 \(got -2\)"),
    ({"method": "median"}, r"method: Input should be 'minmax', 'entropy' or 'percentile' \(got 'median'\)"),
])
def test_settings_out_of_range_are_refused_before_any_model_runs(micro_artifacts, monkeypatch, settings, message):
    directory, manifest = micro_artifacts
    assert manifest.schedule.num_inference_steps == 50

    def cascade(*args, **kwargs):
        raise AssertionError("the FP32 cascade ran")

    monkeypatch.setattr("calibration.calibrate.capture", cascade)
    with pytest.raises(UsageError, match=message):
        calibrate_artifacts(directory, **{**SMALL, **settings})


def test_calibration_is_refused_while_another_command_writes_the_artifact(micro_artifacts, monkeypatch):
    directory, _ = micro_artifacts
    monkeypatch.setattr("calibration.calibrate.capture", lambda *args, **kwargs: pytest.fail("the cascade ran"))
    with artifact_lock(directory), pytest.raises(BusyError, match=rf"another walt-export command is writing "
                                                                  rf"{re.escape(str(directory))}"):
        calibrate_artifacts(directory, **SMALL)


def test_tensorrt_rtx_builds_the_int8_engines(calibrated):
    trt = pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX is not installed (extra trt-rtx)")
    from walt_export.engine_build import build_engines, network_layers

    directory, _ = calibrated
    out, decisions = build_engines(directory, "int8", trt=trt)
    assert [d.built for d in decisions] == [True] * 7
    registry = json.loads((out / "build.json").read_text())["engines"]
    assert registry["base.int8.plan"]["source_file"] == "int8/base.fallback.onnx"
    assert registry["tokenizer_decoder.int8.plan"]["source_file"] == "int8/tokenizer_decoder.onnx"
    text = registry["text_encoder.fp32.plan"]  # the policy: T5 stays FP32, for INT8 requests too
    assert (text["source_file"], text["precision"]) == ("text_encoder.onnx", "fp32")
    kinds = {kind for _, kind in network_layers(directory / "int8/base.fallback.onnx", trt)}
    assert {"QUANTIZE", "DEQUANTIZE", "MATRIX_MULTIPLY", "SOFTMAX"} <= kinds, kinds


def test_bench_times_int8_beside_fp32(calibrated, tmp_path, capsys):
    from walt_export.cli import main as walt_export

    directory, _ = calibrated
    out = tmp_path / "speed.json"
    assert walt_export(["bench", "--artifacts", str(directory), "--backends", "onnxruntime,onnxruntime-int8",
                        "--stages", "sr1", "--repeats", "1", "--warmup", "1", "--generate-repeats", "0",
                        "--json", str(out)]) == 0
    rows = {row["backend"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"onnxruntime", "onnxruntime-int8"}
    assert rows["onnxruntime-int8"]["file"] == "int8/sr1.attention.onnx"  # what the runtime runs
    assert rows["onnxruntime-int8"]["latency"]["median_ms"] > 0
    assert "onnxruntime-int8" in capsys.readouterr().out


def test_a_tensor_that_also_feeds_a_batch_matmul_stays_float_there(tmp_path):
    """x feeds a weight MatMul (quantized) and an activation x activation MatMul (kept float, as attention's are):
    one shared Q/DQ pair would quantize it for both (tiny's 128-wide SR2 has such a tensor)."""
    from onnx import TensorProto, helper

    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="projection"),
             helper.make_node("Transpose", ["y"], ["yt"], perm=[0, 2, 1], name="transpose"),
             helper.make_node("MatMul", ["x", "yt"], ["scores"], name="scores")]
    graph = helper.make_graph(nodes, "shared", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8])],
                              [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 4, 4])], [weight])
    source = tmp_path / "shared.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), source)
    feeds = [{"x": np.random.default_rng(i).standard_normal((1, 4, 8)).astype(np.float32)} for i in range(2)]
    quantize_stage("base", source, tmp_path / "shared.int8.onnx", feeds, "minmax")
    model = onnx.load(tmp_path / "shared.int8.onnx")
    assert qdq_problems(model, expected_nodes=0) == []
    assert qdq_summary(model)["quantized_nodes"] == 1
