"""``edgefleet fleet ...``: list and inspect devices and edges, set desired device config, assign groups;
enroll, claim tokens, revoke (broker identities)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click

from cloud.cli.common import (
    actor,
    ago,
    api_call,
    api_option,
    config_option,
    fail,
    get_console,
    json_option,
    registry_url,
    settings_from,
)
from cloud.errors import CommandRequestError, NotFoundError
from shared.errors import EdgefleetError


@click.group()
def fleet() -> None:
    """List and inspect devices and edge nodes: online state, desired vs reported model, health."""


@fleet.command("ls")
@config_option
@api_option
@json_option
def fleet_ls(config_file: Path | None, api_url: str | None, as_json: bool) -> None:
    """Every edge (and device) with its state, last seen, and desired vs reported model version."""
    if api_url:
        edges = api_call("GET", api_url, "/v1/fleet/edges")
        devices = api_call("GET", api_url, "/v1/fleet/devices")
    else:
        from cloud.registry import fleet as registry_fleet  # noqa: PLC0415  (SQLAlchemy: not on the --api path)
        from cloud.registry.db import session_scope  # noqa: PLC0415  (SQLAlchemy: not on the --api path)

        with session_scope(registry_url(config_file)) as session:
            edges = registry_fleet.fleet_edges(session)
            devices = registry_fleet.fleet_devices(session)
    if as_json:
        click.echo(json.dumps({"edges": edges, "devices": devices}, indent=2))
        return
    from rich.table import Table  # noqa: PLC0415  (rich: only when printing a table)

    table = Table(title=f"edges ({len(edges)})")
    for column in ("edge", "state", "last seen", "group", "desired", "reported", "in sync", "health"):
        table.add_column(column)
    for e in edges:
        desired = e["desired_version"] or (e["desired_action"] or "-")
        if e["desired_revision"] is not None:
            desired = f"{desired} (r{e['desired_revision']})"
        reported = e["reported_version"] or "-"
        if e["reported_revision"] is not None:
            reported = f"{reported} (r{e['reported_revision']})"
        table.add_row(
            e["edge_id"],
            e["state"],
            ago(e["last_seen"]),
            e["group"] or "-",
            desired,
            reported,
            "yes" if e["in_sync"] else "[yellow]no[/yellow]",
            e["health"],
        )
    console = get_console()
    console.print(table)
    if devices:
        dtable = Table(title=f"devices ({len(devices)})")
        for column in ("device", "edge", "state", "last seen", "group", "tags", "config", "health"):
            dtable.add_column(column)
        for d in devices:
            config = "-"
            if d.get("desired_config_revision") is not None:
                reported = d.get("reported_config_revision")
                config = f"r{d['desired_config_revision']} / " + (
                    f"r{reported}" if reported is not None else "-"
                )
                config += "" if d["config_in_sync"] else " [yellow]pending[/yellow]"
            dtable.add_row(
                d["device_id"],
                d["edge_id"] or "-",
                d["state"],
                ago(d["last_seen"]),
                d["group"] or "-",
                ",".join(d["tags"]),
                config,
                d.get("health", "-"),
            )
        console.print(dtable)


@fleet.command("show")
@click.argument("entity_id", metavar="ID")
@config_option
@api_option
@json_option
def fleet_show(entity_id: str, config_file: Path | None, api_url: str | None, as_json: bool) -> None:
    """One edge (desired and reported state, latest metrics, its devices) or one device (state,
    desired vs reported config, health)."""
    if api_url:
        row = api_call("GET", api_url, f"/v1/fleet/edges/{entity_id}", missing_ok=True)
        if row is None:
            row = api_call("GET", api_url, f"/v1/fleet/devices/{entity_id}", missing_ok=True)
        if row is None:
            raise click.ClickException(f"no edge or device {entity_id} in the registry")
    else:
        from cloud.registry import fleet as registry_fleet  # noqa: PLC0415  (SQLAlchemy: not on the --api path)
        from cloud.registry.db import session_scope  # noqa: PLC0415  (SQLAlchemy: not on the --api path)

        try:
            with session_scope(registry_url(config_file)) as session:
                try:
                    row = registry_fleet.fleet_edge(session, edge_id=entity_id)
                except NotFoundError:
                    if registry_fleet.get_device(session, device_id=entity_id) is None:
                        raise NotFoundError(f"no edge or device {entity_id} in the registry") from None
                    row = registry_fleet.fleet_device(session, device_id=entity_id)
        except EdgefleetError as exc:
            raise fail(exc) from exc
    if as_json:
        click.echo(json.dumps(row, indent=2))
        return
    if "device_id" in row:
        _show_device(row)
        return
    metrics = row.pop("metrics") or {}
    for key, value in row.items():
        click.echo(f"{key:>18}: {value}")
    if metrics:
        click.echo(
            f"{'metrics':>18}: {metrics.get('windows_per_s', 0):.1f} windows/s, "
            f"p95 {metrics.get('inference_latency', {}).get('p95_ms', 0):.2f} ms, "
            f"errors {metrics.get('errors_total', 0)}, dead letters {metrics.get('dead_letters_total', 0)}"
        )


def _show_device(row: dict[str, Any]) -> None:
    diff = row.pop("config_diff")
    for key in ("last_seen", "since", "desired_config_published_at"):
        row[key] = ago(row[key]) if row[key] is not None else None
    for key, value in row.items():
        if key not in ("desired_config", "reported_config"):
            click.echo(f"{key:>27}: {value}")
    if diff or row["reported_config"]:
        click.echo(f"{'config':>27}: {'desired':>12} {'reported':>12}")
        for key in sorted(set(diff) | set(row["reported_config"])):
            wanted = diff[key]["desired"] if key in diff else "-"
            reported = row["reported_config"].get(key, "-")
            mark = "  <- pending" if key in diff and wanted != reported else ""
            click.echo(f"{key:>27}: {wanted!s:>12} {reported!s:>12}{mark}")


@fleet.command("set-config")
@click.argument("device_id")
@click.argument("settings_kv", nargs=-1, metavar="KEY=VALUE...")
@click.option("--unset", "unset", multiple=True, help="drop KEY from the desired config (repeatable)")
@config_option
@api_option
@json_option
def fleet_set_config(
    *,
    device_id: str,
    settings_kv: tuple[str, ...],
    unset: tuple[str, ...],
    config_file: Path | None,
    api_url: str | None,
    as_json: bool,
) -> None:
    """Set the desired config of a device (e.g. rate_hz=50 heartbeat_interval_s=5): recorded in the
    registry and published retained on the device's desired topic; an offline device applies it when
    it reconnects. Values parse as JSON when they can. With no KEY=VALUE, the current desired config
    is published again."""
    from cloud.fleet.commands import parse_args  # noqa: PLC0415  (SQLAlchemy: only when this command runs)
    from cloud.fleet.device_config import set_device_config  # noqa: PLC0415  (SQLAlchemy: only when this command runs)

    try:
        changes = parse_args(settings_kv)
        if api_url:
            body = {"set": changes, "unset": list(unset)}
            row = api_call("PUT", api_url, f"/v1/fleet/devices/{device_id}/config", body)
        else:
            registry_url(config_file)
            row = set_device_config(
                settings=settings_from(config_file),
                device_id=device_id,
                changes=changes,
                unset=list(unset),
                actor=actor(),
            )
    except (CommandRequestError, EdgefleetError) as exc:
        raise fail(exc) from exc
    if as_json:
        click.echo(json.dumps(row, indent=2))
        return
    state = "applied" if row["config_in_sync"] else "published, waiting for the device to report it"
    click.echo(
        f"{device_id}: desired config r{row['desired_config_revision']} {row['desired_config']}: {state}"
    )


@fleet.command("assign")
@click.option("--edge", "edge_id", default=None)
@click.option("--device", "device_id", default=None)
@click.option("--behind", "behind_edge", default=None, help="(devices) the edge the device talks to")
@click.option("--group", default=None)
@click.option("--tag", "tags", multiple=True)
@config_option
def fleet_assign(
    *,
    edge_id: str | None,
    device_id: str | None,
    behind_edge: str | None,
    group: str | None,
    tags: tuple[str, ...],
    config_file: Path | None,
) -> None:
    """Register an edge or device in a group and/or with tags (targets of --group)."""
    from cloud.registry import crud  # noqa: PLC0415  (SQLAlchemy: only when this command runs)
    from cloud.registry.db import session_scope  # noqa: PLC0415  (SQLAlchemy: only when this command runs)

    try:
        with session_scope(registry_url(config_file)) as session:
            crud.assign(session, edge_id=edge_id, device_id=device_id, group=group, tags=list(tags) or None)
            if device_id is not None and behind_edge is not None:
                crud.upsert_device(session, device_id=device_id, edge_id=behind_edge)
            crud.audit(
                session,
                actor=actor(),
                action="fleet_assign",
                target=edge_id or device_id or "",
                detail={"group": group, "tags": list(tags), "edge": behind_edge},
            )
    except (EdgefleetError, ValueError) as exc:
        raise fail(exc) from exc
    click.echo(f"{edge_id or device_id}: group={group} tags={list(tags)}")


# -- identities: enrollment, claim tokens, revocation (cloud/fleet/enrollment.py) ----------------------

_KINDS = ["device", "edge", "service", "operator"]


def _enrollment_settings(config_file: Path | None) -> Any:
    """The cloud settings, with the registry migrated to the current schema."""
    registry_url(config_file)
    return settings_from(config_file)


def _print_rows(rows: list[dict[str, Any]], columns: list[tuple[str, str]], title: str) -> None:
    from rich.table import Table  # noqa: PLC0415  (rich: only when printing a table)

    table = Table(title=title)
    for _key, header in columns:
        table.add_column(header)
    for row in rows:
        table.add_row(*[_cell(key, row.get(key)) for key, _header in columns])
    get_console().print(table)


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key.endswith("_at") and isinstance(value, int | float):
        return ago(value) if value <= time.time() else f"in {_left(value - time.time())}"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def _left(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.0f}h"
    return f"{seconds / 86400:.0f}d"


@fleet.command("enroll")
@click.argument("identity_id", metavar="ID")
@click.option("--kind", type=click.Choice(_KINDS), required=True, help="what the identity is")
@click.option(
    "--role",
    type=click.Choice(["viewer", "admin"]),
    default=None,
    help="operators only: viewer reads every device and edge topic (default), admin also writes them",
)
@click.option(
    "--reissue", is_flag=True, help="give an enrolled identity a new secret (the old one stops working)"
)
@click.option(
    "--out",
    "out_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="write the bundle (with the password) to FILE, mode 0600, instead of printing the password",
)
@config_option
@json_option
def fleet_enroll(
    *,
    identity_id: str,
    kind: str,
    role: str | None,
    reissue: bool,
    out_file: Path | None,
    config_file: Path | None,
    as_json: bool,
) -> None:
    """Enroll ID: make its secret, store only its hash, print its enrollment bundle (username, password,
    client id, broker URL, broker CA, the cloud's public key). The password is shown once. A revoked
    ID is enrolled again with a new secret; an enrolled one only with --reissue."""
    from cloud.fleet.enrollment import enroll_identity  # noqa: PLC0415  (SQLAlchemy: only when this command runs)
    from shared.enrollment import write_bundle  # noqa: PLC0415

    settings = _enrollment_settings(config_file)
    try:
        bundle = enroll_identity(
            settings=settings, identity_id=identity_id, kind=kind, role=role, reissue=reissue, actor=actor()
        )
        if out_file is not None:
            write_bundle(bundle, out_file)
    except (EdgefleetError, OSError, ValueError) as exc:
        raise fail(exc) from exc
    shown = bundle if out_file is None else bundle.without_password()
    if as_json:
        data = shown.model_dump(mode="json")
        if out_file is not None:
            data["written_to"] = str(out_file)
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(f"enrolled {bundle.kind} {bundle.identity_id}" + (f" ({bundle.role})" if bundle.role else ""))
    click.echo(f"  username:    {bundle.username}")
    if out_file is None:
        click.echo(f"  password:    {bundle.password}   (shown once: the registry keeps only its hash)")
    else:
        click.echo(f"  password:    in {out_file} (mode 0600); shown nowhere else")
    click.echo(f"  client id:   {bundle.client_id}   (the broker forces client id = username)")
    click.echo(f"  broker:      {bundle.broker_url}")
    click.echo(f"  broker CA:   {'included' if bundle.ca_certificate else 'none (no TLS CA configured)'}")
    click.echo(f"  cloud key:   {bundle.cloud_key_id or 'none configured'}")
    if bundle.kind == "edge":
        click.echo("  connections: ID/site, ID/cloud, ID/site-K, ID/cloud-K (same password)")
    click.echo("the broker accepts it once 'edgefleet broker run' has synced (seconds)")


@fleet.group("enroll-token")
def enroll_token() -> None:
    """One-time claim tokens: a device exchanges one for its own identity on first start."""


@enroll_token.command("create")
@click.option("--count", type=int, default=1, show_default=True, help="how many tokens (one per device)")
@click.option("--ttl", "ttl", default="24h", show_default=True, help="lifetime: 90s, 30m, 1h, 7d, ...")
@click.option("--kind", type=click.Choice(["device", "edge"]), default="device", show_default=True)
@config_option
@json_option
def enroll_token_create(*, count: int, ttl: str, kind: str, config_file: Path | None, as_json: bool) -> None:
    """Create claim tokens (TOKEN_ID.SECRET, printed once, stored hashed). Give each device its own,
    e.g. in the file its agent's claim_token_file names; it can be used once, until it expires."""
    from cloud.fleet.enrollment import create_claim_tokens, parse_duration  # noqa: PLC0415  (SQLAlchemy)

    try:
        ttl_s = parse_duration(ttl)
    except EdgefleetError as exc:
        raise click.BadParameter(str(exc), param_hint="--ttl") from exc
    settings = _enrollment_settings(config_file)
    try:
        tokens = create_claim_tokens(settings=settings, count=count, ttl_s=ttl_s, kind=kind, actor=actor())
    except EdgefleetError as exc:
        raise fail(exc) from exc
    expires_at = time.time() + ttl_s
    if as_json:
        click.echo(json.dumps({"kind": kind, "expires_at": expires_at, "tokens": tokens}, indent=2))
        return
    for value in tokens:
        click.echo(value)
    click.echo(
        f"{len(tokens)} {kind} claim token(s), each usable once, expire in {_left(ttl_s)}: shown once",
        err=True,
    )


@enroll_token.command("list")
@config_option
@json_option
def enroll_token_list(config_file: Path | None, as_json: bool) -> None:
    """Claim tokens: kind, created, expires, used by (never their secrets or hashes)."""
    from cloud.fleet.enrollment import claim_token_rows  # noqa: PLC0415  (SQLAlchemy: only when this runs)

    rows = claim_token_rows(settings=_enrollment_settings(config_file))
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    columns = [
        ("token_id", "token"),
        ("kind", "kind"),
        ("created_at", "created"),
        ("expires_at", "expires"),
        ("used_at", "used"),
        ("used_by", "used by"),
        ("created_by", "by"),
    ]
    _print_rows(rows, columns, f"claim tokens ({len(rows)})")


@fleet.command("revoke")
@click.argument("identity_id", metavar="ID")
@config_option
@json_option
def fleet_revoke(identity_id: str, config_file: Path | None, as_json: bool) -> None:
    """Revoke ID: the broker refuses it and closes its connections at its next sync. 'fleet enroll ID'
    enrolls it again with a new secret."""
    from cloud.fleet.enrollment import revoke_identity  # noqa: PLC0415  (SQLAlchemy: only when this runs)

    settings = _enrollment_settings(config_file)
    try:
        row = revoke_identity(settings=settings, identity_id=identity_id, actor=actor())
    except EdgefleetError as exc:
        raise fail(exc) from exc
    if as_json:
        click.echo(json.dumps(row, indent=2))
        return
    click.echo(f"{row['kind']} {identity_id}: revoked")


@fleet.command("set-label-trust")
@click.argument("identity_id", metavar="ID")
@click.argument("state", type=click.Choice(["on", "off"]))
@config_option
def fleet_set_label_trust(identity_id: str, state: str, config_file: Path | None) -> None:
    """Mark device ID a trusted labeller (on: its labels may train models) or not (off: they only
    evaluate them)."""
    from cloud.fleet.enrollment import set_label_trust  # noqa: PLC0415  (SQLAlchemy: only when this runs)

    settings = _enrollment_settings(config_file)
    try:
        row = set_label_trust(
            settings=settings, identity_id=identity_id, trusted=state == "on", actor=actor()
        )
    except EdgefleetError as exc:
        raise fail(exc) from exc
    click.echo(f"{identity_id}: labels {'train models' if row['label_trusted'] else 'only evaluate models'}")


@fleet.command("identities")
@click.option("--kind", type=click.Choice(_KINDS), default=None, help="only this kind")
@click.option("--status", type=click.Choice(["active", "revoked"]), default=None, help="only this status")
@config_option
@json_option
def fleet_identities(kind: str | None, status: str | None, config_file: Path | None, as_json: bool) -> None:
    """Enrolled identities: kind, role, status, label trust, how enrolled (never secrets or hashes)."""
    from cloud.fleet.enrollment import list_identity_rows  # noqa: PLC0415  (SQLAlchemy: only when this runs)

    try:
        rows = list_identity_rows(settings=_enrollment_settings(config_file), kind=kind, status=status)
    except EdgefleetError as exc:
        raise fail(exc) from exc
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    columns = [
        ("identity_id", "id"),
        ("kind", "kind"),
        ("role", "role"),
        ("status", "status"),
        ("label_trusted", "labels train"),
        ("enrolled_via", "via"),
        ("created_at", "enrolled"),
        ("revoked_at", "revoked"),
    ]
    _print_rows(rows, columns, f"identities ({len(rows)})")
