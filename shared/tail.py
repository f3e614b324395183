"""``edgefleet tail``: the operator's window onto the wire.

Subscribes to the contract's topics (filters come only from ``shared.topics``), decodes every
message (binary telemetry with ``shared.codec``, control messages with ``shared.schemas``) and
prints one line per message: JSON with ``--json``, a readable summary otherwise. A message that
does not decode is printed as ``{"type": "undecodable", ...}`` and tail carries on.

With ``--session NAME`` it holds a persistent MQTT session (clean_session off, a client id derived
from NAME) at QoS1 and acknowledges each message only after printing it, so nothing is missed
across its own restarts or the broker's (a broker with persistence on).

Needs only the ``agent`` extra: no numpy (the codec falls back to ``array``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, Final

import click
from pydantic import ValidationError

from shared.codec import decode_window, window_to_json
from shared.errors import CodecError, EdgefleetError, SchemaError, TopicError
from shared.mqtt import MqttLink, Received
from shared.schemas import (
    Command,
    CommandAck,
    DeadLetter,
    Decision,
    DeploymentProgress,
    DesiredState,
    DeviceDesired,
    DeviceReport,
    DeviceStatus,
    EdgeMetrics,
    EdgeStatus,
    HardExample,
    Heartbeat,
    Message,
    decode_message,
)
from shared.settings.base import MqttSettings
from shared.topics import DEFAULT_PREFIX, DeviceTopic, EdgeTopic, ParsedTopic, Topics, validate_id

logger = logging.getLogger(__name__)

# Module-level so tests can patch them.
POLL_S: Final = 0.2
CONNECT_TIMEOUT_S: Final = 10.0
SUBSCRIBE_TIMEOUT_S: Final = 10.0

ALL: Final = "all"
KINDS: Final[tuple[str, ...]] = (
    *(k.value for k in DeviceTopic),
    *(k.value for k in EdgeTopic if k.value not in {d.value for d in DeviceTopic}),
    ALL,
)

# The schema each topic kind must carry; ``None`` marks the binary telemetry codec.
DEVICE_SCHEMAS: Final[dict[DeviceTopic, type[Message] | None]] = {
    DeviceTopic.TELEMETRY: None,
    DeviceTopic.STATUS: DeviceStatus,
    DeviceTopic.HEALTH: Heartbeat,
    DeviceTopic.CMD: Command,
    DeviceTopic.ACK: CommandAck,
    DeviceTopic.DESIRED: DeviceDesired,
}
EDGE_SCHEMAS: Final[dict[EdgeTopic, type[Message]]] = {
    EdgeTopic.STATUS: EdgeStatus,
    EdgeTopic.DECISION: Decision,
    EdgeTopic.SAMPLES: HardExample,
    EdgeTopic.METRICS: EdgeMetrics,
    EdgeTopic.DESIRED: DesiredState,
    EdgeTopic.DEPLOY: DeploymentProgress,
    EdgeTopic.DEAD: DeadLetter,
    EdgeTopic.DEVICES: DeviceReport,
}
_SUMMARY_SKIP: Final = frozenset({"schema_version", "type", "device_id", "edge_id", "seq"})
_SUMMARY_MAX_NESTED: Final = 60


def subscription_filters(
    topics: Topics, *, device_id: str | None, edge_id: str | None, kind: str
) -> list[str]:
    """The topic filters for a device / edge / kind selection.

    ``--device`` narrows device topics to that device (edge topics are still subscribed and
    narrowed to messages about the device); ``--edge`` alone selects edge topics only.
    """
    dev_kinds = [k for k in DeviceTopic if kind in (k.value, ALL)]
    edge_kinds = [k for k in EdgeTopic if kind in (k.value, ALL)]
    if edge_id is not None and device_id is None:
        dev_kinds = []
    filters: list[str] = []
    if len(dev_kinds) == len(DeviceTopic):
        filters.append(topics.device_filter(device_id, None))
    else:
        filters.extend(topics.device_filter(device_id, k) for k in dev_kinds)
    if len(edge_kinds) == len(EdgeTopic):
        filters.append(topics.edge_filter(edge_id, None))
    else:
        filters.extend(topics.edge_filter(edge_id, k) for k in edge_kinds)
    if not filters:
        raise click.UsageError(
            f"--kind {kind} is a device topic: with --edge alone nothing matches (add --device)"
        )
    return filters


def session_client_id(name: str) -> str:
    """The stable client id of a persistent tail session."""
    return f"ef-tail-{validate_id(name, what='session name')}"


def decode_record(topics: Topics, received: Received, *, with_values: bool = False) -> dict[str, Any]:
    """Decode one received message into a JSON-ready record; never raises for bad input."""
    record: dict[str, Any] = {
        "topic": received.topic,
        "qos": received.qos,
        "retained": received.retain,
        "received_at": time.time(),
    }
    try:
        parsed = topics.parse(received.topic)
    except TopicError as exc:
        return _undecodable(record, received, f"topic: {exc}")
    record["kind"] = parsed.kind.value
    if parsed.tier == "dev":
        record["device_id"] = parsed.entity_id
    else:
        record["edge_id"] = parsed.entity_id
    if not received.payload:
        return _undecodable(record, received, "empty payload (a retained message was cleared)")
    try:
        message = _decode_payload(parsed, received.payload, with_values=with_values)
    except (CodecError, SchemaError) as exc:
        return _undecodable(record, received, f"{type(exc).__name__}: {exc}")
    except (ValueError, TypeError) as exc:  # anything the decoders did not map: still never stop
        return _undecodable(record, received, f"{type(exc).__name__}: {exc}")
    mismatch = _id_mismatch(parsed, message)
    if mismatch is not None:
        return _undecodable(record, received, mismatch)
    record["type"] = message["type"]
    if "device_id" in message:
        record["device_id"] = message["device_id"]
    seq = message.get("seq", message.get("window_seq"))
    if seq is not None:
        record["seq"] = seq
    record["message"] = message
    return record


def _decode_payload(parsed: ParsedTopic, payload: bytes, *, with_values: bool) -> dict[str, Any]:
    if parsed.tier == "dev":
        schema = DEVICE_SCHEMAS[DeviceTopic(parsed.kind)]
        if schema is None:
            return window_to_json(decode_window(payload), with_values=with_values)
    else:
        schema = EDGE_SCHEMAS[EdgeTopic(parsed.kind)]
    try:
        message = decode_message(payload, schema)
    except ValidationError as exc:  # defensive: decode_message maps these already
        raise SchemaError(str(exc)) from exc
    return message.model_dump(mode="json")


def _id_mismatch(parsed: ParsedTopic, message: dict[str, Any]) -> str | None:
    field = "device_id" if parsed.tier == "dev" else "edge_id"
    value = message.get(field)
    if value is not None and value != parsed.entity_id:
        return f"{field}: {value!r} in the payload differs from {parsed.entity_id!r} in the topic"
    return None


def _undecodable(record: dict[str, Any], received: Received, error: str) -> dict[str, Any]:
    record.update(type="undecodable", error=error, size=len(received.payload))
    return record


def wanted(record: dict[str, Any], *, device_id: str | None, edge_id: str | None) -> bool:
    """Client-side narrowing of edge messages to one device (``--device``)."""
    if device_id is None or "edge_id" not in record:
        return True
    about = record.get("device_id")
    if about is None:
        return edge_id is not None  # edge-level messages only when that edge was asked for
    return bool(about == device_id)


def format_line(record: dict[str, Any]) -> str:
    """A readable one-line form of a record."""
    stamp = datetime.fromtimestamp(record["received_at"], tz=UTC).strftime("%H:%M:%S.%f")[:-3]
    head = [stamp, record["topic"], record["type"]]
    if "edge_id" in record and "device_id" in record:  # a device id not already in the topic
        head.append(f"device_id={record['device_id']}")
    if "seq" in record:
        head.append(f"seq={record['seq']}")
    if record["type"] == "undecodable":
        head.append(f"error={record['error']!r} size={record['size']}")
    else:
        head.extend(_summary(record["message"]))
    if record["retained"]:
        head.append("(retained)")
    return " ".join(head)


def _summary(message: dict[str, Any]) -> Iterator[str]:
    for key, value in message.items():
        if key in _SUMMARY_SKIP or value is None or value in ({}, []):
            continue
        if key == "channels" and isinstance(value, list):
            yield f"channels={','.join(map(str, value))}"
        elif isinstance(value, dict | list):
            text = json.dumps(value, separators=(",", ":"))
            yield f"{key}={text}" if len(text) <= _SUMMARY_MAX_NESTED else f"{key}=<{len(value)} items>"
        elif isinstance(value, float) and (key == "ts" or key.endswith(("_ts", "_at"))):
            yield f"{key}={_iso(value)}"
        elif isinstance(value, float):
            yield f"{key}={value:.6g}"
        else:
            yield f"{key}={value}"


def _iso(epoch_s: float) -> str:
    try:
        stamp = datetime.fromtimestamp(epoch_s, tz=UTC).isoformat(timespec="milliseconds")
    except (OverflowError, OSError, ValueError):
        return repr(epoch_s)
    return stamp.replace("+00:00", "Z")


def _note(text: str) -> None:
    click.echo(f"edgefleet tail: {text}", err=True)


@click.command("tail")
@click.option(
    "--broker", "broker_url", default="mqtt://127.0.0.1:1883", show_default=True, help="mqtt:// or mqtts://"
)
@click.option("--device", "device_id", help="only this device (its topics, and edge messages about it)")
@click.option("--edge", "edge_id", help="only this edge node's topics")
@click.option("--kind", type=click.Choice(KINDS), default=ALL, show_default=True, help="topic kind")
@click.option("--count", type=click.IntRange(min=1), help="exit after N messages")
@click.option("--session", help="persistent QoS1 session NAME: nothing is missed across restarts")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per line")
@click.option("--values", "with_values", is_flag=True, help="include telemetry sample values")
@click.option("--prefix", default=DEFAULT_PREFIX, show_default=True, help="topic prefix")
def tail(
    *,
    broker_url: str,
    device_id: str | None,
    edge_id: str | None,
    kind: str,
    count: int | None,
    session: str | None,
    as_json: bool,
    with_values: bool,
    prefix: str,
) -> None:
    """Print every message on the wire, decoded (Ctrl-C to stop)."""
    try:
        settings = MqttSettings(url=broker_url, topic_prefix=prefix)
        topics = settings.topics
        filters = subscription_filters(topics, device_id=device_id, edge_id=edge_id, kind=kind)
        client_id = session_client_id(session) if session else f"ef-tail-{os.getpid()}-{time.monotonic_ns()}"
    except (ValidationError, EdgefleetError) as exc:
        raise click.UsageError(str(exc)) from exc
    qos = 1 if session else 0
    link = MqttLink(
        settings, client_id=client_id, clean_session=session is None, manual_ack=session is not None
    )
    for topic_filter in filters:
        link.subscribe(topic_filter, qos)

    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        try:
            link.connect(CONNECT_TIMEOUT_S)
        except EdgefleetError as exc:
            raise click.ClickException(str(exc)) from exc
        if not link.wait_subscribed(SUBSCRIBE_TIMEOUT_S):
            raise click.ClickException("the broker did not grant the subscription")
        where = f"session {session!r}, QoS1" if session else "QoS0"
        addr = settings.address  # host and port only: the URL may carry a password
        _note(f"subscribed to {', '.join(filters)} at {addr.host}:{addr.port} ({where})")
        _run(
            link,
            topics,
            stop,
            count=count,
            as_json=as_json,
            with_values=with_values,
            device_id=device_id,
            edge_id=edge_id,
        )
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): exit quietly, without a second error at shutdown.
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
    finally:
        link.stop()


def _run(
    link: MqttLink,
    topics: Topics,
    stop: threading.Event,
    *,
    count: int | None,
    as_json: bool,
    with_values: bool,
    device_id: str | None,
    edge_id: str | None,
) -> None:
    printed = 0
    while not stop.is_set() and (count is None or printed < count):
        while True:
            try:
                event = link.events.get_nowait()
            except queue.Empty:
                break
            if event.connected and link.connects > 1:
                _note("reconnected")
            elif not event.connected:
                _note(f"disconnected ({event.reason}); reconnecting")
        try:
            received = link.inbox.get(timeout=POLL_S)
        except queue.Empty:
            continue
        record = decode_record(topics, received, with_values=with_values)
        if wanted(record, device_id=device_id, edge_id=edge_id):
            line = json.dumps(record, separators=(",", ":")) if as_json else format_line(record)
            click.echo(line)
            sys.stdout.flush()
            printed += 1
        link.ack(received)  # after printing: a crash before this gets the message again
