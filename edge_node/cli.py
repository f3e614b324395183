"""``edgefleet edge``: run an edge node."""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any

import click
import yaml
from pydantic import ValidationError

from edge_node.enrollment import apply as apply_enrollment
from shared.bridge import mosquitto_bridge_config
from shared.errors import ConfigError
from shared.settings import EdgeSettings, MqttSettings, load_settings

logger = logging.getLogger(__name__)


@click.group()
def edge() -> None:
    """Run an edge node: LiteRT inference, local decisions, model hot-swap."""


@edge.command("run")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path), help="edge.yaml")
@click.option("--edge-id", help="this edge's id (a topic level)")
@click.option("--broker", help="site broker URL, mqtt://HOST:PORT (devices: telemetry, commands)")
@click.option("--cloud-broker", help="cloud broker URL (default: the site broker)")
@click.option(
    "--model", "model_path", type=click.Path(dir_okay=False, path_type=Path), help="a .tflite to start with"
)
@click.option("--manifest", type=click.Path(dir_okay=False, path_type=Path), help="its ModelManifest JSON")
@click.option("--class-names", help="comma-separated class names for a --model without manifest")
@click.option(
    "--public-key", type=click.Path(dir_okay=False, path_type=Path), help="cloud ed25519 public key"
)
@click.option("--rules", "rules_file", type=click.Path(dir_okay=False, path_type=Path), help="rules YAML")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--metrics-port", type=int, help="Prometheus port (0 disables)")
@click.option("--metrics-bind", help="address of the Prometheus endpoint (default 127.0.0.1)")
@click.option("--share-group", help="MQTT shared-subscription group to split devices between edges")
@click.option("--workers", type=int, help="inference threads per process (one interpreter each)")
@click.option(
    "--processes",
    help="worker processes: N, or auto (default: one per CPU); above 1 a supervisor runs them "
    "under one edge identity, restarting any that crashes",
)
@click.option("--backend", type=click.Choice(["auto", "ai-edge-litert", "tflite-runtime", "tensorflow"]))
def run(
    *,
    config_file: Path | None,
    edge_id: str | None,
    broker: str | None,
    cloud_broker: str | None,
    model_path: Path | None,
    manifest: Path | None,
    class_names: str | None,
    public_key: Path | None,
    rules_file: Path | None,
    data_dir: Path | None,
    metrics_port: int | None,
    metrics_bind: str | None,
    share_group: str | None,
    workers: int | None,
    processes: str | None,
    backend: str | None,
) -> None:
    """Run until SIGINT/SIGTERM. Options override the config file and EDGEFLEET_* variables."""
    from edge_node.node import EdgeNode  # noqa: PLC0415  (numpy and LiteRT only when running)
    from edge_node.supervisor import EdgeSupervisor  # noqa: PLC0415

    overrides: dict[str, Any] = {
        "edge_id": edge_id,
        "site_broker": {"url": broker} if broker else None,
        "cloud_broker": {"url": cloud_broker} if cloud_broker else None,
        "share_group": share_group,
        "processes": processes,
        "data_dir": data_dir,
        "rules_file": rules_file,
        "model": {
            "path": model_path,
            "manifest": manifest,
            "class_names": class_names.split(",") if class_names else None,
            "public_key": public_key,
        },
        "metrics": {"port": metrics_port, "bind": metrics_bind},
        "batching": {"workers": workers},
        "runtime": {"backend": backend},
    }
    settings = apply_enrollment(_merge_load(config_file, overrides))
    if settings.gil_switch_interval_ms is not None:
        sys.setswitchinterval(settings.gil_switch_interval_ms / 1000.0)
    count = settings.process_count
    node: EdgeNode | EdgeSupervisor = EdgeSupervisor(settings, count) if count > 1 else EdgeNode(settings)

    def _stop(signum: int, _frame: FrameType | None) -> None:
        logger.info("signal %d: stopping", signum)
        node.stop_event.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    node.run_forever()


def _merge_load(config_file: Path | None, overrides: dict[str, Any]) -> EdgeSettings:
    """Options override the file field by field: nested sections are merged, not replaced."""
    base: dict[str, Any] = {}
    if config_file is not None and config_file.is_file():
        loaded = yaml.safe_load(config_file.read_text()) or {}
        if isinstance(loaded, dict):
            base = loaded
    merged = _deep_merge(base, overrides)
    return load_settings(EdgeSettings, config_file, **merged)


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in over.items():
        if isinstance(value, dict):
            nested = {k: v for k, v in value.items() if v is not None}
            if not nested:
                continue
            below = base.get(key)
            out[key] = _deep_merge(below, nested) if isinstance(below, dict) else nested
            if isinstance(below, dict):
                out[key] = {**below, **out[key]}
        elif value is not None:
            out[key] = value
    return out


@edge.command("bridge-config")
@click.option(
    "--cloud-broker", required=True, help="cloud broker URL the site broker bridges to, mqtt(s)://HOST:PORT"
)
@click.option("--name", required=True, help="connection name and client id on the cloud broker: one per site")
@click.option(
    "--username", help="the bridge's user on the cloud broker (password: EDGEFLEET_BRIDGE_PASSWORD)"
)
@click.option("--tls-ca", type=click.Path(dir_okay=False, path_type=Path), help="CA bundle (turns TLS on)")
@click.option("--tls-cert", type=click.Path(dir_okay=False, path_type=Path), help="client certificate")
@click.option("--tls-key", type=click.Path(dir_okay=False, path_type=Path), help="its key")
@click.option("--prefix", "topic_prefix", default=None, help="topic prefix (default ef/v1)")
@click.option(
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="write here (mode 0600: it may hold the password) instead of printing",
)
def bridge_config(
    *,
    cloud_broker: str,
    name: str,
    username: str | None,
    tls_ca: Path | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    topic_prefix: str | None,
    output: Path | None,
) -> None:
    """Print the mosquitto bridge for a site broker: device cmd/desired down from the cloud broker,
    ack/status up (docs/operations.md, "Split brokers")."""
    fields: dict[str, Any] = {"url": cloud_broker, "username": username}
    fields.update(tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key)
    if password := os.environ.get("EDGEFLEET_BRIDGE_PASSWORD"):
        fields["password"] = password
    if topic_prefix:
        fields["topic_prefix"] = topic_prefix
    try:
        cloud = MqttSettings(**fields)
        text = mosquitto_bridge_config(cloud=cloud, name=name)
    except (ValidationError, ConfigError) as exc:
        raise click.ClickException(str(exc)) from exc
    if output is None:
        click.echo(text, nl=False)
        return
    fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    click.echo(f"wrote {output}")
