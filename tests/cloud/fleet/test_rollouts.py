"""The rollout engine end to end: a real mosquitto, a real Redis, a real Celery worker with beat
ticking the engine, the real ingest, four in-process edge nodes (real MqttLinks, real LiteRT) fed
labelled windows, and real signed .tflite models.

One fleet is shared by the tests of this module (it is expensive); each test starts from what the
previous one left, which is how a fleet lives: v1 everywhere, then a good v2 through canary and
waves, then a regressed model halted at the canary and rolled back, then an edge that was offline
during a rollout converging when it returns."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from cloud.fleet import rollouts
from cloud.fleet.wave_gates import window_from_records
from cloud.ingest import Ingest
from cloud.learning import reference_models
from cloud.registry import crud, fleet
from cloud.registry.db import session_scope, upgrade
from cloud.registry.models import Deployment, DeploymentTarget
from edge_node import synthetic
from edge_node.node import EdgeNode
from shared.mqtt import Received
from shared.schemas import EdgeMetrics, encode_message
from shared.settings import MqttSettings
from shared.settings.cloud import CloudSettings
from shared.topics import EdgeTopic
from tests.support.brokers import Mosquitto, RedisServer
from tests.support.celery_worker import start_celery_worker, stop_celery_worker
from tests.support.edge_fixtures import (
    edge_models_fixture,  # noqa: F401  (fixture)
    edge_settings,
    wait_for,
)
from tests.support.identities import enroll_fleet
from tests.support.rollout_fleet import WindowFeeder, register_signed_model

EDGES = ("edge-a", "edge-b", "edge-c", "edge-d")
ROLLOUT_WAIT_S = 180.0
MIN_WINDOWS = 60

REGRESSED_BUILDER = """
import sys
import numpy as np
from cloud.learning import reference_models
from edge_node import synthetic

