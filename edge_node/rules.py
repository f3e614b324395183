"""Where a decision is made: declarative rules evaluated on every classified window.

A rule reads "class X with p >= T in K of the last N windows of a device -> command + alert
severity", with a per-device cooldown and a per-rule rate limit (decisions per minute)::

    rules:
      - name: stop_on_bearing_fault
        class: bearing_fault
        min_probability: 0.9
        k: 3
        n: 5
        severity: high
        command: {name: actuate, args: {action: stop_motor}}
        cooldown_s: 60
        max_per_minute: 10
"""

from __future__ import annotations

import fnmatch
import logging
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError, model_validator

from shared.errors import ConfigError
from shared.schemas import CommandName, Severity

logger = logging.getLogger(__name__)

DEVICE_TTL_S: Final = 3600.0  # default: a device not evaluated this long is forgotten
MAX_DEVICES: Final = 100_000  # default: devices with rule state at once
SWEEP_S: Final = 1.0  # at most this often, devices idle for the TTL are swept out


class CommandSpec(BaseModel):
    """The command a rule sends to the device when it fires."""

    model_config = ConfigDict(extra="forbid")

    name: CommandName
    args: dict[str, JsonValue] = Field(default_factory=dict)
    ttl_s: float | None = Field(default=None, gt=0, description="default: the edge's command_ttl_s")


class RuleSpec(BaseModel):
    """One rule: fire when ``k`` of a device's last ``n`` windows are ``class`` above ``min_probability``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(min_length=1, max_length=128)
    class_name: str = Field(alias="class", min_length=1)
    min_probability: float = Field(default=0.9, ge=0, le=1)
    k: int = Field(default=1, ge=1)
    n: int = Field(default=1, ge=1, le=10_000)
    severity: Severity = Severity.MEDIUM
    command: CommandSpec | None = None
    cooldown_s: float = Field(default=0.0, ge=0, description="per device, after a decision")
    max_per_minute: int | None = Field(default=None, ge=1, description="decisions of this rule, all devices")
    devices: list[str] | None = Field(default=None, description="device id globs; default: all")

    @model_validator(mode="after")
    def _k_le_n(self) -> Self:
        if self.k > self.n:
            raise ValueError(f"rule {self.name!r}: k ({self.k}) must not exceed n ({self.n})")
        return self


class RulesFile(BaseModel):
    """The rules file: a list of rules."""

    model_config = ConfigDict(extra="forbid")

    rules: list[RuleSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> Self:
        names = [r.name for r in self.rules]
        if len(names) != len(set(names)):
            raise ValueError("rule names must be unique")
        return self


def load_rules(path: Path) -> list[RuleSpec]:
    """Parse a rules YAML file; ``ConfigError`` names the file and the bad field."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"rules file {path}: {exc}") from exc
    try:
        return RulesFile.model_validate(data).rules
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"rules file {path}: {problems}") from exc


@dataclass(frozen=True, slots=True)
class Firing:
    """A rule that fired for one device's window."""

    rule: RuleSpec
    device_id: str
    probability: float
    window_seq: int
    window_ts: float


class _RuleState:
    """One rule's memory of one device: its last ``n`` hits as bits of an int, and its cooldown."""

    __slots__ = ("bits", "count", "hits", "last_fired")

    def __init__(self) -> None:
        self.bits = 0  # bit 0: the newest window was a hit; bit n-1: the oldest of the last n
        self.count = 0  # windows in ``bits`` (up to n)
        self.hits = 0
        self.last_fired = float("-inf")


class _DeviceRules:
    """Every rule's state for one device (``None``: the rule's device globs exclude it)."""

    __slots__ = ("states", "touched")

    def __init__(self, states: list[_RuleState | None], now: float) -> None:
        self.states = states
        self.touched = now


