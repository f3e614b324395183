"""The demo's topology on one machine: MQTT broker, Redis (or kombu's SQLite transport), the cloud
services, M edge nodes and N simulated devices, each a child process of a ``Supervisor``, configured
with the same files as the compose services (``deploy/config/*.yaml``) plus command-line / env
overrides for local ports and directories."""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
import shutil
import signal
import sqlite3
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cloud.demo.supervisor import Child, Supervisor, tail
from cloud.errors import SupervisorError
from device_agent.state import db_path
from shared.identity import MAX_EDGE_WORKERS
from shared.private_broker import free_port, mosquitto_binary, port_open, redis_argv, redis_binary

logger = logging.getLogger(__name__)

MODEL_NAME = "vibration"
CLASSES = ("normal", "imbalance", "misalignment", "bearing_fault")
# Run-scoped state is wiped at each start (simulated machines, edges, broker sessions); the
# registry, datasets, models and keys under cloud/ are kept between runs.
# Enrollment bundles (``identities``) are run-scoped too: every run reissues each identity's secret.
RUN_SCOPED = ("broker", "redis", "edges", "devices", "logs", "identities", "replay")
# What the summary's ``broker_auth`` says: mosquitto under ``edgefleet broker run`` (users and ACLs from
# the registry, one identity per process) or the embedded amqtt broker, which has no authentication.
BROKER_AUTH_PER_IDENTITY = "per-identity"
BROKER_AUTH_NONE = "none (amqtt fallback)"
BROKER_CHILD = "broker"  # the supervised broker process (``edgefleet broker run`` or amqtt)
CLOUD_IDENTITY = "cloud"  # the cloud's service identity: cloud services and the demo's own monitor


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
    dataset: str | None = None  # aeon:NAME or FILE.npz: devices replay its test split (default: simulated)

    @property
    def model_name(self) -> str:
        """The registry name of the demo's model: ``vibration``, or one per replayed dataset."""
        return MODEL_NAME if self.dataset is None else dataset_model_name(self.dataset)


def dataset_model_name(spec: str) -> str:
    """``aeon:GunPoint`` -> ``gunpoint``, ``/data/pumps.npz`` -> ``pumps`` (a valid model name)."""
    name = spec.removeprefix("aeon:") if spec.startswith("aeon:") else Path(spec).stem
    slug = re.sub(r"[^a-z0-9_.-]+", "-", name.lower()).strip("-._") or "dataset"
    return slug[:64]


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
    broker_auth: str = BROKER_AUTH_NONE  # BROKER_AUTH_PER_IDENTITY under ``edgefleet broker run``
    cloud_broker_url: str | None = None  # the broker's cloud listener (per-identity broker only)
    bundles: dict[str, Path] = field(default_factory=dict)  # identity id -> its enrollment bundle

    @property
    def data_dir(self) -> Path:
        """The demo's data directory (``--data-dir``)."""
        return self.options.data_dir

    @property
    def identities_dir(self) -> Path:
        """Where the enrollment bundles of this run go (0600 each, reissued at every run)."""
        return self.data_dir / "identities"

    @property
    def per_identity(self) -> bool:
        """Whether every process logs in to the broker with its own identity (not on amqtt)."""
        return self.broker_auth == BROKER_AUTH_PER_IDENTITY

    def enrollment_file(self, identity_id: str) -> Path | None:
        """The bundle a process of ``identity_id`` logs in with, or None (amqtt: anonymous)."""
        return self.bundles.get(identity_id) if self.per_identity else None

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


@dataclass(frozen=True)
class BrokerPlan:
    """The broker the demo will run: its kind and ports (chosen before the registry is prepared, since
    the enrollment bundles name the listeners)."""

    kind: str  # mosquitto (under ``edgefleet broker run``) | amqtt
    port: int  # the site listener: devices, edges (amqtt: its only listener)
    cloud_port: int | None = None  # mosquitto: the cloud listener (the cloud's service identity)

    @property
    def url(self) -> str:
        """The site listener's URL."""
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def cloud_url(self) -> str:
        """The URL the cloud services use: the cloud listener (amqtt: the one listener)."""
        return f"mqtt://127.0.0.1:{self.cloud_port or self.port}"

    @property
    def auth(self) -> str:
        """What the summary's ``broker_auth`` says."""
        return BROKER_AUTH_PER_IDENTITY if self.kind == "mosquitto" else BROKER_AUTH_NONE


