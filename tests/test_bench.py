"""`walt-export bench` on the micro cascade: the structure of its report, not its speed."""

import json

import pytest

from walt_export.cli import main as walt_export


def test_bench_reports_every_stage_and_backend_side_by_side(micro_artifacts, tmp_path, capsys):
    directory, _ = micro_artifacts
    out = tmp_path / "bench.json"
    stages = ["text_encoder", "base", "tokenizer_decoder"]
    assert walt_export(["bench", "--artifacts", str(directory), "--backends",
                        "torch,torch-compile,onnxruntime,onnxruntime-fp16,onnxruntime-int8,tensorrt,torch",
                        "--stages", "text_encoder,base", "tokenizer_decoder", "base",  # commas or spaces, once each
                        "--repeats", "2", "--warmup", "1", "--steps", "2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    measured = {(r["stage"], r["backend"]) for r in report["rows"]}
    expected = {(s, b) for s in stages for b in ("torch", "torch-compile", "onnxruntime")}
    expected |= {(s, "onnxruntime-fp16") for s in stages if s != "text_encoder"}  # T5 runs FP32 by its policy
    assert measured == expected
    skipped = {(s["backend"], s["stage"]): s["reason"] for s in report["skipped"]}
    assert "FP32" in skipped[("onnxruntime-fp16", "text_encoder")]
    assert "walt-export calibrate" in skipped[("onnxruntime-int8", None)]  # the fixture is not calibrated
    assert skipped[("tensorrt", None)]  # no TensorRT or no GPU here: a reason, not a silent gap
    assert report["matmul_gflops_per_s"] > 0
    for row in report["rows"]:
        latency = row["latency"]
        assert len(latency["calls_ms"]) == 2 and latency["p10_ms"] <= latency["median_ms"] <= latency["p90_ms"]
        assert row["flops"] > 0 and row["gflops_per_s"] > 0 and row["peak_fraction"] > 0
        assert row["batch"] == (2 if row["stage"] in ("text_encoder", "base") else 1)
        if row["backend"] == "torch":
            assert row["vs_torch"] == pytest.approx(1.0) and row["file"] is None
        elif row["backend"].startswith("onnxruntime"):
            assert row["file"].endswith(".onnx")
    generate = {g["backend"]: g for g in report["generate"]}
    assert set(generate) == {"onnxruntime", "torch"}
    for g in generate.values():
        assert g["calls"] == {"text_encoder": 1, "base": 2, "sr1": 2, "sr2": 2, "tokenizer_decoder": 1,
                              "tokenizer_decoder_step": 2}  # streamed: micro's 3 latent frames one at a time
        assert 0 < g["infer_seconds"][0] < g["seconds"][0] and 0 < g["outside_infer_fraction"] < 1
    speedup = generate["torch"]["median_s"] / generate["onnxruntime"]["median_s"]
    assert report["generate_speedup"] == pytest.approx(speedup)
    printed = capsys.readouterr().out
    assert "skipped tensorrt" in printed and "generate: onnxruntime is" in printed


def test_paper_report_prints_the_clip_cost_and_lower_bounds(tmp_path, capsys):
    out = tmp_path / "paper.json"
    assert walt_export(["bench", "--paper", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [s["stage"] for s in report["cost"]["stages"]] == ["text_encoder", "base", "sr1", "sr2",
                                                              "tokenizer_decoder"]
    assert report["cost"]["steps"] == 50 and 1 < report["pflop_per_clip"] < 5
    assert "lower bound at H100/H200 SXM dense FP16/BF16" in capsys.readouterr().out


def test_an_unknown_backend_is_an_argument_error(micro_artifacts, capsys):
    directory, _ = micro_artifacts
    with pytest.raises(SystemExit) as exit_:
        walt_export(["bench", "--artifacts", str(directory), "--backends", "torch,cuda"])
    assert exit_.value.code == 2 and "unknown backends cuda" in capsys.readouterr().err


def test_an_unknown_stage_gets_one_line_before_anything_runs(micro_artifacts, capsys):
    directory, _ = micro_artifacts
    assert walt_export(["bench", "--artifacts", str(directory), "--stages", "decoder"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown stages decoder" in err and "tokenizer_decoder" in err


def test_a_run_with_nothing_to_time_says_why(micro_artifacts, capsys):
    directory, _ = micro_artifacts
    assert walt_export(["bench", "--artifacts", str(directory), "--backends", "tensorrt"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nothing to time: every backend was skipped (tensorrt: " in err


@pytest.mark.parametrize("argv, says", [
    (["--paper", "--stages", "base", "--repeats", "2"], "--stages, --repeats measure an artifact"),
    (["--artifacts", "x", "--preset", "tiny"], "--preset goes with --paper"),
])
def test_options_that_do_not_apply_are_refused(argv, says, capsys):
    assert walt_export(["bench", *argv]) == 1
    assert says in capsys.readouterr().err
