"""The demo's topology on one machine: MQTT broker, Redis (or kombu's SQLite transport), the cloud
services, M edge nodes and N simulated devices, each a child process of a ``Supervisor``, configured
with the same files as the compose services (``deploy/config/*.yaml``) plus command-line / env
overrides for local ports and directories."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import sqlite3
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cloud.demo.supervisor import Supervisor, tail
from cloud.errors import SupervisorError
from device_agent.state import db_path
from shared.private_broker import DURABLE, free_port, mosquitto_binary, port_open, write_config

logger = logging.getLogger(__name__)

MODEL_NAME = "vibration"
CLASSES = ("normal", "imbalance", "misalignment", "bearing_fault")
# Run-scoped state is wiped at each start (simulated machines, edges, broker sessions); the
# registry, datasets, models and keys under cloud/ are kept between runs.
RUN_SCOPED = ("broker", "redis", "edges", "devices", "logs")


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def config_dir() -> Path:
    """``deploy/config`` of this checkout (the compose services' files)."""
    return Path(os.environ.get("EDGEFLEET_DEMO_CONFIG_DIR", _repo_root() / "deploy" / "config"))


def edgefleet_argv() -> list[str]:
    """How to run ``edgefleet`` with this interpreter (works without the venv on PATH)."""
    return [sys.executable, "-m", "shared.cli"]


@dataclass
class DemoOptions:
    """What ``edgefleet demo`` was asked for: sizes, timings, drift or scenario, broker and deploy mode."""

    devices: int = 20
    edges: int = 2
    duration_s: float = 120.0
    drift: float = 1.0
    drift_at: float = 0.5  # fraction of the streaming phase
    wait_recovery_s: float = 0.0  # after duration_s, stream on until recovered, at most this long
    data_dir: Path = Path("var/demo")
    reset: bool = False
    devices_in_one_process: bool = False
    n_windows: int = 1500
    epochs: int = 4
    uplink_random_fraction: float = 0.3
    broker: str = "auto"  # auto | mosquitto | amqtt
    metrics_interval_s: float = 2.0
    trigger_check_s: float = 2.0
    seed: int = 0
    scenario: str | None = None  # a fault-injection scenario (cloud/demo_scenarios.py) instead of drift
    deploy_mode: str = "rollout"  # how retrained models reach the edges: rollout | direct
    console: bool = True  # serve the web console (``edgefleet cloud api``) and print a sign-in link
    console_port: int | None = None  # default: a free port


@dataclass
class Topology:
    """The running demo: its options, supervisor, broker and Celery transport, the ids, and relayed links."""

    options: DemoOptions
    supervisor: Supervisor
    broker_url: str
    broker_kind: str
    celery_kind: str
    cloud_env: dict[str, str]
    edge_ids: list[str] = field(default_factory=list)
    device_ids: list[str] = field(default_factory=list)
    # Fault injection routes some links through a cuttable TCP relay (cloud/demo_scenarios.py):
    edge_cloud_url: str | None = None  # the edges' cloud link (default: the broker, like the site link)
    device_broker_urls: dict[str, str] = field(default_factory=dict)  # per device (default: the broker)

    @property
    def data_dir(self) -> Path:
        """The demo's data directory (``--data-dir``)."""
        return self.options.data_dir

    @property
    def cloud_dir(self) -> Path:
        """Where the cloud keeps its registry, datasets, models and keys (kept between runs)."""
        return self.data_dir / "cloud"

    @property
    def devices_dir(self) -> Path:
        """Where the devices keep their outboxes and state."""
        return self.data_dir / "devices"

    def device_fault(self, index: int) -> str:
        """The machine class the ``index``-th device simulates: the classes in turn, ``normal`` first."""
        return CLASSES[index % len(CLASSES)]


def prepare_dirs(options: DemoOptions) -> None:
    """Create the data directory and wipe its run-scoped state (all of it with ``reset``)."""
    root = options.data_dir
    if options.reset and root.exists():
        shutil.rmtree(root)
    for name in RUN_SCOPED:
        shutil.rmtree(root / name, ignore_errors=True)
    for name in (*RUN_SCOPED, "cloud"):
        (root / name).mkdir(parents=True, exist_ok=True)


# -- broker ------------------------------------------------------------------------------------------


def start_broker(sup: Supervisor, options: DemoOptions) -> tuple[str, str]:
    """mosquitto when installed (private config), else the embedded amqtt broker."""
    port = free_port()
    workdir = (options.data_dir / "broker").resolve()
    binary = mosquitto_binary() if options.broker in ("auto", "mosquitto") else None
    if options.broker == "mosquitto" and binary is None:
        raise SupervisorError("--broker mosquitto: mosquitto is not installed")
    if binary is not None:
        # Edges ack after deciding (ack_after_decision): DURABLE allows many messages in flight.
        conf = write_config(workdir, port, dataclasses.replace(DURABLE, autosave_interval_s=5))
        child = sup.start("mosquitto", [binary, "-c", str(conf)])
        kind = "mosquitto"
    else:
        child = sup.start("amqtt", [sys.executable, "-m", "cloud.demo.broker", "--port", str(port)])
        kind = "amqtt"
    sup.wait_port(child, port)
    return f"mqtt://127.0.0.1:{port}", kind


# -- Celery transport ----------------------------------------------------------------------------------


def _redis_answers(url: str) -> bool:
    try:
        import redis  # noqa: PLC0415  (redis: only when EDGEFLEET_REDIS_URL is set)

        client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:  # noqa: BLE001 - any failure means "not usable"
        return False


def start_celery_transport(sup: Supervisor, options: DemoOptions) -> tuple[dict[str, str], str]:
    """A private redis-server when installed; else EDGEFLEET_REDIS_URL if it answers; else SQLite."""
    binary = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.access("/usr/bin/redis-server", os.X_OK) else None
    )
    if binary is not None:
        port = free_port()
        workdir = (options.data_dir / "redis").resolve()
        child = sup.start(
            "redis",
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(workdir),
            ],
        )
        sup.wait_port(child, port)
        url = f"redis://127.0.0.1:{port}/0"
        return {"EDGEFLEET_REDIS_URL": url}, f"redis (private, {url})"
    configured = os.environ.get("EDGEFLEET_REDIS_URL")
    if configured and _redis_answers(configured):
        return {"EDGEFLEET_REDIS_URL": configured}, f"redis ({configured})"
    db = (options.data_dir / "cloud" / "celery-broker.db").resolve()
    return {"EDGEFLEET_CELERY_BROKER_URL": f"sqla+sqlite:///{db}"}, "kombu sqla+sqlite"


