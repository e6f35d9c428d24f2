"""`walt-export verify`: every model of an artifact against its PyTorch reference, on the same seeded inputs.

First every file the manifest lists is hashed (`Manifest.check_files`: all variants, precisions, external data and
tokenizer files), so a deleted or modified file fails even where onnxruntime cannot run it (the plugin variant).
For each stage, each file onnxruntime can run (canonical, fallback and attention, FP32 and FP16; the plugin variant
needs TensorRT's plugin; INT8 files have no tolerance here, `walt-export calibrate`'s quality gates judge them) and each
batch size: the reference runs in float32 PyTorch, the file in onnxruntime (CPU), and every output is compared
against the tolerance of the file's precision. The table and `verify.json` record the max abs and max rel
(max |diff| / max |reference|) error per output.
"""

from __future__ import annotations

import itertools
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from runtime.compare import Tolerance, find_mismatch
from runtime.files import artifact_lock, atomic_output
from runtime.manifest import StageInfo, read_manifest
from runtime.runners import OnnxRuntimeRunner
from walt_export.export_specs import BATCH, ExportSpec, export_specs
from walt_export.torch_runner import reference_components

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class OutputTolerance:
    """Per output: an element passes when |actual - expected| <= atol + of_scale * max|expected| + rtol * |expected|."""

    atol: float
    rtol: float
    of_scale: float = 0.0  # a fraction of the output's largest magnitude (float16 rounds relative to the scale)

    def at(self, expected: np.ndarray) -> Tolerance:
        scale = float(np.abs(expected).max()) if expected.size else 0.0
        return Tolerance(self.atol + self.of_scale * scale, self.rtol)


# onnxruntime (CPU) vs float32 PyTorch, per precision of the file. FP32: reordered float32 sums (measured <= 3e-5
# abs on micro and tiny). FP16: an 11-bit mantissa through every layer (measured <= 4.2e-3 of the output's scale).
TOLERANCES: dict[str, OutputTolerance] = {
    "fp32": OutputTolerance(atol=1e-4, rtol=1e-4),
    "fp16": OutputTolerance(atol=0.0, rtol=1e-2, of_scale=1e-2),
}
VERIFY_JSON = "verify.json"
RUNNABLE_VARIANTS = ("canonical", "fallback", "attention")  # the plugin variant has no body: TensorRT only


@dataclass
class Check:
    stage: str
    file: str
    precision: str
    variant: str
    batch: int
    output: str
    max_abs: float
    max_rel: float
    atol: float
    rtol: float
    passed: bool
    worst: str  # the worst element when it failed


def verify_artifacts(directory: str | Path, checkpoint: str | Path | None = None, batches: tuple[int, ...] = (1, 2),
                     seed: int = 0, tolerances: dict[str, OutputTolerance] = TOLERANCES) -> list[Check]:
    """Check every file of the artifact, then run every runnable one against PyTorch; writes `verify.json` and
    returns the checks.

    Raises ArtifactError naming the file when one the manifest lists lies outside the directory, is missing or was
    modified; BusyError when another command is writing the artifact.
    """
    directory = Path(directory)
    with artifact_lock(directory):
        manifest = read_manifest(directory)
        paths = manifest.check_files(directory)  # every file hashed once, runnable or not
        cfg, components = reference_components(manifest, checkpoint)
        specs = export_specs(cfg)
        checks = []
        for component, names in itertools.groupby(manifest.stages, key=lambda name: specs[name].component):
            parent = components(component)
            for name in names:
                spec, stage = specs[name], manifest.stages[name]
                checks += _verify_stage(paths, spec, stage, spec.module_of(parent), batches, seed, tolerances)
        _write_json(directory / VERIFY_JSON, {"artifact": manifest.name, "batches": list(batches), "seed": seed,
                                              "checks": [asdict(c) for c in checks]})
    return checks


def _verify_stage(paths: dict[str, Path], spec: ExportSpec, stage: StageInfo, module: nn.Module,
                  batches: tuple[int, ...], seed: int, tolerances: dict[str, OutputTolerance]) -> list[Check]:
    """`paths`: the checked path of each model file (`Manifest.check_files`)."""
    checks = []
    runnable = [file for file in stage.files if file.variant in RUNNABLE_VARIANTS and file.precision in tolerances]
    for batch in batches:  # one batch's reference outputs in memory at a time (video-sized for the tokenizer)
        inputs = spec.sample_inputs(torch.Generator().manual_seed(seed), **{BATCH: batch})
        with torch.no_grad():
            expected = [t.numpy() for t in spec.call(module, *inputs)]
        feeds = {t.name: x.numpy() for t, x in zip(spec.inputs, inputs, strict=True)}
        for file in runnable:
            with OnnxRuntimeRunner(paths[file.file]) as runner:
                actual = runner.infer(feeds)
            for out, ref in zip(spec.outputs, expected, strict=True):
                checks.append(_check(spec.name, file.file, file.precision, file.variant, batch, out.name,
                                     actual[out.name], ref, tolerances[file.precision].at(ref)))
    return checks


def _check(stage: str, file: str, precision: str, variant: str, batch: int, output: str, actual: np.ndarray,
           expected: np.ndarray, tol: Tolerance) -> Check:
    actual, expected = actual.astype(np.float64), expected.astype(np.float64)
    diff = np.abs(actual - expected)
    max_abs = float(np.nanmax(diff)) if diff.size else 0.0
    scale = float(np.abs(expected).max()) if expected.size else 0.0
    mismatch = find_mismatch(actual, expected, tol)
    return Check(stage, file, precision, variant, batch, output, max_abs, max_abs / scale if scale else max_abs,
                 tol.atol, tol.rtol, mismatch is None, "" if mismatch is None else mismatch.describe(output))


def format_table(checks: list[Check]) -> str:
    """One row per file, batch and output; numbered outputs (next_state.0, .1, ...) share a row (their worst)."""
    rows: dict[tuple, list[Check]] = {}
    for c in checks:
        rows.setdefault((c.stage, c.file, c.batch, c.output.split(".")[0] + (".*" if "." in c.output else "")), []).append(c)
    lines = [f"{'stage':<23} {'file':<34} {'batch':>5} {'output':<13} {'max abs':>9} {'max rel':>9}  result"]
    for (stage, file, batch, output), group in rows.items():
        bad = [c for c in group if not c.passed]
        result = "ok" if not bad else f"FAIL (atol {bad[0].atol:g}, rtol {bad[0].rtol:g})"
        lines.append(f"{stage:<23} {file:<34} {batch:>5} {output:<13} {max(c.max_abs for c in group):>9.2e} "
                     f"{max(c.max_rel for c in group):>9.2e}  {result}")
    failed = [c for c in checks if not c.passed]
    lines.append(f"{len(checks) - len(failed)} of {len(checks)} outputs within tolerance")
    lines += [f"  {c.file} batch {c.batch}: {c.worst}" for c in failed]
    return "\n".join(lines)


def _write_json(path: Path, data: dict) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
