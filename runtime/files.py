"""Writing outputs safely, and several processes writing into one place (docs/architecture.md §10).

- `atomic_output`: a file is written under a temporary name beside its target (`.NAME.XXXX.tmpSUFFIX`) and renamed
  when complete, so no partial file ever has the final name. While it is written the process holds an exclusive
  `flock` on it, which the kernel drops when the process dies: `remove_stale`, run before each write of a target,
  removes only the temporaries whose writer is gone, never a live one.
- `exclusive`: a lock file (the `filelock` library, `flock` underneath) that one process holds at a time; a lock
  held by a killed process is free again at once. Commands that write into an artifact hold `artifact_lock`;
  `render` holds one lock per job.
- `check_output`: an output location is checked before any model runs, so a bad `--out` fails in one line at once
  instead of in a traceback after the whole generation.
"""

from __future__ import annotations

import fcntl
import glob
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from runtime.errors import WaltExportError

log = logging.getLogger(__name__)


class OutputError(WaltExportError, OSError):
    """An output location that cannot be written; the message names the argument and what to pass instead."""


class BusyError(WaltExportError, RuntimeError):
    """Another process holds the lock of what this one would write; the message names it."""


def usual_mode(directory: bool = False) -> int:
    """0o666 (files) or 0o777 (directories) less the process umask: what `open()` or `mkdir` would give."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def _temporary(target: Path) -> tuple[int, Path]:
    """A new temporary file beside `target`, flocked through the returned descriptor."""
    while True:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=f".tmp{target.suffix}", dir=target.parent)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:  # `remove_stale` may have removed it between mkstemp and flock: then make another
            if os.stat(tmp).st_ino == os.fstat(fd).st_ino:
                return fd, Path(tmp)
        except FileNotFoundError:
            pass
        os.close(fd)


@contextmanager
def atomic_output(target: str | Path) -> Iterator[Path]:
    """A temporary path beside `target` (ending in its suffix, so encoders pick the format), renamed onto it when
    the block succeeds and removed when it fails; a killed process leaves only the temporary `.NAME.*.tmpSUFFIX`,
    which the next write of `target` removes (`remove_stale`)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target)
    fd, tmp = _temporary(target)
    try:
        yield tmp
        os.chmod(tmp, usual_mode())  # mkstemp creates it private
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)  # drops the flock


def remove_stale(target: str | Path) -> list[Path]:
    """Remove the temporaries of `target` (`.STEM.*.tmpSUFFIX` beside it) that killed writers left; a temporary
    whose writer is alive (it holds the flock) is kept. Returns the removed paths."""
    target = Path(target)
    pattern = f".{glob.escape(target.stem)}.*.tmp{glob.escape(target.suffix)}"
    removed = []
    for path in target.parent.glob(pattern) if target.parent.is_dir() else ():
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:  # its writer renamed it meanwhile
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a live writer
            os.close(fd)
            continue
        try:
            path.unlink(missing_ok=True)
            removed.append(path)
            log.info("removed %s, left by an interrupted run", path)
        finally:
            os.close(fd)
    return removed


def staging_directory(target: Path) -> Path:
    """A new private directory `.NAME.XXXX.tmp` beside `target`, to build a whole directory in before
    `replace_directory`. Only the holder of the lock of what `target` belongs to may create one, so
    `remove_staging` can take every one it finds for a killed run's."""
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))


def remove_staging(target: Path) -> list[Path]:
    """Remove the staging (`.NAME.*.tmp`) and swapped-out (`.NAME.*.old`) directories killed runs left beside
    `target`. Call it only while holding the lock that `staging_directory`'s users hold."""
    removed = []
    name = glob.escape(target.name)
    for pattern in (f".{name}.*.tmp", f".{name}.*.old"):
        for path in target.parent.glob(pattern) if target.parent.is_dir() else ():
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
                log.info("removed %s, left by an interrupted run", path)
    return removed


