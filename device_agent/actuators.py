"""Actuator plugins for the ``actuate`` command; the default ``log`` actuator records state.

An actuator turns ``{"action": ..., ...}`` into a change of state of one target and returns
the new state; the agent reports every target's state in its heartbeat.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, Final, TypeVar

from device_agent.errors import AgentError, CommandError

logger = logging.getLogger(__name__)

# action -> (target, new state)
LOG_ACTIONS: Final[dict[str, tuple[str, str]]] = {
    "stop_motor": ("motor", "stopped"),
    "start_motor": ("motor", "running"),
    "reduce_speed": ("motor", "reduced"),
    "raise_alarm": ("alarm", "on"),
    "clear_alarm": ("alarm", "off"),
    "open_valve": ("valve", "open"),
    "close_valve": ("valve", "closed"),
}


# Targets whose state an actuator keeps (memory, heartbeat, state database): a command naming one more
# is refused. The built-in actions use 3.
MAX_ACTUATOR_TARGETS: Final = 64


class Actuator(ABC):
    """What an ``actuate`` command drives; keeps the last state of each target."""

    name = ""

    def __init__(self, states: Mapping[str, str] | None = None) -> None:
        self.states: dict[str, str] = dict(states or {})

    @abstractmethod
    def actuate(self, args: Mapping[str, Any]) -> tuple[str, str]:
        """Carry out the action in ``args``; return (target, new state) or raise ``CommandError``."""


ACTUATORS: dict[str, type[Actuator]] = {}
A = TypeVar("A", bound=type[Actuator])


def register_actuator(name: str) -> Callable[[A], A]:
    """Class decorator: make an actuator available under ``name`` in the settings."""

    def decorate(cls: A) -> A:
        cls.name = name
        ACTUATORS[name] = cls
        return cls

    return decorate


def create_actuator(name: str, states: Mapping[str, str] | None = None) -> Actuator:
    """The actuator registered as ``name``, with its targets' last known states."""
    cls = ACTUATORS.get(name)
    if cls is None:
        raise AgentError(f"unknown actuator {name!r}; available: {', '.join(sorted(ACTUATORS))}")
    return cls(states)


@register_actuator("log")
class LogActuator(Actuator):
    """Logs the action and records the target's new state; drives no hardware.

    Actions: the names in ``LOG_ACTIONS``, or ``{"action": "set", "target": T, "state": S}``.
    """

    def actuate(self, args: Mapping[str, Any]) -> tuple[str, str]:
        """Log the action and record the target's new state."""
        action = args.get("action")
        if not isinstance(action, str):
            raise CommandError("actuate needs args.action (a string)")
        if action == "set":
            target, state = args.get("target"), args.get("state")
            if not (isinstance(target, str) and isinstance(state, str) and target and state):
                raise CommandError("action 'set' needs args.target and args.state (strings)")
            if target not in self.states and len(self.states) >= MAX_ACTUATOR_TARGETS:
                raise CommandError(f"args.target: at most {MAX_ACTUATOR_TARGETS} actuator targets")
        elif action in LOG_ACTIONS:
            target, state = LOG_ACTIONS[action]
        else:
            raise CommandError(f"unknown action {action!r}; known: set, {', '.join(sorted(LOG_ACTIONS))}")
        logger.warning("actuator: %s -> %s = %s", action, target, state)
        self.states[target] = state
        return target, state
