"""TensorRT plans of an artifact: what a plan is tied to, the `build.json` registry, and finding a plan to run.

    ARTIFACT/engines/<gpu>-sm<cc>-trt<version>/<stage>.<precision>.plan   (+ build.json beside the plans)

`walt-export engines` writes the plans and the registry; the runtime reads them. Both go through this module, which
lives in `runtime/` because the runtime is the consumer of plans (and `runtime` never imports `walt_export`).
A plan runs only with the TensorRT build and the GPU it was built for: `check_plan` refuses any other and names
the command that rebuilds it. TensorRT is passed in as a module (`import_tensorrt`), never imported at import time.
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from runtime.files import atomic_output
from runtime.manifest import ArtifactError, sha256_of

log = logging.getLogger(__name__)

TENSORRT_MODULES = ("tensorrt", "tensorrt_rtx")  # in order of preference
ENGINES = "engines"  # the artifact's subdirectory of per-target engine directories
PRECISIONS = ("fp16", "int8")  # what `walt-export engines --precision` builds
BUILD_JSON = "build.json"


def import_tensorrt(name: str | None = None) -> ModuleType:
    """`tensorrt`, else `tensorrt_rtx` (or the one named); ImportError saying how to install one."""
    for module in (name,) if name else TENSORRT_MODULES:
        try:
            return importlib.import_module(module)
        except ImportError:
            continue
    raise ImportError(f"no TensorRT found (tried {', '.join((name,) if name else TENSORRT_MODULES)}): install "
                      "TensorRT on a GPU machine, or `pip install tensorrt-rtx` to build engines on a CPU")


@dataclass(frozen=True)
class Target:
    """What a plan is tied to: the TensorRT build and the device."""

    tensorrt: str  # module name: tensorrt or tensorrt_rtx
    version: str
    device: str  # GPU name, or "cpu-aot" for TensorRT-RTX builds without a GPU
    compute_capability: str | None  # "9.0"; None for ahead-of-time builds

    @property
    def directory_name(self) -> str:
        device = re.sub(r"[^a-z0-9]+", "-", self.device.lower()).strip("-")
        sm = f"-sm{self.compute_capability.replace('.', '')}" if self.compute_capability else ""
        flavour = "trtrtx" if self.tensorrt == "tensorrt_rtx" else "trt"
        return f"{device}{sm}-{flavour}{self.version}"


@functools.cache  # one nvidia-smi run per process, not one per stage
def detect_target(trt: ModuleType) -> Target:
    """The first GPU from nvidia-smi; without one only TensorRT-RTX can build (ahead of time, for RTX GPUs)."""
    gpu = None
    if shutil.which("nvidia-smi"):
        query = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                               capture_output=True, text=True, check=False)
        if query.returncode == 0 and query.stdout.strip():
            gpu = [part.strip() for part in query.stdout.splitlines()[0].split(",")]
    if gpu is not None:
        return Target(trt.__name__, trt.__version__, gpu[0], gpu[1])
    if trt.__name__ == "tensorrt_rtx":
        return Target(trt.__name__, trt.__version__, "cpu-aot", None)
    raise ArtifactError("no GPU found (nvidia-smi): full TensorRT builds engines on the GPU that will run them")


def find_plan(artifact_dir: str | Path, stage_name: str, precision: str, trt: ModuleType) -> Path:
    """`ARTIFACT/engines/<this machine's target>/<stage>.<precision>.plan`, checked by `check_plan`.

    Raises ArtifactError naming the `walt-export engines` command that builds the plan when it is missing, and
    which targets the artifact has engines for when they are another machine's; ValueError for a precision that
    `walt-export engines` does not build.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"TensorRT plans are {' or '.join(PRECISIONS)} (`walt-export engines --precision`), "
                         f"not {precision!r}")
    artifact_dir = Path(artifact_dir)
    target = detect_target(trt)
    engines = artifact_dir / ENGINES
    out = engines / target.directory_name
    plan = out / f"{stage_name}.{precision}.plan"
    build = f"`walt-export engines --artifacts {artifact_dir} --precision {precision}`"
    if not out.is_dir():
        others = sorted(p.name for p in engines.iterdir() if p.is_dir()) if engines.is_dir() else []
        where = f"engines exist only for {', '.join(others)}" if others else "it has no engines"
        raise ArtifactError(f"{artifact_dir} has no engines for this machine ({target.directory_name}; {where}); "
                            f"build them here with {build}")
    if not plan.is_file():
        have = sorted(p.name for p in out.glob("*.plan"))
        raise ArtifactError(f"no {plan.name} in {out} (it has: {', '.join(have) or 'no plans'}); build it with "
                            f"{build}")
    check_plan(plan, trt, target)
    return plan


def check_plan(plan: str | Path, trt: ModuleType, target: Target | None = None) -> dict:
    """The registry entry of a plan, after checking that it was built for this TensorRT and device."""
    plan = Path(plan)
    entry = next((e for e in read_registry(plan.parent).values() if e.get("plan") == plan.name), None)
    if entry is None or not plan.is_file():
        raise ArtifactError(f"{plan} is not a registered engine; build it with `walt-export engines --artifacts DIR`")
    target = target or detect_target(trt)
    built_for = Target(entry["tensorrt"], entry["version"], entry["device"], entry["compute_capability"])
    if built_for != target:
        raise ArtifactError(f"{plan.name} was built for {built_for.directory_name}, this machine is "
                            f"{target.directory_name}; rebuild with `walt-export engines --artifacts DIR "
                            f"--precision {entry['precision']}`")
    if sha256_of(plan) != entry["plan_sha256"]:
        raise ArtifactError(f"{plan} does not match its build.json (modified or truncated); rebuild it with "
                            f"`walt-export engines --artifacts DIR --precision {entry['precision']}`")
    return entry


def read_registry(out: Path) -> dict:
    """stage -> registry entry of an engine directory's build.json; {} when it is absent or unreadable."""
    path = out / BUILD_JSON
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())["engines"]
    except (json.JSONDecodeError, KeyError, TypeError):
        log.warning("%s is unreadable: every engine will be rebuilt", path)
        return {}


def write_registry(out: Path, engines: dict) -> None:
    """Write an engine directory's build.json (atomically)."""
    with atomic_output(out / BUILD_JSON) as tmp:
        tmp.write_text(json.dumps({"engines": engines}, indent=2) + "\n")
