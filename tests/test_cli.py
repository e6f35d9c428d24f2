import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    return subprocess.run([sys.executable, str(ROOT / "export.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, check=False)


def test_summary_of_the_default_preset():
    result = run("summary")
    assert result.returncode == 0, result.stderr
    assert "cascade 'tiny': 17 frames x 512x896 px @ 8 fps" in result.stdout


def test_paper_preset_on_the_meta_device():
    result = run("summary", "--preset", "t2v", "--meta")
    assert result.returncode == 0, result.stderr
    assert "3,106,142,664" in result.stdout  # the 3B base


def test_unknown_preset_lists_the_valid_ones():
    result = run("summary", "--preset", "walt-xxl")
    assert result.returncode == 2
    assert "invalid choice: 'walt-xxl'" in result.stderr and "'t2v'" in result.stderr


def test_init_then_summary_of_the_checkpoint(tmp_path):
    path = tmp_path / "micro.safetensors"
    result = run("init", "--preset", "micro", "--out", str(path), "--seed", "3")
    assert result.returncode == 0, result.stderr
    assert path.is_file() and path.with_suffix(".json").is_file()
    result = run("summary", "--checkpoint", str(path))
    assert result.returncode == 0 and "cascade 'micro'" in result.stdout


def test_bad_checkpoint_is_one_line_of_error(tmp_path):
    result = run("summary", "--checkpoint", str(tmp_path / "missing.safetensors"))
    assert result.returncode == 1
    assert result.stderr.startswith("walt-export: error: config") and "Traceback" not in result.stderr


# ------------------------------------------------------------------------------------------ onnx and verify
def assert_one_line_error(result, *fragments):
    assert result.returncode == 1, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("walt-export: error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def leftovers(parent):
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


def test_onnx_from_a_missing_or_truncated_checkpoint(tmp_path):
    out = tmp_path / "art"
    assert_one_line_error(run("onnx", "--checkpoint", str(tmp_path / "missing.safetensors"), "--out", str(out)))
    ckpt = tmp_path / "micro.safetensors"
    assert run("init", "--preset", "micro", "--out", str(ckpt)).returncode == 0
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    assert_one_line_error(run("onnx", "--checkpoint", str(ckpt), "--out", str(out)), str(ckpt))
    assert not out.exists() and not leftovers(tmp_path)


def test_onnx_with_a_checkpoint_of_another_preset(tmp_path):
    ckpt = tmp_path / "micro.safetensors"
    assert run("init", "--preset", "micro", "--out", str(ckpt)).returncode == 0
    result = run("onnx", "--preset", "tiny", "--checkpoint", str(ckpt), "--out", str(tmp_path / "art"))
    assert_one_line_error(result, "checkpoint of 'micro', not 'tiny'", "--preset micro")


def test_onnx_refuses_a_directory_of_another_artifact_or_other_files(tmp_path, micro_artifacts):
    directory, _ = micro_artifacts
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_text((directory / "manifest.json").read_text())  # micro, seed 0
    assert_one_line_error(run("onnx", "--preset", "micro", "--seed", "1", "--out", str(other)),
                          "already holds another artifact")
    assert sorted(p.name for p in other.iterdir()) == ["manifest.json"]
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert_one_line_error(run("onnx", "--preset", "micro", "--out", str(busy)), "not an artifact directory")
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]


def test_onnx_to_an_unwritable_place(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert_one_line_error(run("onnx", "--preset", "micro", "--out", str(blocker / "art")), "cannot write into")


def test_verify_prints_the_table_and_refuses_tampered_files(tmp_path, micro_artifacts):
    directory, _ = micro_artifacts
    result = run("verify", "--artifacts", str(directory), "--batches", "1")
    assert result.returncode == 0, result.stderr
    assert "base.fallback.onnx" in result.stdout and "outputs within tolerance" in result.stdout
    copy = tmp_path / "copy"
    shutil.copytree(directory, copy)
    data = bytearray((copy / "sr1.onnx").read_bytes())
    data[-100] ^= 0xFF
    (copy / "sr1.onnx").write_bytes(bytes(data))
    assert_one_line_error(run("verify", "--artifacts", str(copy)), "sr1.onnx does not match the manifest")


def test_verify_hashes_the_plugin_variants_it_cannot_run(tmp_path, micro_artifacts):
    """onnxruntime cannot run the plugin variant, but verify still checks that it is there, intact."""
    directory, _ = micro_artifacts
    copy = tmp_path / "copy"
    shutil.copytree(directory, copy)
    (copy / "base.plugin.onnx").unlink()
    assert_one_line_error(run("verify", "--artifacts", str(copy)), "base.plugin.onnx is missing")
    shutil.copyfile(directory / "base.plugin.onnx", copy / "base.plugin.onnx")
    (copy / "sr1.fp16.plugin.onnx").write_bytes(b"")  # zeroed
    assert_one_line_error(run("verify", "--artifacts", str(copy)), "sr1.fp16.plugin.onnx does not match the manifest")


def test_verify_refuses_while_another_command_writes_the_artifact(tmp_path, micro_artifacts):
    from runtime.files import artifact_lock

    directory, _ = micro_artifacts
    copy = tmp_path / "copy"
    shutil.copytree(directory, copy)
    (copy / "verify.json").unlink(missing_ok=True)
    with artifact_lock(copy):
        assert_one_line_error(run("verify", "--artifacts", str(copy)), "another walt-export command is writing")
    assert not (copy / "verify.json").exists()


def test_ctrl_c_during_an_export_exits_130_leaving_nothing(tmp_path, sigint_children):
    import signal
    import time

    process = subprocess.Popen([sys.executable, str(ROOT / "export.py"), "-v", "onnx", "--preset", "micro", "--out",
                                str(tmp_path / "art")], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".art.*.tmp/*.onnx")) and time.monotonic() < deadline:  # exporting its models
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode == 130 and stderr.strip().splitlines()[-1] == "walt-export: interrupted", stderr[-2000:]
    assert "Traceback" not in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [".art.lock"]  # no staging directory, no artifact


@pytest.mark.parametrize("args, says", [
    (["onnx", "--seed", "99999999999999999999", "--out", "x"], "argument --seed: input should be less than or equal"),
    (["init", "--seed", "-1", "--out", "x.safetensors"], "argument --seed: input should be greater than or equal to 0"),
    (["engines", "--artifacts", "x", "--workspace-gb", "-1"], "argument --workspace-gb: input should be greater than 0"),
    (["calibrate", "--artifacts", "x", "--timesteps", "0"], "argument --timesteps: input should be greater than"),
    (["calibrate", "--artifacts", "x", "--threads", "-5"], "argument --threads: input should be greater than"),
])
def test_flag_values_out_of_range_name_the_flag(args, says):
    result = run(*args)
    assert result.returncode == 2 and says in result.stderr.splitlines()[-1], result.stderr


@pytest.mark.parametrize("args, says", [
    (["--profile", "static"], "--profile static needs --batch N: the videos per call its plans are fixed to"),
    (["--batch", "2"], "--batch N sets the batch of a static profile: add --profile static"),
])
def test_a_static_profile_and_its_batch_go_together(tmp_path, args, says):
    result = run("engines", "--artifacts", str(tmp_path), *args)
    (line,) = result.stderr.strip().splitlines()  # one line, before anything is read or built
    assert result.returncode == 1 and line.startswith(f"walt-export: error: {says}"), result.stderr
