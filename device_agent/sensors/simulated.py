"""``simulated``: the vibration of a rotating machine (see ``vibration.py`` for the physics)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from device_agent.errors import CommandError
from device_agent.sensors.base import Row, Sensor, SensorOptions, register_sensor
from device_agent.sensors.vibration import (
    CHANNELS,
    DEFAULT_NOISE,
    DEFAULT_RPM,
    FAULTS,
    VibrationSimulator,
)


class SimulatedOptions(SensorOptions):
    """Options of the ``simulated`` sensor: machine, sensor and fault parameters."""

    rpm: float = Field(default=DEFAULT_RPM, gt=0, le=100_000, description="shaft speed")
    gain: float = Field(default=1.0, gt=0, le=1000, description="sensor sensitivity multiplier")
    noise: float = Field(default=DEFAULT_NOISE, ge=0, le=10, description="white noise, g (1 sigma)")
    drift: float = Field(default=0.0, ge=0, le=1, description="machine/mounting change, 0 = as trained")
    seed: int | None = Field(
        default=None, ge=-(2**63), le=2**63 - 1, description="random seed (None: different every run)"
    )
    bearing_defect: Literal["outer", "inner"] = "outer"
    fault: Literal["imbalance", "misalignment", "bearing_fault"] | None = Field(
        default=None, description="fault present from the start"
    )
    severity: float = Field(default=1.0, gt=0, le=1)


@register_sensor("simulated")
class SimulatedSensor(Sensor):
    """A simulated 3-axis vibration sensor on a rotating machine (``VibrationSimulator``)."""

    Options = SimulatedOptions

    def __init__(self, options: SensorOptions, *, rate_hz: float) -> None:
        super().__init__(options, rate_hz=rate_hz)
        self.sim = self._build()

    def _build(self) -> VibrationSimulator:
        opts = self._opts
        sim = VibrationSimulator(
            rate_hz=self.rate_hz,
            rpm=opts.rpm,
            gain=opts.gain,
            noise=opts.noise,
            drift=opts.drift,
            seed=opts.seed,
            bearing_defect=opts.bearing_defect,
        )
        if opts.fault is not None:
            sim.set_fault(opts.fault, opts.severity)
        return sim

    @property
    def _opts(self) -> SimulatedOptions:
        assert isinstance(self.options, SimulatedOptions)
        return self.options

    @property
    def channels(self) -> tuple[str, ...]:
        """The channel names (x, y, z)."""
        return CHANNELS

    def read(self, n_samples: int) -> list[Row]:
        """The next ``n_samples`` rows of the simulated signal."""
        return self.sim.read(n_samples)  # type: ignore[return-value]

    @property
    def label(self) -> str | None:
        """Ground truth: the simulated machine's current class."""
        return self.sim.label

    @property
    def fault(self) -> str | None:
        """The fault being simulated, if any."""
        return self.sim.fault

    def set_rate(self, rate_hz: float) -> None:
        """Follow a new sampling rate."""
        super().set_rate(rate_hz)
        self.sim.rate_hz = rate_hz

    def inject_fault(self, fault: str, severity: float) -> None:
        """Simulate ``fault`` at ``severity`` from now on; ``CommandError`` for an unknown one."""
        if fault not in FAULTS:
            raise CommandError(f"unknown fault {fault!r}; expected one of {', '.join(FAULTS)}")
        try:
            self.sim.set_fault(fault, severity)
        except ValueError as exc:
            raise CommandError(str(exc)) from exc

    def clear_fault(self) -> None:
        """Simulate a normal machine again."""
        self.sim.clear_fault()

    def apply_options(self, options: SensorOptions) -> None:
        """Apply new machine and sensor parameters to the running simulation."""
        assert isinstance(options, SimulatedOptions)
        sim = self.sim
        sim.rpm, sim.gain, sim.noise, sim.drift = options.rpm, options.gain, options.noise, options.drift
        sim.bearing_defect = options.bearing_defect
        if options.fault != self._opts.fault:
            if options.fault is None:
                sim.clear_fault()
            else:
                sim.set_fault(options.fault, options.severity)

    def restart(self) -> None:
        """A fresh machine with the configured options (an injected fault is cleared)."""
        self.sim = self._build()
