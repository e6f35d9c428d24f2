"""Numerical comparison with tolerances as data, naming the worst element, and PSNR (numpy only)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

PSNR_LIMIT_DB = 999.0  # |PSNR| reported for identical outputs (+) and an all-zero reference (-): JSON has no infinity


@dataclass(frozen=True)
class Tolerance:
    """An element passes when |actual - expected| <= atol + rtol * |expected|."""

    atol: float
    rtol: float = 0.0


@dataclass(frozen=True)
class Mismatch:
    """The element of `actual` that exceeds its allowance the most."""

    index: tuple[int, ...]
    actual: float
    expected: float
    allowed: float
    max_abs: float  # over all elements
    failing: int  # elements out of tolerance
    total: int

    def describe(self, what: str) -> str:
        return (f"{what}: {self.failing} of {self.total} elements out of tolerance; worst at {self.index}: "
                f"actual {self.actual:.6g}, expected {self.expected:.6g}, |diff| {abs(self.actual - self.expected):.3g} "
                f"> allowed {self.allowed:.3g}; max |diff| {self.max_abs:.3g}")


def find_mismatch(actual, expected, tol: Tolerance) -> Mismatch | None:
    """None when every element is within `tol` (NaN/inf must match exactly), else the worst element."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    if a.shape != e.shape:
        raise AssertionError(f"shapes differ: actual {a.shape}, expected {e.shape}")
    allowed = tol.atol + tol.rtol * np.abs(e)
    with np.errstate(invalid="ignore"):
        diff = np.abs(a - e)
        same_nonfinite = (~np.isfinite(a) | ~np.isfinite(e)) & ((a == e) | (np.isnan(a) & np.isnan(e)))
        excess = np.where(same_nonfinite, -np.inf, np.nan_to_num(diff - allowed, nan=np.inf))
    failing = int((excess > 0).sum())
    if failing == 0:
        return None
    flat = int(np.argmax(excess))
    index = tuple(int(i) for i in np.unravel_index(flat, a.shape))
    finite = np.where(np.isfinite(diff), diff, 0.0)
    return Mismatch(index, float(a[index]), float(e[index]), float(allowed[index]),
                    float(finite.max()) if finite.size else 0.0, failing, int(a.size))


def assert_close(actual, expected, tol: Tolerance, what: str = "output") -> None:
    """Raise AssertionError naming the worst element when `actual` and `expected` differ beyond `tol`."""
    mismatch = find_mismatch(actual, expected, tol)
    if mismatch is not None:
        raise AssertionError(mismatch.describe(what))


def psnr(reference: np.ndarray, other: np.ndarray, peak: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB; the peak is the reference's largest magnitude unless given. Identical
    inputs give PSNR_LIMIT_DB, a zero peak with any difference -PSNR_LIMIT_DB (for infinity)."""
    reference, other = reference.astype(np.float64), other.astype(np.float64)
    mse = float(np.mean((reference - other) ** 2))
    peak = float(np.max(np.abs(reference))) if peak is None else peak
    if mse == 0:
        return PSNR_LIMIT_DB
    return 10 * math.log10(peak**2 / mse) if peak > 0 else -PSNR_LIMIT_DB