# -- cloud ---------------------------------------------------------------------------------------------


def cloud_env(options: DemoOptions, broker_url: str, celery: dict[str, str]) -> dict[str, str]:
    """Overrides of deploy/config/cloud.yaml for one machine (paths, ports, fast trigger checks)."""
    cloud_dir = (options.data_dir / "cloud").resolve()
    return {
        "EDGEFLEET_CLOUD_CONFIG": str(config_dir() / "cloud.yaml"),
        "EDGEFLEET_DATA_DIR": str(cloud_dir),
        "EDGEFLEET_BROKER__URL": broker_url,
        "EDGEFLEET_SIGNING_PRIVATE_KEY": str(cloud_dir / "keys" / "signing.key"),
        "EDGEFLEET_SIGNING_PUBLIC_KEY": str(cloud_dir / "keys" / "signing.pub"),
        # Edges share this machine's filesystem: file:// artifact URLs stay valid across demo runs
        # (an http URL would name the port of the run that signed the model).
        "EDGEFLEET_ARTIFACT_BASE_URL": "",
        "EDGEFLEET_THRESHOLDS__TRIGGER_CHECK_S": str(options.trigger_check_s),
        "EDGEFLEET_THRESHOLDS__MIN_METRICS_WINDOWS": "100",
        # The demo shows the drift trigger; the sample-count trigger would retrain before drift.
        "EDGEFLEET_THRESHOLDS__NEW_LABELLED_SAMPLES": "1000000",
        "EDGEFLEET_ROLLOUT_TICK_S": str(ROLLOUT_TICK_S),
        **celery,
    }


def load_cloud_settings(env: dict[str, str]) -> Any:
    """CloudSettings as the cloud children see them (env applied to this process temporarily)."""
    from shared.settings import load_settings  # noqa: PLC0415  (pydantic: not for --help)
    from shared.settings.cloud import CloudSettings  # noqa: PLC0415  (pydantic: not for --help)

    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        settings = load_settings(CloudSettings, env["EDGEFLEET_CLOUD_CONFIG"])
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    if not settings.artifact_base_url:
        settings = settings.model_copy(update={"artifact_base_url": None})
    return settings


CLOUD_SERVICES = ("cloud-worker", "cloud-beat", "cloud-ingest")


def start_cloud(topo: Topology, services: tuple[str, ...] = CLOUD_SERVICES) -> None:
    """Start the named cloud services (default all); each is started at most once."""
    sup, env = topo.supervisor, topo.cloud_env
    base = edgefleet_argv()
    running = {c.name for c in sup.children}
    argvs = {
        "cloud-worker": [*base, "cloud", "worker", "--pool", "solo", "--loglevel", "INFO"],
        "cloud-beat": [
            *base,
            "cloud",
            "beat",
            "--loglevel",
            "INFO",
            "--schedule-file",
            str(topo.cloud_dir.resolve() / "celerybeat-schedule"),
        ],
        "cloud-ingest": [*base, "cloud", "ingest", "--client-id", "edgefleet-demo-ingest"],
    }
    for name in CLOUD_SERVICES:
        if name in services and name not in running:
            sup.start(name, argvs[name], env=env)


