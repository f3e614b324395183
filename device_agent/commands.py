"""Command handling on the device's ``cmd`` topic, in its own thread.

Every command gets exactly one ack (QoS1, ``ack`` topic) per delivery: ``ok``, ``error`` (bad
arguments, unknown command, failure), ``expired`` (past ``expires_at``) or ``rejected`` (addressed
to another device, or expiring further ahead than ``command_ttl_cap_s``). Command ids are
remembered (``COMMAND_HISTORY`` newest, on disk) with their ack: a redelivered or repeated id is
not executed again and its original ack is sent again with ``duplicate=true``. A payload that is
not JSON, or has no usable ``command_id``, cannot be acked: it is logged and counted.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final, Protocol

from pydantic import JsonValue, ValidationError

from device_agent.actuators import MAX_ACTUATOR_TARGETS, Actuator
from device_agent.errors import CommandError
from device_agent.state import connect, transaction
from shared.errors import EdgefleetError, SchemaError
from shared.mqtt import MqttLink, Received
from shared.schemas import (
    AckStatus,
    ActuateArgs,
    Command,
    CommandAck,
    CommandArgs,
    CommandName,
    InjectFaultArgs,
    NoArgs,
    SetRateArgs,
    SetWindowArgs,
    decode_message,
    encode_message,
)
from shared.topics import ID_PATTERN, Topics

logger = logging.getLogger(__name__)

COMMAND_HISTORY: Final = 1000
STOP_POLL_S: Final = 1.0
_ID_RE: Final = re.compile(ID_PATTERN)


class AgentControl(Protocol):
    """What commands may do to the running agent (implemented by ``Agent``)."""

    def ping(self) -> dict[str, JsonValue]:
        """Answer a ``ping``."""

    def set_config(self, changes: Mapping[str, Any]) -> dict[str, JsonValue]:
        """Change runtime settings."""

    def inject_fault(self, fault: str, severity: float) -> dict[str, JsonValue]:
        """Make the sensor simulate a fault."""

    def clear_fault(self) -> dict[str, JsonValue]:
        """Make the sensor normal again."""

    def restart_sensor(self) -> dict[str, JsonValue]:
        """Restart the sensor."""


class CommandStats:
    """Counts of commands received, executed, duplicated, expired, rejected, failed and unackable."""

    def __init__(self) -> None:
        self.received = 0
        self.executed = 0
        self.duplicates = 0
        self.expired = 0
        self.rejected = 0
        self.errors = 0
        self.unackable = 0

    def as_dict(self) -> dict[str, int]:
        """The counts by name."""
        return dict(vars(self))


class CommandProcessor:
    """Validates, dedups and executes commands; persists ids and actuator states."""

    def __init__(
        self,
        *,
        device_id: str,
        topics: Topics,
        link: MqttLink,
        control: AgentControl,
        actuator: Actuator,
        db_path: Path,
        ttl_cap_s: float,
        desired_topic: str | None = None,
        on_desired: Callable[[bytes], None] | None = None,
    ) -> None:
        """``on_desired`` handles what arrives on ``desired_topic`` (the device's desired config)."""
        self.device_id = device_id
        self.desired_topic = desired_topic
        self.on_desired = on_desired
        self.ack_topic = topics.ack(device_id)
        self.link = link
        self.control = control
        self.actuator = actuator
        self.db_path = db_path
        self.ttl_cap_s = ttl_cap_s
        self.stats = CommandStats()
        self.conn: sqlite3.Connection | None = None
        self._handlers: dict[CommandName, Callable[[dict[str, JsonValue]], dict[str, JsonValue]]] = {
            CommandName.PING: self._ping,
            CommandName.SET_RATE: self._set_rate,
            CommandName.SET_WINDOW: self._set_window,
            CommandName.SET_CONFIG: self._set_config,
            CommandName.INJECT_FAULT: self._inject_fault,
            CommandName.CLEAR_FAULT: self._clear_fault,
            CommandName.ACTUATE: self._actuate,
            CommandName.RESTART_SENSOR: self._restart_sensor,
        }

    # -- thread ---------------------------------------------------------------------------------
    def open(self) -> None:
        """Open the command state database (executed ids, actuator states)."""
        self.conn = connect(self.db_path)

    def load_actuator_states(self) -> dict[str, str]:
        """The actuator states saved by earlier runs."""
        assert self.conn is not None
        return dict(self.conn.execute("SELECT target, state FROM actuators").fetchall())

    def run(self, inbox: queue.SimpleQueue[Received], stop: threading.Event) -> None:
        """Consume ``inbox`` until ``stop``; opens its own database connection."""
        self.open()
        self.actuator.states.update(self.load_actuator_states())
        try:
            while not stop.is_set():
                try:
                    msg = inbox.get(timeout=STOP_POLL_S)
                except queue.Empty:
                    continue
                if not msg.topic:  # wake-up sentinel
                    continue
                try:
                    if msg.topic == self.desired_topic and self.on_desired is not None:
                        self.on_desired(msg.payload)
                    else:
                        self.handle(msg.payload)
                except Exception:  # one bad command must never stop the thread
                    self.stats.errors += 1
                    logger.exception("command handling failed")
        finally:
            self.close()

    def close(self) -> None:
        """Close the command state database."""
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    # -- one command ----------------------------------------------------------------------------
    def handle(self, payload: bytes) -> CommandAck | None:
        """Process one payload; returns the ack that was published (or None if none could be)."""
        self.stats.received += 1
        try:
            command = decode_message(payload, Command)
        except SchemaError as exc:
            command_id = _recover_id(payload)
            if command_id is None:
                self.stats.unackable += 1
                logger.warning("command without a usable command_id dropped: %s", exc)
                return None
            previous = self._lookup(command_id)
            if previous is not None:
                return self._resend(previous)
            self.stats.errors += 1
            return self._finish(command_id, AckStatus.ERROR, error=str(exc))

        previous = self._lookup(command.command_id)
        if previous is not None:
            return self._resend(previous)
        now = time.time()
        if command.device_id != self.device_id:
            self.stats.rejected += 1
            return self._finish(
                command.command_id,
                AckStatus.REJECTED,
                error=f"command for device {command.device_id!r} reached device {self.device_id!r}",
            )
        if now > command.expires_at:
            self.stats.expired += 1
            return self._finish(
                command.command_id,
                AckStatus.EXPIRED,
                error=f"expired {now - command.expires_at:.3f} s ago (expires_at {command.expires_at:.3f})",
            )
        if command.expires_at - now > self.ttl_cap_s:
            self.stats.rejected += 1
            return self._finish(
                command.command_id,
                AckStatus.REJECTED,
                error=f"expires_at is more than command_ttl_cap_s={self.ttl_cap_s:g} s ahead",
            )
        try:
            result = self._handlers[command.name](dict(command.args))
        except CommandError as exc:
            self.stats.errors += 1
            return self._finish(command.command_id, AckStatus.ERROR, error=str(exc))
        except EdgefleetError as exc:
            self.stats.errors += 1
            return self._finish(command.command_id, AckStatus.ERROR, error=f"{type(exc).__name__}: {exc}")
        self.stats.executed += 1
        logger.info("command %s %s from %s: ok", command.name.value, command.command_id, command.sender)
        return self._finish(command.command_id, AckStatus.OK, result=result)

    def _finish(
        self,
        command_id: str,
        status: AckStatus,
        *,
        error: str | None = None,
        result: dict[str, JsonValue] | None = None,
    ) -> CommandAck:
        ack = CommandAck(
            command_id=command_id,
            device_id=self.device_id,
            status=status,
            ok=status is AckStatus.OK,
            error=error,
            result=result or {},
        )
        if error is not None:
            logger.warning("command %s: %s: %s", command_id, status.value, error)
        self._remember(ack)
        self._publish(ack)
        return ack

    def _resend(self, previous: CommandAck) -> CommandAck:
        self.stats.duplicates += 1
        ack = previous.model_copy(update={"duplicate": True, "ts": time.time()})
        logger.info("command %s is a duplicate: ack sent again, not executed", previous.command_id)
        self._publish(ack)
        return ack

    def _publish(self, ack: CommandAck) -> None:
        self.link.publish(self.ack_topic, encode_message(ack), qos=1)

    def _lookup(self, command_id: str) -> CommandAck | None:
        assert self.conn is not None
        row = self.conn.execute("SELECT ack FROM commands WHERE command_id = ?", (command_id,)).fetchone()
        if row is None:
            return None
        try:
            return decode_message(row[0], CommandAck)
        except SchemaError:
            logger.warning("stored ack of command %s is unreadable; executing it again", command_id)
            return None

    def _remember(self, ack: CommandAck) -> None:
        assert self.conn is not None
        with transaction(self.conn) as c:
            c.execute(
                "INSERT OR REPLACE INTO commands (command_id, received, ack) VALUES (?, ?, ?)",
                (ack.command_id, time.time(), encode_message(ack).decode()),
            )
            c.execute(
                "DELETE FROM commands WHERE command_id IN (SELECT command_id FROM commands "
                "ORDER BY received DESC LIMIT -1 OFFSET ?)",
                (COMMAND_HISTORY,),
            )

    # -- handlers -------------------------------------------------------------------------------
    @staticmethod
    def _args(model: type[CommandArgs], args: dict[str, JsonValue]) -> Any:
        try:
            return model.model_validate(args)
        except ValidationError as exc:
            problems = "; ".join(
                f"args.{'.'.join(str(p) for p in e['loc']) or ''}: {e['msg']}" for e in exc.errors()[:5]
            )
            raise CommandError(problems) from exc

    def _ping(self, args: dict[str, JsonValue]) -> dict[str, JsonValue]:
        self._args(NoArgs, args)
        result = self.control.ping()
        result["commands"] = {**self.stats.as_dict(), "inbox_full": self.link.inbox_full}
        return result

    def _set_rate(self, args: dict[str, JsonValue]) -> dict[str, JsonValue]:
        parsed: SetRateArgs = self._args(SetRateArgs, args)
        return self.control.set_config({"rate_hz": parsed.rate_hz})

    def _set_window(self, args: dict[str, JsonValue]) -> dict[str, JsonValue]:
        parsed: SetWindowArgs = self._args(SetWindowArgs, args)
        return self.control.set_config({"window": parsed.window, "hop": parsed.hop})

    def _set_config(self, args: dict[str, JsonValue]) -> dict[str, JsonValue]:
        if not args:
            raise CommandError("set_config needs at least one setting in args")
        return self.control.set_config(args)

    def _inject_fault(self, args: dict[str, JsonValue]) -> dict[str, JsonValue]:
        parsed: InjectFaultArgs = self._args(InjectFaultArgs, args)
        return self.control.inject_fault(parsed.fault, parsed.severity)

    def _clear_fault(self, args: dict[str, JsonValue]) -> dict[str, JsonValue]:
        self._args(NoArgs, args)
        return self.control.clear_fault()

    def _restart_sensor(self, args: dict[str, JsonValue]) -> dict[str, JsonValue]:
        self._args(NoArgs, args)
        return self.control.restart_sensor()

    def _actuate(self, args: dict[str, JsonValue]) -> dict[str, JsonValue]:
        parsed: ActuateArgs = self._args(ActuateArgs, args)  # bounded lengths (shared/schemas.py)
        states = self.actuator.states
        if parsed.target is not None and parsed.target not in states and len(states) >= MAX_ACTUATOR_TARGETS:
            raise CommandError(
                f"args.target: {parsed.target!r} would be target {len(states) + 1}; "
                f"at most {MAX_ACTUATOR_TARGETS} actuator targets"
            )
        target, state = self.actuator.actuate(args)
        assert self.conn is not None
        with transaction(self.conn) as c:
            c.execute(
                "INSERT OR REPLACE INTO actuators (target, state, updated) VALUES (?, ?, ?)",
                (target, state, time.time()),
            )
        return {"target": target, "state": state}


def _recover_id(payload: bytes) -> str | None:
    """The command_id of a payload that failed validation, if it has a usable one."""
    try:
        data = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return None
    if isinstance(data, dict):
        value = data.get("command_id")
        if isinstance(value, str) and _ID_RE.match(value):
            return value
    return None
