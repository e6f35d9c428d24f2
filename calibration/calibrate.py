"""`walt-export calibrate`: INT8 Q/DQ files for every stage of an artifact, with the figures that prove them.

1. Capture (seeded): the FP32 cascade runs `samples` calibration requests and `held_out` others; each stage's
   feeds are recorded (`capture`), the tokenizer encoder gets real video.
2. Quantize each stage's canonical FP32 model (`quantize`); check the Q/DQ structure; write the plugin,
   fallback and attention variants of the quantized canonical beside it.
3. Measure on the held-out data only: per stage INT8 vs FP32 on the same feeds, and end to end the INT8 cascade's
   video against the FP32 video of the same seed (`report`).
4. Write `DIR/int8/` (models, onnxruntime's calibration caches = the activation ranges, `report.json`) as a whole,
   and add the INT8 files to the manifest only when every gate passed; when one is missed, the files and the
   report stay for inspection but the runtime cannot pick them up.

The settings are checked before anything runs (`CalibrationSettings`, and the timesteps against the artifact's
schedule). The run holds the artifact's lock (`runtime.files.artifact_lock`) throughout, builds `int8/` in a staging
directory beside it, and first removes what killed runs left (staging directories, manifest temporaries).

Which stages are quantized is the manifest's precision policy: those that allow INT8 (every stage but the text
encoder, whose activations are its weak spot even in FP16: it runs in FP32 everywhere, docs/architecture.md §5).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
from pydantic import BaseModel, ConfigDict, ValidationError

from calibration.capture import capture, requests
from calibration.quantize import METHODS, qdq_problems, qdq_summary, quantize_stage
from calibration.report import Gates, failures, report_json, stage_figures, video_figures
from runtime.errors import UsageError, describe_validation
from runtime.files import (
    artifact_lock,
    remove_staging,
    remove_stale,
    replace_directory,
    staging_directory,
)
from runtime.manifest import MANIFEST, Manifest, ModelFile, check_file, read_manifest, write_manifest
from runtime.pipeline import Pipeline
from runtime.request import Count, Seed, Threads
from runtime.runners import make_runner
from walt_export.window_attention.onnx_contract import write_attention_variants

log = logging.getLogger(__name__)

INT8_DIR = "int8"
REPORT = "report.json"


class CalibrationError(RuntimeError):
    """A quantized model that breaks the Q/DQ recipe (a bug, not a quality problem)."""




class CalibrationSettings(BaseModel):
    """The settings of `calibrate_artifacts`; `timesteps` must also fit the artifact's schedule
    (`check_timesteps`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    method: Literal[METHODS]  # denoisers; the tokenizer stages use minmax
    seed: Seed  # calibration request i has seed + i, held-out request i seed + samples + i
    samples: Count  # calibration generations
    held_out: Count  # held-out generations, for the gates
    timesteps: Count  # denoiser calls kept per generation, spread over the schedule
    threads: Threads  # onnxruntime CPU threads; 0: it decides (not in the report: it changes no figure)

    @classmethod
    def parse(cls, **values: object) -> CalibrationSettings:
        """The settings of keyword values; UsageError naming each bad one and its range."""
        try:
            return cls.model_validate(values)
        except ValidationError as e:
            raise UsageError(f"bad calibration settings: {describe_validation(e)}") from None

    def check_timesteps(self, manifest: Manifest) -> None:
        """UsageError unless `timesteps` is at most the schedule's denoising steps (there are no more calls)."""
        steps = manifest.schedule.num_inference_steps
        if self.timesteps > steps:
            raise UsageError(f"timesteps must be in [1, {steps}] (the denoising steps of this artifact's schedule), "
                             f"got {self.timesteps}")


def calibrate_artifacts(directory: str | Path, *, samples: int = 4, held_out: int = 2,
                        prompts: list[str] | None = None, method: str = "percentile",
                        seed: int = 0, timesteps: int = 8, gates: Gates = Gates(), threads: int = 0,
                        progress: Callable[[str], None] | None = None) -> dict:
    """Calibrate and quantize every stage of the artifact in `directory`; returns the report (also written).

    Args:
        samples, held_out: calibration and held-out generations (prompts, classes or unconditional), >= 1.
        prompts: text prompts for text artifacts (default: a built-in varied list).
        method: minmax, entropy or percentile (denoisers; the tokenizer stages use minmax).
        seed: of the first calibration request, in [0, 2**63 - 1].
        timesteps: calls kept per generation and denoiser, spread over the schedule: in [1, the schedule's steps].
        threads: onnxruntime CPU threads, >= 0 (0: onnxruntime decides).
    Raises UsageError for settings it cannot use (before anything runs), ArtifactError for an unusable artifact,
    BusyError while another command writes into the artifact.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    settings = CalibrationSettings.parse(method=method, seed=seed, samples=samples, held_out=held_out,
                                         timesteps=timesteps, threads=threads)
    settings.check_timesteps(manifest)
    if prompts is not None and not prompts:
        raise UsageError("the prompts file has no prompts (one per line)")
    with artifact_lock(directory):
        manifest = read_manifest(directory)  # again, under the lock: another command may have changed it meanwhile
        for stage in manifest.stages.values():
            check_file(directory, stage.file("fp32"))
        remove_staging(directory / INT8_DIR)  # what killed runs left
        remove_stale(directory / MANIFEST)
        return _calibrate(directory, manifest, settings, prompts, gates, progress or (lambda line: None))


def _calibrate(directory: Path, manifest: Manifest, settings: CalibrationSettings, prompts: list[str] | None,
               gates: Gates, say: Callable[[str], None]) -> dict:
    """The run of `calibrate_artifacts`, under the artifact's lock, with checked settings."""
    samples, held_out, timesteps, threads = settings.samples, settings.held_out, settings.timesteps, settings.threads
    calibration = requests(manifest, samples, settings.seed, prompts)
    held = requests(manifest, held_out, settings.seed, prompts, offset=samples)
    say(f"running the FP32 cascade: {samples} calibration + {held_out} held-out generations")
    data, _ = capture(directory, calibration, timesteps, threads)
    held_data, fp32_videos = capture(directory, held, timesteps, threads)

    quantized = [name for name, stage in manifest.stages.items() if "int8" in stage.precision.allowed]
    tmp = staging_directory(directory / INT8_DIR)
    try:
        stages, files = {}, {}
        for name in quantized:
            say(f"quantizing {name}")
            stages[name], files[name] = _quantize(manifest, directory, tmp, name, data[name], held_data[name],
                                                  settings.method, threads)
        say("running the INT8 cascade on the held-out requests")
        int8_videos = _generate(manifest, directory, tmp, quantized, held, threads)
        report = {
            **settings.model_dump(exclude={"threads"}),
            "requests": {"calibration": [asdict(r) for r in calibration], "held_out": [asdict(r) for r in held]},
            "not_quantized": [n for n in manifest.stages if n not in quantized],
            "gates": asdict(gates), "stages": stages,
            "video": video_figures([v.frames for v in fp32_videos], int8_videos),
        }
        report["failures"] = failures(report, gates)
        (tmp / REPORT).write_text(report_json(report))
        _replace_int8(directory, manifest, tmp, None if report["failures"] else files)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _quantize(manifest: Manifest, directory: Path, tmp: Path, name: str, feeds, held_feeds, method: str,
              threads: int) -> tuple[dict, list[ModelFile]]:
    """Quantize one stage into `tmp`; its report entry and its files' manifest entries (paths under int8/)."""
    stage = manifest.stage(name)
    source = directory / stage.file("fp32").file
    out = tmp / f"{name}.onnx"
    used = quantize_stage(name, source, out, feeds, method, cache=tmp / f"{name}.calibration.json")
    model = onnx.load(str(out), load_external_data=False)
    problems = qdq_problems(model, stage.file("fp32").window_attention_nodes)
    if problems:
        raise CalibrationError(f"{name}: the quantized model breaks the Q/DQ recipe: {'; '.join(problems[:5])}")
    entries = [f.model_copy(update={
        "file": f"{INT8_DIR}/{f.file}",
        "external_data": tuple(d.model_copy(update={"file": f"{INT8_DIR}/{d.file}"}) for d in f.external_data),
    }) for f in write_attention_variants(model, out, "int8")]
    main = stage.outputs[0].name
    fp32 = _run(source, held_feeds, main, threads)
    int8 = _run(out, held_feeds, main, threads)
    entry = {"method": used, "calibration_samples": len(feeds), "held_out_samples": len(held_feeds),
             "output": main, "quantization": qdq_summary(model), "quality": stage_figures(fp32, int8)}
    if "timestep" in feeds[0]:
        entry["calibration_timesteps"] = sorted({float(t) for f in feeds for t in np.unique(f["timestep"])})
    return entry, entries


def _run(path: Path, feeds: list[dict[str, np.ndarray]], output: str, threads: int) -> list[np.ndarray]:
    with make_runner("onnxruntime", path, threads=threads) as runner:
        return [runner.infer(f)[output] for f in feeds]


def _generate(manifest: Manifest, directory: Path, tmp: Path, quantized: list[str], reqs, threads: int):
    """The held-out videos of the cascade with the INT8 stages (FP32 for the others)."""
    def runner_for(name: str):
        path = tmp / f"{name}.onnx" if name in quantized else directory / manifest.stage(name).file("fp32").file
        return make_runner("onnxruntime", path, threads=threads)

    with Pipeline(manifest, runner_for, directory) as pipeline:
        return [pipeline.generate(r.prompt, class_id=r.class_id, seed=r.seed).frames for r in reqs]


def _replace_int8(directory: Path, manifest: Manifest, tmp: Path, files: dict[str, list[ModelFile]] | None) -> None:
    """Swap `tmp` in as `DIR/int8` and list its files in the manifest (`files`), or none when gates were missed.

    The manifest first loses any old INT8 entries, so it never lists files that are being replaced.
    """
    _write_manifest(directory, manifest, {})
    replace_directory(tmp, directory / INT8_DIR)
    if files:
        _write_manifest(directory, manifest, files)


def _write_manifest(directory: Path, manifest: Manifest, int8: dict[str, list[ModelFile]]) -> None:
    stages = {name: stage.model_copy(update={"files": tuple(
        [f for f in stage.files if f.precision != "int8"] + int8.get(name, []))})
        for name, stage in manifest.stages.items()}
    write_manifest(directory, manifest.model_copy(update={"stages": stages}))
