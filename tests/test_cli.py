import subprocess
import sys
from pathlib import Path

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
