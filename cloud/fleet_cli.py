"""``edgefleet fleet|rollout|command|admin`` and ``edgefleet model rollback``: fleet operations over
the registry and the broker, or (``--api URL``) through the admin HTTP API."""

from __future__ import annotations

import getpass
import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from shared.errors import EdgefleetError

if TYPE_CHECKING:
    from shared.settings.cloud import CloudSettings

# The same option as cloud.cli's (that module imports this one, so it is not imported at the top).
config_option = click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    envvar="EDGEFLEET_CLOUD_CONFIG",
    help="CloudSettings YAML file (EDGEFLEET_* environment variables override it)",
)


def _settings(config_file: Path | None) -> CloudSettings:
    from cloud.cli import _settings as load  # noqa: PLC0415

    return load(config_file)


def _console() -> Any:
    from cloud.cli import _console as console  # noqa: PLC0415

    return console()


api_option = click.option(
    "--api",
    "api_url",
    default=None,
    envvar="EDGEFLEET_API_URL",
    help="go through the admin API at this URL (token in EDGEFLEET_API_TOKEN) instead of the registry",
)
json_option = click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")


def _actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


def _url(config_file: Path | None) -> str:
    from cloud.registry.db import upgrade  # noqa: PLC0415

    url = _settings(config_file).resolved_database_url
    upgrade(url)
    return url


def _api(
    method: str,
    api_url: str,
    path: str,
    body: Any = None,
    timeout: float = 130.0,
    *,
    missing_ok: bool = False,
) -> Any:
    """One admin API call; with ``missing_ok`` a 404 returns None."""
    import httpx  # noqa: PLC0415

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


def _ago(ts: float | None) -> str:
    if ts is None:
        return "never"
    seconds = max(0.0, time.time() - ts)
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M")


def _fail(exc: Exception) -> click.ClickException:
    return click.ClickException(str(exc))


# ------------------------------------------------------------------------------------------------
# edgefleet fleet
# ------------------------------------------------------------------------------------------------


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
        edges = _api("GET", api_url, "/v1/fleet/edges")
        devices = _api("GET", api_url, "/v1/fleet/devices")
    else:
        from cloud.registry import fleet as registry_fleet  # noqa: PLC0415
        from cloud.registry.db import session_scope  # noqa: PLC0415

        with session_scope(_url(config_file)) as session:
            edges = registry_fleet.fleet_edges(session)
            devices = registry_fleet.fleet_devices(session)
    if as_json:
        click.echo(json.dumps({"edges": edges, "devices": devices}, indent=2))
        return
    from rich.table import Table  # noqa: PLC0415

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
            _ago(e["last_seen"]),
            e["group"] or "-",
            desired,
            reported,
            "yes" if e["in_sync"] else "[yellow]no[/yellow]",
            e["health"],
        )
    console = _console()
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
                _ago(d["last_seen"]),
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
        row = _api("GET", api_url, f"/v1/fleet/edges/{entity_id}", missing_ok=True)
        if row is None:
            row = _api("GET", api_url, f"/v1/fleet/devices/{entity_id}", missing_ok=True)
        if row is None:
            raise click.ClickException(f"no edge or device {entity_id} in the registry")
    else:
        from cloud.errors import NotFoundError  # noqa: PLC0415
        from cloud.registry import fleet as registry_fleet  # noqa: PLC0415
        from cloud.registry.db import session_scope  # noqa: PLC0415

        try:
            with session_scope(_url(config_file)) as session:
                try:
                    row = registry_fleet.fleet_edge(session, edge_id=entity_id)
                except NotFoundError:
                    if registry_fleet.get_device(session, device_id=entity_id) is None:
                        raise NotFoundError(f"no edge or device {entity_id} in the registry") from None
                    row = registry_fleet.fleet_device(session, device_id=entity_id)
        except EdgefleetError as exc:
            raise _fail(exc) from exc
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
        row[key] = _ago(row[key]) if row[key] is not None else None
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
    from cloud.commands import CommandError, parse_args  # noqa: PLC0415
    from cloud.device_config import set_device_config  # noqa: PLC0415

    try:
        changes = parse_args(settings_kv)
        if api_url:
            body = {"set": changes, "unset": list(unset)}
            row = _api("PUT", api_url, f"/v1/fleet/devices/{device_id}/config", body)
        else:
            _url(config_file)
            row = set_device_config(
                settings=_settings(config_file),
                device_id=device_id,
                changes=changes,
                unset=list(unset),
                actor=_actor(),
            )
    except (CommandError, EdgefleetError) as exc:
        raise _fail(exc) from exc
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
    from cloud.registry import crud  # noqa: PLC0415
    from cloud.registry.db import session_scope  # noqa: PLC0415

    try:
        with session_scope(_url(config_file)) as session:
            crud.assign(session, edge_id=edge_id, device_id=device_id, group=group, tags=list(tags) or None)
            if device_id is not None and behind_edge is not None:
                crud.upsert_device(session, device_id=device_id, edge_id=behind_edge)
            crud.audit(
                session,
                actor=_actor(),
                action="fleet_assign",
                target=edge_id or device_id or "",
                detail={"group": group, "tags": list(tags), "edge": behind_edge},
            )
    except (EdgefleetError, ValueError) as exc:
        raise _fail(exc) from exc
    click.echo(f"{edge_id or device_id}: group={group} tags={list(tags)}")


