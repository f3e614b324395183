"""``edgefleet rollout ...``: staged rollouts gated on quality: start, watch, pause, resume, abort."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click

from cloud.cli.common import (
    actor,
    api_call,
    api_option,
    config_option,
    fail,
    get_console,
    json_option,
    registry_url,
    settings_from,
    target_edges,
)
from cloud.fleet import wave_gates as gatelib
from cloud.fleet.wave_gates import DEFAULT_GATES
from shared.errors import EdgefleetError


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
    from cloud.fleet import rollouts  # noqa: PLC0415  (SQLAlchemy: only when this command runs)

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
        status = api_call("POST", api_url, "/v1/rollouts", body)
    else:
        settings = settings_from(config_file)
        edges = target_edges(config_file, to, group, everything)
        try:
            rollout_id = rollouts.start_rollout(
                settings=settings,
                model_ref=model_ref,
                edge_ids=edges,
                canary=canary_value,
                waves=waves,
                gates=thresholds,
                params={"min_windows": min_windows, "soak_s": soak_s},
                actor=actor(),
            )
            rollouts.tick(settings=settings, rollout_ids=[rollout_id])  # the canary goes out now
            status = rollouts.status(settings=settings, rollout_id=rollout_id)
        except EdgefleetError as exc:
            raise fail(exc) from exc
    if as_json:
        click.echo(json.dumps(status, indent=2))
    else:
        click.echo(
            f"rollout {status['rollout_id']} of {status['model']}: {status['state']}, {status['waves']} waves"
        )


@rollout.command("gates")
def rollout_gates() -> None:
    """The gates and their default thresholds."""
    for name, value in DEFAULT_GATES.items():
        click.echo(f"{name}={value:g}")


def _status(config_file: Path | None, api_url: str | None, rollout_id: str) -> dict[str, Any]:
    if api_url:
        result: dict[str, Any] = api_call("GET", api_url, f"/v1/rollouts/{rollout_id}")
        return result
    from cloud.fleet import rollouts  # noqa: PLC0415  (SQLAlchemy: not on the --api path)

    try:
        return rollouts.status(settings=settings_from(config_file), rollout_id=rollout_id)
    except EdgefleetError as exc:
        raise fail(exc) from exc


def _render_status(status: dict[str, Any]) -> Any:
    from rich.console import Group  # noqa: PLC0415  (rich: only when printing)
    from rich.table import Table  # noqa: PLC0415  (rich: only when printing)
    from rich.text import Text  # noqa: PLC0415  (rich: only when printing)

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
            items = api_call("GET", api_url, "/v1/rollouts")
        else:
            from cloud.fleet import rollouts  # noqa: PLC0415  (SQLAlchemy: not on the --api path)
            from cloud.registry import fleet as registry_fleet  # noqa: PLC0415  (SQLAlchemy: not on the --api path)
            from cloud.registry.db import session_scope  # noqa: PLC0415  (SQLAlchemy: not on the --api path)

            with session_scope(registry_url(config_file)) as session:
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
        get_console().print(_render_status(status))


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
    from rich.live import Live  # noqa: PLC0415  (rich: only when printing)

    from cloud.fleet import rollouts  # noqa: PLC0415  (SQLAlchemy: only when this command runs)

    deadline = None if timeout is None else time.monotonic() + timeout
    status = _status(config_file, api_url, rollout_id)
    with Live(_render_status(status), console=get_console(), refresh_per_second=4) as live:
        while True:
            if drive and not api_url:
                rollouts.tick(settings=settings_from(config_file), rollout_ids=[rollout_id])
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
            status = api_call("POST", api_url, f"/v1/rollouts/{rollout_id}/{action}")
            click.echo(f"rollout {rollout_id}: {status['state']}")
            return
        from cloud.fleet import rollouts  # noqa: PLC0415  (SQLAlchemy: not on the --api path)

        try:
            state = rollouts.set_state(
                settings=settings_from(config_file), rollout_id=rollout_id, action=action, actor=actor()
            )
        except EdgefleetError as exc:
            raise fail(exc) from exc
        click.echo(f"rollout {rollout_id}: {state}")

    return command


rollout_pause = _steer("pause")
rollout_resume = _steer("resume")
rollout_abort = _steer("abort")