def plan_broker(options: DemoOptions) -> BrokerPlan:
    """mosquitto when installed (``--broker auto``), with a site and a cloud listener; else amqtt."""
    binary = mosquitto_binary() if options.broker in ("auto", "mosquitto") else None
    if options.broker == "mosquitto" and binary is None:
        raise SupervisorError("--broker mosquitto: mosquitto is not installed")
    port = free_port()
    if binary is None:
        return BrokerPlan("amqtt", port)
    cloud_port = free_port()
    while cloud_port == port:
        cloud_port = free_port()
    return BrokerPlan("mosquitto", port, cloud_port)


def broker_config_file(data_dir: Path) -> Path:
    """The mosquitto.conf ``edgefleet broker run`` writes into the demo's broker directory."""
    return (data_dir / "broker" / "mosquitto.conf").resolve()


def start_broker(topo: Topology, plan: BrokerPlan) -> Child:
    """Start the broker as the supervised child ``broker``: ``edgefleet broker run`` (mosquitto whose
    users and ACLs come from the demo's registry: enroll the identities first) or the anonymous amqtt
    broker; wait until every listener accepts connections. The child can be stopped and restarted
    (``Supervisor.kill`` / ``restart``): ``broker run`` starts again on the same ports, data dir and
    persistence file."""
    sup = topo.supervisor
    if plan.kind == "mosquitto":
        argv = [
            *edgefleet_argv(),
            "broker",
            "run",
            "--config",
            str(config_dir() / "cloud.yaml"),
            "--host",
            "127.0.0.1",
            "--port",
            str(plan.port),
            "--cloud-port",
            str(plan.cloud_port),
            "--data-dir",
            str((topo.data_dir / "broker").resolve()),
        ]
        # The cloud's settings (the same registry) without the cloud identity's login: the broker
        # needs none.
        env = {k: v for k, v in topo.cloud_env.items() if k not in CLOUD_LOGIN_VARS}
        child = sup.start(BROKER_CHILD, argv, env=env)
    else:
        child = sup.start(BROKER_CHILD, [sys.executable, "-m", "cloud.demo.broker", "--port", str(plan.port)])
    wait_broker(topo, child, plan)
    return child


def wait_broker(topo: Topology, child: Child, plan: BrokerPlan) -> None:
    """Wait until a (re)started broker child listens on all its ports."""
    for port in (plan.port, plan.cloud_port):
        if port:
            topo.supervisor.wait_port(child, port)


def reap_broker_leftovers(data_dir: Path) -> list[int]:
    """SIGTERM (then SIGKILL) a mosquitto still running on this demo's broker config: ``broker run``
    keeps mosquitto in its own session, so one killed with SIGKILL (not stopped) leaves it behind.
    Only processes whose command line is ``... -c <this demo's mosquitto.conf>`` are touched. Returns
    their pids."""
    conf = str(broker_config_file(data_dir))
    found: list[int] = []
    proc_dir = Path("/proc")
    if not proc_dir.is_dir():
        return found
    for entry in proc_dir.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if any(a == "-c" and b == conf for a, b in itertools.pairwise(argv)):
            found.append(int(entry.name))
    for pid in found:
        logger.warning("mosquitto (pid %d) outlived its broker run process: stopping it", pid)
        _terminate_pid(pid)
    return found


def _terminate_pid(pid: int, timeout_s: float = 10.0) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            os.kill(pid, 0)  # ProcessLookupError once it is gone
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)


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
    binary = redis_binary()
    if binary is not None:
        port = free_port()
        workdir = (options.data_dir / "redis").resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        child = sup.start("redis", redis_argv(binary, port=port, workdir=workdir))
        sup.wait_port(child, port)
        url = f"redis://127.0.0.1:{port}/0"
        return {"EDGEFLEET_REDIS_URL": url}, f"redis (private, {url})"
    configured = os.environ.get("EDGEFLEET_REDIS_URL")
    if configured and _redis_answers(configured):
        return {"EDGEFLEET_REDIS_URL": configured}, f"redis ({configured})"
    db = (options.data_dir / "cloud" / "celery-broker.db").resolve()
    return {"EDGEFLEET_CELERY_BROKER_URL": f"sqla+sqlite:///{db}"}, "kombu sqla+sqlite"


# -- cloud ---------------------------------------------------------------------------------------------


