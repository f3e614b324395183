"""Errors of the device agent, under the project's one hierarchy."""

from __future__ import annotations

from shared.errors import EdgefleetError


class AgentError(EdgefleetError):
    """The device agent cannot run (e.g. its data directory is locked by another agent)."""


class SensorError(AgentError):
    """A sensor cannot be configured, opened or read."""


class CommandError(AgentError):
    """A command was understood but cannot be carried out; the text goes into the error ack."""
