"""`walt-export engines`: one TensorRT engine per stage in `DIR/engines/<gpu>-sm<cc>-trt<version>/`, with a registry.

Two layers. `build_engine` parses one ONNX file with TensorRT's ONNX parser and builds a serialized engine for the
stage's profile, through Polygraphy's loaders (NetworkFromOnnxPath -> CreateConfig -> EngineBytesFromNetwork), which
handle full TensorRT (`tensorrt`, GPU machines) and TensorRT-RTX (`tensorrt_rtx`, which also builds ahead of time on
a CPU, without plugins) alike. `build_engines` builds every stage of an artifact and keeps the registry
(`runtime.engine_registry`, shared with the runtime that runs the plans): a plan is reused only while its source
file, precision, attention path, profile, plugin version and target are unchanged; otherwise it is rebuilt and a log
line says why.

Precision (docs/architecture.md §5, docs/tensorrt.md §5, §7): each stage's plan has the precision its policy gives
the requested one, so the text encoder gets an FP32 plan for `--precision fp16` and `int8` alike. TensorRT 11 and
TensorRT-RTX are strongly typed, so FP16 comes from the artifact's FP16 ONNX files; an artifact exported without
`--fp16` (`make demo`'s) gets them first, derived from its FP32 files exactly as `walt-export onnx --fp16` writes
them, and listed in its manifest. TensorRT 10.x builds the FP32 files with its FP16 builder flag. INT8 comes from the
Q/DQ files of `walt-export calibrate` (with the FP16 flag on TensorRT 10.x, so the layers left unquantized run in
FP16).

`build_engines` holds the artifact's lock (`runtime.files.artifact_lock`) for its whole run, removes what killed runs
left (temporaries of its plans, build.json and the manifest, FP16 staging directories), and creates
`engines/<target>/` only when it writes the first plan, so a run that fails before leaves nothing new.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import onnx

from runtime.engine_registry import (
    ATTENTION,
    BUILD_JSON,
    ENGINES,
    Attention,
    EngineEntry,
    EngineKey,
    EngineProfile,
    check_engine_precision,
    detect_target,
    import_tensorrt,
    plan_name,
    read_registry,
    resolve_attention,
    write_registry,
)
from runtime.errors import UsageError, WaltExportError, import_optional
from runtime.files import artifact_lock, atomic_output, remove_staging, remove_stale, staging_directory
from runtime.manifest import (
    MANIFEST,
    ArtifactError,
    Manifest,
    ModelFile,
    Precision,
    StageInfo,
    check_file,
    read_manifest,
    sha256_of,
    write_manifest,
)
from runtime.request import Count, Gigabytes, check_setting
from walt_export.onnx_fp16 import write_fp16_files
from walt_export.window_attention.onnx_contract import PLUGIN_VERSION

log = logging.getLogger(__name__)

FP16_STAGING = "fp16"  # FP16 files derived for an artifact are staged in `.fp16.XXXX.tmp` inside it

# ------------------------------------------------------------------------------------------------ one stage
class EngineBuildError(WaltExportError, RuntimeError):
    """The ONNX parser or the builder refused a model; the message carries TensorRT's own errors."""


def profile_shapes(stage: StageInfo, profile: EngineProfile = EngineProfile()
                   ) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """input name -> (min, opt, max) shapes, from the stage's dynamic-dim profile (`EngineProfile.dims`)."""
    bounds = profile.dims(stage)
    dims = [{name: dim[i] for name, dim in bounds.items()} for i in range(3)]
    return {t.name: tuple(t.concrete(d) for d in dims) for t in stage.inputs}  # type: ignore[misc]


@dataclass(frozen=True)
class BuiltEngine:
    """A serialized engine and the device memory its builder reported (None where it reported none)."""

    plan: bytes
    activation_bytes: int | None  # "Total Activation Memory": the execution context's, at the profile's largest
    weights_bytes: int | None  # "Total Weights Memory"


_REPORTED = {field: re.compile(rf"Total {what} Memory: (\d+) bytes")
             for field, what in (("activation_bytes", "Activation"), ("weights_bytes", "Weights"))}


