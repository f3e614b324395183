"""``edgefleet admin ...``: API tokens and the audit log."""

from __future__ import annotations

import json
import sys
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
    """Administration: API tokens and console users (stored hashed), sign-in links, the audit log."""


@admin.group()
def token() -> None:
    """Bearer tokens of the admin API."""


@token.command("create")
@click.argument("name")
@click.option(
    "--role",
    type=click.Choice(["viewer", "operator", "admin", "edge"]),
    default="admin",
    show_default=True,
    help="viewer reads; operator also commands, device config, rollouts; admin everything; edge downloads",
)
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
            f"{r['name']:<20} {r['role']:<8} {r['prefix']}...  {state}  last used {ago(r['last_used_at'])}"
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


@admin.group()
def user() -> None:
    """People who sign in to the web console with a password (stored as a scrypt hash)."""


@user.command("create")
@click.argument("name")
@click.option(
    "--role",
    type=click.Choice(["viewer", "operator", "admin"]),
    default="viewer",
    show_default=True,
    help="viewer reads; operator also commands, device config, rollouts; admin also tokens, users, keys",
)
@click.option("--password-stdin", is_flag=True, help="read the password from stdin (first line)")
@config_option
def user_create(name: str, role: str, password_stdin: bool, config_file: Path | None) -> None:
    """Create a console user; the password is asked for (or read from stdin), never echoed or stored."""
    from cloud.console import auth as console_auth  # noqa: PLC0415  (the console: only for this command)
    from cloud.registry import crud  # noqa: PLC0415  (SQLAlchemy: only when this command runs)
    from cloud.registry.db import session_scope  # noqa: PLC0415  (SQLAlchemy: only when this command runs)

    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = click.prompt("password", hide_input=True, confirmation_prompt=True)
    url = registry_url(config_file)
    try:
        console_auth.create_user(database_url=url, username=name, role=role, password=password)
    except (EdgefleetError, ValueError) as exc:
        raise fail(exc) from exc
    with session_scope(url) as session:
        crud.audit(session, actor=actor(), action="user_create", target=name, detail={"role": role})
    click.echo(f"{name}: created (role {role})")


@user.command("list")
@config_option
@json_option
def user_list(config_file: Path | None, as_json: bool) -> None:
    """Console users (name, role, created, last sign-in, disabled); never the hashes."""
    from cloud.registry import accounts  # noqa: PLC0415  (SQLAlchemy: only when this command runs)
    from cloud.registry.db import session_scope  # noqa: PLC0415  (SQLAlchemy: only when this command runs)

    with session_scope(registry_url(config_file)) as session:
        rows: list[dict[str, Any]] = [
            {
                "name": u.username,
                "role": u.role,
                "created_at": u.created_at,
                "last_login_at": u.last_login_at,
                "disabled": u.disabled_at is not None,
            }
            for u in accounts.list_users(session)
        ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        state = "disabled" if r["disabled"] else "active"
        click.echo(f"{r['name']:<20} {r['role']:<8} {state:<8} last sign-in {ago(r['last_login_at'])}")


@user.command("set")
@click.argument("name")
@click.option("--role", type=click.Choice(["viewer", "operator", "admin"]), default=None)
@click.option("--disable/--enable", "disabled", default=None, help="refuse (or allow again) its sign-in")
@click.option("--password-stdin", is_flag=True, help="a new password from stdin (first line)")
@config_option
def user_set(
    name: str, role: str | None, disabled: bool | None, password_stdin: bool, config_file: Path | None
) -> None:
    """Change a user's role, password, or disable it; its open sessions end at once."""
    from cloud.console import auth as console_auth  # noqa: PLC0415  (the console: only for this command)
    from cloud.registry import accounts, crud  # noqa: PLC0415  (SQLAlchemy: only when this command runs)
    from cloud.registry.db import session_scope  # noqa: PLC0415  (SQLAlchemy: only when this command runs)

    password_hash = None
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
        if len(password) < console_auth.MIN_PASSWORD_LENGTH:
            raise fail(ValueError(f"password: at least {console_auth.MIN_PASSWORD_LENGTH} characters"))
        password_hash = console_auth.hash_password(password)
    try:
        with session_scope(registry_url(config_file)) as session:
            accounts.set_user(
                session, username=name, role=role, password_hash=password_hash, disabled=disabled
            )
            detail = {"role": role, "disabled": disabled, "password_changed": password_hash is not None}
            crud.audit(session, actor=actor(), action="user_set", target=name, detail=detail)
    except EdgefleetError as exc:
        raise fail(exc) from exc
    click.echo(f"{name}: updated")


@admin.command("signin-link")
@click.option(
    "--role", type=click.Choice(["viewer", "operator", "admin"]), default="admin", show_default=True
)
@click.option("--name", default="link", show_default=True, help="who the audit log names")
@click.option("--ttl", "ttl_s", type=float, default=3600.0, show_default=True, help="seconds it stays valid")
@click.option(
    "--base-url", default="http://127.0.0.1:8080", show_default=True, help="where the console is served"
)
@config_option
def signin_link(role: str, name: str, ttl_s: float, base_url: str, config_file: Path | None) -> None:
    """Print a one-time console sign-in link (like Jupyter's): it works once, until it expires."""
    from cloud.console import auth as console_auth  # noqa: PLC0415  (the console: only for this command)
    from cloud.registry import crud  # noqa: PLC0415  (SQLAlchemy: only when this command runs)
    from cloud.registry.db import session_scope  # noqa: PLC0415  (SQLAlchemy: only when this command runs)

    url = registry_url(config_file)
    secret = console_auth.create_signin_link(database_url=url, name=name, role=role, ttl_s=ttl_s)
    with session_scope(url) as session:
        crud.audit(session, actor=actor(), action="signin_link_create", target=name, detail={"role": role})
    click.echo(f"{base_url.rstrip('/')}/signin/link/{secret}")