# ------------------------------------------------------------------------------------------------
# edgefleet rollout
# ------------------------------------------------------------------------------------------------


@click.group()
def rollout() -> None:
    """Roll models out to edges: canary, then waves, gated on health and quality, rolled back on breach."""


def _parse_canary(value: str) -> float:
    text = value.strip()
    try:
        if text.endswith("%"):
            share = float(text[:-1]) / 100
            if not 0 <= share <= 1:
                raise ValueError  # noqa: TRY301 - one message for every malformed form
            return share if share < 1 else 1.0 * 10**9
        return float(int(text))
    except ValueError as exc:
        raise click.BadParameter(f"{value!r}: N (edges) or N% (of the targets)") from exc


def _targets(config_file: Path | None, to: str | None, group: str | None, everything: bool) -> list[str]:
    if sum((to is not None, group is not None, everything)) != 1:
        raise click.UsageError("give exactly one of --to EDGE,..., --group TAG and --all")
    if to is not None:
        return [e for e in (s.strip() for s in to.split(",")) if e]
    from cloud.registry import fleet as registry_fleet  # noqa: PLC0415
    from cloud.registry.db import session_scope  # noqa: PLC0415

    with session_scope(_url(config_file)) as session:
        if group is not None:
            edges = [e.edge_id for e in registry_fleet.edges_in_group(session, tag=group)]
        else:
            edges = [e["edge_id"] for e in registry_fleet.fleet_edges(session)]
    if not edges:
        raise click.ClickException("no edge matches")
    return edges


@rollout.command("start")
@click.argument("model_ref")
@click.option("--to", default=None, help="comma-separated edge ids")
@click.option("--group", default=None, help="every edge in this group or with this tag")
@click.option("--all", "everything", is_flag=True, help="every edge in the registry")
@click.option("--canary", default="1", show_default=True, help="canary cohort: N edges or N%")
@click.option("--waves", type=int, default=2, show_default=True, help="waves after the canary")
@click.option("--gate", "gates", multiple=True, help="NAME=THRESHOLD (see 'rollout gates')")
@click.option("--min-windows", type=int, default=200, show_default=True, help="windows a wave must see")
@click.option("--soak", "soak_s", type=float, default=30.0, show_default=True, help="seconds a wave soaks")
@config_option
@api_option
@json_option
def rollout_start(
    *,
    model_ref: str,
    to: str | None,
    group: str | None,
    everything: bool,
    canary: str,
    waves: int,
    gates: tuple[str, ...],
    min_windows: int,
    soak_s: float,
    config_file: Path | None,
    api_url: str | None,
    as_json: bool,
) -> None:
    """Start rolling MODEL@VERSION out; the engine (Celery beat) advances it wave by wave."""
    from cloud import gates as gatelib  # noqa: PLC0415
    from cloud import rollouts  # noqa: PLC0415

    try:
        thresholds = gatelib.parse_gates(gates)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--gate") from exc
    canary_value = _parse_canary(canary)
    if api_url:
        body = {
            "model": model_ref,
            "edges": [e for e in (to or "").split(",") if e],
            "group": group,
            "all": everything,
            "canary": canary_value,
            "waves": waves,
            "gates": thresholds,
            "min_windows": min_windows,
            "soak_s": soak_s,
        }
        status = _api("POST", api_url, "/v1/rollouts", body)
    else:
        settings = _settings(config_file)
        edges = _targets(config_file, to, group, everything)
        try:
            rollout_id = rollouts.start_rollout(
                settings=settings,
                model_ref=model_ref,
                edge_ids=edges,
                canary=canary_value,
                waves=waves,
                gates=thresholds,
                params={"min_windows": min_windows, "soak_s": soak_s},
                actor=_actor(),
            )
            rollouts.tick(settings=settings, rollout_ids=[rollout_id])  # the canary goes out now
            status = rollouts.status(settings=settings, rollout_id=rollout_id)
        except EdgefleetError as exc:
            raise _fail(exc) from exc
    if as_json:
        click.echo(json.dumps(status, indent=2))
    else:
        click.echo(
            f"rollout {status['rollout_id']} of {status['model']}: {status['state']}, {status['waves']} waves"
        )