def build_engine(onnx_path: str | Path, stage: StageInfo, trt: ModuleType | None = None,
                 workspace_bytes: int | None = None, fp16_flag: bool = False,
                 timing_cache: str | Path | None = None, profile: EngineProfile = EngineProfile()) -> BuiltEngine:
    """Parse `onnx_path` (external data beside it) and build a serialized engine for the stage's profile.

    Built with Polygraphy's loaders (NetworkFromOnnxPath -> CreateConfig -> EngineBytesFromNetwork), for
    TensorRT or TensorRT-RTX alike. The device memory the builder reports at the end of a build (its INFO lines
    "Total Activation Memory: N bytes" and "Total Weights Memory: N bytes", which TensorRT 10 and TensorRT-RTX 1.7
    print) is returned with the plan.

    Args:
        profile: the manifest's dynamic profile, or static at one batch (`EngineProfile`).
        fp16_flag: TensorRT 10.x only: a weakly typed network with the FP16 builder flag (FP32 ONNX in, FP16
            kernels allowed). Otherwise the network is strongly typed: the ONNX file's types are the engine's.
        timing_cache: a file read before the build (if it exists) and written back after it (full TensorRT).
    """
    trt = trt or import_tensorrt()
    loaders, logger = _polygraphy(trt)
    optimization_profile = loaders.Profile()
    for name, (low, opt, high) in profile_shapes(stage, profile).items():
        optimization_profile.add(name, low, opt, high)
    if timing_cache is not None and trt.__name__ == "tensorrt_rtx":
        log.warning("ignoring the timing cache %s: TensorRT-RTX has none (its timing-cache calls are no-ops)",
                    timing_cache)
        timing_cache = None
    strongly_typed = hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED") and not fp16_flag
    with _polygraphy_errors(logger, f"TensorRT could not build an engine from {Path(onnx_path).name}",
                            logger.VERBOSE) as output:  # VERBOSE: where Polygraphy puts TensorRT's INFO lines
        network = loaders.NetworkFromOnnxPath(str(onnx_path), strongly_typed=strongly_typed)
        config = loaders.CreateConfig(
            fp16=fp16_flag, profiles=[optimization_profile],
            memory_pool_limits=None if workspace_bytes is None else {trt.MemoryPoolType.WORKSPACE: workspace_bytes},
            load_timing_cache=str(timing_cache) if timing_cache and Path(timing_cache).is_file() else None,
        )
        if timing_cache is None:
            engine = loaders.EngineBytesFromNetwork(network, config)()
        else:
            with atomic_output(timing_cache) as tmp:
                engine = loaders.EngineBytesFromNetwork(network, config, save_timing_cache=str(tmp))()
    reported = {field: int(match[-1]) if (match := pattern.findall(output.getvalue())) else None
                for field, pattern in _REPORTED.items()}
    log.info("built an engine from %s: %d bytes (%s)", Path(onnx_path).name, engine.nbytes,
             ", ".join(f"{k} {v}" for k, v in reported.items()))
    return BuiltEngine(bytes(engine), **reported)


def network_layers(onnx_path: str | Path, trt: ModuleType | None = None) -> list[tuple[str, str]]:
    """(name, layer type) of every layer TensorRT's parser makes of a file (what the engine is built from;
    inspecting the built engine itself needs a GPU)."""
    loaders, logger = _polygraphy(trt or import_tensorrt())
    with _polygraphy_errors(logger, f"TensorRT cannot parse {Path(onnx_path).name}"):
        _, network, _ = loaders.NetworkFromOnnxPath(str(onnx_path))()
    return [(network.get_layer(i).name, str(network.get_layer(i).type).split(".")[-1]) for i in range(network.num_layers)]


@contextlib.contextmanager
def _polygraphy_errors(logger, failure: str, verbosity: int | None = None) -> Iterator[io.StringIO]:
    """Polygraphy's console output captured (TensorRT's messages pass through it) and yielded: on success it goes to
    the debug log; Polygraphy's failure (PolygraphyException) becomes an EngineBuildError carrying TensorRT's error
    lines. `verbosity`: Polygraphy's, default INFO when debugging, else WARNING."""
    from polygraphy.exception import PolygraphyException

    output = io.StringIO()
    if verbosity is None:
        verbosity = logger.INFO if log.isEnabledFor(logging.DEBUG) else logger.WARNING
    try:
        with logger.verbosity(verbosity), contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            yield output
    except PolygraphyException as e:
        errors = [line.strip() for line in output.getvalue().splitlines() if line.startswith(("[E]", "[!]"))]
        raise EngineBuildError(f"{failure}: {'; '.join(errors) or e}") from None
    finally:
        if output.getvalue().strip():
            log.debug("polygraphy: %s", output.getvalue().strip())


