"""Writing outputs safely: under a temporary name beside the target, renamed when complete, usual file modes."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def usual_mode(directory: bool = False) -> int:
    """0o666 (files) or 0o777 (directories) less the process umask: what `open()` or `mkdir` would give."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


@contextmanager
def atomic_output(target: str | Path) -> Iterator[Path]:
    """A temporary path beside `target` (ending in its suffix, so encoders pick the format), renamed onto it when
    the block succeeds and removed when it fails; a killed process leaves only the temporary `.NAME.*.tmpSUFFIX`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=f".tmp{target.suffix}", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, usual_mode())  # mkstemp creates it private
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
