"""TensorRT plans of an artifact: what a plan is tied to, the `build.json` registry, and finding a plan to run.

    ARTIFACT/engines/<gpu>-sm<cc>-trt<version>/<stage>.<precision>.plan   (+ build.json beside the plans)
    ARTIFACT/engines/<gpu>-sm<cc>-trt<version>/<stage>.<precision>.static-b<N>.plan   (--profile static --batch N)

`walt-export engines` writes the plans and the registry; the runtime reads them. Both go through this module, which
lives in `runtime/` because the runtime is the consumer of plans (and `runtime` never imports `walt_export`).
A plan's precision is its stage's precision policy applied to the requested one (`--precision fp16` gives
`base.fp16.plan` but `text_encoder.fp32.plan`, docs/architecture.md §5). A plan runs only with the TensorRT build
and the GPU it was built for: `check_plan` refuses any other and names the command that rebuilds it. TensorRT is
passed in as a module (`import_tensorrt`), never imported at import time.

Profiles (`EngineProfile`): dynamic plans take the manifest's batch range (1..8 rows); static ones are built with
min = opt = max at one batch of N videos (the rows each stage takes for them, `rows_per_video`: 2N for the
denoisers and the text encoder with classifier-free guidance, N for the tokenizer; other dynamic dims keep their
range), the setting TensorRT recommends where memory is tight, as TensorRT sizes activation memory for a profile's
largest shapes. Their file names differ and the registry keys on the profile, so the two never mix.
"""

from __future__ import annotations

import functools
import importlib
import re
import shutil
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Annotated, Literal, get_args

from pydantic import AfterValidator, BaseModel, ConfigDict

from runtime.documents import read_model
from runtime.errors import MissingDependencyError, UsageError
from runtime.files import atomic_output
from runtime.manifest import ArtifactError, Precision, RelativePath, StageInfo, artifact_path, rows_per_video, sha256_of

TENSORRT_MODULES = ("tensorrt", "tensorrt_rtx")  # in order of preference
ENGINES = "engines"  # the artifact's subdirectory of per-target engine directories
ENGINE_PRECISIONS = ("fp16", "int8")  # what `walt-export engines --precision` builds
Attention = Literal["attention", "fallback", "plugin"]  # the denoiser variant a plan is compiled from (manifest)
AttentionChoice = Literal["auto", "attention", "fallback", "plugin"]  # `walt-export engines --attention`
ATTENTION: tuple[str, ...] = get_args(AttentionChoice)
# The first versions whose ONNX parser maps the standard `Attention` operator (opset 23) to the fused attention layer:
# TensorRT 10.14 (release notes 10.14.1; docs/tensorrt.md), TensorRT-RTX 1.7 (the one run here).
ATTENTION_PARSERS = {"tensorrt": (10, 14), "tensorrt_rtx": (1, 7)}
BUILD_JSON = "build.json"
REGISTRY_FORMAT = "walt-export-engines"
REGISTRY_VERSION = 1


def import_tensorrt(name: str | None = None) -> ModuleType:
    """`tensorrt`, else `tensorrt_rtx` (or the one named); MissingDependencyError saying how to install one."""
    for module in (name,) if name else TENSORRT_MODULES:
        try:
            return importlib.import_module(module)
        except ImportError:
            continue
    tried = ", ".join((name,) if name else TENSORRT_MODULES)
    raise MissingDependencyError(f"no TensorRT found (tried {tried}): install TensorRT on a GPU machine, or "
                                 "`pip install 'walt-export[trt-rtx]'` to build engines on a CPU")