def _polygraphy(trt: ModuleType):
    """Polygraphy's TensorRT loaders bound to `trt` (it picks TensorRT-RTX by a flag read when its TensorRT
    backend is first imported), and its logger."""
    settings = import_optional("polygraphy.config", "pip install 'walt-export[trt-rtx]' (or [tools])")
    from polygraphy.logger import G_LOGGER

    rtx = trt.__name__ == "tensorrt_rtx"
    if "polygraphy.backend.trt" in sys.modules and settings.USE_TENSORRT_RTX != rtx:
        raise UsageError(f"Polygraphy is already bound to {'TensorRT-RTX' if not rtx else 'TensorRT'} in this "
                         f"process; use one TensorRT per process")
    settings.USE_TENSORRT_RTX = rtx
    from polygraphy.backend import trt as loaders

    return loaders, G_LOGGER


# ------------------------------------------------------------------------------------------------ every stage
@dataclass(frozen=True)
class EngineDecision:
    """What `build_engines` did for one stage."""

    stage: str
    plan: Path
    reason: str | None  # why the plan was built; None when the registered one was reused
    entry: EngineEntry  # its registry entry

    @property
    def built(self) -> bool:
        return self.reason is not None


def source_file(stage: StageInfo, requested: Precision, attention: str, trt: ModuleType,
                weakly_typed: bool) -> tuple[Precision, ModelFile, bool, Attention | None]:
    """(the plan's precision, the ONNX file it is built from, whether the FP16 builder flag is needed, the attention
    variant of a denoiser or None).

    The plan's precision is the stage's policy applied to `requested`; `attention` (a choice of `--attention`) is
    resolved for it by `resolve_attention`. INT8 plans are built from the Q/DQ files of `walt-export calibrate`, on
    TensorRT 10.x (`weakly_typed`) with the FP16 flag too; FP16 plans on TensorRT 10.x from the FP32 files with the
    FP16 flag; everything else from the file of the plan's precision.
    """
    precision = stage.precision.resolve(requested)
    resolved = resolve_attention(attention, trt, precision) if stage.has_window_attention else None
    variant = resolved or "canonical"
    if precision == "int8":
        return precision, stage.file("int8", variant), weakly_typed, resolved
    if precision == "fp16" and weakly_typed:
        return precision, stage.file("fp32", variant), True, resolved
    return precision, stage.file(precision, variant), False, resolved


def build_engines(directory: str | Path, precision: Precision = "fp16", attention: str = "auto",
                  workspace_gb: float | None = None, timing_cache: str | Path | None = None,
                  trt: ModuleType | None = None, static_batch: int | None = None) -> tuple[Path, list[EngineDecision]]:
    """Build (or reuse) one engine per stage; returns the engine directory and one decision per stage.

    `static_batch` N builds static plans (min = opt = max at N videos per call: 2N rows for the denoisers and the
    text encoder, N for the tokenizer; `runtime.engine_registry.EngineProfile`) named
    `<stage>.<precision>.static-bN.plan`, beside the dynamic ones; the runtime runs them with `--static-batch N`.

    For FP16 engines with a strongly typed TensorRT (11, TensorRT-RTX), stages whose policy allows FP16 but that have
    no FP16 files (an artifact exported without `--fp16`) get them first (`add_fp16_files`).

    Args:
        workspace_gb: TensorRT's workspace limit in GiB (a finite number > 0); None: TensorRT's default.
    Raises UsageError for a precision, attention path or workspace it cannot build with (before anything else),
    ArtifactError when the artifact lacks what they need (INT8 files, a plugin-capable TensorRT), BusyError while
    another command writes into the artifact, EngineBuildError when TensorRT refuses a model.
    """
    directory = Path(directory)
    check_engine_precision(precision)
    if attention not in ATTENTION:
        raise UsageError(f"attention must be one of {', '.join(ATTENTION)}, got {attention!r}")
    workspace_bytes = _workspace(workspace_gb)
    if static_batch is not None:
        check_setting(Count, static_batch, "static_batch (--batch) is the number of videos per call")
    profile = EngineProfile(static_batch=static_batch)
    read_manifest(directory)  # an artifact directory, before its lock file is made beside it
    trt = trt or import_tensorrt()
    if attention == "plugin":
        if trt.__name__ == "tensorrt_rtx":
            raise ArtifactError("TensorRT-RTX has no plugins: build --attention fallback, or use full TensorRT with "
                                "the wattn plugin registered")
        from walt_export.window_attention.plugin import register_plugin

        register_plugin()  # the parser maps the plugin variant's wattn nodes to it
    target = detect_target(trt)
    out = directory / ENGINES / target.directory_name
    weakly_typed = hasattr(trt.BuilderFlag, "FP16")
    with artifact_lock(directory):
        manifest = read_manifest(directory)  # again, under the lock: another command may have changed it meanwhile
        if precision == "int8":
            manifest.require_files(precision, directory, f" to build {precision} engines from with {trt.__name__} "
                                                         f"{trt.__version__}")
        elif not weakly_typed:  # TensorRT 10.x alone makes FP16 engines of the FP32 files
            manifest = add_fp16_files(directory, manifest)
        remove_stale(out / BUILD_JSON)
        registry = read_registry(out)
        decisions = []
        for name, stage in manifest.stages.items():
            plan_precision, model, fp16_flag, variant = source_file(stage, precision, attention, trt, weakly_typed)
            check_file(directory, model)
            wanted = EngineKey(stage=name, precision=plan_precision, source_file=model.file,
                               source_sha256=model.sha256, attention=variant,
                               profile=profile.dims(stage), static_batch=static_batch,
                               plugin_version=PLUGIN_VERSION if stage.has_window_attention else None, target=target)
            plan = out / plan_name(name, plan_precision, profile)
            remove_stale(plan)
            reason = _rebuild_reason(registry.engines.get(plan.name), wanted, plan)
            if reason is None:
                log.info("%s: reusing %s", name, plan.name)
                decisions.append(EngineDecision(name, plan, None, registry.engines[plan.name]))
                continue
            log.info("%s: building %s (%s)", name, plan.name, reason)
            start = time.perf_counter()
            built = build_engine(directory / model.file, stage, trt, workspace_bytes, fp16_flag, timing_cache, profile)
            with atomic_output(plan) as tmp:  # makes engines/<target>/ with the first plan
                tmp.write_bytes(built.plan)
            entry = EngineEntry(**wanted.model_dump(), plan=plan.name, plan_sha256=sha256_of(plan),
                                build_seconds=round(time.perf_counter() - start, 3),
                                activation_bytes=built.activation_bytes, weights_bytes=built.weights_bytes)
            registry = registry.model_copy(update={"engines": {**registry.engines, plan.name: entry}})
            write_registry(out, registry)
            decisions.append(EngineDecision(name, plan, reason, entry))
    return out, decisions


