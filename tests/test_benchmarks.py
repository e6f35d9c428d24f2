import json

import pytest
import torch

from benchmarks import reference_forward


def test_reference_forward_writes_a_table_and_json(tmp_path, capsys):
    out = tmp_path / "micro.json"
    assert reference_forward.main(["--preset", "micro", "--repeats", "1", "--warmup", "0", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [row["stage"] for row in result["rows"]] == ["text_encoder", "base", "sr1", "sr2", "tokenizer_encoder",
                                                         "tokenizer_decoder", "tokenizer_decoder_step"]
    assert all(row["flops"] > 0 and len(row["times_s"]) == 1 for row in result["rows"])
    assert "tokenizer_decoder" in capsys.readouterr().out


def test_meta_device_counts_flops_without_timing(tmp_path):
    out = tmp_path / "t2v.json"
    assert reference_forward.main(["--preset", "t2v", "--device", "meta", "--stages", "sr2", "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["times_s"] == [] and row["median_s"] is None and row["flops"] > 1e12


def test_onnx_export_benchmark_records_time_and_memory_per_model(tmp_path, capsys):
    from benchmarks import onnx_export

    out = tmp_path / "micro.json"
    assert onnx_export.main(["--preset", "micro", "--out", str(tmp_path / "art"), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [row["model"] for row in result["rows"]][:2] == ["text_encoder", "base"]
    assert all(row["export_s"] > 0 and row["component_peak_rss_gb"] > 0.1 for row in result["rows"])
    assert result["peak_rss_gb"] >= max(row["component_peak_rss_gb"] for row in result["rows"])
    assert "peak resident memory" in capsys.readouterr().out


def test_attention_benchmark_bounds_every_shape_and_call(tmp_path, capsys):
    from benchmarks import attention_cpu

    out = tmp_path / "attention.json"
    assert attention_cpu.main(["--preset", "micro", "--repeats", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert {row["kind"] for row in result["rows"]} == {"spatial", "spatiotemporal", "cross"}
    for row in result["rows"]:
        assert set(row["ms"]) == set(attention_cpu.KERNELS) and all(ms > 0 for ms in row["ms"].values())
        assert all(0 < fraction < 1 for fraction in row["peak_fraction"].values())
    assert list(result["calls"]) == ["base", "sr1", "sr2"]
    assert all(0 < call["attention_flops"] < call["flops"] and 0 < call["peak_fraction"] < 1
               for call in result["calls"].values())
    assert "limit of one denoiser call" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer on a machine without a CUDA GPU")
def test_gpu_check_says_it_needs_a_gpu(tmp_path, capsys):
    from benchmarks import gpu_check

    assert gpu_check.main(["--out", str(tmp_path / "gpu.json")]) == 1
    assert "needs a CUDA GPU" in capsys.readouterr().err and not (tmp_path / "gpu.json").exists()


def test_generate_benchmark_measures_memory_first_frame_and_batches(micro_artifacts, tmp_path, capsys):
    from benchmarks import generate_cpu

    directory, _ = micro_artifacts
    out = tmp_path / "generate.json"
    assert generate_cpu.main(["--artifacts", str(directory), "--steps", "1", "--repeats", "1", "--long-frames", "21",
                              "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["memory"]) == {"whole-clip decode", "default (streaming)", "--low-memory"}
    assert all(setting["peak_rss_gib"] > 0.05 for setting in result["memory"].values())
    assert list(result["long"]["runs"]) == ["9", "13", "21"]
    (run,) = result["first-frame"]["runs"]
    assert 0 < run["first_frame_s"] < run["total_s"] and run["frames"] == 9
    assert list(result["batch"]) == ["1", "2", "4"]
    assert all(size["videos_per_hour"] > 0 for size in result["batch"].values())
    assert "Videos per hour" in capsys.readouterr().out