CONSOLE_TIMEOUT_S = 60.0  # the console process imports FastAPI and migrates the registry first


def start_console(topo: Topology, port: int) -> None:
    """Start ``edgefleet cloud api`` (the admin API and the web console) on ``127.0.0.1:port`` with the
    cloud's environment (the same registry), and wait until ``/healthz`` answers."""
    child = topo.supervisor.start(
        "cloud-api",
        [*edgefleet_argv(), "cloud", "api", "--host", "127.0.0.1", "--port", str(port)],
        env=topo.cloud_env,
    )
    topo.supervisor.wait_port(child, port, timeout=CONSOLE_TIMEOUT_S)
    deadline = time.monotonic() + CONSOLE_TIMEOUT_S
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2.0) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, OSError) as exc:
            logger.debug("console not answering yet: %s", exc)
        if not child.running or time.monotonic() > deadline:
            raise SupervisorError(
                f"the console (cloud-api) does not answer on 127.0.0.1:{port}; its log {child.log_path}:\n"
                f"{tail(child.log_path)}"
            )
        time.sleep(0.25)


def console_signin_link(database_url: str, *, ttl_s: float) -> str:
    """A one-time admin sign-in secret named ``demo`` (audited like ``edgefleet admin signin-link``)."""
    from cloud.console.auth import create_signin_link  # noqa: PLC0415  (SQLAlchemy: not for --help)
    from cloud.registry import crud  # noqa: PLC0415  (SQLAlchemy: not for --help)
    from cloud.registry.db import session_scope  # noqa: PLC0415  (SQLAlchemy: not for --help)

    secret = create_signin_link(database_url=database_url, name="demo", role="admin", ttl_s=ttl_s)
    with session_scope(database_url) as session:
        crud.audit(
            session, actor="demo", action="signin_link_create", target="demo", detail={"role": "admin"}
        )
    return secret


# Retrained models go through the rollout engine: edge-1 as the canary, then the rest in one wave.
# The first model is deployed directly (deploy.first_model): no devices stream until it serves, so a
# canary would never see traffic. Thresholds: docs/demo.md ("Rollout gates in the demo").
DEMO_DEPLOY: dict[str, Any] = {
    "mode": "rollout",
    "canary": 1,
    "waves": 1,
    "gates": {"accuracy_drop": 0.3, "min_accuracy": 0.5, "p95_latency_ms": 250.0},
    "params": {"min_windows": 50, "soak_s": 5.0},
}
ROLLOUT_TICK_S = 1.0  # beat's rollout tick (EDGEFLEET_ROLLOUT_TICK_S; 2 s by default)


def pipeline_config_file(topo: Topology) -> Path:
    """deploy/config/bootstrap-pipeline.yaml with the demo's size and its edges to deploy to."""
    source = config_dir() / "bootstrap-pipeline.yaml"
    config: dict[str, Any] = yaml.safe_load(source.read_text()) or {}
    config["model_name"] = MODEL_NAME
    config["n_windows"] = topo.options.n_windows
    config["seed"] = topo.options.seed
    config.setdefault("training", {})["epochs"] = topo.options.epochs
    config["deploy_edges"] = list(topo.edge_ids)
    config["deploy"] = {**DEMO_DEPLOY, "mode": topo.options.deploy_mode}
    path = topo.cloud_dir / "demo-pipeline.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# -- edges and devices ---------------------------------------------------------------------------------


def edge_env(options: DemoOptions, broker_kind: str) -> dict[str, str]:
    """Environment overrides of every edge: metrics interval, uplink share and budget, and no shared
    subscription (so one process per edge) on amqtt."""
    env = {}
    if broker_kind == "amqtt":
        env["EDGEFLEET_SHARE_GROUP"] = ""  # amqtt has no shared subscriptions (one edge only)
        env["EDGEFLEET_PROCESSES"] = "1"  # nor, for the same reason, several processes per edge
    return env | {
        "EDGEFLEET_METRICS__PUBLISH_INTERVAL_S": str(options.metrics_interval_s),
        # Labelled drifted windows are what retraining learns from: send a share of ordinary
        # windows too (confidently wrong windows are not "hard" to the old model).
        "EDGEFLEET_UPLINK__RANDOM_FRACTION": str(options.uplink_random_fraction),
        "EDGEFLEET_UPLINK__BUDGET_PER_MINUTE": "3000",
    }


