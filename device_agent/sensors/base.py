"""The sensor interface and its registry: adding a sensor is one class plus ``@register_sensor``."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from device_agent.errors import CommandError, SensorError

logger = logging.getLogger(__name__)

Row = tuple[float, ...]


class SensorOptions(BaseModel):
    """Base of each sensor's ``Options``: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class Sensor(ABC):
    """A source of samples: ``read(n)`` returns ``n`` rows of ``len(channels)`` floats.

    ``self_paced`` sensors (e.g. a program printing samples) deliver at their own rate and
    ``read`` blocks until samples arrive; the others are sampled on the agent's clock.
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type[SensorOptions]] = SensorOptions
    self_paced: ClassVar[bool] = False

    def __init__(self, options: SensorOptions, *, rate_hz: float) -> None:
        self.options = options
        self.rate_hz = rate_hz

    @property
    @abstractmethod
    def channels(self) -> tuple[str, ...]:
        """Channel names, in the order of each row."""

    @abstractmethod
    def read(self, n_samples: int) -> list[Row]:
        """The next samples (at most ``n_samples``; a self-paced sensor may return fewer on timeout)."""

    @property
    def label(self) -> str | None:
        """Ground truth of the most recent sample, when the sensor knows it (simulation, replay)."""
        return None

    @property
    def fault(self) -> str | None:
        """The injected fault, for sensors that simulate one."""
        return None

    def set_rate(self, rate_hz: float) -> None:
        """Follow a new sampling rate."""
        self.rate_hz = rate_hz

    def inject_fault(self, fault: str, severity: float) -> None:  # noqa: ARG002  (hook)
        """Simulate ``fault`` at ``severity``; real sensors refuse (``CommandError``)."""
        raise CommandError(f"sensor {self.name!r} does not simulate faults")

    def clear_fault(self) -> None:
        """Stop simulating a fault; real sensors refuse (``CommandError``)."""
        raise CommandError(f"sensor {self.name!r} does not simulate faults")

    def update_options(self, changes: Mapping[str, Any]) -> SensorOptions:
        """Validate ``changes`` against ``Options`` and apply them to the running sensor."""
        merged = {**self.options.model_dump(), **changes}
        try:
            options = self.Options.model_validate(merged)
        except ValidationError as exc:
            raise CommandError(f"invalid options for sensor {self.name!r}: {_describe(exc)}") from exc
        self.apply_options(options)
        self.options = options
        return options

    def apply_options(self, options: SensorOptions) -> None:  # noqa: ARG002  (hook)
        """Apply validated options to the running sensor; by default refused (restart it)."""
        raise CommandError(f"sensor {self.name!r} cannot change options while running; restart it")

    @property
    def row_length(self) -> int | None:
        """Samples per recorded row when the sensor replays rows (a dataset's windows), else None."""
        return None

    def realign(self) -> None:  # noqa: B027  (optional hook)
        """The agent dropped a partial window (a gap): a row-replaying sensor skips to its next row."""

    def restart(self) -> None:
        """Start over from a fresh state (``restart_sensor``)."""
        self.close()
        self.open()

    def open(self) -> None:  # noqa: B027  (optional hook)
        """Acquire resources (files, processes); called once before the first read."""

    def close(self) -> None:  # noqa: B027  (optional hook)
        """Release resources."""

    def stats(self) -> dict[str, int]:
        """Counters worth reporting (bad lines, restarts...)."""
        return {}


def _describe(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or '<options>'}: {err['msg']}" for err in exc.errors()[:5]
    )


SENSORS: dict[str, type[Sensor]] = {}
S = TypeVar("S", bound=type[Sensor])


def register_sensor(name: str) -> Callable[[S], S]:
    """Class decorator: make a sensor selectable as ``sensor.kind: name``."""

    def decorate(cls: S) -> S:
        if name in SENSORS and SENSORS[name] is not cls:
            raise ValueError(f"sensor {name!r} is already registered by {SENSORS[name].__qualname__}")
        cls.name = name
        SENSORS[name] = cls
        return cls

    return decorate


def create_sensor(kind: str, options: Mapping[str, Any], *, rate_hz: float) -> Sensor:
    """Build and open the sensor ``kind`` with validated ``options``; ``SensorError`` names what was wrong."""
    cls = SENSORS.get(kind)
    if cls is None:
        raise SensorError(f"unknown sensor kind {kind!r}; available: {', '.join(sorted(SENSORS))}")
    try:
        parsed = cls.Options.model_validate(dict(options))
    except ValidationError as exc:
        raise SensorError(f"invalid sensor.options for {kind!r}: {_describe(exc)}") from exc
    sensor = cls(parsed, rate_hz=rate_hz)
    sensor.open()
    return sensor
