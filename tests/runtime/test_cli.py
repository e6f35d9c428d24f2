"""`python -m runtime` as a user meets it: bad values and outputs refused at once in one line naming the argument,
nothing left on disk, Ctrl-C, --version, help for every flag."""

import argparse
import os
import signal
import subprocess
import time
from pathlib import Path

import onnxruntime
import pytest

from tests.kill_trials import _command

ROOT = Path(__file__).resolve().parents[2]


def run(*args, **kwargs):
    return subprocess.run(_command(*args), capture_output=True, cwd=ROOT, **kwargs)


def _files(path: Path) -> list[Path]:
    return sorted(path.rglob("*"))


@pytest.mark.parametrize("extra, code, says", [
    (["--guidance", "nan"], 2, "argument --guidance: input should be a finite number, got 'nan'"),
    (["--guidance", "inf"], 2, "argument --guidance: input should be a finite number"),
    (["--frames", "0"], 2, "argument --frames: input should be greater than or equal to 1, got '0'"),
    (["--seed", "-1"], 2, "argument --seed: input should be greater than or equal to 0, got '-1'"),
    (["--threads", "-5"], 2, "argument --threads: input should be greater than or equal to 0, got '-5'"),
    (["--steps", "2.5"], 2, "argument --steps: input should be a valid integer"),
    (["--prompt", os.fsdecode(b"caf\xe9")], 1, "prompt: is not valid UTF-8 text (byte 0xe9 at character 3)"),
    (["--out", "{tmp}/x.avi"], 1, "--out {tmp}/x.avi: expected a path ending in .mp4"),
    (["--out", "{tmp}/x"], 1, "--out {tmp}/x: expected a path ending in .mp4"),
    (["--out", "{tmp}/dir.mp4"], 1, "--out {tmp}/dir.mp4 is a directory"),
    (["--out", "/proc/walt/x.mp4"], 1, "--out /proc/walt/x.mp4: cannot write into /proc"),
    (["--png-dir", "/proc/walt"], 1, "--png-dir /proc/walt: cannot write into /proc"),
    (["--png-dir", "{tmp}/file"], 1, "--png-dir {tmp}/file exists and is not a directory"),
    (["--steps", "5000"], 1, "steps=5000 for base is not in [1, 1000]"),
    (["--image", "{tmp}/broken.jpg"], 1, "cannot read an image from {tmp}/broken.jpg"),
    pytest.param(["--device", "cuda"], 1, "--device cuda needs onnxruntime's CUDAExecutionProvider, which this "
                 "onnxruntime lacks", marks=pytest.mark.skipif(
                     "CUDAExecutionProvider" in onnxruntime.get_available_providers(), reason="onnxruntime-gpu")),
])
def test_generate_refuses_bad_input_in_one_line_leaving_nothing(micro_artifacts, tmp_path, extra, code, says):
    directory, _ = micro_artifacts
    (tmp_path / "dir.mp4").mkdir()
    (tmp_path / "file").write_text("")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 30)
    args = {"--prompt": "a cat", "--out": str(tmp_path / "cat.mp4")}
    flags = [a.format(tmp=tmp_path) for a in extra]
    args |= dict(zip(flags[::2], flags[1::2], strict=True))
    before = _files(tmp_path)
    result = run("generate", "--artifacts", str(directory), *[x for kv in args.items() for x in kv], text=True)
    stderr = result.stderr.strip()
    assert result.returncode == code and says.format(tmp=tmp_path) in stderr, stderr
    assert "Traceback" not in stderr and says.format(tmp=tmp_path) in stderr.splitlines()[-1], stderr
    assert code == 2 or len(stderr.splitlines()) == 1, stderr  # argparse: the usage, then its error line
    assert _files(tmp_path) == before


def test_render_refuses_an_out_dir_it_cannot_use(micro_artifacts, tmp_path):
    directory, _ = micro_artifacts
    (tmp_path / "jobs.jsonl").write_text('{"prompt": "x", "output": "x.mp4"}\n')
    (tmp_path / "file").write_text("")
    for out, says in [(tmp_path / "file", "--out-dir {o} exists and is not a directory"),
                      (Path("/proc/walt"), "--out-dir {o}: cannot write into /proc")]:
        result = run("render", "--artifacts", str(directory), "--jobs", str(tmp_path / "jobs.jsonl"), "--out-dir",
                     str(out), text=True)
        assert result.returncode == 1 and says.format(o=out) in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_ctrl_c_exits_130_in_one_line_leaving_no_partial_file(micro_artifacts, tmp_path, sigint_children):
    directory, _ = micro_artifacts
    out = tmp_path / "videos"
    process = subprocess.Popen(_command("generate", "--artifacts", str(directory), "--prompt", "x", "--steps", "400",
                                        "--out", str(out / "x.mp4"), "--progress", "on"),
                               cwd=ROOT, stderr=subprocess.PIPE, text=True)
    seen = ""
    while "step/s]" not in seen:  # the first denoiser's progress bar: the models are running
        char = process.stderr.read(1)
        assert char, seen
        seen += char
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    stderr = process.stderr.read()
    assert process.wait(timeout=60) == 130
    assert stderr.strip().splitlines()[-1].endswith("python -m runtime: interrupted") and "Traceback" not in stderr
    assert not out.exists() or _files(out) == []


def test_version_of_both_commands():
    for command in (["walt-export", "--version"], ["--version"]):
        result = run(*command, text=True)
        assert result.returncode == 0 and result.stdout.split()[-1][0].isdigit(), result


def _actions(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _actions(sub)
        elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            yield parser.prog, action


def test_every_flag_has_help():
    from runtime.cli import _parser as runtime_parser
    from walt_export.cli import _parser as export_parser

    missing = [f"{prog} {'/'.join(a.option_strings)}" for parser in (runtime_parser(), export_parser())
               for prog, a in _actions(parser) if a.option_strings and not a.help]
    assert missing == []
