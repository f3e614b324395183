"""The site broker's bridge to the cloud broker, for deployments with a broker per site.

Cloud-to-device traffic keeps its one topic end to end (docs/fleet.md, "Routing"): the cloud
publishes a device's ``cmd`` and retained ``desired`` on the cloud broker and reads its ``ack`` and
retained ``status`` there, so a bridge on each site broker carries exactly these four device topics
(telemetry stays on the site: the edges consume it). This module renders that bridge for mosquitto
from the same ``Topics`` every tier uses, so the bridge follows a changed topic prefix."""

from __future__ import annotations

import re

from shared.errors import ConfigError
from shared.settings.base import MqttSettings
from shared.topics import DeviceTopic, Topics

# Direction seen from the site broker (mosquitto's "in" = remote to local).
BRIDGED_DOWN: tuple[DeviceTopic, ...] = (DeviceTopic.CMD, DeviceTopic.DESIRED)
BRIDGED_UP: tuple[DeviceTopic, ...] = (DeviceTopic.ACK, DeviceTopic.STATUS)
BRIDGE_QOS = 1
# mosquitto's reconnect backoff for the bridge: start, cap (seconds).
RESTART_TIMEOUT_S = (2, 30)
SYSTEM_CA_PATH = "/etc/ssl/certs"
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def bridged_topics(topics: Topics) -> list[tuple[str, str]]:
    """``(topic filter, "in" | "out")`` for every device topic the bridge carries."""
    return [(topics.all_devices(kind), "in") for kind in BRIDGED_DOWN] + [
        (topics.all_devices(kind), "out") for kind in BRIDGED_UP
    ]


def mosquitto_bridge_config(*, cloud: MqttSettings, name: str) -> str:
    """A mosquitto ``connection`` stanza for the site broker's config (``include_dir`` or appended).

    ``name`` is the connection name and the bridge's client id on the cloud broker: unique per site.
    The session is persistent (``cleansession false``), so commands and desired configs published
    while the bridge is down are delivered when it reconnects."""
    if not _NAME_RE.match(name):
        raise ConfigError(f"bridge name {name!r} is invalid: 1-64 of [A-Za-z0-9_.-], unique per site")
    address = cloud.address
    username, password = cloud.credentials()
    if password is not None and username is None:
        raise ConfigError("bridge password given without a username")
    lines = [
        "# edgefleet: this site broker's bridge to the cloud broker (`edgefleet edge bridge-config`).",
        f"connection {name}",
        f"address {address.host}:{address.port}",
        f"remote_clientid {name}",
        "cleansession false",
        "try_private true",
        "bridge_protocol_version mqttv311",
        f"restart_timeout {RESTART_TIMEOUT_S[0]} {RESTART_TIMEOUT_S[1]}",
    ]
    if username is not None:
        lines.append(f"remote_username {username}")
    if password is not None:
        lines.append(f"remote_password {password}")
    if cloud.use_tls:
        if cloud.tls_ca is not None:
            lines.append(f"bridge_cafile {cloud.tls_ca}")
        else:
            lines.append(f"bridge_capath {SYSTEM_CA_PATH}")
        if cloud.tls_cert is not None and cloud.tls_key is not None:
            lines += [f"bridge_certfile {cloud.tls_cert}", f"bridge_keyfile {cloud.tls_key}"]
        if cloud.tls_insecure:
            lines.append("bridge_insecure true")
    lines += [
        f"topic {pattern} {direction} {BRIDGE_QOS}" for pattern, direction in bridged_topics(cloud.topics)
    ]
    return "\n".join(lines) + "\n"
