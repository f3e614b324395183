"""Time-series augmentation in numpy, seeded by the caller's ``numpy.random.Generator``.

Inputs are batches shaped (n, time, channels), already normalized; every function returns a new
array of the same shape and dtype. The methods follow Iwana & Uchida 2021 ("An empirical survey of
data augmentation for time series classification with neural networks"): jitter, scaling and
magnitude warping change amplitudes; window slicing and window warping change the time axis."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np

logger = logging.getLogger(__name__)

AugmentMethod = Literal["jitter", "scaling", "magnitude_warp", "window_slice", "window_warp"]
AUGMENT_METHODS: tuple[str, ...] = ("jitter", "scaling", "magnitude_warp", "window_slice", "window_warp")

JITTER_SIGMA = 0.03  # inputs have unit variance: a small noise floor, not a new signal
SCALING_SIGMA = 0.1
MAGNITUDE_WARP_SIGMA = 0.2
MAGNITUDE_WARP_KNOTS = 4
SLICE_RATIO = 0.9  # keep 90 % of the series (Le Guennec et al. 2016)
WARP_WINDOW_RATIO = 0.1
WARP_SCALES = (0.5, 2.0)  # Le Guennec et al. 2016: stretch or squeeze a 10 % window


def jitter(x: np.ndarray, rng: np.random.Generator, sigma: float = JITTER_SIGMA) -> np.ndarray:
    """Add Gaussian noise to every value."""
    return (x + rng.normal(0.0, sigma, size=x.shape)).astype(x.dtype)


def scaling(x: np.ndarray, rng: np.random.Generator, sigma: float = SCALING_SIGMA) -> np.ndarray:
    """Multiply each series (and channel) by one factor drawn around 1."""
    factors = rng.normal(1.0, sigma, size=(x.shape[0], 1, x.shape[2]))
    return (x * factors).astype(x.dtype)


def magnitude_warp(
    x: np.ndarray,
    rng: np.random.Generator,
    sigma: float = MAGNITUDE_WARP_SIGMA,
    knots: int = MAGNITUDE_WARP_KNOTS,
) -> np.ndarray:
    """Multiply each series by a smooth random curve around 1 (piecewise-linear through ``knots``)."""
    n, length, channels = x.shape
    knot_x = np.linspace(0, length - 1, knots + 2)
    knot_y = rng.normal(1.0, sigma, size=(n, knots + 2, channels))
    grid = np.arange(length)
    curves = np.empty_like(x, dtype=np.float64)
    for i in range(n):
        for c in range(channels):
            curves[i, :, c] = np.interp(grid, knot_x, knot_y[i, :, c])
    return (x * curves).astype(x.dtype)


def resample_at(x: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Linear interpolation of each series at fractional time ``positions`` (n, time_out)."""
    length = x.shape[1]
    positions = np.clip(positions, 0, length - 1)
    lower = np.floor(positions).astype(np.int64)
    upper = np.minimum(lower + 1, length - 1)
    frac = (positions - lower)[..., np.newaxis]
    rows = np.arange(x.shape[0])[:, np.newaxis]
    resampled: np.ndarray = (x[rows, lower] * (1 - frac) + x[rows, upper] * frac).astype(x.dtype)
    return resampled


def window_slice(x: np.ndarray, rng: np.random.Generator, ratio: float = SLICE_RATIO) -> np.ndarray:
    """Crop a random ``ratio`` of each series and stretch it back to full length (shift + stretch)."""
    n, length, _ = x.shape
    width = max(2, int(np.ceil(ratio * length)))
    if width >= length:
        return x.copy()
    starts = rng.integers(0, length - width + 1, size=n)
    positions = starts[:, np.newaxis] + np.linspace(0, width - 1, length)[np.newaxis, :]
    return resample_at(x, positions)


def window_warp(
    x: np.ndarray,
    rng: np.random.Generator,
    window_ratio: float = WARP_WINDOW_RATIO,
    scales: Sequence[float] = WARP_SCALES,
) -> np.ndarray:
    """Speed up or slow down one random window of each series; the whole is resampled to its length."""
    n, length, _ = x.shape
    width = max(2, int(np.ceil(window_ratio * length)))
    if width >= length - 1:
        return x.copy()
    starts = rng.integers(1, length - width, size=n)
    factors = rng.choice(np.asarray(scales, dtype=np.float64), size=n)
    positions = np.empty((n, length))
    for i in range(n):
        start, end = starts[i], starts[i] + width
        warped_end = start + width * factors[i]
        out_length = length - width + width * factors[i]
        # Output knots (in the warped series) -> source knots; then sample the warped series evenly.
        out_knots = [0.0, start, warped_end, out_length - 1]
        src_knots = [0.0, start, end, length - 1]
        positions[i] = np.interp(np.linspace(0, out_length - 1, length), out_knots, src_knots)
    return resample_at(x, positions)


METHODS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "jitter": jitter,
    "scaling": scaling,
    "magnitude_warp": magnitude_warp,
    "window_slice": window_slice,
    "window_warp": window_warp,
}


def augment_batch(
    x: np.ndarray, methods: Sequence[str], rng: np.random.Generator, *, probability: float = 0.5
) -> np.ndarray:
    """Apply each of ``methods`` in turn, each to a random ``probability`` share of the rows.

    Leaving some rows untouched keeps the original distribution in every batch, which matters when
    a dataset has a few dozen rows and the test split looks like them, not like their distortions."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown augmentation {unknown}: choose from {', '.join(AUGMENT_METHODS)}")
    out = np.array(x, copy=True)
    for method in methods:
        chosen = rng.random(len(out)) < probability
        if chosen.any():
            out[chosen] = METHODS[method](out[chosen], rng)
    return out