# The production architecture and training recipe on the synthetic data with its labels shuffled:
# it learns no relation between a window and its class (accuracy near chance, low confidence).
x, y = synthetic.synthetic_dataset(800, 11)
y = np.random.default_rng(11).permutation(y)
model = reference_models.build_model(synthetic.SAMPLES, 11, train=False)
model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
model.fit(x, y, epochs=6, batch_size=32, verbose=0)
open(sys.argv[1], "wb").write(reference_models.convert(model))
"""


@pytest.fixture(scope="module")
def regressed_model() -> Path:
    """A real .tflite trained on shuffled labels (built once, cached by the builders' hash)."""
    source = (
        REGRESSED_BUILDER.encode()
        + Path(synthetic.__file__).read_bytes()
        + Path(reference_models.__file__).read_bytes()
    )
    digest = hashlib.sha256(source).hexdigest()[:12]
    path = Path(tempfile.gettempdir()) / f"edgefleet-regressed-{digest}.tflite"
    if not path.exists():
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
        proc = subprocess.run(
            [sys.executable, "-c", REGRESSED_BUILDER, str(tmp)],
            capture_output=True,
            env=env,
            timeout=600,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr.decode()[-3000:]
        tmp.replace(path)
    return path


@dataclass
class Fleet:
    settings: CloudSettings
    broker: Mosquitto
    workdir: Path
    edge_settings: dict[str, Any]
    nodes: dict[str, EdgeNode] = field(default_factory=dict)
    models: dict[str, str] = field(default_factory=dict)
    worker_env: dict[str, str] = field(default_factory=dict)
    worker: subprocess.Popen[bytes] | None = None

    def start_worker(self) -> None:
        """The cloud's Celery worker with an embedded beat (which ticks the rollout engine)."""
        self.worker = start_celery_worker(
            self.worker_env,
            self.workdir / "worker.log",
            name="rollout",
            beat_schedule=self.workdir / "beat-schedule",
        )

    def stop_worker(self) -> None:
        if self.worker is not None:
            stop_celery_worker(self.worker)
            self.worker = None

    @property
    def url(self) -> str:
        return self.settings.resolved_database_url

    def start_edge(self, edge_id: str) -> None:
        node = EdgeNode(self.edge_settings[edge_id])
        node.start()
        self.nodes[edge_id] = node

    def stop_edge(self, edge_id: str) -> None:
        self.nodes.pop(edge_id).stop()

    def reported(self, edge_id: str) -> dict[str, Any]:
        with session_scope(self.url) as session:
            edge = fleet.get_edge(session, edge_id=edge_id)
            return dict(edge.reported or {}) if edge is not None else {}

    def edge_state(self, edge_id: str) -> str | None:
        with session_scope(self.url) as session:
            edge = fleet.get_edge(session, edge_id=edge_id)
            return edge.state if edge is not None else None

    def labelled_windows(self, edge_id: str, version: str) -> int:
        with session_scope(self.url) as session:
            records = fleet.metrics_of(session, edge_id=edge_id, model_version=version)
        window = window_from_records(edge_id, records)
        return window.labelled if window is not None else 0

    def status(self, rollout_id: str) -> dict[str, Any]:
        return rollouts.status(settings=self.settings, rollout_id=rollout_id)

    def wait_rollout(self, rollout_id: str, states: tuple[str, ...]) -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            status = self.status(rollout_id)
            return status if status["state"] in states else None

        try:
            result: dict[str, Any] = wait_for(done, f"rollout {rollout_id} to be {states}", ROLLOUT_WAIT_S)
        except AssertionError:
            print(json.dumps(self.status(rollout_id), indent=1))
            print((self.workdir / "worker.log").read_text(errors="replace")[-4000:])
            raise
        return result


@pytest.fixture(scope="module")
def fleet_env(
    tmp_path_factory: pytest.TempPathFactory,
    redis_server: RedisServer,
    edge_models: dict[str, Path],
    regressed_model: Path,
) -> Iterator[Fleet]:
    workdir = tmp_path_factory.mktemp("fleet")
    broker = Mosquitto(workdir=workdir / "mosquitto")
    broker.start()
    settings = CloudSettings(
        data_dir=workdir / "cloud",
        database_url=f"sqlite:///{workdir / 'registry.db'}",
        broker=MqttSettings(url=broker.url),
        redis_url=redis_server.url,
        dev_mode=True,
    )
    upgrade(settings.resolved_database_url)
    enroll_fleet(settings.resolved_database_url, edges=EDGES, devices=[f"dev-{edge}" for edge in EDGES])
    _, public_key = settings.key_paths()
    env = {
        **os.environ,
        "EDGEFLEET_BROKER__URL": broker.url,
        "EDGEFLEET_DATA_DIR": str(settings.data_dir),
        "EDGEFLEET_DATABASE_URL": settings.resolved_database_url,
        "EDGEFLEET_REDIS_URL": redis_server.url,
        "EDGEFLEET_DEV_MODE": "true",
        "EDGEFLEET_ROLLOUT_TICK_S": "0.5",
    }
    models = {
        "v1": register_signed_model(settings, edge_models["float32"], "1.0.0"),
        "v2": register_signed_model(settings, edge_models["float32_v2"], "2.0.0"),
        "bad": register_signed_model(settings, regressed_model, "3.0.0-regressed"),
        # The same weights as v2 under a new version: a release that is as good as what runs.
        "v2b": register_signed_model(settings, edge_models["float32_v2"], "2.1.0"),
    }
    per_edge = {
        edge: edge_settings(
            broker.url,
            workdir / edge,
            None,
            cloud_url=broker.url,
            public_key=public_key,
            edge_id=edge,
            site_broker=MqttSettings(
                url=broker.url, topic_prefix=f"site-{edge}/v1", reconnect_min_s=0.5, reconnect_max_s=1.0
            ),
        )
        for edge in EDGES
    }
    ingest = Ingest(settings)
    ingest_thread = threading.Thread(target=ingest.run, daemon=True)
    ingest_thread.start()
    state = Fleet(settings, broker, workdir, per_edge, models=models, worker_env=env)
    state.start_worker()
    feeder = WindowFeeder(broker.url, EDGES)
    try:
        for edge in EDGES:
            state.start_edge(edge)
        feeder.start()
        wait_for(
            lambda: all(state.edge_state(e) == "online" for e in EDGES), "every edge online in the registry"
        )
        # Bootstrap: v1 everywhere in one wave, so later rollouts have a previous version to compare.
        rollout_id = rollouts.start_rollout(
            settings=settings,
            model_ref=models["v1"],
            edge_ids=list(EDGES),
            canary=0,
            waves=1,
            params={"min_windows": 10, "soak_s": 0},
        )
        state.wait_rollout(rollout_id, ("completed",))
        # The first real rollout compares against v1: every edge needs a labelled v1 baseline of
        # min_windows in the registry before it starts, or its accuracy gate can only be skipped.
        for edge in EDGES:
            wait_for(
                lambda e=edge: state.labelled_windows(e, "1.0.0") >= 2 * MIN_WINDOWS,
                f"a labelled v1 baseline on {edge}",
            )
        yield state
    finally:
        feeder.stop()
        for edge in list(state.nodes):
            state.stop_edge(edge)
        state.stop_worker()
        ingest.stop_event.set()
        ingest_thread.join(10)
        ingest.close()
        broker.stop()


def test_ingest_stores_beside_a_busy_registry_writer(tmp_path: Path) -> None:
    """The ingest's batches read (dedup lookups) before they write; a rollout tick committing in
    between must not make SQLite refuse them ("database is locked" without waiting, which sent the
    ingest into its retry backoff and stalled the edges' status behind the rollout)."""
    settings = CloudSettings(
        data_dir=tmp_path / "cloud",
        database_url=f"sqlite:///{tmp_path / 'registry.db'}",
        broker=MqttSettings(url="mqtt://127.0.0.1:1"),  # never connected: batches are stored directly
        ingest={"edge_burst": 10_000},  # 1000 metrics at once: this test is not about the rate limit
    )
    enroll_fleet(settings.resolved_database_url, edges=["edge-x"])
    ingest = Ingest(settings)
    url = settings.resolved_database_url
    stop = threading.Event()
    writes = 0

    def tick_like_writer() -> None:
        nonlocal writes
        while not stop.is_set():
            with session_scope(url) as session:
                crud.upsert_edge(session, edge_id="edge-busy", state="online")
            writes += 1

    topics = settings.broker.topics
    batches = [
        [
            Received(
                topic=topics.edge("edge-x", EdgeTopic.METRICS),
                payload=encode_message(
                    EdgeMetrics(
                        edge_id="edge-x", interval_s=1.0, windows_total=b * 100 + i, windows_per_s=1.0
                    )
                ),
                qos=0,
                retain=False,
            )
            for i in range(50)
        ]
        for b in range(20)
    ]
    writer = threading.Thread(target=tick_like_writer, daemon=True)
    writer.start()
    try:
        for batch in batches:
            ingest.store_batch(batch)
    finally:
        stop.set()
        writer.join(30)
        ingest.close()
    assert writes > 0
    assert ingest.stats.store_retries == 0
    assert ingest.stats.stored == 1000
    assert ingest.stats.malformed == 0


def _params() -> dict[str, Any]:
    return {"min_windows": MIN_WINDOWS, "soak_s": 0}


GATES = {"accuracy_drop": 0.15, "error_rate": 0.05, "p95_latency_ms": 500.0}


def _gates() -> dict[str, float]:
    from cloud.fleet.wave_gates import DEFAULT_GATES  # noqa: PLC0415

    return {**DEFAULT_GATES, **GATES}


def test_good_model_rolls_out_through_canary_and_waves(fleet_env: Fleet) -> None:
    rollout_id = rollouts.start_rollout(
        settings=fleet_env.settings,
        model_ref=fleet_env.models["v2"],
        edge_ids=list(EDGES),
        canary=1,
        waves=2,
        gates=_gates(),
        params=_params(),
        actor="test",
    )
    status = fleet_env.wait_rollout(rollout_id, ("completed", "halted"))
    assert status["state"] == "completed", (status["reason"], status["gate_results"])
    assert [t["wave"] for t in status["targets"]] == [0, 1, 1, 2]
    assert all(t["state"] == "serving" for t in status["targets"])
    for wave in ("0", "1", "2"):
        entry = status["gate_results"][wave]
        assert entry["decision"] == "pass"
        by_name = {g["name"]: g for g in entry["gates"]}
        assert by_name["deploy_failures"]["passed"] is True, entry
        assert by_name["error_rate"]["passed"] is True
        assert by_name["accuracy_drop"]["passed"] is True  # a labelled baseline of v1 existed
    for edge in EDGES:
        wait_for(lambda e=edge: fleet_env.reported(e).get("model_version") == "2.0.0", f"{edge} on v2")
    with session_scope(fleet_env.url) as session:
        # Each wave went out only after the previous wave's gates passed.
        rollout = fleet.get_rollout(session, rollout_id=rollout_id)
        published = {t.edge_id: t.published_at for t in rollout.targets}
        serving = {t.edge_id: t.serving_at for t in rollout.targets}
        assert published["edge-b"] >= serving["edge-a"]
        assert published["edge-d"] >= max(serving["edge-b"], serving["edge-c"])
        rows = fleet.fleet_edges(session)
        assert all(r["in_sync"] and r["reported_version"] == "2.0.0" for r in rows)


def test_regressed_model_halts_at_canary_and_rolls_back(fleet_env: Fleet) -> None:
    rollout_id = rollouts.start_rollout(
        settings=fleet_env.settings,
        model_ref=fleet_env.models["bad"],
        edge_ids=list(EDGES),
        canary=1,
        waves=2,
        gates=_gates(),
        params=_params(),
        actor="test",
    )
    status = fleet_env.wait_rollout(rollout_id, ("completed", "halted"))
    assert status["state"] == "halted", status
    assert status["reason"].startswith("wave 0:")
    assert "accuracy" in status["reason"]
    canary, *rest = status["targets"]
    assert canary["edge_id"] == "edge-a"
    assert [t["state"] for t in rest] == ["skipped", "skipped", "skipped"]
    wait_for(
        lambda: fleet_env.status(rollout_id)["targets"][0]["state"] == "rolled_back", "the canary rolled back"
    )
    assert fleet_env.reported("edge-a")["model_version"] == "2.0.0"  # its last-good
    with session_scope(fleet_env.url) as session:
        bad = crud.get_model_version(session, ref=fleet_env.models["bad"])
        received = session.scalars(
            select(DeploymentTarget.edge_id)
            .join(Deployment, Deployment.id == DeploymentTarget.deployment_id)
            .where(Deployment.model_version_id == bad.id)
        ).all()
        assert received == ["edge-a"]  # the rest of the fleet never received it
        actions = [a.action for a in crud.list_audit(session, limit=200)]
        assert "rollout_halted" in actions
    for edge in EDGES[1:]:
        assert fleet_env.reported(edge)["model_version"] == "2.0.0"


def test_offline_edge_converges_when_it_returns(fleet_env: Fleet) -> None:
    fleet_env.stop_edge("edge-d")
    wait_for(lambda: fleet_env.edge_state("edge-d") == "offline", "edge-d offline in the registry")
    rollout_id = rollouts.start_rollout(
        settings=fleet_env.settings,
        model_ref=fleet_env.models["v2b"],
        edge_ids=list(EDGES),
        canary=1,
        waves=1,
        gates=_gates(),
        params=_params(),
        actor="test",
    )
    status = fleet_env.wait_rollout(rollout_id, ("completed", "halted"))
    assert status["state"] == "completed", json.dumps(status, indent=1)
    by_edge = {t["edge_id"]: t for t in status["targets"]}
    assert by_edge["edge-d"]["state"] == "deferred"
    assert fleet_env.reported("edge-d")["model_version"] == "2.0.0"
    fleet_env.start_edge("edge-d")  # comes back: the retained desired state is waiting for it
    wait_for(lambda: fleet_env.reported("edge-d").get("model_version") == "2.1.0", "edge-d on 2.1.0")
    wait_for(
        lambda: (
            {t["edge_id"]: t for t in fleet_env.status(rollout_id)["targets"]}["edge-d"]["state"] == "serving"
        ),
        "the engine to see edge-d serving",
    )
    with session_scope(fleet_env.url) as session:
        rows = {r["edge_id"]: r for r in fleet.fleet_edges(session)}
        assert rows["edge-d"]["in_sync"]
        assert rows["edge-d"]["desired_version"] == "2.1.0"


def test_rollout_resumes_after_a_cloud_restart(fleet_env: Fleet) -> None:
    """The worker (and its beat) stops with the canary published; a new one finishes the rollout from
    what the registry holds."""
    fleet_env.stop_worker()
    try:
        rollout_id = rollouts.start_rollout(
            settings=fleet_env.settings,
            model_ref=fleet_env.models["v2"],
            edge_ids=list(EDGES),
            canary=1,
            waves=1,
            gates=_gates(),
            params=_params(),
            actor="test",
        )
        rollouts.tick(settings=fleet_env.settings, rollout_ids=[rollout_id])  # as `rollout start` does
        assert [t["state"] for t in fleet_env.status(rollout_id)["targets"]] == [
            "deploying",
            "pending",
            "pending",
            "pending",
        ]
    finally:
        fleet_env.start_worker()
    status = fleet_env.wait_rollout(rollout_id, ("completed", "halted"))
    assert status["state"] == "completed", json.dumps(status, indent=1)
    assert all(t["state"] == "serving" for t in status["targets"])
    for edge in EDGES:
        wait_for(lambda e=edge: fleet_env.reported(e).get("model_version") == "2.0.0", f"{edge} on v2")
