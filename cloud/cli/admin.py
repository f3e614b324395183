"""``edgefleet admin ...``: API tokens and the audit log."""

from __future__ import annotations

import json
from datetime import UTC, datetime
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
    json_option,
    registry_url,
)
from shared.errors import EdgefleetError


@click.group()
def admin() -> None:
    """Administration: API tokens (stored hashed)."""


@admin.group()
def token() -> None:
    """Bearer tokens of the admin API."""


@token.command("create")
@click.argument("name")
@click.option("--role", type=click.Choice(["admin", "edge"]), default="admin", show_default=True)
@config_option
def token_create(name: str, role: str, config_file: Path | None) -> None:
    """Create a token; its secret is printed once and stored only as a hash."""
    from cloud.api import auth  # noqa: PLC0415  (FastAPI: the API package, only for this command)
    from cloud.registry import crud  # noqa: PLC0415  (SQLAlchemy: only when this command runs)
    from cloud.registry.db import session_scope  # noqa: PLC0415  (SQLAlchemy: only when this command runs)

    url = registry_url(config_file)
    try:
        secret = auth.create_token(database_url=url, name=name, role=role)
    except (EdgefleetError, ValueError) as exc:
        raise fail(exc) from exc
    with session_scope(url) as session:
        crud.audit(session, actor=actor(), action="token_create", target=name, detail={"role": role})
    click.echo(secret)


@token.command("list")
@config_option
@json_option
def token_list(config_file: Path | None, as_json: bool) -> None:
    """Tokens (name, role, prefix, created, last used, revoked); never the secrets."""
    from cloud.registry import fleet as registry_fleet  # noqa: PLC0415  (SQLAlchemy: only when this command runs)
    from cloud.registry.db import session_scope  # noqa: PLC0415  (SQLAlchemy: only when this command runs)

    with session_scope(registry_url(config_file)) as session:
        rows: list[dict[str, Any]] = [
            {
                "name": t.name,
                "role": t.role,
                "prefix": t.prefix,
                "created_at": t.created_at,
                "last_used_at": t.last_used_at,
                "revoked": t.revoked_at is not None,
            }
            for t in registry_fleet.list_tokens(session)
        ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        state = "revoked" if r["revoked"] else "active"
        click.echo(
            f"{r['name']:<20} {r['role']:<6} {r['prefix']}...  {state}  last used {ago(r['last_used_at'])}"
        )


@token.command("revoke")
@click.argument("name")
@config_option
def token_revoke(name: str, config_file: Path | None) -> None:
    """Revoke a token: the API refuses it from now on."""
    from cloud.registry import crud  # noqa: PLC0415  (SQLAlchemy: only when this command runs)
    from cloud.registry import fleet as registry_fleet  # noqa: PLC0415  (SQLAlchemy: only when this command runs)
    from cloud.registry.db import session_scope  # noqa: PLC0415  (SQLAlchemy: only when this command runs)

    try:
        with session_scope(registry_url(config_file)) as session:
            registry_fleet.revoke_token(session, name=name)
            crud.audit(session, actor=actor(), action="token_revoke", target=name)
    except EdgefleetError as exc:
        raise fail(exc) from exc
    click.echo(f"{name}: revoked")


@admin.command("audit")
@click.option("--limit", type=int, default=50, show_default=True, help="newest entries to show")
@click.option("--action", default=None, help="only this action (e.g. command_send, rollout_halted)")
@config_option
@api_option
@json_option
def audit_log(
    limit: int, action: str | None, config_file: Path | None, api_url: str | None, as_json: bool
) -> None:
    """The audit log, newest first: who (actor) did what (action) to what (target), with details."""
    if api_url:
        query = f"/v1/audit?limit={limit}" + (f"&action={action}" if action else "")
        rows: list[dict[str, Any]] = api_call("GET", api_url, query)
    else:
        from cloud.registry import fleet as registry_fleet  # noqa: PLC0415  (SQLAlchemy: not on the --api path)
        from cloud.registry.db import session_scope  # noqa: PLC0415  (SQLAlchemy: not on the --api path)

        with session_scope(registry_url(config_file)) as session:
            entries = registry_fleet.audit_entries(session, limit=limit, action=action)
            rows = [registry_fleet.audit_row(a) for a in entries]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        stamp = datetime.fromtimestamp(r["ts"], UTC).strftime("%Y-%m-%d %H:%M:%S")
        click.echo(f"{stamp}  {r['actor']:<20} {r['action']:<22} {r['target']}  {json.dumps(r['detail'])}")
