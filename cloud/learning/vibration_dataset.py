"""The vibration dataset: labelled windows from the same physics as the device agent's simulator
(``device_agent.sensors.vibration``), vectorised with numpy for training. The agent streams one
machine sample by sample in pure Python; this builds thousands of machines' windows at once."""

from __future__ import annotations

import cmath
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from device_agent.sensors.vibration import (
    BASE_1X,
    BASE_2X,
    BASE_3X,
    BASE_AXIAL_1X,
    BEARING_AM_DEPTH,
    BEARING_AXES,
    BEARING_IMPACT,
    BEARING_SLIP,
    BPFI_ORDER,
    BPFO_ORDER,
    CLASS_NAMES,
    DEFAULT_NOISE,
    DEFAULT_RATE_HZ,
    DEFAULT_RPM,
    DRIFT_GAIN,
    DRIFT_NOISE,
    DRIFT_RESONANCE,
    DRIFT_RPM,
    DRIFT_TILT_RAD,
    GRAVITY_G,
    IMBALANCE_1X,
    MISALIGN_2X,
    MISALIGN_3X,
    MISALIGN_AXIAL_1X,
    MISALIGN_AXIAL_2X,
    REF_SHAFT_HZ,
    RESONANCE_AXES,
    RESONANCE_DAMPING,
    RESONANCE_HZ,
    RESONANCE_NOISE,
    Y_STIFFNESS,
    check_class,
)


