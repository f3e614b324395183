"""Physics-plausible vibration of a rotating machine, seen by a 3-axis accelerometer (units: g).

The device agent streams it (``VibrationSimulator``: pure Python ``math``); the cloud generates
datasets from the same constants, vectorised with numpy (``cloud.learning.vibration_dataset``).
Both run the same model:

- **Shaft harmonics** 1x/2x/3x of the shaft frequency ``f_r = rpm / 60`` on the radial axes
  (x, y; elliptical orbit, y stiffer than x) and a small 1x on the axial axis (z).
- **imbalance**: a strong 1x radial component growing with ``f_r**2`` (centrifugal force).
- **misalignment**: strong 2x radial plus an axial 1x/2x component (the classic axial signature).
- **bearing_fault**: impacts at a bearing defect frequency (BPFO for an outer-race defect, BPFI for
  an inner-race one, from the geometry of a 6205-class deep-groove bearing) with ~1.5 % slip; each
  impact rings a damped structural resonance, and the impact force is amplitude-modulated at the
  shaft rate (strongly for an inner-race defect that rotates through the load zone).
- **Resonance and noise**: broadband noise also excites the structural resonance, plus white sensor
  noise; gravity (1 g) sits on z.
- **drift** in [0, 1] is a progressive change of machine and mounting: the shaft runs slower (load
  change), the loosening mount lowers the resonance, raises the gain and tilts the sensor (axes mix,
  gravity leaks into x), and the noise floor rises. A classifier trained at drift 0 loses clear
  accuracy at drift 1; one trained on drifted windows recovers.

Defaults fit the default 100 Hz sample rate (Nyquist 50 Hz): at 450 rpm the shaft is 7.5 Hz, so
1x/2x/3x are 7.5/15/22.5 Hz, BPFO 26.9 Hz, BPFI 40.6 Hz, resonance 32 Hz. Real bearing monitoring
samples at kHz; at 100 Hz we keep the defect frequencies below Nyquist instead of modelling the
high-frequency envelope. At other rates choose rpm so that ``rpm / 60 * 5.42 < rate_hz / 2``.
"""

from __future__ import annotations

import cmath
import math
import random
from typing import Final

CLASS_NAMES: Final[tuple[str, ...]] = ("normal", "imbalance", "misalignment", "bearing_fault")
CHANNELS: Final[tuple[str, str, str]] = ("x", "y", "z")
FAULTS: Final[tuple[str, ...]] = CLASS_NAMES[1:]

DEFAULT_RATE_HZ: Final = 100.0
DEFAULT_RPM: Final = 450.0
DEFAULT_NOISE: Final = 0.03  # g, white sensor noise (1 sigma)
REF_SHAFT_HZ: Final = DEFAULT_RPM / 60.0  # imbalance amplitudes are quoted at this speed

# Bearing geometry of a 6205-class deep-groove ball bearing.
BALLS: Final = 9
BALL_DIAMETER_MM: Final = 7.94
PITCH_DIAMETER_MM: Final = 39.04
CONTACT_ANGLE_RAD: Final = 0.0
_RATIO: Final = BALL_DIAMETER_MM / PITCH_DIAMETER_MM * math.cos(CONTACT_ANGLE_RAD)
BPFO_ORDER: Final = BALLS / 2.0 * (1.0 - _RATIO)  # outer-race defect frequency / shaft frequency
BPFI_ORDER: Final = BALLS / 2.0 * (1.0 + _RATIO)  # inner-race defect frequency / shaft frequency
BEARING_SLIP: Final = 0.015  # rolling elements slip: impact spacing jitters by ~1.5 %
BEARING_AM_DEPTH: Final = {"outer": 0.25, "inner": 0.7}

# Structure: one dominant resonance of the machine frame / sensor mount.
RESONANCE_HZ: Final = 32.0
RESONANCE_DAMPING: Final = 0.06  # damping ratio zeta
RESONANCE_NOISE: Final = 1.2  # broadband excitation of the resonance, relative to the noise knob

# Amplitudes in g at severity 1 and REF_SHAFT_HZ.
BASE_1X: Final = 0.04  # residual imbalance of a healthy machine
BASE_2X: Final = 0.015
BASE_3X: Final = 0.008
BASE_AXIAL_1X: Final = 0.01
IMBALANCE_1X: Final = 0.30
MISALIGN_2X: Final = 0.22
MISALIGN_3X: Final = 0.05
MISALIGN_AXIAL_1X: Final = 0.12
MISALIGN_AXIAL_2X: Final = 0.25
BEARING_IMPACT: Final = 0.35
BEARING_AXES: Final = (1.0, 0.7, 0.35)
RESONANCE_AXES: Final = (1.0, 0.6, 0.3)
Y_STIFFNESS: Final = 0.8  # radial orbit is an ellipse: y responds less than x
GRAVITY_G: Final = 1.0

