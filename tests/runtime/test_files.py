"""Safe outputs: output locations checked up front, live temporaries never removed, locks freed by a killed process."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from runtime.files import (
    BusyError,
    OutputError,
    artifact_lock,
    atomic_output,
    check_output,
    exclusive,
    remove_staging,
    remove_stale,
    staging_directory,
)

ROOT = Path(__file__).resolve().parents[2]


def _holder(code: str) -> subprocess.Popen:
    """A Python process that runs `code`, prints 'ready' and then sleeps until it is killed."""
    script = (f"import sys, time\nsys.path.insert(0, {str(ROOT)!r})\n{textwrap.dedent(code)}\n"
              "print('ready', flush=True)\ntime.sleep(600)\n")
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "ready"
    return process


def test_a_live_temporary_is_kept_and_a_dead_ones_removed(tmp_path):
    target = tmp_path / "video.mp4"
    writer = _holder(f"""
        from runtime.files import atomic_output
        context = atomic_output({str(target)!r})
        tmp = context.__enter__()
        tmp.write_bytes(b"half a video")
    """)
    try:
        live = list(tmp_path.glob(".video.*.tmp.mp4"))
        assert len(live) == 1
        assert remove_stale(target) == [] and live[0].exists()  # its writer is alive
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    assert remove_stale(target) == live and not live[0].exists()  # the kernel dropped the dead writer's flock
    (tmp_path / ".other.abc.tmp.mp4").write_bytes(b"")  # another target's: not ours to touch
    assert remove_stale(target) == [] and (tmp_path / ".other.abc.tmp.mp4").exists()


def test_atomic_output_leaves_nothing_on_failure_or_interrupt(tmp_path):
    for error in (RuntimeError, KeyboardInterrupt):
        with pytest.raises(error), atomic_output(tmp_path / "x.mp4") as tmp:
            tmp.write_bytes(b"partial")
            raise error()
    assert list(tmp_path.iterdir()) == []


def test_a_lock_held_by_a_killed_process_is_free_at_once(tmp_path):
    holder = _holder(f"""
        from runtime.files import artifact_lock
        held = artifact_lock({str(tmp_path / "art")!r})
        held.__enter__()
    """)
    try:
        with pytest.raises(BusyError, match=r"another walt-export command is writing .*art \(it holds .*\.art\.lock\)"):
            with artifact_lock(tmp_path / "art"):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with artifact_lock(tmp_path / "art"):  # no waiting, no manual cleanup
        pass


def test_a_lock_waits_up_to_its_timeout(tmp_path):
    holder = _holder(f"""
        from runtime.files import try_lock
        lock = try_lock({str(tmp_path / "x.lock")!r})
    """)
    try:
        start = time.monotonic()
        with pytest.raises(BusyError, match="busy"), exclusive(tmp_path / "x.lock", "busy", timeout=0.5):
            pass
        assert time.monotonic() - start >= 0.5
    finally:
        holder.kill()
        holder.wait()


def test_staging_left_by_a_killed_run_is_removed(tmp_path):
    target = tmp_path / "art"
    stale = staging_directory(target)
    (stale / "base.onnx").write_bytes(b"x" * 100)
    old = tmp_path / ".art.abcd.old"
    old.mkdir()
    keep = tmp_path / ".artwork.abcd.tmp"
    keep.mkdir()
    assert sorted(remove_staging(target)) == sorted([stale, old])
    assert sorted(p.name for p in tmp_path.iterdir()) == [".artwork.abcd.tmp"]


@pytest.mark.parametrize("make, path, kind, suffix, says", [
    (None, "x.avi", "file", ".mp4", "--out {p}: expected a path ending in .mp4"),
    (None, "noext", "file", ".mp4", "expected a path ending in .mp4"),
    ("dir", "d.mp4", "file", ".mp4", "--out {p} is a directory"),
    ("file", "f", "directory", None, "--out {p} exists and is not a directory"),
    ("file", "f/x.mp4", "file", ".mp4", "cannot write into {t}/f, it is not a directory"),
    (None, "/proc/walt/x.mp4", "file", ".mp4", "cannot write into /proc"),
    (None, "/proc/walt", "directory", None, "cannot write into /proc"),
])
def test_output_locations_are_checked_naming_the_argument(tmp_path, make, path, kind, suffix, says):
    p = tmp_path / path
    if make == "dir":
        p.mkdir()
    elif make == "file":
        (tmp_path / path.split("/")[0]).write_text("")
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(OutputError) as info:
        check_output(p, "--out", kind, suffix)
    assert says.format(p=p, t=tmp_path) in str(info.value), str(info.value)
    assert sorted(tmp_path.rglob("*")) == before  # the check leaves nothing


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories (the /proc cases cover it)")
def test_a_read_only_directory_is_refused(tmp_path):
    (tmp_path / "ro").mkdir(mode=0o500)
    with pytest.raises(OutputError, match="Permission denied"):
        check_output(tmp_path / "ro" / "x.mp4", "--out")


def test_new_directories_are_fine(tmp_path):
    assert check_output(tmp_path / "a" / "b" / "x.mp4", "--out", suffix=".mp4") == tmp_path / "a" / "b" / "x.mp4"
    assert not (tmp_path / "a").exists()  # checked, not created