def add_fp16_files(directory: Path, manifest: Manifest) -> Manifest:
    """The manifest after giving every stage whose policy allows FP16 but that has no FP16 files the ones
    `walt-export onnx --fp16` would have written (same names, same entries), derived from its FP32 files.

    The files are written into a staging directory inside the artifact, moved in when all are complete, and then
    listed in manifest.json (written atomically); a killed run leaves at most complete files the manifest does not
    list, which the next run replaces. Call it only while holding the artifact's lock.

    Raises ArtifactError when an FP32 file is missing or does not match its sha256.
    """
    staging = directory / FP16_STAGING
    remove_staging(staging)  # what killed runs left
    remove_stale(directory / MANIFEST)
    missing = [name for name, stage in manifest.stages.items()
               if "fp16" in stage.precision.allowed and "fp16" not in stage.precisions]
    if not missing:
        return manifest
    sources = {name: check_file(directory, manifest.stages[name].file("fp32")) for name in missing}
    staged = staging_directory(staging)
    derived, hashes = {}, {}
    try:
        for name, source in sources.items():
            canonical = onnx.load(str(source), load_external_data=False)
            derived[name] = write_fp16_files(name, canonical, directory, staged, hashes)
        for path in staged.iterdir():
            os.replace(path, directory / path.name)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    stages = {name: stage.model_copy(update={"files": (
        *[f for f in stage.files if f.precision == "fp32"], *derived.get(name, ()),
        *[f for f in stage.files if f.precision != "fp32"])}) for name, stage in manifest.stages.items()}
    manifest = manifest.model_copy(update={"stages": stages})
    write_manifest(directory, manifest)
    log.info("derived FP16 files from the FP32 files of %s (the artifact was exported without --fp16) and listed "
             "them in its manifest: %s", ", ".join(missing),
             ", ".join(f.file for files in derived.values() for f in files))
    return manifest


def _rebuild_reason(entry: EngineEntry | None, wanted: EngineKey, plan: Path) -> str | None:
    if entry is None:
        return "no engine yet"
    if not plan.is_file() or sha256_of(plan) != entry.plan_sha256:
        return "the plan file is missing or modified"
    changed = [key for key in EngineKey.model_fields if getattr(entry, key) != getattr(wanted, key)]
    return f"{', '.join(changed)} changed" if changed else None


def _workspace(gb: float | None) -> int | None:
    """TensorRT's workspace limit in bytes for `gb` GiB; UsageError unless it is None or a `Gigabytes` (finite, > 0)."""
    if gb is None:
        return None
    return int(check_setting(Gigabytes, gb, "workspace_gb (--workspace-gb) is TensorRT's workspace limit in GiB")
               * 2**30)