# The cloud identity's broker login in the cloud services' environment (as deploy/bin/with-identity).
CLOUD_LOGIN_VARS = ("EDGEFLEET_BROKER__USERNAME", "EDGEFLEET_BROKER__PASSWORD")


def cloud_env(options: DemoOptions, plan: BrokerPlan, celery: dict[str, str]) -> dict[str, str]:
    """Overrides of deploy/config/cloud.yaml for one machine (paths, ports, fast trigger checks). The
    cloud services use the broker's cloud listener; the bundles enrolled here name the demo's
    listeners (``enroll_topology`` adds the cloud identity's login)."""
    cloud_dir = (options.data_dir / "cloud").resolve()
    return {
        "EDGEFLEET_CLOUD_CONFIG": str(config_dir() / "cloud.yaml"),
        "EDGEFLEET_DATA_DIR": str(cloud_dir),
        "EDGEFLEET_BROKER__URL": plan.cloud_url,
        "EDGEFLEET_ENROLLMENT__SITE_BROKER_URL": plan.url,
        "EDGEFLEET_ENROLLMENT__CLOUD_BROKER_URL": plan.cloud_url,
        "EDGEFLEET_SIGNING_PRIVATE_KEY": str(cloud_dir / "keys" / "signing.key"),
        "EDGEFLEET_SIGNING_PUBLIC_KEY": str(cloud_dir / "keys" / "signing.pub"),
        # Edges share this machine's filesystem: file:// artifact URLs stay valid across demo runs
        # (an http URL would name the port of the run that signed the model).
        "EDGEFLEET_ARTIFACT_BASE_URL": "",
        "EDGEFLEET_THRESHOLDS__TRIGGER_CHECK_S": str(options.trigger_check_s),
        "EDGEFLEET_THRESHOLDS__MIN_METRICS_WINDOWS": "100",
        # The demo shows the drift trigger; the sample-count trigger would retrain before drift, and
        # the periodic one (a day by default) would retrain a registry's older model during a run.
        "EDGEFLEET_THRESHOLDS__NEW_LABELLED_SAMPLES": "1000000",
        "EDGEFLEET_THRESHOLDS__PERIODIC_RETRAIN_S": str(10 * 365 * 86400),
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


# The bootstrap model of a replayed dataset: the small-data recipe on a short budget (the loop retrains
# it anyway).
DATASET_TRAINING_MAX_S = 120.0


def dataset_training(dataset_path: Path) -> dict[str, Any]:
    """The ``training`` section for a replayed dataset: ``training.recipe_for`` its train rows."""
    from cloud.learning import datasets, training  # noqa: PLC0415  (numpy: only with --dataset)

    dataset = datasets.load_npz(dataset_path)
    n_train = int((dataset.split == datasets.TRAIN).sum()) if dataset.split is not None else len(dataset.y)
    length, channels = dataset.input_shape[0], dataset.input_shape[-1]
    recipe = training.recipe_for(n_train, length, channels, max_seconds=DATASET_TRAINING_MAX_S)
    return recipe.model_dump(mode="json")


def pipeline_config_file(topo: Topology, dataset_path: Path | None = None) -> Path:
    """deploy/config/bootstrap-pipeline.yaml with the demo's size and its edges to deploy to; with a
    replayed dataset, its bootstrap data (``dataset_path``) and a short training budget."""
    source = config_dir() / "bootstrap-pipeline.yaml"
    config: dict[str, Any] = yaml.safe_load(source.read_text()) or {}
    config["model_name"] = topo.options.model_name
    config["n_windows"] = topo.options.n_windows
    config["seed"] = topo.options.seed
    config.setdefault("training", {})["epochs"] = topo.options.epochs
    if dataset_path is not None:
        config["dataset"] = str(dataset_path.resolve())
        config["training"] = dataset_training(dataset_path)
    config["deploy_edges"] = list(topo.edge_ids)
    config["deploy"] = {**DEMO_DEPLOY, "mode": topo.options.deploy_mode}
    path = topo.cloud_dir / "demo-pipeline.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# -- every run starts from the bootstrap model ----------------------------------------------------------

RESTART_TRIGGER_KIND = "restart"  # recorded when a run restarts from the bootstrap model (not a retrain)


def find_bootstrap(
    settings: Any, *, model_name: str, edge_ids: list[str], dataset: str
) -> tuple[str, str] | None:
    """(ref, version) of the newest signed ``model_name`` trained on the demo's base data alone: its run
    took no uplinked samples (``include_samples`` false: every retraining run takes them), trained on
    ``dataset`` and deployed to exactly ``edge_ids``. None when the registry has none (train one)."""
    from cloud.registry import crud  # noqa: PLC0415  (SQLAlchemy: not for --help)
    from cloud.registry.db import session_scope  # noqa: PLC0415  (SQLAlchemy: not for --help)

    with session_scope(settings.resolved_database_url) as session:
        for model in crud.list_model_versions(session, name=model_name, limit=1000):  # newest first
            if model.manifest is None or model.signature is None or model.status in ("rejected", "withdrawn"):
                continue
            run = crud.run_of(session, model=model)
            config = (run.config or {}) if run is not None else {}
            if run is None or config.get("include_samples") or config.get("dataset") != dataset:
                continue
            if sorted(config.get("deploy_edges", [])) == sorted(edge_ids):
                return model.ref, model.version
    return None


def close_stale_runs(settings: Any, *, model_name: str, reason: str) -> list[int]:
    """Mark pipeline runs of ``model_name`` still pending or running as failed: at a demo's start no
    worker runs yet and the Celery transport is new, so they are leftovers of a demo that stopped, and
    a run in progress blocks every retraining trigger. Returns their ids."""
    from cloud.registry import crud  # noqa: PLC0415  (SQLAlchemy: not for --help)
    from cloud.registry.db import session_scope  # noqa: PLC0415  (SQLAlchemy: not for --help)

    closed: list[int] = []
    with session_scope(settings.resolved_database_url) as session:
        while (run_id := crud.run_in_progress(session, model_name=model_name)) is not None:
            crud.finish_run(
                session,
                run_id=run_id,
                state="failed",
                error=f"interrupted: the demo that started it stopped; {reason}",
            )
            closed.append(run_id)
    if closed:
        logger.info("closed runs %s left running by an earlier demo", closed)
    return closed


@dataclass
class Restart:
    """What ``restart_from_bootstrap`` did: the bootstrap model back in production and on the edges."""

    model: str  # NAME@VERSION of the bootstrap model
    version: str
    replaced: str | None  # the production model it replaced (None: it was production already)
    rollouts_aborted: list[str] = field(default_factory=list)
    runs_failed: list[int] = field(default_factory=list)


def restart_from_bootstrap(
    settings: Any, *, model_name: str, bootstrap: str, edge_ids: list[str], actor: str = "demo"
) -> Restart:
    """Make a run on a kept registry start where the first run started, so drift shows and the loop
    has something to recover (issue 12, item 7). Before any cloud service runs:

    - pipeline runs of ``model_name`` still pending or running are marked failed
      (``close_stale_runs``);
    - rollouts of ``model_name`` still running or paused are aborted (beat would otherwise carry an
      older run's rollout on to the edges; as any aborted pipeline rollout, its model is withdrawn);
    - the bootstrap model is promoted to production again (the previous production is retired: the
      retrained versions stay in the registry) and a ``restart`` trigger is recorded, so that the
      retraining triggers count edge signals from now, not the previous run's drifted windows;
    - it is published to ``edge_ids`` as their signed desired state (retained): a signed ``rollback``
      naming it to an edge that last reported a newer model, else a ``deploy``."""
    from cloud.errors import RolloutError  # noqa: PLC0415  (not for --help)
    from cloud.fleet import rollouts  # noqa: PLC0415  (SQLAlchemy, paho: not for --help)
    from cloud.fleet.desired_state import publish_desired_state  # noqa: PLC0415  (pydantic, paho: not for --help)
    from cloud.registry import crud, fleet  # noqa: PLC0415  (SQLAlchemy: not for --help)
    from cloud.registry.db import session_scope  # noqa: PLC0415  (SQLAlchemy: not for --help)

    url = settings.resolved_database_url
    runs_failed = close_stale_runs(
        settings, model_name=model_name, reason=f"the next demo restarted from {bootstrap}"
    )
    with session_scope(url) as session:
        # Before the aborts: an aborted pipeline rollout withdraws its model (the one before it is
        # production again), so production afterwards is not what the previous run ended on.
        production = crud.production_model(session, name=model_name)
        ended_on = production.ref if production is not None else None
        open_rollouts = [
            r.rollout_id
            for r in fleet.list_rollouts(session, limit=1000)
            if r.model.name == model_name and r.state in ("running", "paused")
        ]
    aborted: list[str] = []
    for rollout_id in open_rollouts:
        try:
            rollouts.set_state(
                settings=settings, rollout_id=rollout_id, action="abort", actor=f"{actor} restart"
            )
            aborted.append(rollout_id)
        except RolloutError as exc:
            logger.warning("rollout %s not aborted: %s", rollout_id, exc)
    with session_scope(url) as session:
        model = crud.get_model_version(session, ref=bootstrap)
        production = crud.production_model(session, name=model_name)
        replaced = ended_on if ended_on != bootstrap else None
        if production is None or production.id != model.id:
            crud.promote(session, model_id=model.id, actor=actor)
        crud.record_trigger(
            session,
            kind=RESTART_TRIGGER_KIND,
            reason=f"{actor}: a new run restarts from the bootstrap model {bootstrap}"
            + (f" (production was {replaced})" if replaced else ""),
            model_name=model_name,
            detail={"bootstrap": bootstrap, "replaced": replaced, "rollouts_aborted": aborted},
        )
        crud.audit(
            session,
            actor=actor,
            action="demo_restart_from_bootstrap",
            target=bootstrap,
            detail={"replaced": replaced, "rollouts_aborted": aborted, "runs_failed": runs_failed},
        )
        version = model.version
    publish_desired_state(settings=settings, edge_ids=edge_ids, model_ref=bootstrap, actor=actor)
    logger.info("restarted from %s (replaced %s) on %s", bootstrap, replaced, ", ".join(edge_ids))
    return Restart(bootstrap, version, replaced, aborted, runs_failed)


# -- a dataset replayed by the devices (``--dataset``) -----------------------------------------------------


@dataclass
class ReplayPlan:
    """What the replaying devices play: the bootstrap's training data, each device's test-split shard
    before drift and after (the held-out class mixed in), and the row length (= the agents' window)."""

    base_dataset: Path  # the bootstrap model's dataset (every row of the held-out class left out)
    row_length: int
    rate_hz: float  # one row per second per device
    held_out: str | None  # the class the bootstrap never saw (drift), None: no drift possible
    class_names: list[str]
    before: dict[str, Path] = field(default_factory=dict)  # device id -> shard played from the start
    after: dict[str, Path] = field(default_factory=dict)  # device id -> shard played after drift
    test_rows: int = 0
    note: str | None = None  # why there is no drift, when there is none


def plan_replay(topo: Topology) -> ReplayPlan:
    """Load ``--dataset``, cut its test split into one labelled shard per device and write the
    bootstrap's data. Drift is a switch to a held-out part: one class (the last) is left out of the
    bootstrap's data entirely (its train and test rows; the model still names it), devices first
    replay the test rows of the other classes, then all test rows, so rows of a class the bootstrap
    never saw arrive, labelled; the loop retrains on the uplinked labelled windows and recovers.
    Needs 3 classes or more (left with one class, the bootstrap would learn nothing): with 2, no drift,
    and the summary says why. Rows of unequal length cannot be replayed yet (``SupervisorError``)."""
    import numpy as np  # noqa: PLC0415  (numpy: only with --dataset)

    from cloud.errors import DatasetError  # noqa: PLC0415  (not for --help)
    from cloud.learning import datasets  # noqa: PLC0415  (numpy, aeon: only with --dataset)

    options = topo.options
    assert options.dataset is not None
    try:
        dataset = datasets.load(options.dataset, seed=options.seed)
    except DatasetError as exc:
        raise SupervisorError(f"--dataset {options.dataset}: {exc}") from exc
    lengths = getattr(dataset, "lengths", None)
    if dataset.X.ndim != 3 or (lengths is not None and len(set(np.asarray(lengths).tolist())) > 1):
        raise SupervisorError(
            f"--dataset {options.dataset}: only datasets of equal-length (time, channels) rows can be "
            "replayed by devices yet (this one has rows of unequal length or is not a time series)"
        )
    splits = datasets.split(dataset, seed=options.seed)
    test_index = getattr(splits, "test_index", None)
    if test_index is None:
        raise SupervisorError(f"--dataset {options.dataset}: the split does not name its test rows")
    # Shuffled once (fixed by --seed): each device plays a mix of classes from its first rows on (the
    # edges' running accuracy stays near the model's recorded one, and no trigger fires before drift).
    test_index = np.random.default_rng(options.seed).permutation(np.asarray(test_index))
    names = list(dataset.class_names)
    y = np.asarray(dataset.y)
    split = np.asarray(dataset.split) if dataset.split is not None else None
    if split is None:  # the bootstrap must train on exactly the rows the devices do not replay
        split = np.zeros(len(y), dtype=np.int8)
        split[test_index] = 1
    held = len(names) - 1 if len(set(y.tolist())) >= 3 else None
    root = (topo.data_dir / "replay").resolve()
    root.mkdir(parents=True, exist_ok=True)
    base_path = topo.cloud_dir.resolve() / "demo-datasets" / f"{options.model_name}-bootstrap.npz"
    keep = np.ones(len(y), dtype=bool) if held is None else y != held
    base = datasets.Dataset(
        name=f"{options.model_name}-bootstrap",
        source=f"{options.dataset} (demo bootstrap"
        + (f", class {names[held]} held out)" if held is not None else ")"),
        X=dataset.X[keep],
        y=y[keep],
        class_names=names,
        sample_rate_hz=dataset.sample_rate_hz,
        channels=dataset.channels,
        split=split[keep],
    )
    if not base_path.exists() or datasets.load_npz(base_path).sha256() != base.sha256():
        base.save(base_path)
    row_length = int(dataset.X.shape[1])
    before_rows = test_index[y[test_index] != held] if held is not None else test_index
    devices = topo.device_ids
    if len(before_rows) < len(devices):
        raise SupervisorError(
            f"--dataset {options.dataset}: {len(before_rows)} test rows to replay for {len(devices)} "
            "devices: run fewer devices (--devices)"
        )
    plan = ReplayPlan(
        base_dataset=base_path,
        row_length=row_length,
        rate_hz=float(row_length),
        held_out=names[held] if held is not None else None,
        class_names=names,
        test_rows=len(test_index),
        note=None
        if held is not None
        else f"{options.dataset} has {len(set(y.tolist()))} classes: holding one out would leave the "
        "bootstrap a single class, so no drift is injected (3 classes or more needed)",
    )
    arrays: dict[str, Any] = {"class_names": np.array(names)}
    if dataset.channels:
        arrays["channels"] = np.array(dataset.channels)

    def write(path: Path, rows: Any) -> Path:
        np.savez(path, X=dataset.X[rows], y=y[rows], **arrays)
        return path

    for index, device_id in enumerate(devices):
        # Interleaved shards of the shuffled rows: every device gets a mix of classes.
        plan.before[device_id] = write(root / f"{device_id}-before.npz", before_rows[index :: len(devices)])
        if held is not None:
            plan.after[device_id] = write(root / f"{device_id}-after.npz", test_index[index :: len(devices)])
    return plan


# -- edges and devices ---------------------------------------------------------------------------------

DEMO_SITE_GROUP = "demo-site"  # the demo's edges share one site broker: each may report all its devices


def enroll_topology(topo: Topology, settings: Any) -> None:
    """Enroll every identity of the demo once per run, as ``fleet enroll`` does: the ``cloud`` service
    identity (the cloud services and the demo's monitor, on the broker's cloud listener), each edge (in
    one registry group: one site) and each device; write each bundle (0600) to ``identities/<id>.json``
    and put the cloud identity's login into ``topo.cloud_env`` (as deploy/bin/with-identity does).
    An identity enrolled by an earlier run on this data dir gets a new secret (reissued, never a
    second identity). The simulated devices are marked trusted labellers: the ingest stores only
    enrolled edges' uplink and reports of enrolled devices, and the drifted windows' labels retrain
    the model only from trusted labellers. Every secret is hashed at full cost (the broker checks it
    at each connect); on the amqtt fallback the bundles are written but unused (no authentication)."""
    from cloud.fleet.enrollment import enroll_identity  # noqa: PLC0415  (SQLAlchemy: not for --help)
    from cloud.registry import crud, identities  # noqa: PLC0415  (SQLAlchemy: not for --help)
    from cloud.registry.db import session_scope  # noqa: PLC0415  (SQLAlchemy: not for --help)
    from shared.enrollment import write_bundle  # noqa: PLC0415  (pydantic: not for --help)
    from shared.identity import IdentityKind  # noqa: PLC0415  (not for --help)

    directory = topo.identities_dir
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    directory.chmod(0o700)
    wanted = [
        (CLOUD_IDENTITY, IdentityKind.SERVICE),
        *((edge_id, IdentityKind.EDGE) for edge_id in topo.edge_ids),
        *((device_id, IdentityKind.DEVICE) for device_id in topo.device_ids),
    ]
    for identity_id, kind in wanted:
        bundle = enroll_identity(
            settings=settings,
            identity_id=identity_id,
            kind=kind,
            reissue=True,
            actor="demo",
            enrolled_via="demo",
        )
        path = (directory / f"{identity_id}.json").resolve()
        write_bundle(bundle, path)
        topo.bundles[identity_id] = path
        if identity_id == CLOUD_IDENTITY:
            assert bundle.password is not None
            topo.cloud_env["EDGEFLEET_BROKER__USERNAME"] = bundle.username
            topo.cloud_env["EDGEFLEET_BROKER__PASSWORD"] = bundle.password
    with session_scope(settings.resolved_database_url) as session:
        for edge_id in topo.edge_ids:
            crud.assign(session, edge_id=edge_id, group=DEMO_SITE_GROUP)
        for device_id in topo.device_ids:
            identities.set_label_trust(session, identity_id=device_id, trusted=True, actor="demo")
    logger.info("enrolled %d identities; bundles in %s", len(wanted), directory)


def edge_env(options: DemoOptions, broker_kind: str) -> dict[str, str]:
    """Environment overrides of every edge: metrics interval, uplink share and budget, and no shared
    subscription (so one process per edge) on amqtt."""
    env = {}
    if broker_kind == "amqtt":
        env["EDGEFLEET_SHARE_GROUP"] = ""  # amqtt has no shared subscriptions (one edge only)
        env["EDGEFLEET_PROCESSES"] = "1"  # nor, for the same reason, several processes per edge
    elif (os.cpu_count() or 1) > MAX_EDGE_WORKERS:
        # An edge with credentials has connection names for this many worker processes at most.
        env["EDGEFLEET_PROCESSES"] = str(MAX_EDGE_WORKERS)
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
        bundle = topo.enrollment_file(edge_id)
        # Enrolled: its site and cloud links log in as EDGE/site, EDGE/cloud, ... and the cloud's
        # public key comes from its bundle (as in compose); on amqtt: anonymous, the key file.
        identity = {"EDGEFLEET_ENROLLMENT_FILE": str(bundle)} if bundle else {}
        key = [] if bundle else ["--public-key", str(public_key)]
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
                *key,
                "--metrics-port",
                "0",
            ],
            env=edge_env(topo.options, topo.broker_kind) | edge_cloud_env(topo) | identity,
        )


