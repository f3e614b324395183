"""Desired config of devices: recorded in the registry, published retained on the device's
``desired`` topic (``DeviceDesired``, QoS1), applied by the device agent like a ``set_config``
command and reported back in its birth (``config_revision``, ``config``, ``config_error``), which
the edges relay to the ingest. A device that is offline gets the retained message when it
reconnects: no operator action. Beat (``republish_pending``) publishes a revision the broker did not
take (it was down) once the broker is back, and again one an online device still does not report
after ``REPUBLISH_STALE_S`` (a retained message lost by a broker without persistence). Shared by
the CLI (``edgefleet fleet set-config``), the API (``PUT /v1/fleet/devices/{id}/config``) and the
Celery beat task."""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Sequence
from typing import Any

from pydantic import JsonValue

from cloud.errors import DeviceConfigError, DeviceConfigUnpublishedError
from cloud.registry import crud, fleet
from cloud.registry.db import session_scope
from shared.errors import MqttError
from shared.mqtt import MqttLink
from shared.schemas import DeviceDesired, SetConfigArgs, bound_errors, encode_message
from shared.settings.agent import RUNTIME_SETTINGS
from shared.settings.cloud import CloudSettings
from shared.topics import validate_id

logger = logging.getLogger(__name__)

PUBACK_TIMEOUT_S = 10.0
# How often beat looks for recorded, unpublished desired device configs.
REPUBLISH_CHECK_S = float(os.environ.get("EDGEFLEET_DEVICE_CONFIG_CHECK_S", "15.0"))
# How long an online device may go without reporting a published revision before it is sent again.
REPUBLISH_STALE_S = float(os.environ.get("EDGEFLEET_DEVICE_CONFIG_STALE_S", "60.0"))


def validate_config(changes: dict[str, JsonValue], unset: Sequence[str] = ()) -> None:
    """Only settings a running agent may change (``shared.settings.agent.RUNTIME_SETTINGS``), within
    their upper bounds (``shared.schemas.SetConfigArgs``: the device refuses beyond them too); the
    device validates the rest of the values and reports a refusal as ``config_error``."""
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
    beyond = bound_errors(SetConfigArgs, changes, where="config")
    if beyond:
        raise DeviceConfigError(f"setting(s) beyond their limits: {'; '.join(beyond)}")


def publish_device_desired(*, link: MqttLink, settings: CloudSettings, desired: DeviceDesired) -> None:
    """Publish retained at QoS1 and wait for the broker's PUBACK."""
    topic = settings.broker.topics.device_desired(desired.device_id)
    if link.publish(topic, encode_message(desired), qos=1, retain=True).wait(PUBACK_TIMEOUT_S):
        return
    raise MqttError(f"no PUBACK from the broker in {PUBACK_TIMEOUT_S:.0f} s")


def _link(settings: CloudSettings, purpose: str) -> MqttLink:
    link = MqttLink(
        settings.broker,
        client_id=f"edgefleet-{purpose}-{os.getpid()}-{uuid.uuid4().hex[:6]}",
    )
    link.connect()
    return link


def set_device_config(
    *,
    settings: CloudSettings,
    device_id: str,
    changes: dict[str, JsonValue] | None = None,
    unset: Sequence[str] = (),
    actor: str = "cli",
    link: MqttLink | None = None,
) -> dict[str, Any]:
    """Record a new desired-config revision for ``device_id`` (``changes`` merged in, ``unset`` keys
    dropped; with neither, the current config is published again), audit it (``device_config``),
    publish it retained and return the device's ``fleet.fleet_device`` view.

    ``DeviceConfigUnpublishedError`` when the broker is unreachable or does not acknowledge: the
    revision stays recorded and beat publishes it once the broker is back."""
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
    try:
        active = link or _link(settings, "device-config")
        try:
            publish_device_desired(link=active, settings=settings, desired=desired)
        finally:
            if link is None:
                active.stop()
    except MqttError as exc:
        raise DeviceConfigUnpublishedError(
            f"desired config r{desired.revision} of {device_id} is recorded but not published ({exc}); "
            "the cloud beat publishes it when the broker is back, or run set-config again"
        ) from exc
    logger.info("desired config r%d published to %s", desired.revision, device_id)
    with session_scope(url) as session:
        fleet.mark_device_config_published(session, device_id=device_id, revision=desired.revision)
        return fleet.fleet_device(session, device_id=device_id)


def republish_pending(*, settings: CloudSettings, link: MqttLink | None = None) -> list[str]:
    """Publish every desired config the broker has not taken (set while it was down) or an online
    device has not picked up after ``REPUBLISH_STALE_S`` (``fleet.device_configs_to_publish``);
    returns the devices published. Idempotent: a device applies each revision once, and a revision
    superseded meanwhile is not marked published (``mark_device_config_published``)."""
    url = settings.resolved_database_url
    with session_scope(url) as session:
        pending = [
            DeviceDesired(device_id=r.device_id, revision=r.revision, config=dict(r.config or {}))
            for r in fleet.device_configs_to_publish(session, now=time.time(), stale_s=REPUBLISH_STALE_S)
        ]
    if not pending:
        return []
    published: list[str] = []
    active = link
    try:
        if active is None:
            active = _link(settings, "device-config-republish")
        for desired in pending:
            publish_device_desired(link=active, settings=settings, desired=desired)
            with session_scope(url) as session:
                fleet.mark_device_config_published(
                    session, device_id=desired.device_id, revision=desired.revision
                )
            published.append(desired.device_id)
            logger.info("desired config r%d republished to %s", desired.revision, desired.device_id)
    except MqttError as exc:
        logger.warning(
            "%d desired device config(s) still unpublished: %s", len(pending) - len(published), exc
        )
    finally:
        if link is None and active is not None:
            active.stop()
    return published