@rollout.command("gates")
def rollout_gates() -> None:
    """The gates and their default thresholds."""
    from cloud.gates import DEFAULT_GATES  # noqa: PLC0415

    for name, value in DEFAULT_GATES.items():
        click.echo(f"{name}={value:g}")


def _status(config_file: Path | None, api_url: str | None, rollout_id: str) -> dict[str, Any]:
    if api_url:
        result: dict[str, Any] = _api("GET", api_url, f"/v1/rollouts/{rollout_id}")
        return result
    from cloud import rollouts  # noqa: PLC0415

    try:
        return rollouts.status(settings=_settings(config_file), rollout_id=rollout_id)
    except EdgefleetError as exc:
        raise _fail(exc) from exc


def _render_status(status: dict[str, Any]) -> Any:
    from rich.console import Group  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415
    from rich.text import Text  # noqa: PLC0415

    head = Text(
        f"rollout {status['rollout_id']} of {status['model']}: {status['state']} "
        f"(wave {status['current_wave']} of {status['waves'] - 1}; wave 0 is the canary)"
    )
    parts: list[Any] = [head]
    if status.get("reason"):
        parts.append(Text(f"reason: {status['reason']}", style="bold red"))
    waves = Table(title="targets")
    for column in ("wave", "edge", "state", "revision", "previous", "reason"):
        waves.add_column(column)
    for t in status["targets"]:
        waves.add_row(
            str(t["wave"]),
            t["edge_id"],
            t["state"],
            str(t["revision"] or "-"),
            t["previous_version"] or "-",
            t["reason"] or "",
        )
    parts.append(waves)
    results = status.get("gate_results") or {}
    if results:
        gates = Table(title="gates (latest evaluation per wave)")
        for column in ("wave", "decision", "gate", "value", "threshold", "passed", "detail"):
            gates.add_column(column)
        for wave, entry in sorted(results.items(), key=lambda kv: int(kv[0])):
            for g in entry["gates"]:
                passed = {True: "pass", False: "[red]BREACH[/red]", None: "waiting"}[g["passed"]]
                value = "-" if g["value"] is None else f"{g['value']:.4g}"
                gates.add_row(
                    wave, entry["decision"], g["name"], value, f"{g['threshold']:g}", passed, g["detail"]
                )
        parts.append(gates)
    return Group(*parts)


@rollout.command("status")
@click.argument("rollout_id", required=False)
@config_option
@api_option
@json_option
def rollout_status(
    rollout_id: str | None, config_file: Path | None, api_url: str | None, as_json: bool
) -> None:
    """One rollout's waves, targets and gate results (or the list of rollouts without an id)."""
    if rollout_id is None:
        if api_url:
            items = _api("GET", api_url, "/v1/rollouts")
        else:
            from cloud import rollouts  # noqa: PLC0415
            from cloud.registry import fleet as registry_fleet  # noqa: PLC0415
            from cloud.registry.db import session_scope  # noqa: PLC0415

            with session_scope(_url(config_file)) as session:
                items = [rollouts.describe(r) for r in registry_fleet.list_rollouts(session)]
        if as_json:
            click.echo(json.dumps(items, indent=2))
        else:
            for r in items:
                wave = f"wave {r['current_wave']}/{r['waves'] - 1}"
                click.echo(f"{r['rollout_id']}  {r['model']}  {r['state']}  {wave}")
        return
    status = _status(config_file, api_url, rollout_id)
    if as_json:
        click.echo(json.dumps(status, indent=2))
    else:
        _console().print(_render_status(status))


