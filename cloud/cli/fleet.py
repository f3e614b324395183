"""``edgefleet fleet ...``: list and inspect devices and edges, set desired device config, assign groups."""

from __future__ import annotations

import json
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