class RuleEngine:
    """Evaluates every rule on every window. Single-threaded: only the decision thread calls it.

    Per-device state is bounded: at most ``max_devices`` devices (the least recently evaluated go
    first, ``evicted_full``), and a device not evaluated for ``device_ttl_s`` (or for the longest
    rule cooldown, if longer: forgetting must not cut a cooldown short) is forgotten
    (``evicted_idle``), swept at most every ``SWEEP_S``.
    """

    def __init__(
        self,
        rules: list[RuleSpec],
        class_names: list[str] | None = None,
        *,
        device_ttl_s: float = DEVICE_TTL_S,
        max_devices: int = MAX_DEVICES,
    ) -> None:
        self.rules = rules
        self.max_devices = max_devices
        self.ttl_s = max([device_ttl_s, *(r.cooldown_s for r in rules)])
        self._full = [(1 << r.n) - 1 for r in rules]
        # Least recently evaluated first: the TTL sweep and the LRU cap both pop from the front.
        self._devices: OrderedDict[str, _DeviceRules] = OrderedDict()
        self._next_sweep = float("-inf")
        self._rate: dict[str, deque[float]] = {r.name: deque() for r in rules}
        self._class_index: dict[str, int] = {}
        self.suppressed_cooldown = 0
        self.suppressed_rate = 0
        self.fired = 0
        self.evicted_idle = 0
        self.evicted_full = 0
        self.set_classes(class_names or [])

    def __len__(self) -> int:
        return len(self._devices)

    def set_classes(self, class_names: list[str]) -> None:
        """Map each rule's class to an output index (a new model may order classes differently)."""
        index = {name: i for i, name in enumerate(class_names)}
        self._class_index = {r.name: index[r.class_name] for r in self.rules if r.class_name in index}
        for rule in self.rules:
            if class_names and rule.class_name not in index:
                logger.warning(
                    "rule %s: class %r is not one of the model's classes", rule.name, rule.class_name
                )

    def _device(self, device_id: str, now: float) -> _DeviceRules:
        if now >= self._next_sweep:
            self._sweep(now)
        devices = self._devices
        entry = devices.get(device_id)
        if entry is None:
            # Device globs are matched once per device, not on every window.
            states: list[_RuleState | None] = [
                _RuleState()
                if rule.devices is None or any(fnmatch.fnmatchcase(device_id, g) for g in rule.devices)
                else None
                for rule in self.rules
            ]
            entry = devices[device_id] = _DeviceRules(states, now)
            if len(devices) > self.max_devices:
                devices.popitem(last=False)
                self.evicted_full += 1
        else:
            devices.move_to_end(device_id)
            entry.touched = now
        return entry

    def _sweep(self, now: float) -> None:
        """Forget the devices not evaluated for ``ttl_s`` (the front of the LRU order)."""
        self._next_sweep = now + SWEEP_S
        cutoff = now - self.ttl_s
        devices = self._devices
        while devices and next(iter(devices.values())).touched < cutoff:
            devices.popitem(last=False)
            self.evicted_idle += 1

    def evaluate(
        self, device_id: str, probs: list[float], seq: int, ts: float, now: float | None = None
    ) -> list[Firing]:
        """The rules that fire for one device's window, given its class probabilities."""
        now = time.monotonic() if now is None else now
        states = self._device(device_id, now).states
        out: list[Firing] = []
        for i, rule in enumerate(self.rules):
            state = states[i]
            if state is None:
                continue
            col = self._class_index.get(rule.name)
            if col is None:
                continue
            p = probs[col]
            hit = p >= rule.min_probability
            if state.count == rule.n:
                state.hits -= (state.bits >> (rule.n - 1)) & 1  # the oldest window leaves the last n
            else:
                state.count += 1
            state.bits = ((state.bits << 1) | hit) & self._full[i]
            state.hits += hit
            if state.hits < rule.k:
                continue
            if now - state.last_fired < rule.cooldown_s:
                self.suppressed_cooldown += 1
                continue
            if rule.max_per_minute is not None:
                stamps = self._rate[rule.name]
                while stamps and now - stamps[0] >= 60.0:
                    stamps.popleft()
                if len(stamps) >= rule.max_per_minute:
                    self.suppressed_rate += 1
                    continue
                stamps.append(now)
            state.last_fired = now
            self.fired += 1
            out.append(Firing(rule, device_id, float(p), seq, ts))
        return out