def generate_dataset(
    n_windows: int,
    *,
    window: int = 100,
    rate_hz: float = DEFAULT_RATE_HZ,
    drift: float = 0.0,
    seed: int = 0,
    classes: Sequence[str] = CLASS_NAMES,
    rpm: float = DEFAULT_RPM,
    gain: float = 1.0,
    noise: float = DEFAULT_NOISE,
    rpm_spread: float = 0.08,
    severity_range: tuple[float, float] = (0.3, 1.0),
) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """``X`` float32 (n_windows, window, 3) and ``y`` int64 indices into ``classes``, balanced.

    Same physics as ``VibrationSimulator``; each window gets its own rpm (+-``rpm_spread``),
    severity, phases, healthy-machine baseline (+-30 %), bearing defect (outer or inner) and a
    settled resonance (0.5 s of warm-up before the window).
    """
    if n_windows < 1 or window < 1 or rate_hz <= 0:
        raise ValueError("n_windows, window and rate_hz must be positive")
    if not 0.0 <= drift <= 1.0:
        raise ValueError(f"drift {drift} must be in [0, 1]")
    names = [check_class(c) for c in classes]
    if not names or len(set(names)) != len(names):
        raise ValueError("classes must be a non-empty sequence of distinct class names")
    rng = np.random.default_rng(seed)
    n = n_windows
    y = np.arange(n, dtype=np.int64) % len(names)
    rng.shuffle(y)
    kind = np.array([CLASS_NAMES.index(names[i]) for i in range(len(names))])[y]
    dt = 1.0 / rate_hz
    sev = np.where(kind == 0, 0.0, rng.uniform(*severity_range, size=n))
    shaft = rpm / 60.0 * (1.0 + DRIFT_RPM * drift) * (1.0 + rng.uniform(-rpm_spread, rpm_spread, size=n))
    speed2 = (shaft / REF_SHAFT_HZ) ** 2
    healthy = rng.uniform(0.7, 1.3, size=(n, 4))
    imb = np.where(kind == 1, sev, 0.0)
    mis = np.where(kind == 2, sev, 0.0)
    a1 = BASE_1X * healthy[:, 0] * speed2 + imb * IMBALANCE_1X * speed2
    a2 = BASE_2X * healthy[:, 1] + mis * MISALIGN_2X
    a3 = BASE_3X * healthy[:, 2] + mis * MISALIGN_3X
    b1 = BASE_AXIAL_1X * healthy[:, 3] + mis * MISALIGN_AXIAL_1X
    b2 = mis * MISALIGN_AXIAL_2X
    phases = rng.uniform(0.0, 2.0 * np.pi, size=(n, 6))
    t = np.arange(1, window + 1) * dt  # sample times inside the window
    theta = (phases[:, 5:6] + 2.0 * np.pi * shaft[:, None] * t[None, :]) % (2.0 * np.pi)

    def harm(k: int, amp: Any, phase: Any, fn: Any) -> Any:
        return amp[:, None] * fn(k * theta + phase[:, None])

    x = (
        harm(1, a1, phases[:, 0], np.cos)
        + harm(2, a2, phases[:, 1], np.cos)
        + harm(3, a3, phases[:, 2], np.cos)
    )
    yy = Y_STIFFNESS * (
        harm(1, a1, phases[:, 0], np.sin)
        + harm(2, a2, phases[:, 1], np.sin)
        + harm(3, a3, phases[:, 2], np.sin)
    )
    z = harm(1, b1, phases[:, 3], np.cos) + harm(2, b2, phases[:, 4], np.cos) + GRAVITY_G

    # Resonance rung by noise and by bearing impacts: the same complex recursion as the simulator,
    # stepped over time and vectorised over windows.
    noise_eff = noise * (1.0 + DRIFT_NOISE * drift)
    omega = 2.0 * np.pi * RESONANCE_HZ * (1.0 + DRIFT_RESONANCE * drift)
    pole = complex(-RESONANCE_DAMPING * omega, omega * math.sqrt(1.0 - RESONANCE_DAMPING**2))
    step = cmath.exp(pole * dt)
    warmup = math.ceil(0.5 * rate_hz)
    bearing = kind == 3
    inner = bearing & (rng.random(n) < 0.5)
    order = np.where(inner, BPFI_ORDER, BPFO_ORDER)
    am = np.where(inner, BEARING_AM_DEPTH["inner"], BEARING_AM_DEPTH["outer"])
    impact = np.where(bearing, sev * BEARING_IMPACT, 0.0)
    period = 1.0 / (order * shaft)
    next_impact = -warmup * dt + rng.uniform(0.0, 1.0, size=n) * period
    next_impact[~bearing] = np.inf
    z_b = np.zeros(n, dtype=np.complex128)
    z_n = np.zeros(n, dtype=np.complex128)
    res_in = noise_eff * RESONANCE_NOISE
    s_b = np.empty((n, window))
    s_n = np.empty((n, window))
    for k in range(-warmup + 1, window + 1):
        tk = k * dt
        z_b *= step
        due = next_impact <= tk
        while due.any():
            idx = np.nonzero(due)[0]
            th = phases[idx, 5] + 2.0 * np.pi * shaft[idx] * next_impact[idx]
            force = impact[idx] * (1.0 + am[idx] * np.cos(th))
            z_b[idx] += force * np.exp(pole * (tk - next_impact[idx]))
            next_impact[idx] += (1.0 + BEARING_SLIP * rng.standard_normal(idx.size)) * period[idx]
            due = next_impact <= tk
        z_n = z_n * step + res_in * rng.standard_normal(n)
        if k >= 1:
            s_b[:, k - 1] = z_b.imag
            s_n[:, k - 1] = z_n.imag
    white = noise_eff * rng.standard_normal((3, n, window))
    x += BEARING_AXES[0] * s_b + RESONANCE_AXES[0] * s_n + white[0]
    yy += BEARING_AXES[1] * s_b + RESONANCE_AXES[1] * s_n + white[1]
    z += BEARING_AXES[2] * s_b + RESONANCE_AXES[2] * s_n + white[2]
    tilt = DRIFT_TILT_RAD * drift
    g = gain * (1.0 + DRIFT_GAIN * drift)
    out = np.stack(
        [
            g * (x * math.cos(tilt) + z * math.sin(tilt)),
            g * yy,
            g * (z * math.cos(tilt) - x * math.sin(tilt)),
        ],
        axis=-1,
    ).astype(np.float32)
    return out, y