class _Schema(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _plan_file_name(value: str) -> str:
    """`value` when it is a bare file name (no separator, not '.' or '..'); else ValueError."""
    if value in ("", ".", "..") or any(c in value for c in "/\\\0"):
        raise ValueError("must be a file name in the engine directory, like 'base.fp16.plan' (no '/', no '..')")
    return value


PlanFileName = Annotated[str, AfterValidator(_plan_file_name)]


class Target(_Schema):
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


class EngineProfile(_Schema):
    """The profile plans are built for: the manifest's (dynamic) or static at `static_batch` videos per call."""

    static_batch: int | None = None  # videos per call of a static profile; None: dynamic

    @property
    def suffix(self) -> str:
        """What the profile adds to a plan's file name: '' (dynamic) or '.static-b4'."""
        return "" if self.static_batch is None else f".static-b{self.static_batch}"

    @property
    def flags(self) -> str:
        """The `walt-export engines` flags that build it."""
        return "" if self.static_batch is None else f" --profile static --batch {self.static_batch}"

    def dims(self, stage: StageInfo) -> dict[str, tuple[int, int, int]]:
        """The stage's dynamic dim -> (min, opt, max): the manifest's, with the batch fixed to the rows a batch of
        `static_batch` videos takes (with guidance) when static."""
        if self.static_batch is None:
            return dict(stage.profile)
        rows = rows_per_video(stage, guided=True) * self.static_batch
        return {**stage.profile, "batch": (rows, rows, rows)}


class EngineKey(_Schema):
    """Everything a plan depends on: a plan is reused only while all of it is unchanged."""

    stage: str
    precision: Precision  # of the plan: the stage's policy applied to the requested precision
    source_file: RelativePath  # the ONNX file it was built from, relative to the artifact
    source_sha256: str
    attention: Attention | None  # denoisers: the variant compiled; None for stages without window attention
    profile: dict[str, tuple[int, int, int]]  # dynamic dim -> (min, opt, max)
    static_batch: int | None = None  # EngineProfile.static_batch (None: dynamic)
    plugin_version: str | None  # the wattn plugin's version; None for stages without window attention
    target: Target


class EngineEntry(EngineKey):
    """One plan of an engine directory, as `build.json` records it."""

    plan: PlanFileName  # file name beside build.json
    plan_sha256: str
    build_seconds: float
    activation_bytes: int | None = None  # device memory of an execution context, as the builder reported it
    weights_bytes: int | None = None  # device memory of the weights, as the builder reported it


class Registry(_Schema):
    """`build.json`: every plan of one engine directory, keyed by plan file name."""

    format: Literal["walt-export-engines"] = REGISTRY_FORMAT
    format_version: Literal[1] = REGISTRY_VERSION
    engines: dict[PlanFileName, EngineEntry] = {}


def plan_name(stage: str, precision: Precision, profile: EngineProfile = EngineProfile()) -> str:
    """The file name of a stage's plan of one precision and profile: `<stage>.<precision>[.static-b<N>].plan`."""
    return f"{stage}.{precision}{profile.suffix}.plan"


def check_engine_precision(precision: str) -> None:
    """UsageError unless `precision` is one `walt-export engines --precision` builds."""
    if precision not in ENGINE_PRECISIONS:
        raise UsageError(f"TensorRT plans are built for {' or '.join(ENGINE_PRECISIONS)} (`walt-export engines "
                         f"--precision`), not {precision!r}")


def resolve_attention(choice: str, trt: ModuleType, precision: Precision) -> Attention:
    """The variant a denoiser's plan of `precision` is built from; `choice` other than 'auto' is taken as given.

    auto: 'attention' (one `Attention` node per window attention: TensorRT's fused attention layer) for FP16 plans
    where the parser supports it (ATTENTION_PARSERS), else 'fallback' (the inlined MatMul/Softmax body, e.g. JetPack
    6's TensorRT 10.3). FP32 and INT8 plans take the fallback: the fused layer is not decomposable by default, and
    TensorRT-RTX 1.7 has no dedicated FP32 kernel for these windows, so the build fails (measured on `micro`);
    INT8 with `Attention` is untested. The wattn plugin only when asked ('plugin')."""
    if choice != "auto":
        return choice  # type: ignore[return-value]
    first = ATTENTION_PARSERS.get(trt.__name__)
    version = tuple(int(part) for part in re.findall(r"\d+", trt.__version__)[:2])
    return "attention" if precision == "fp16" and first is not None and version >= first else "fallback"


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
        return Target(tensorrt=trt.__name__, version=trt.__version__, device=gpu[0], compute_capability=gpu[1])
    if trt.__name__ == "tensorrt_rtx":
        return Target(tensorrt=trt.__name__, version=trt.__version__, device="cpu-aot", compute_capability=None)
    raise ArtifactError("no GPU found (nvidia-smi): full TensorRT builds engines on the GPU that will run them")


def find_plan(artifact_dir: str | Path, stage: str, precision: Precision, trt: ModuleType,
              requested: Precision | None = None, profile: EngineProfile = EngineProfile()) -> Path:
    """`ARTIFACT/engines/<this machine's target>/<stage>.<precision>[.static-b<N>].plan`, checked by `check_plan`.

    Args:
        precision: the plan's precision (the stage's policy applied to the requested one).
        requested: the precision asked for, named in the command that builds missing plans (default `precision`).
        profile: which plans: dynamic, or static at one batch.
    Raises ArtifactError naming the `walt-export engines` command that builds the plan when it is missing, and
    which targets the artifact has engines for when they are another machine's; and when `stage` would put the
    plan outside the engine directory.
    """
    artifact_dir = Path(artifact_dir)
    target = detect_target(trt)
    engines = artifact_dir / ENGINES
    out = engines / target.directory_name
    plan = out / plan_name(stage, precision, profile)
    if plan.parent != out:
        raise ArtifactError(f"the stage name {stage!r} gives a plan path outside {out} ({plan}); the artifact is "
                            "refused: re-export it")
    build = f"`walt-export engines --artifacts {artifact_dir} --precision {requested or precision}{profile.flags}`"
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


def check_plan(plan: str | Path, trt: ModuleType, target: Target | None = None) -> EngineEntry:
    """The registry entry of a plan, after checking that it was built for this TensorRT and device.

    Raises ArtifactError naming the rebuild command when it is unregistered, another target's, or modified, and
    when it resolves outside its engine directory (a symlink).
    """
    plan = artifact_path(Path(plan).parent, Path(plan).name)
    rebuild = f"`walt-export engines --artifacts {plan.parent.parent.parent}"
    entry = read_registry(plan.parent).engines.get(plan.name)
    if entry is None or not plan.is_file():
        raise ArtifactError(f"{plan} is not a registered engine; build it with {rebuild}`")
    target = target or detect_target(trt)
    rebuild += f" --precision {entry.precision if entry.precision in ENGINE_PRECISIONS else 'fp16'}" \
               f"{EngineProfile(static_batch=entry.static_batch).flags}`"
    if entry.target != target:
        raise ArtifactError(f"{plan.name} was built for {entry.target.directory_name}, this machine is "
                            f"{target.directory_name}; rebuild with {rebuild}")
    if sha256_of(plan) != entry.plan_sha256:
        raise ArtifactError(f"{plan} does not match its build.json (modified or truncated); rebuild it with {rebuild}")
    return entry


def batch_profile(plans: dict[str, Path]) -> dict[str, tuple[int, int]]:
    """stage -> (min, max) batch rows of its plan (checked plans, `find_plan`), as their registry records it."""
    registries = {directory: read_registry(directory) for directory in {plan.parent for plan in plans.values()}}
    entries = {name: registries[plan.parent].engines[plan.name] for name, plan in plans.items()}
    return {name: (entry.profile["batch"][0], entry.profile["batch"][2]) for name, entry in entries.items()}


def read_registry(out: Path) -> Registry:
    """The `build.json` of an engine directory; an empty registry when there is none yet.

    Raises ArtifactError naming the file and the command that rebuilds it when it is unreadable, of another
    format version, or does not match the schema.
    """
    path = out / BUILD_JSON
    if not path.is_file():
        return Registry()
    redo = (f"delete it and rebuild the engines with `walt-export engines --artifacts {out.parent.parent} "
            "--precision fp16|int8`")
    return read_model(path, Registry, REGISTRY_FORMAT, REGISTRY_VERSION, ArtifactError, redo)


def write_registry(out: Path, registry: Registry) -> None:
    """Write an engine directory's build.json (atomically)."""
    with atomic_output(out / BUILD_JSON) as tmp:
        tmp.write_text(registry.model_dump_json(indent=2) + "\n")