def replace_directory(staged: Path, target: Path) -> None:
    """Give a directory staged beside `target` the usual modes (mkdtemp makes it private) and rename it onto
    `target`, replacing an existing one as a whole: the old one is moved aside first, then removed."""
    for path in [staged, *staged.rglob("*")]:
        os.chmod(path, usual_mode(path.is_dir()))
    if not target.exists():
        os.replace(staged, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    os.replace(target, old / target.name)
    os.replace(staged, target)
    shutil.rmtree(old)


# ------------------------------------------------------------------------------------------------------ locks
@contextmanager
def exclusive(lock_file: str | Path, busy: str, timeout: float = 0) -> Iterator[None]:
    """Hold the lock file `lock_file` for the block, or raise BusyError(`busy`) when another process holds it for
    longer than `timeout` seconds (0: do not wait). The kernel releases the lock of a killed process, so a crash
    never wedges it; the (empty) lock file stays.
    """
    lock = try_lock(lock_file, timeout)
    if lock is None:
        raise BusyError(busy)
    try:
        yield
    finally:
        lock.release()


def try_lock(lock_file: str | Path, timeout: float = 0):
    """The acquired `filelock.FileLock` of `lock_file`, or None when another process holds it for longer than
    `timeout` seconds (0: do not wait)."""
    from filelock import FileLock, Timeout

    lock_file = Path(lock_file)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    # no soft fallback: a soft lock (a marker file) would outlive a killed process
    lock = FileLock(lock_file, timeout=timeout, fallback_to_soft=False, thread_local=False)
    try:
        lock.acquire()
    except Timeout:
        return None
    return lock


def artifact_lock_file(directory: str | Path) -> Path:
    """`.NAME.lock` beside the artifact directory NAME (beside it, because `walt-export onnx` replaces the directory
    as a whole)."""
    directory = Path(directory).absolute()
    return directory.parent / f".{directory.name}.lock"


@contextmanager
def artifact_lock(directory: str | Path) -> Iterator[None]:
    """Held by every command that writes into an artifact directory (`walt-export onnx`, `verify`, `calibrate`,
    `engines`): one at a time per artifact. Raises BusyError when another holds it."""
    lock_file = artifact_lock_file(directory)
    with exclusive(lock_file, f"another walt-export command is writing {directory} (it holds {lock_file}); "
                              "wait for it to finish"):
        yield


# ------------------------------------------------------------------------------------------------ output checks
def check_output(path: str | Path, argument: str, kind: Literal["file", "directory"] = "file",
                 suffix: str | None = None) -> Path:
    """`path` after checking that this process can write it, before any expensive work.

    A file must not be an existing directory (nor a directory an existing file), and must end in `suffix` if one is
    given; the nearest existing parent must be a directory this process can create files in (tried, not guessed
    from the mode bits: root, read-only mounts). Nothing is left behind by the check.

    Raises OutputError naming `argument` (e.g. "--out") and what was wrong.
    """
    path = Path(path)
    if suffix is not None and path.suffix.lower() != suffix:
        raise OutputError(f"{argument} {path}: expected a path ending in {suffix}")
    if kind == "file" and path.is_dir():
        raise OutputError(f"{argument} {path} is a directory; pass the path of the {suffix or ''} file to write")
    if path.exists() and kind == "directory" and not path.is_dir():
        raise OutputError(f"{argument} {path} exists and is not a directory; pass a directory")
    if path.exists() and kind == "file" and not path.is_file():
        raise OutputError(f"{argument} {path} exists and is not a regular file")
    start = path if kind == "directory" else path.parent
    existing = next((p for p in [start, *start.parents] if p.exists() or p.is_symlink()), Path("."))
    if not existing.is_dir():
        raise OutputError(f"{argument} {path}: cannot write into {existing}, it is not a directory")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise OutputError(f"{argument} {path}: cannot write into {existing} ({e.strerror}); "
                          "pass a path in a writable directory") from None
    return path
