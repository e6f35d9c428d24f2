"""Quality of INT8 against FP32: the figures, the gates they must pass, and the printed table.

Per stage, on held-out samples (never used for calibration): cosine similarity and PSNR of the stage's main
output, INT8 against FP32 on the same feeds, PSNR with the FP32 output's peak magnitude as the peak. End to end,
on held-out requests: PSNR of the decoded INT8 video against the FP32 video of the same seed (8-bit frames, peak
255), and temporal flicker: the mean absolute frame-to-frame difference of the INT8 video over that of the FP32
video (1.0 = as steady; above 1, INT8 adds flicker). Each gate is checked on the worst held-out sample.

The report is written as strict JSON (`report_json`): every figure is finite, so PSNR (`runtime.compare.psnr`) stands
in +-`runtime.compare.PSNR_LIMIT_DB` for the infinities of identical outputs and of an all-zero reference.
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass, fields

import numpy as np

from runtime.compare import psnr
from runtime.errors import UsageError


@dataclass(frozen=True)
class Gates:
    """Thresholds every stage and the end-to-end video must meet, per stage kind (a denoiser's v or a tokenizer
    stage's latent or video: their errors differ in kind, docs/reference.md §7); `--gate name=value` overrides
    one."""

    # Set from the trained reference cascade (docs/reference.md §7: worst of two calibrations, 4 + 2 and 2 + 1
    # generations), a margin below its worst figure; random weights measure far better on the denoisers.
    denoiser_min_cosine: float = 0.975  # base, sr1, sr2 output, worst held-out sample (trained: 0.9818)
    denoiser_min_psnr_db: float = 25.0  # (trained: 26.5 dB)
    tokenizer_min_cosine: float = 0.98  # the tokenizer's encoder and decoders, quantize.VIDEO_STAGES (0.9853)
    tokenizer_min_psnr_db: float = 30.0  # (trained: 35.5 dB; random: 36.6 dB)
    min_video_psnr_db: float = 28.0  # decoded INT8 video vs FP32 video, same seed (trained: 33.7 dB)
    max_flicker_ratio: float = 1.30  # INT8 frame-to-frame difference over FP32's (trained: 1.245)

    def stage(self, name: str) -> tuple[str, float, float]:
        """(kind, min cosine, min PSNR dB) of the stage `name`."""
        from calibration.quantize import VIDEO_STAGES

        if name in VIDEO_STAGES:
            return "tokenizer", self.tokenizer_min_cosine, self.tokenizer_min_psnr_db
        return "denoiser", self.denoiser_min_cosine, self.denoiser_min_psnr_db

    def __post_init__(self) -> None:
        """UsageError naming the first gate that is not a finite number (a NaN gate would pass every figure)."""
        for f in fields(self):
            value = getattr(self, f.name)
            if not (isinstance(value, numbers.Real) and math.isfinite(value)):
                raise UsageError(f"bad gate '{f.name}={value}': a gate must be a finite number "
                                 f"(default {f.name}={f.default})")

    @classmethod
    def parse(cls, overrides: list[str]) -> Gates:
        """Gates from 'name=value' strings, e.g. ['denoiser_min_cosine=0.999']; UsageError for unknown names, values
        that are not numbers, and values that are not finite."""
        names = {f.name for f in fields(cls)}
        values = {}
        for item in overrides:
            name, sep, value = item.partition("=")
            if not sep or name.strip() not in names:
                raise UsageError(f"bad gate {item!r}: expected name=value with name one of {', '.join(sorted(names))}")
            try:
                values[name.strip()] = float(value)
            except ValueError:
                raise UsageError(f"bad gate {item!r}: {value!r} is not a number") from None
        return cls(**values)


def cosine(reference: np.ndarray, other: np.ndarray) -> float:
    a, b = reference.astype(np.float64).ravel(), other.astype(np.float64).ravel()
    denominator = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / denominator) if denominator > 0 else float(np.array_equal(a, b))


def flicker(frames: np.ndarray) -> float:
    """Mean absolute difference between consecutive frames of (T, H, W, 3) uint8."""
    return float(np.mean(np.abs(np.diff(frames.astype(np.int16), axis=0))))


def stage_figures(fp32_outputs: list[np.ndarray], int8_outputs: list[np.ndarray]) -> dict:
    """Worst and mean cosine and PSNR over held-out samples."""
    cosines = [cosine(a, b) for a, b in zip(fp32_outputs, int8_outputs, strict=True)]
    psnrs = [psnr(a, b) for a, b in zip(fp32_outputs, int8_outputs, strict=True)]
    return {"samples": len(cosines), "cosine_min": min(cosines), "cosine_mean": float(np.mean(cosines)),
            "psnr_db_min": min(psnrs), "psnr_db_mean": float(np.mean(psnrs))}


def video_figures(fp32_videos: list[np.ndarray], int8_videos: list[np.ndarray]) -> dict:
    """Worst video PSNR and worst flicker ratio over held-out requests."""
    psnrs = [psnr(a, b, peak=255.0) for a, b in zip(fp32_videos, int8_videos, strict=True)]
    ratios = [flicker(b) / max(flicker(a), 1e-12) for a, b in zip(fp32_videos, int8_videos, strict=True)]
    return {"videos": len(psnrs), "psnr_db_min": min(psnrs), "psnr_db_mean": float(np.mean(psnrs)),
            "flicker_ratio_max": max(ratios), "flicker_ratio_mean": float(np.mean(ratios))}


def failures(report: dict, gates: Gates) -> list[str]:
    """One line per missed gate, naming the stage (or 'video') and the figure."""
    out = []
    for name, stage in report["stages"].items():
        q = stage["quality"]
        kind, min_cosine, min_psnr_db = gates.stage(name)
        if q["cosine_min"] < min_cosine:
            out.append(f"{name}: cosine {q['cosine_min']:.6f} < {kind}_min_cosine {min_cosine}")
        if q["psnr_db_min"] < min_psnr_db:
            out.append(f"{name}: PSNR {q['psnr_db_min']:.2f} dB < {kind}_min_psnr_db {min_psnr_db}")
    video = report.get("video")
    if video is not None:
        if video["psnr_db_min"] < gates.min_video_psnr_db:
            out.append(f"video: PSNR {video['psnr_db_min']:.2f} dB < min_video_psnr_db {gates.min_video_psnr_db}")
        if video["flicker_ratio_max"] > gates.max_flicker_ratio:
            out.append(f"video: flicker ratio {video['flicker_ratio_max']:.3f} > max_flicker_ratio "
                       f"{gates.max_flicker_ratio}")
    return out


def report_json(report: dict) -> str:
    """The report as strict JSON; ValueError (a bug) for a NaN or infinite figure, which JSON cannot hold."""
    return json.dumps(report, indent=2, default=float, allow_nan=False) + "\n"


def format_report(report: dict) -> str:
    """The table `walt-export calibrate` prints."""
    lines = [f"{'stage':<23} {'method':<10} {'quantized':>10} {'int8 wts':>8} {'cos min':>9} {'PSNR min':>9}"]
    for name, s in report["stages"].items():
        q, p = s["quality"], s["quantization"]
        lines.append(f"{name:<23} {s['method']:<10} {p['quantized_nodes']:>4}/{p['quantizable_nodes']:<5} "
                     f"{p['int8_weight_share']:>7.1%} {q['cosine_min']:>9.5f} {q['psnr_db_min']:>7.2f}dB")
    video = report.get("video")
    if video is not None:
        lines.append(f"video (INT8 vs FP32, same seed, {video['videos']} held out): PSNR min {video['psnr_db_min']:.2f} "
                     f"dB, mean {video['psnr_db_mean']:.2f} dB; flicker ratio max {video['flicker_ratio_max']:.3f}")
    missed = report.get("failures", [])
    lines.append("gates: " + ("passed" if not missed else "MISSED: " + "; ".join(missed)))
    return "\n".join(lines)
