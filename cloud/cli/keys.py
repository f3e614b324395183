"""``edgefleet cloud keys ...``: the signing key ring (rotate, revoke, list). See cloud/fleet/keyring.py."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click

from cloud.cli.common import actor, ago, config_option, fail, get_console, json_option, settings_from
from shared.errors import EdgefleetError


@click.group()
def keys() -> None:
    """The cloud's signing key ring: rotate, revoke, list (announced to edges on the keys topic)."""


def _audit(config_file: Path | None, action: str, target: str, detail: dict[str, Any]) -> None:
    from cloud.cli.common import registry_url  # noqa: PLC0415  (SQLAlchemy: only when this command runs)
    from cloud.registry import crud  # noqa: PLC0415  (SQLAlchemy: only when this command runs)
    from cloud.registry.db import session_scope  # noqa: PLC0415  (SQLAlchemy: only when this command runs)

    with session_scope(registry_url(config_file)) as session:
        crud.audit(session, actor=actor(), action=action, target=target, detail=detail)


def _announce(ring: Any) -> str:
    """Publish the ring retained; a broker that is away gets it with the next order instead."""
    from cloud.fleet.keyring import publish_if_needed  # noqa: PLC0415  (paho: only when this command runs)
    from shared.mqtt import MqttLink  # noqa: PLC0415  (paho: only when this command runs)

    link = MqttLink(ring.settings.broker, client_id=f"edgefleet-cloud-keys-{os.getpid()}")
    try:
        link.connect()
        publish_if_needed(ring.settings, link)
    except EdgefleetError as exc:
        return f"not announced yet ({exc}): it goes out with the next desired state"
    finally:
        link.stop()
    return f"announced on {ring.settings.broker.topics.keys()}"


@keys.command("rotate")
@config_option
@click.option("--no-publish", is_flag=True, help="do not announce now (the next desired state will)")
def rotate(config_file: Path | None, *, no_publish: bool) -> None:
    """Make a new key pair the signing key, announced to edges signed by the current key."""
    from cloud.fleet.keyring import CloudKeyRing  # noqa: PLC0415  (cryptography: only when this command runs)

    settings = settings_from(config_file)
    try:
        ring = CloudKeyRing(settings)
        previous = ring.current.key_id
        key = ring.rotate()
    except EdgefleetError as exc:
        raise fail(exc) from exc
    _audit(
        config_file,
        "key_rotate",
        key.key_id,
        {"previous": previous, "seq": ring.announcements[-1].seq, "public": key.public},
    )
    status = "not announced (--no-publish)" if no_publish else _announce(ring)
    click.echo(f"key id {key.key_id} now signs (was {previous})\npublic  {key.public}\n{status}")


@keys.command("revoke")
@config_option
@click.argument("key_id")
@click.option("--no-publish", is_flag=True, help="do not announce now (the next desired state will)")
def revoke(config_file: Path | None, key_id: str, *, no_publish: bool) -> None:
    """Revoke KEY_ID, announced to edges signed by another active key (never the last active key)."""
    from cloud.fleet.keyring import CloudKeyRing  # noqa: PLC0415  (cryptography: only when this command runs)

    settings = settings_from(config_file)
    try:
        ring = CloudKeyRing(settings)
        key = ring.revoke(key_id)
    except EdgefleetError as exc:
        raise fail(exc) from exc
    announcement = ring.announcements[-1]
    _audit(
        config_file,
        "key_revoke",
        key.key_id,
        {"signed_by": announcement.signer_key_id, "seq": announcement.seq},
    )
    status = "not announced (--no-publish)" if no_publish else _announce(ring)
    click.echo(f"key id {key.key_id} revoked (announcement signed by {announcement.signer_key_id})\n{status}")


@keys.command("list")
@config_option
@json_option
def list_keys(config_file: Path | None, *, as_json: bool) -> None:
    """The keys of the ring, newest first; the signing one marked."""
    from cloud.fleet.keyring import CloudKeyRing  # noqa: PLC0415  (cryptography: only when this command runs)

    settings = settings_from(config_file)
    try:
        rows = CloudKeyRing(settings).describe()
    except EdgefleetError as exc:
        raise fail(exc) from exc
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    from rich.table import Table  # noqa: PLC0415  (rich: only when something is printed)

    table = Table("key id", "state", "created", "revoked", "public key")
    for row in rows:
        state = f"{row['state']} (signing)" if row["signing"] else row["state"]
        table.add_row(
            row["key_id"],
            state,
            ago(row["created_at"]),
            ago(row["revoked_at"]) if row["revoked_at"] else "-",
            row["public"],
        )
    get_console().print(table)