def start_devices(topo: Topology, replay: ReplayPlan | None = None) -> None:
    """Start the devices: an ``edgefleet agent run`` each, or all as threads of one process
    (``--devices-in-one-process``). With ``replay``: each replays its shard of the dataset's test split
    (``replay`` sensor, window = row length, one row per second: each window is one labelled row)."""
    base = edgefleet_argv()
    data_dir = topo.devices_dir.resolve()
    env = {"EDGEFLEET_HEARTBEAT_INTERVAL_S": "2"}
    if topo.broker_kind == "amqtt":
        # amqtt speaks MQTT 3.1.1 only: no MQTT 5 "no matching subscribers" to hold windows on.
        env["EDGEFLEET_HOLD_UNROUTED"] = "false"
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
                *(["--identities-dir", str(topo.identities_dir.resolve())] if topo.per_identity else []),
                *(
                    [
                        "--replay-dir",
                        str((topo.data_dir / "replay").resolve()),
                        "--rate",
                        str(replay.rate_hz),
                        "--window",
                        str(replay.row_length),
                    ]
                    if replay is not None
                    else []
                ),
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
        ]
        if replay is not None:
            argv += [
                "--sensor",
                "replay",
                "-o",
                f"path={replay.before[device_id]}",
                "--rate",
                str(replay.rate_hz),
                "--window",
                str(replay.row_length),
            ]
        else:
            argv += ["-o", f"seed={topo.options.seed * 1000 + index}"]
            fault = topo.device_fault(index)
            if fault != "normal":
                argv += ["-o", f"fault={fault}"]
        bundle = topo.enrollment_file(device_id)
        identity = {"EDGEFLEET_ENROLLMENT_FILE": str(bundle)} if bundle else {}
        topo.supervisor.start(device_id, argv, env=env | identity)


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