@rollout.command("watch")
@click.argument("rollout_id")
@click.option("--interval", type=float, default=1.0, show_default=True)
@click.option("--timeout", type=float, default=None, help="give up after this many seconds")
@click.option("--tick", "drive", is_flag=True, help="advance the rollout from here (no Celery beat running)")
@config_option
@api_option
def rollout_watch(
    *,
    rollout_id: str,
    interval: float,
    timeout: float | None,
    drive: bool,
    config_file: Path | None,
    api_url: str | None,
) -> None:
    """Live progress per wave until the rollout completes, halts or is aborted."""
    from rich.live import Live  # noqa: PLC0415

    from cloud import rollouts  # noqa: PLC0415

    deadline = None if timeout is None else time.monotonic() + timeout
    status = _status(config_file, api_url, rollout_id)
    with Live(_render_status(status), console=_console(), refresh_per_second=4) as live:
        while True:
            if drive and not api_url:
                rollouts.tick(settings=_settings(config_file), rollout_ids=[rollout_id])
            status = _status(config_file, api_url, rollout_id)
            live.update(_render_status(status))
            converging = any(t["state"] in ("deploying", "rolling_back") for t in status["targets"])
            if status["state"] in ("completed", "halted", "aborted") and not converging:
                break
            if deadline is not None and time.monotonic() >= deadline:
                raise click.ClickException(f"rollout {rollout_id} still {status['state']} after {timeout} s")
            time.sleep(interval)
    if status["state"] != "completed":
        raise SystemExit(1)


_STEER_HELP = {
    "pause": "Stop advancing (edges keep what they run).",
    "resume": "Advance a paused rollout again.",
    "abort": "Stop and roll every edge that received the model back to its previous model.",
}


def _steer(action: str) -> Any:
    @rollout.command(action, help=_STEER_HELP[action])
    @click.argument("rollout_id")
    @config_option
    @api_option
    def command(rollout_id: str, config_file: Path | None, api_url: str | None) -> None:
        if api_url:
            status = _api("POST", api_url, f"/v1/rollouts/{rollout_id}/{action}")
            click.echo(f"rollout {rollout_id}: {status['state']}")
            return
        from cloud import rollouts  # noqa: PLC0415

        try:
            state = rollouts.set_state(
                settings=_settings(config_file), rollout_id=rollout_id, action=action, actor=_actor()
            )
        except EdgefleetError as exc:
            raise _fail(exc) from exc
        click.echo(f"rollout {rollout_id}: {state}")

    return command


rollout_pause = _steer("pause")
rollout_resume = _steer("resume")
rollout_abort = _steer("abort")


@click.command("rollback")
@click.option("--to", "to_ref", default=None, help="NAME@VERSION to deploy; default: each edge's last-good")
@click.option("--edge", "edges", multiple=True, help="edge id (repeatable)")
@click.option("--group", default=None)
@click.option("--all", "everything", is_flag=True)
@config_option
@api_option
def model_rollback(
    *,
    to_ref: str | None,
    edges: tuple[str, ...],
    group: str | None,
    everything: bool,
    config_file: Path | None,
    api_url: str | None,
) -> None:
    """Send edges back: to --to NAME@VERSION, or to the last-good model each keeps on disk."""
    targets = _targets(config_file, ",".join(edges) if edges else None, group, everything)
    if api_url:
        result = _api("POST", api_url, "/v1/models/rollback", {"edges": targets, "to": to_ref})
        for order in result["orders"]:
            click.echo(f"{order['edge_id']}: revision {order['revision']} {order['action']}")
        return
    from cloud import rollouts  # noqa: PLC0415

    try:
        sent = rollouts.rollback_edges(
            settings=_settings(config_file), edge_ids=targets, to_ref=to_ref, actor=_actor()
        )
    except EdgefleetError as exc:
        raise _fail(exc) from exc
    for desired in sent:
        what = desired.model.ref if desired.model is not None else "last-good"
        click.echo(f"{desired.edge_id}: revision {desired.revision} -> {what}")


# ------------------------------------------------------------------------------------------------
# edgefleet command
# ------------------------------------------------------------------------------------------------


@click.group()
def command() -> None:
    """Send commands to devices (through the broker) and collect their acks."""


