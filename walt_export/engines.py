"""`walt-export engines`: one TensorRT engine per stage in `DIR/engines/<gpu>-sm<cc>-trt<version>/`, with a registry.

`build.json` in that directory records, per stage, what its plan was built from: the source ONNX file and its
sha256, precision, attention path, profile, TensorRT module and version, device and compute capability, plan
sha256 and build time. A plan is reused only when all of these match the request; otherwise it is rebuilt and a
log line says why. The target naming, the registry file and `check_plan` (which refuses a plan built for another
device or TensorRT version) live in `runtime.engine_registry`, shared with the runtime that runs the plans.

Precision: TensorRT 11 and TensorRT-RTX are strongly typed, so FP16 comes from the artifact's FP16 ONNX files;
TensorRT 10.x builds the FP32 files with its FP16 builder flag. INT8 comes from the Q/DQ files that
`walt-export calibrate` adds to the artifact.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from types import ModuleType

from runtime.engine_registry import ENGINES, detect_target, import_tensorrt, read_registry, write_registry
from runtime.files import atomic_output
from runtime.manifest import ArtifactError, StageInfo, check_file, read_manifest, sha256_of
from walt_export.tensorrt_build import build_engine
from walt_export.window_attention import PLUGIN_VERSION

log = logging.getLogger(__name__)

ATTENTION = ("fallback", "plugin")  # which denoiser variant is compiled: inlined body, or the wattn plugin


def source_file(stage: StageInfo, precision: str, attention: str, weakly_typed: bool):
    """The ONNX file an engine of `precision` is built from, and whether the FP16 builder flag is needed.

    INT8 engines are built from the Q/DQ files of `walt-export calibrate`; on TensorRT 10.x with the FP16 flag
    too, so the layers left unquantized run in FP16. A stage without Q/DQ files (the text encoder) gets its FP16
    engine instead.
    """
    has_wattn = any(f.window_attention_nodes for f in stage.files)
    variant = attention if has_wattn else "canonical"
    if precision == "int8":
        if "int8" in stage.precisions:
            return stage.file("int8", variant), weakly_typed
        log.info("%s has no INT8 files: its engine is FP16", stage.module)
        precision = "fp16"
    if precision == "fp16" and weakly_typed:  # TensorRT 10.x: FP32 ONNX + the FP16 flag
        return stage.file("fp32", variant), True
    return stage.file(precision, variant), False


def build_engines(directory: str | Path, precision: str = "fp16", attention: str = "fallback",
                  workspace_gb: float | None = None, timing_cache: str | Path | None = None,
                  trt: ModuleType | None = None) -> tuple[Path, list[dict]]:
    """Build (or reuse) one engine per stage; returns the engine directory and one decision per stage."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    trt = trt or import_tensorrt()
    if attention not in ATTENTION:
        raise ValueError(f"attention must be one of {ATTENTION}, got {attention!r}")
    if attention == "plugin":
        if trt.__name__ == "tensorrt_rtx":
            raise ArtifactError("TensorRT-RTX has no plugins: build --attention fallback, or use full TensorRT with "
                                "the wattn plugin registered")
        from walt_export.window_attention_plugin import register_plugin

        register_plugin()  # the parser maps the plugin variant's wattn nodes to it
    if precision == "int8" and "int8" not in manifest.precisions:
        raise ArtifactError(f"{directory} has no INT8 Q/DQ files; calibrate it first with `walt-export calibrate "
                            f"--artifacts {directory}`, or build --precision fp16")
    target = detect_target(trt)
    out = directory / ENGINES / target.directory_name
    out.mkdir(parents=True, exist_ok=True)
    registry = read_registry(out)
    weakly_typed = hasattr(trt.BuilderFlag, "FP16")
    decisions = []
    for name, stage in manifest.stages.items():
        model, fp16_flag = source_file(stage, precision, attention, weakly_typed)
        check_file(directory, model)
        wanted = {"source_file": model.file, "source_sha256": model.sha256, "precision": precision,
                  "attention": attention if model.window_attention_nodes or model.variant == "fallback" else None,
                  "profile": {k: list(v) for k, v in stage.profile.items()}, "plugin_version": PLUGIN_VERSION,
                  **asdict(target)}
        plan = out / f"{name}.{precision}.plan"
        reason = _rebuild_reason(registry.get(name), wanted, plan)
        if reason is None:
            log.info("%s: reusing %s", name, plan.name)
            decisions.append({"stage": name, "decision": "reused", "plan": str(plan)})
            continue
        log.info("%s: building %s (%s)", name, plan.name, reason)
        start = time.perf_counter()
        serialized = build_engine(directory / model.file, stage, trt, _workspace(workspace_gb), fp16_flag,
                                  timing_cache)
        with atomic_output(plan) as tmp:
            tmp.write_bytes(serialized)
        registry[name] = wanted | {"plan": plan.name, "plan_sha256": sha256_of(plan),
                                   "build_seconds": round(time.perf_counter() - start, 3)}
        write_registry(out, registry)
        decisions.append({"stage": name, "decision": "built", "reason": reason, "plan": str(plan)})
    return out, decisions


def _rebuild_reason(entry: dict | None, wanted: dict, plan: Path) -> str | None:
    if entry is None:
        return "no engine yet"
    if not plan.is_file() or sha256_of(plan) != entry.get("plan_sha256"):
        return "the plan file is missing or modified"
    changed = [key for key, value in wanted.items() if entry.get(key) != value]
    return f"{', '.join(changed)} changed" if changed else None


def _workspace(gb: float | None) -> int | None:
    return None if gb is None else int(gb * 2**30)