# Drift at drift = 1 (linear in between).
DRIFT_RPM: Final = -0.18
DRIFT_RESONANCE: Final = -0.30
DRIFT_GAIN: Final = 0.6
DRIFT_TILT_RAD: Final = math.radians(10.0)
DRIFT_NOISE: Final = 0.5

SPEED_WANDER: Final = 0.01  # streaming: slow random speed fluctuation (fraction of rpm, 1 sigma)
SPEED_WANDER_TAU_S: Final = 5.0


def check_class(name: str) -> str:
    """``name`` if it is one of ``CLASS_NAMES``; ``ValueError`` naming the choices otherwise."""
    if name not in CLASS_NAMES:
        raise ValueError(f"unknown class {name!r}; expected one of {', '.join(CLASS_NAMES)}")
    return name


def _amplitudes(fault: str, severity: float, shaft_hz: float) -> tuple[float, float, float, float, float]:
    """Harmonic amplitudes (radial 1x, 2x, 3x, axial 1x, axial 2x) for one machine state."""
    imb = severity if fault == "imbalance" else 0.0
    mis = severity if fault == "misalignment" else 0.0
    speed2 = (shaft_hz / REF_SHAFT_HZ) ** 2
    return (
        BASE_1X * speed2 + imb * IMBALANCE_1X * speed2,
        BASE_2X + mis * MISALIGN_2X,
        BASE_3X + mis * MISALIGN_3X,
        BASE_AXIAL_1X + mis * MISALIGN_AXIAL_1X,
        mis * MISALIGN_AXIAL_2X,
    )