@command.command("send")
@click.argument("device", required=False)
@click.argument("name", required=False)
@click.option("--group", default=None, help="every device in this group or with this tag")
@click.option("--edge", default=None, help="every device behind this edge")
@click.option("--arg", "args", multiple=True, help="KEY=VALUE (JSON values parse)")
@click.option(
    "--wait", "wait_s", type=float, default=10.0, show_default=True, help="seconds to wait for acks"
)
@click.option("--ttl", "ttl_s", type=float, default=60.0, show_default=True, help="command expiry")
@config_option
@api_option
@json_option
def command_send(
    *,
    device: str | None,
    name: str | None,
    group: str | None,
    edge: str | None,
    args: tuple[str, ...],
    wait_s: float,
    ttl_s: float,
    config_file: Path | None,
    api_url: str | None,
    as_json: bool,
) -> None:
    """edgefleet command send (DEVICE | --group TAG | --edge EDGE) TYPE [--arg k=v ...] [--wait S]"""
    from cloud import commands  # noqa: PLC0415

    if name is None:  # "command send --group G ping": the one positional is the command type
        device, name = None, device
    if name is None:
        raise click.UsageError("give the command TYPE")
    try:
        parsed = commands.parse_args(args)
    except EdgefleetError as exc:
        raise click.BadParameter(str(exc), param_hint="--arg") from exc
    if api_url:
        body = {
            "device": device,
            "group": group,
            "edge": edge,
            "name": name,
            "args": parsed,
            "ttl_s": ttl_s,
            "wait_s": wait_s,
        }
        result = _api("POST", api_url, "/v1/commands", body, timeout=wait_s + 30)
        outcomes, summary = result["outcomes"], result["summary"]
    else:
        settings = _settings(config_file)

        def show(outcome: Any) -> None:
            if not as_json:
                extra = f" ({outcome.error})" if outcome.error else ""
                click.echo(f"  {outcome.device_id}: {outcome.status}{extra} in {outcome.latency_ms:.1f} ms")

        try:
            targets = commands.resolve_targets(settings=settings, device=device, group=group, edge=edge)
            if not as_json:
                click.echo(f"{name} -> {len(targets)} device(s)")
            result = commands.send_commands(
                settings=settings,
                device_ids=targets,
                name=name,
                args=parsed,
                ttl_s=ttl_s,
                wait_s=wait_s,
                sender=_actor(),
                on_ack=show,
            )
        except EdgefleetError as exc:
            raise _fail(exc) from exc
        outcomes, summary = [o.__dict__ for o in result.outcomes], result.summary()
    if as_json:
        click.echo(json.dumps({"summary": summary, "outcomes": outcomes}, indent=2))
    else:
        for o in outcomes:
            if o["status"] == "timeout":
                click.echo(f"  {o['device_id']}: no ack in {wait_s:g} s")
        click.echo(
            f"{summary['acked']} acked, {summary['failed']} failed, {summary['timed_out']} timed out "
            f"of {summary['targets']}"
        )
    if summary["acked"] != summary["targets"]:
        raise SystemExit(1)


# ------------------------------------------------------------------------------------------------
# edgefleet admin
# ------------------------------------------------------------------------------------------------


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
    from cloud import auth  # noqa: PLC0415
    from cloud.registry import crud  # noqa: PLC0415
    from cloud.registry.db import session_scope  # noqa: PLC0415

    url = _url(config_file)
    try:
        secret = auth.create_token(database_url=url, name=name, role=role)
    except (EdgefleetError, ValueError) as exc:
        raise _fail(exc) from exc
    with session_scope(url) as session:
        crud.audit(session, actor=_actor(), action="token_create", target=name, detail={"role": role})
    click.echo(secret)


@token.command("list")
@config_option
@json_option
def token_list(config_file: Path | None, as_json: bool) -> None:
    """Tokens (name, role, prefix, created, last used, revoked); never the secrets."""
    from cloud.registry import fleet as registry_fleet  # noqa: PLC0415
    from cloud.registry.db import session_scope  # noqa: PLC0415

    with session_scope(_url(config_file)) as session:
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
            f"{r['name']:<20} {r['role']:<6} {r['prefix']}...  {state}  last used {_ago(r['last_used_at'])}"
        )


@token.command("revoke")
@click.argument("name")
@config_option
def token_revoke(name: str, config_file: Path | None) -> None:
    """Revoke a token: the API refuses it from now on."""
    from cloud.registry import crud  # noqa: PLC0415
    from cloud.registry import fleet as registry_fleet  # noqa: PLC0415
    from cloud.registry.db import session_scope  # noqa: PLC0415

    try:
        with session_scope(_url(config_file)) as session:
            registry_fleet.revoke_token(session, name=name)
            crud.audit(session, actor=_actor(), action="token_revoke", target=name)
    except EdgefleetError as exc:
        raise _fail(exc) from exc
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
        rows: list[dict[str, Any]] = _api("GET", api_url, query)
    else:
        from cloud.registry import fleet as registry_fleet  # noqa: PLC0415
        from cloud.registry.db import session_scope  # noqa: PLC0415

        with session_scope(_url(config_file)) as session:
            entries = registry_fleet.audit_entries(session, limit=limit, action=action)
            rows = [registry_fleet.audit_row(a) for a in entries]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        stamp = datetime.fromtimestamp(r["ts"], UTC).strftime("%Y-%m-%d %H:%M:%S")
        click.echo(f"{stamp}  {r['actor']:<20} {r['action']:<22} {r['target']}  {json.dumps(r['detail'])}")
