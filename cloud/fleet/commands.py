"""Cloud -> device commands: fan-out over the broker with per-target acks.

Routing: the cloud publishes each ``Command`` (QoS1, id, expiry) on the device's ``cmd`` topic of the
cloud broker; in a split deployment a mosquitto bridge carries ``dev/+/cmd`` down to the site broker
and ``dev/+/ack`` back up (docs/operations.md says why a bridge, not an edge relay). The device runs a
command id at most once and acks it; acks are recorded in the registry (here while waiting, and by the
ingest for late ones) and every send is in the audit log with its sender."""

from __future__ import annotations

import json
import logging
import os
import queue
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import JsonValue

from cloud.errors import CommandRequestError, NotFoundError
from cloud.registry import crud, fleet
from cloud.registry.db import session_scope
from shared.errors import SchemaError
from shared.mqtt import MqttLink
from shared.schemas import Command, CommandAck, CommandName, decode_message, encode_message
from shared.settings.cloud import CloudSettings

logger = logging.getLogger(__name__)

SUBSCRIBE_TIMEOUT_S = 10.0


@dataclass
class CommandOutcome:
    """What became of one command sent to one device: ack status, error, result and latency."""

    device_id: str
    command_id: str
    status: str = "timeout"  # ok / error / expired / rejected / timeout
    error: str | None = None
    result: dict[str, Any] = field(default_factory=dict)
    duplicate: bool = False
    latency_ms: float | None = None


@dataclass
class FanOutResult:
    """The outcomes of one fan-out, one per target device, in the order sent."""

    outcomes: list[CommandOutcome]

    def summary(self) -> dict[str, int]:
        """Counts of targets, acked, failed (an error, expired or rejected ack) and timed out."""
        acked = sum(1 for o in self.outcomes if o.status == "ok")
        timed_out = sum(1 for o in self.outcomes if o.status == "timeout")
        return {
            "targets": len(self.outcomes),
            "acked": acked,
            "failed": len(self.outcomes) - acked - timed_out,
            "timed_out": timed_out,
        }


def parse_args(items: Sequence[str]) -> dict[str, JsonValue]:
    """``k=v`` pairs; values parse as JSON when they can (numbers, true, lists), else stay strings."""
    args: dict[str, JsonValue] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CommandRequestError(f"argument {item!r}: expected KEY=VALUE")
        try:
            args[key] = json.loads(value)
        except ValueError:
            args[key] = value
    return args


def resolve_targets(
    *, settings: CloudSettings, device: str | None = None, group: str | None = None, edge: str | None = None
) -> list[str]:
    """Device ids for one device, a group or tag, or every device behind an edge."""
    if sum(x is not None for x in (device, group, edge)) != 1:
        raise CommandRequestError("give exactly one of DEVICE, --group TAG and --edge EDGE")
    if device is not None:
        return [device]
    with session_scope(settings.resolved_database_url) as session:
        if group is not None:
            found = [d.device_id for d in fleet.devices_in_group(session, tag=group)]
            what = f"group or tag {group!r}"
        else:
            assert edge is not None
            found = [d.device_id for d in fleet.devices_of(session, edge_id=edge)]
            what = f"edge {edge!r}"
    if not found:
        raise NotFoundError(f"no device in the registry belongs to {what}")
    return found


def send_commands(
    *,
    settings: CloudSettings,
    device_ids: Sequence[str],
    name: str,
    args: dict[str, JsonValue] | None = None,
    ttl_s: float = 60.0,
    wait_s: float = 10.0,
    sender: str = "cli",
    on_ack: Callable[[CommandOutcome], None] | None = None,
    link: MqttLink | None = None,
) -> FanOutResult:
    """Send ``name`` to every device, wait up to ``wait_s`` for their acks (``on_ack`` for each as it
    arrives). Acks that arrive later are recorded by the ingest."""
    try:
        command_name = CommandName(name)
    except ValueError as exc:
        raise CommandRequestError(
            f"unknown command {name!r}: one of {[c.value for c in CommandName]}"
        ) from exc
    topics = settings.broker.topics
    try:
        commands = [
            Command.create(device_id=d, name=command_name, args=args or {}, ttl_s=ttl_s, sender=sender)
            for d in device_ids
        ]
    except SchemaError as exc:  # an argument over its bound: the caller's mistake, not a server error
        raise CommandRequestError(str(exc)) from exc
    outcomes = {
        c.command_id: CommandOutcome(device_id=c.device_id, command_id=c.command_id) for c in commands
    }
    url = settings.resolved_database_url
    with session_scope(url) as session:
        for command in commands:
            crud.record_command(session, command=command)
        crud.audit(
            session,
            actor=sender,
            action="command_send",
            target=command_name.value,
            detail={"devices": list(device_ids), "args": dict(args or {}), "ids": list(outcomes)},
        )
    own = link is None
    if link is None:
        link = MqttLink(settings.broker, client_id=f"edgefleet-cmd-{os.getpid()}-{uuid.uuid4().hex[:6]}")
        for device_id in device_ids:
            link.subscribe(topics.ack(device_id), qos=1)
        link.connect()
        if not link.wait_subscribed(SUBSCRIBE_TIMEOUT_S):
            link.stop()
            raise CommandRequestError("the broker did not confirm the ack subscriptions")
    sent_at: dict[str, float] = {}
    pending = set(outcomes)
    try:
        for command in commands:
            sent_at[command.command_id] = time.monotonic()
            link.publish(topics.command(command.device_id), encode_message(command), qos=1)
        deadline = time.monotonic() + wait_s
        while pending and time.monotonic() < deadline:
            try:
                message = link.inbox.get(timeout=max(0.0, min(0.2, deadline - time.monotonic())))
            except queue.Empty:
                continue
            try:
                ack = decode_message(message.payload, CommandAck)
            except SchemaError as exc:
                logger.warning("malformed ack on %s ignored: %s", message.topic, exc)
                continue
            outcome = outcomes.get(ack.command_id)
            if outcome is None or ack.command_id not in pending:
                continue
            pending.discard(ack.command_id)
            outcome.status, outcome.error, outcome.result = ack.status.value, ack.error, dict(ack.result)
            outcome.duplicate = ack.duplicate
            outcome.latency_ms = (time.monotonic() - sent_at[ack.command_id]) * 1000
            with session_scope(url) as session:
                crud.record_ack(session, ack=ack)
            if on_ack is not None:
                on_ack(outcome)
    finally:
        if own:
            link.stop()
    return FanOutResult([outcomes[c.command_id] for c in commands])