class VibrationSimulator:
    """Streaming 3-axis accelerometer on a rotating machine; phase is continuous across reads."""

    def __init__(
        self,
        *,
        rate_hz: float = DEFAULT_RATE_HZ,
        rpm: float = DEFAULT_RPM,
        gain: float = 1.0,
        noise: float = DEFAULT_NOISE,
        drift: float = 0.0,
        seed: int | None = None,
        bearing_defect: str = "outer",
    ) -> None:
        if rate_hz <= 0 or rpm <= 0 or gain <= 0 or noise < 0:
            raise ValueError("rate_hz, rpm and gain must be > 0 and noise >= 0")
        if bearing_defect not in BEARING_AM_DEPTH:
            raise ValueError(f"bearing_defect must be one of {', '.join(BEARING_AM_DEPTH)}")
        self.rate_hz = float(rate_hz)
        self.rpm = float(rpm)
        self.gain = float(gain)
        self.noise = float(noise)
        self.drift = drift
        self.bearing_defect = bearing_defect
        self._rng = random.Random(seed)
        self._fault: str | None = None
        self._severity = 0.0
        self._theta = self._rng.uniform(0.0, 2.0 * math.pi)
        self._phases = [self._rng.uniform(0.0, 2.0 * math.pi) for _ in range(5)]
        self._wander = 0.0
        self._t = 0.0  # seconds since start (continuous)
        self._n = 0  # samples since start
        self._next_impact = 0.0
        self._z_bearing = 0j
        self._z_noise = 0j

    # -- state -----------------------------------------------------------------------------------
    @property
    def drift(self) -> float:
        """How far the machine and mounting have drifted from how it was trained, 0..1."""
        return self._drift

    @drift.setter
    def drift(self, value: float) -> None:
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"drift {value} must be in [0, 1]")
        self._drift = float(value)

    @property
    def fault(self) -> str | None:
        """The fault being simulated, if any."""
        return self._fault

    @property
    def severity(self) -> float:
        """The simulated fault's severity, 0..1 (0 when normal)."""
        return self._severity

    @property
    def label(self) -> str:
        """Ground truth of what the machine is doing now."""
        return self._fault or "normal"

    def set_fault(self, name: str, severity: float = 1.0) -> None:
        """Simulate fault ``name`` at ``severity`` (``normal`` clears it)."""
        if check_class(name) == "normal":
            self.clear_fault()
            return
        if not 0.0 < severity <= 1.0:
            raise ValueError(f"severity {severity} must be in (0, 1]")
        if name == "bearing_fault" and self._fault != "bearing_fault":
            self._next_impact = self._t
        self._fault = name
        self._severity = float(severity)

    def clear_fault(self) -> None:
        """Simulate a normal machine again."""
        self._fault = None
        self._severity = 0.0

    # -- sampling --------------------------------------------------------------------------------
    def read(self, n: int) -> list[tuple[float, float, float]]:
        """The next ``n`` samples (x, y, z) in g."""
        rng = self._rng
        gauss = rng.gauss
        dt = 1.0 / self.rate_hz
        d = self._drift
        fault = self._fault
        sev = self._severity
        noise = self.noise * (1.0 + DRIFT_NOISE * d)
        gain = self.gain * (1.0 + DRIFT_GAIN * d)
        tilt = DRIFT_TILT_RAD * d
        cos_t, sin_t = math.cos(tilt), math.sin(tilt)
        base_hz = self.rpm / 60.0 * (1.0 + DRIFT_RPM * d)
        res_hz = RESONANCE_HZ * (1.0 + DRIFT_RESONANCE * d)
        omega = 2.0 * math.pi * res_hz
        pole = complex(-RESONANCE_DAMPING * omega, omega * math.sqrt(1.0 - RESONANCE_DAMPING**2))
        step = cmath.exp(pole * dt)
        res_in = noise * RESONANCE_NOISE
        bearing = fault == "bearing_fault"
        order = BPFO_ORDER if self.bearing_defect == "outer" else BPFI_ORDER
        am = BEARING_AM_DEPTH[self.bearing_defect]
        impact = sev * BEARING_IMPACT
        p1, p2, p3, q1, q2 = self._phases
        wander_keep = math.exp(-dt / SPEED_WANDER_TAU_S)
        wander_in = SPEED_WANDER * math.sqrt(1.0 - wander_keep * wander_keep)
        bx, by, bz = BEARING_AXES
        rx, ry, rz = RESONANCE_AXES

        theta, t, wander, count = self._theta, self._t, self._wander, self._n
        z_b, z_n, next_impact = self._z_bearing, self._z_noise, self._next_impact
        shaft_hz = base_hz * (1.0 + wander)
        a1, a2, a3, b1, b2 = _amplitudes(fault or "normal", sev, shaft_hz)
        out: list[tuple[float, float, float]] = []
        append = out.append
        for _ in range(n):
            count += 1
            if count % 10 == 1:  # speed wanders slowly; refresh amplitudes every 10 samples
                wander = wander * wander_keep**10 + wander_in * math.sqrt(10.0) * gauss(0.0, 1.0)
                shaft_hz = base_hz * (1.0 + wander)
                a1, a2, a3, b1, b2 = _amplitudes(fault or "normal", sev, shaft_hz)
            theta = (theta + 2.0 * math.pi * shaft_hz * dt) % (2.0 * math.pi)
            t += dt
            z_b *= step
            if bearing:
                while next_impact <= t:
                    force = impact * (1.0 + am * math.cos(theta))
                    z_b += force * cmath.exp(pole * (t - next_impact))
                    next_impact += (1.0 + BEARING_SLIP * gauss(0.0, 1.0)) / (order * shaft_hz)
            z_n = z_n * step + res_in * gauss(0.0, 1.0)
            s_b = z_b.imag
            s_n = z_n.imag
            h1 = a1 * math.cos(theta + p1)
            h2 = a2 * math.cos(2.0 * theta + p2)
            h3 = a3 * math.cos(3.0 * theta + p3)
            x = h1 + h2 + h3 + bx * s_b + rx * s_n + noise * gauss(0.0, 1.0)
            y = (
                Y_STIFFNESS
                * (
                    a1 * math.sin(theta + p1)
                    + a2 * math.sin(2.0 * theta + p2)
                    + a3 * math.sin(3.0 * theta + p3)
                )
                + by * s_b
                + ry * s_n
                + noise * gauss(0.0, 1.0)
            )
            z = (
                b1 * math.cos(theta + q1)
                + b2 * math.cos(2.0 * theta + q2)
                + bz * s_b
                + rz * s_n
                + noise * gauss(0.0, 1.0)
                + GRAVITY_G
            )
            append((gain * (x * cos_t + z * sin_t), gain * y, gain * (z * cos_t - x * sin_t)))
        if not bearing:
            next_impact = t
        self._theta, self._t, self._wander, self._n = theta, t, wander, count
        self._z_bearing, self._z_noise, self._next_impact = z_b, z_n, next_impact
        return out
