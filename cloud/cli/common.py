"""What every CLI group shares: the ``--config``/``--api``/``--json`` options, settings, the console,
admin API calls, and how errors become exit codes and messages."""

from __future__ import annotations

import getpass
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from shared.errors import EdgefleetError
from shared.settings import load_settings
from shared.settings.cloud import CloudSettings

config_option = click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    envvar="EDGEFLEET_CLOUD_CONFIG",
    help="CloudSettings YAML file (EDGEFLEET_* environment variables override it)",
)
api_option = click.option(
    "--api",
    "api_url",
    default=None,
    envvar="EDGEFLEET_API_URL",
    help="go through the admin API at this URL (token in EDGEFLEET_API_TOKEN) instead of the registry",
)
json_option = click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")


def settings_from(config_file: Path | None) -> CloudSettings:
    """The cloud settings from ``--config`` (or ``EDGEFLEET_CLOUD_CONFIG``) and the environment."""
    if config_file is not None:
        # Celery workers and in-process tasks read the same file through this variable.
        os.environ["EDGEFLEET_CLOUD_CONFIG"] = str(config_file)
    try:
        return load_settings(CloudSettings, config_file)
    except EdgefleetError as exc:
        raise fail(exc) from exc


def get_console() -> Any:
    """A rich console; piped output (files, tests, CI logs) gets wide tables, not 80 columns."""
    from rich.console import Console  # noqa: PLC0415  (rich: only when something is printed)

    return Console(width=None if sys.stdout.isatty() else 200)


def actor() -> str:
    """Who the audit log names for a CLI action: ``cli:<login>``."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


def registry_url(config_file: Path | None) -> str:
    """The registry's database URL, migrated to the current schema."""
    from cloud.registry.db import upgrade  # noqa: PLC0415  (SQLAlchemy + Alembic: not for --api calls)

    url = settings_from(config_file).resolved_database_url
    upgrade(url)
    return url


def api_call(
    method: str,
    api_url: str,
    path: str,
    body: Any = None,
    timeout: float = 130.0,
    *,
    missing_ok: bool = False,
) -> Any:
    """One admin API call; with ``missing_ok`` a 404 returns None."""
    import httpx  # noqa: PLC0415  (only the --api path needs an HTTP client)

    token = os.environ.get("EDGEFLEET_API_TOKEN")
    if not token:
        raise click.ClickException(
            "--api needs a token in EDGEFLEET_API_TOKEN (edgefleet admin token create)"
        )
    try:
        response = httpx.request(
            method,
            api_url.rstrip("/") + path,
            json=body,
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout,
        )
    except httpx.HTTPError as exc:
        raise click.ClickException(f"API at {api_url} unreachable: {exc}") from exc
    if missing_ok and response.status_code == 404:
        return None
    if response.status_code >= 400:
        raise click.ClickException(f"API {response.status_code}: {response.text}")
    return response.json()


def ago(ts: float | None) -> str:
    """A timestamp as a person reads it: ``12s ago``, ``5m ago``, or a UTC date."""
    if ts is None:
        return "never"
    seconds = max(0.0, time.time() - ts)
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M")


def fail(exc: Exception) -> click.ClickException:
    """An edgefleet error as a CLI failure: its message on stderr, exit code 1."""
    return click.ClickException(str(exc))


def target_edges(config_file: Path | None, to: str | None, group: str | None, everything: bool) -> list[str]:
    """The edges an order goes to: ``--to`` ids, a ``--group`` tag, or ``--all`` (exactly one)."""
    if sum((to is not None, group is not None, everything)) != 1:
        raise click.UsageError("give exactly one of --to EDGE,..., --group TAG and --all")
    if to is not None:
        return [e for e in (s.strip() for s in to.split(",")) if e]
    from cloud.registry import fleet as registry_fleet  # noqa: PLC0415  (SQLAlchemy: only to resolve --group or --all)
    from cloud.registry.db import session_scope  # noqa: PLC0415  (SQLAlchemy: only to resolve --group or --all)

    with session_scope(registry_url(config_file)) as session:
        if group is not None:
            edges = [e.edge_id for e in registry_fleet.edges_in_group(session, tag=group)]
        else:
            edges = [e["edge_id"] for e in registry_fleet.fleet_edges(session)]
    if not edges:
        raise click.ClickException("no edge matches")
    return edges