def edge_cloud_env(topo: Topology) -> dict[str, str]:
    """A separate cloud link (the cloud-partition scenario's relay), else none: the edges' cloud link
    then uses the site broker's settings. Its backoff is edge.yaml's site_broker one (5 s), not the
    30 s default of a bare MqttSettings."""
    if not topo.edge_cloud_url:
        return {}
    return {
        "EDGEFLEET_CLOUD_BROKER__URL": topo.edge_cloud_url,
        "EDGEFLEET_CLOUD_BROKER__RECONNECT_MAX_S": "5",
    }


def start_edges(topo: Topology) -> None:
    """Start one ``edgefleet edge run`` per edge id, configured by deploy/config/edge.yaml plus overrides."""
    base = edgefleet_argv()
    public_key = (topo.cloud_dir / "keys" / "signing.pub").resolve()
    for edge_id in topo.edge_ids:
        topo.supervisor.start(
            edge_id,
            [
                *base,
                "edge",
                "run",
                "--config",
                str(config_dir() / "edge.yaml"),
                "--edge-id",
                edge_id,
                "--broker",
                topo.broker_url,
                "--data-dir",
                str((topo.data_dir / "edges" / edge_id).resolve()),
                "--rules",
                str(config_dir() / "rules.yaml"),
                "--public-key",
                str(public_key),
                "--metrics-port",
                "0",
            ],
            env=edge_env(topo.options, topo.broker_kind) | edge_cloud_env(topo),
        )


def start_devices(topo: Topology) -> None:
    """Start the devices: an ``edgefleet agent run`` each, or all as threads of one process
    (``--devices-in-one-process``)."""
    base = edgefleet_argv()
    data_dir = topo.devices_dir.resolve()
    env = {"EDGEFLEET_HEARTBEAT_INTERVAL_S": "2"}
    if topo.options.devices_in_one_process:
        topo.supervisor.start(
            "devices",
            [
                sys.executable,
                "-m",
                "cloud.demo.devices",
                "--config",
                str(config_dir() / "agent.yaml"),
                "--broker",
                topo.broker_url,
                "--data-dir",
                str(data_dir),
                "--count",
                str(len(topo.device_ids)),
                "--seed",
                str(topo.options.seed),
            ],
            env=env,
        )
        return
    for index, device_id in enumerate(topo.device_ids):
        argv = [
            *base,
            "agent",
            "run",
            "--config",
            str(config_dir() / "agent.yaml"),
            "--device-id",
            device_id,
            "--broker",
            topo.device_broker_urls.get(device_id, topo.broker_url),
            "--data-dir",
            str(data_dir),
            "-o",
            f"seed={topo.options.seed * 1000 + index}",
        ]
        fault = topo.device_fault(index)
        if fault != "normal":
            argv += ["-o", f"fault={fault}"]
        topo.supervisor.start(device_id, argv, env=env)


def device_ids(count: int) -> list[str]:
    """The demo's device ids: ``dev-000``, ``dev-001``, ..."""
    return [f"dev-{i:03d}" for i in range(count)]


# -- accounting from the devices' own outboxes ------------------------------------------------------


@dataclass
class DeviceTally:
    """Window counts from the devices' outboxes: made, still pending, dropped on the device."""

    created: int = 0  # windows made (sequence numbers allocated)
    pending: int = 0  # still in the outbox, unacknowledged (kept, not lost)
    dropped: int = 0  # dropped on the device and counted there

    def add(self, other: DeviceTally) -> None:
        """Add another device's counts to these."""
        self.created += other.created
        self.pending += other.pending
        self.dropped += other.dropped


def read_outbox(path: Path) -> DeviceTally:
    """What a stopped agent's outbox says (read-only)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        pending = int(conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
        dropped = int(conn.execute("SELECT COALESCE(SUM(count), 0) FROM drops").fetchone()[0])
    finally:
        conn.close()
    return DeviceTally(created=int(meta.get("next_seq", 0)), pending=pending, dropped=dropped)


def tally_devices(topo: Topology) -> tuple[DeviceTally, list[str]]:
    """The devices' outbox counts summed, and the devices that have no outbox file."""
    total, missing = DeviceTally(), []
    for device_id in topo.device_ids:
        path = db_path(topo.devices_dir, device_id)
        if not path.exists():
            missing.append(device_id)
            continue
        total.add(read_outbox(path))
    return total, missing


def check_alive(sup: Supervisor, ignore: tuple[str, ...] = ("train",)) -> None:
    """Raise ``SupervisorError`` with the tail of its log if a child died (``ignore``: may exit)."""
    dead = [c for c in sup.dead() if c.name not in ignore]
    if dead:
        child = dead[0]
        raise SupervisorError(
            f"{child.name} exited with code {child.proc.returncode}; its log {child.log_path}:\n"
            f"{tail(child.log_path)}"
        )


__all__ = ["DemoOptions", "Topology", "port_open"]
