"""``edgefleet command ...``: send commands to devices and collect their acks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from cloud.cli.common import (
    actor,
    api_call,
    api_option,
    config_option,
    fail,
    json_option,
    settings_from,
)
from shared.errors import EdgefleetError


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
    from cloud.fleet import commands  # noqa: PLC0415  (SQLAlchemy: only when this command runs)

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
        result = api_call("POST", api_url, "/v1/commands", body, timeout=wait_s + 30)
        outcomes, summary = result["outcomes"], result["summary"]
    else:
        settings = settings_from(config_file)

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
                sender=actor(),
                on_ack=show,
            )
        except EdgefleetError as exc:
            raise fail(exc) from exc
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
