"""Desired config of devices: recorded in the registry, published retained on the device's
``desired`` topic (``DeviceDesired``, QoS1), applied by the device agent like a ``set_config``
command and reported back in its birth (``config_revision``, ``config``, ``config_error``), which
the edges relay to the ingest. A device that is offline gets the retained message when it
reconnects: no operator action, no re-send loop. Shared by the CLI (``edgefleet fleet set-config``)
and any API route."""

from __future__ import annotations

import logging
import os
import queue
import time
import uuid
from collections.abc import Sequence
from typing import Any

from pydantic import JsonValue

from cloud.errors import CloudError
from cloud.registry import crud, fleet
from cloud.registry.db import session_scope
from shared.schemas import DeviceDesired, encode_message
from shared.settings.agent import RUNTIME_SETTINGS
from shared.settings.cloud import CloudSettings
from shared.topics import validate_id

logger = logging.getLogger(__name__)

PUBACK_TIMEOUT_S = 10.0


class DeviceConfigError(CloudError):
    """A desired device config the registry refuses (unknown or restart-only setting), or one the
    broker did not take."""


def validate_config(changes: dict[str, JsonValue], unset: Sequence[str] = ()) -> None:
    """Only settings a running agent may change (``shared.settings.agent.RUNTIME_SETTINGS``); the
    device validates the values and reports a refusal as ``config_error``."""
    keys = set(changes) | set(unset)
    wrong = sorted(keys - RUNTIME_SETTINGS)
    if wrong:
        raise DeviceConfigError(
            f"setting(s) {', '.join(wrong)} cannot be set on a running device; "
            f"one of {', '.join(sorted(RUNTIME_SETTINGS))}"
        )
    sensor = changes.get("sensor")
    if sensor is not None and not (isinstance(sensor, dict) and set(sensor) <= {"options"}):
        raise DeviceConfigError("sensor: only {'options': {...}} can be set")


def publish_device_desired(*, link: Any, settings: CloudSettings, desired: DeviceDesired) -> None:
    """Publish retained at QoS1 and wait for the broker's PUBACK (``link`` has ``track_acks``)."""
    topic = settings.broker.topics.device_desired(desired.device_id)
    mid = link.publish(topic, encode_message(desired), qos=1, retain=True)
    deadline = time.monotonic() + PUBACK_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            if link.acked.get(timeout=max(0.0, deadline - time.monotonic())) == mid:
                return
        except queue.Empty:
            break
    raise DeviceConfigError(
        f"desired config of {desired.device_id} was not acknowledged by the broker in "
        f"{PUBACK_TIMEOUT_S:.0f} s; it is recorded: run set-config again to publish it"
    )


def set_device_config(
    *,
    settings: CloudSettings,
    device_id: str,
    changes: dict[str, JsonValue] | None = None,
    unset: Sequence[str] = (),
    actor: str = "cli",
    link: Any = None,
) -> dict[str, Any]:
    """Record a new desired-config revision for ``device_id`` (``changes`` merged in, ``unset`` keys
    dropped; with neither, the current config is published again), audit it (``device_config``),
    publish it retained and return the device's ``fleet.fleet_device`` view."""
    from shared.mqtt import MqttLink  # noqa: PLC0415

    try:
        validate_id(device_id, what="device id")
    except ValueError as exc:
        raise DeviceConfigError(str(exc)) from exc
    changes = dict(changes or {})
    validate_config(changes, unset)
    url = settings.resolved_database_url
    with session_scope(url) as session:
        record = fleet.set_device_config(
            session, device_id=device_id, changes=changes, unset=list(unset), actor=actor
        )
        desired = DeviceDesired(device_id=device_id, revision=record.revision, config=dict(record.config))
        crud.audit(
            session,
            actor=actor,
            action="device_config",
            target=device_id,
            detail={"revision": record.revision, "set": changes, "unset": list(unset)},
        )
    own = link is None
    if own:
        link = MqttLink(
            settings.broker,
            client_id=f"edgefleet-device-config-{os.getpid()}-{uuid.uuid4().hex[:6]}",
            track_acks=True,
        )
        link.connect()
    try:
        publish_device_desired(link=link, settings=settings, desired=desired)
    finally:
        if own:
            link.stop()
    logger.info("desired config r%d published to %s", desired.revision, device_id)
    with session_scope(url) as session:
        fleet.mark_device_config_published(session, device_id=device_id, revision=desired.revision)
        return fleet.fleet_device(session, device_id=device_id)
