"""``edgefleet agent``: run the device agent."""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Any

import click
import yaml

from device_agent.agent import Agent
from shared.settings import AgentSettings, load_settings

logger = logging.getLogger(__name__)


def _sensor_options(pairs: tuple[str, ...]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r}: expected KEY=VALUE", param_hint="--sensor-option")
        options[key.strip()] = yaml.safe_load(raw)
    return options


@click.group()
def agent() -> None:
    """Run the device agent on a device."""


@agent.command("run")
@click.option("--config", "-c", "config", type=click.Path(dir_okay=False, path_type=Path), help="agent.yaml")
@click.option("--device-id", help="this device's id (letters, digits, _ . : -)")
@click.option("--broker", help="mqtt://HOST:PORT or mqtts://HOST:PORT")
@click.option("--sensor", "sensor_kind", help="sensor kind: simulated, replay, command")
@click.option(
    "--sensor-option",
    "-o",
    "sensor_options",
    multiple=True,
    help="sensor option KEY=VALUE (YAML value), repeatable",
)
@click.option("--rate", "rate_hz", type=float, help="samples per second per channel")
@click.option("--window", type=int, help="samples per window")
@click.option("--hop", type=int, help="samples between window starts (default: window)")
@click.option(
    "--data-dir", type=click.Path(file_okay=False, path_type=Path), help="outbox and state directory"
)
def run(  # noqa: PLR0917  (click passes every option)
    config: Path | None,
    device_id: str | None,
    broker: str | None,
    sensor_kind: str | None,
    sensor_options: tuple[str, ...],
    rate_hz: float | None,
    window: int | None,
    hop: int | None,
    data_dir: Path | None,
) -> None:
    """Stream sensor windows to the broker until SIGTERM / SIGINT.

    Settings come from --config, then EDGEFLEET_* environment variables, then these options.
    """
    sensor: dict[str, Any] = {}
    if sensor_kind:
        sensor["kind"] = sensor_kind
    if sensor_options:
        sensor["options"] = _sensor_options(sensor_options)
    settings = load_settings(
        AgentSettings,
        config,
        device_id=device_id,
        broker={"url": broker} if broker else None,
        sensor=sensor or None,
        rate_hz=rate_hz,
        window=window,
        hop=hop,
        data_dir=data_dir,
    )
    if "log_level" in settings.model_fields_set:
        logging.getLogger().setLevel(settings.log_level)
    device = Agent(settings)

    def on_signal(signum: int, _frame: Any) -> None:
        logger.info("agent: %s received, shutting down", signal.Signals(signum).name)
        device.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    device.run()
