"""A small real fleet for the console's rollout tests: a private mosquitto, the real ingest, in-process
edge nodes (real MqttLinks, real LiteRT) fed labelled windows, real signed .tflite models in the
registry, and the rollout engine ticked in a thread (what Celery beat does every ``TICK_S``).

Like ``tests/cloud/fleet/test_rollouts.py`` (which runs the engine under a real Celery worker), but
light enough for a browser test: no Redis, no worker process. Also ``seed_learning_history``: the
rows the learning pipeline writes (dataset, triggers, runs with timed steps, variants with their
metrics and gate verdicts), for the pages that show them without training anything."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cloud.artifacts import sha256_file, store_for
from cloud.fleet import rollouts
from cloud.fleet.desired_state import sign
from cloud.ingest import Ingest
from cloud.registry import crud, fleet
from cloud.registry.db import session_scope, upgrade
from edge_node.node import EdgeNode
from shared.mqtt import MqttLink
from shared.settings import MqttSettings
from shared.settings.cloud import CloudSettings
from shared.topics import Topics
from tests.support.brokers import Mosquitto
from tests.support.edge_fixtures import CLASS_NAMES, edge_settings, make_window, manifest_for, wait_for
from tests.support.identities import enroll_fleet

WINDOWS_PER_S_PER_EDGE = 40
TICK_S = 0.5


def register_signed_model(settings: CloudSettings, source: Path, version: str, *, name: str = "vib") -> str:
    """Publish ``source`` as ``name@version`` the way the pipeline does: stored, signed, registered."""
    store = store_for(settings)
    sha = sha256_file(source)
    path = store.put(source, name=name, version=version, sha256=sha)
    manifest = sign(manifest_for(path, version, name=name, url=store.url(name, version)), settings)
    with session_scope(settings.resolved_database_url) as session:
        model = crud.create_model_version(
            session,
            name=name,
            version=version,
            variant="float32",
            artifact_path=str(path),
            quantization="float32",
        )
        model.manifest = manifest.model_dump(mode="json")
        model.signature = manifest.signature
        model.key_id = manifest.key_id
        model.artifact_sha256 = sha
        model.artifact_size = path.stat().st_size
    return f"{name}@{version}"


class WindowFeeder:
    """Labelled windows to one device per edge (each edge has its own site topic prefix)."""

    def __init__(self, url: str, edges: Sequence[str]) -> None:
        self.link = MqttLink(MqttSettings(url=url), client_id="window-feeder")
        self.link.connect()
        self.edges = list(edges)
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.rng = np.random.default_rng(7)

    def _run(self) -> None:
        seq = 0
        topics = [(Topics(f"site-{edge}/v1"), f"dev-{edge}") for edge in self.edges]
        while not self.stop_event.is_set():
            seq += 1
            for topic, device in topics:
                cls = int(self.rng.integers(0, len(CLASS_NAMES)))
                window = make_window(device, seq, cls=cls, label=CLASS_NAMES[cls], seed=seq * 31 + cls)
                self.link.publish(topic.telemetry(device), window, qos=0)
            self.stop_event.wait(1.0 / WINDOWS_PER_S_PER_EDGE)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(5)
        self.link.stop()


class EngineTicker:
    """``rollouts.tick`` every ``TICK_S`` in a thread: the engine as beat runs it."""

    def __init__(self, settings: CloudSettings) -> None:
        self.settings = settings
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.errors: list[str] = []

    def _run(self) -> None:
        while not self.stop_event.is_set():
            try:
                rollouts.tick(settings=self.settings)
            except Exception as exc:  # a tick that fails is retried on the next one, as beat does
                self.errors.append(repr(exc))
            self.stop_event.wait(TICK_S)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(30)


@dataclass
class RolloutFleet:
    """The running fleet: its cloud settings, broker, edges and registered models (key -> ref)."""

    settings: CloudSettings
    broker: Mosquitto
    edges: list[str]
    models: dict[str, str] = field(default_factory=dict)
    nodes: dict[str, EdgeNode] = field(default_factory=dict)
    ticker: EngineTicker | None = None

    def reported(self, edge_id: str) -> dict[str, Any]:
        with session_scope(self.settings.resolved_database_url) as session:
            edge = fleet.get_edge(session, edge_id=edge_id)
            return dict(edge.reported or {}) if edge is not None else {}

    def edge_state(self, edge_id: str) -> str | None:
        with session_scope(self.settings.resolved_database_url) as session:
            edge = fleet.get_edge(session, edge_id=edge_id)
            return edge.state if edge is not None else None


@contextmanager
def running_fleet(
    workdir: Path, edge_models: dict[str, Path], edges: Sequence[str] = ("edge-a", "edge-b")
) -> Iterator[RolloutFleet]:
    """Broker, registry (dev mode: a generated signing key), v1 and v2 signed, the ingest, ``edges``
    online without a model yet and fed windows, and the engine ticking."""
    broker = Mosquitto(workdir=workdir / "mosquitto")
    broker.start()
    settings = CloudSettings(
        data_dir=workdir / "cloud",
        database_url=f"sqlite:///{workdir / 'registry.db'}",
        broker=MqttSettings(url=broker.url),
        dev_mode=True,
    )
    upgrade(settings.resolved_database_url)
    enroll_fleet(settings.resolved_database_url, edges=edges, devices=[f"dev-{edge}" for edge in edges])
    state = RolloutFleet(settings, broker, list(edges))
    state.models = {
        "v1": register_signed_model(settings, edge_models["float32"], "1.0.0"),
        "v2": register_signed_model(settings, edge_models["float32_v2"], "2.0.0"),
    }
    _, public_key = settings.key_paths()
    ingest = Ingest(settings)
    ingest_thread = threading.Thread(target=ingest.run, daemon=True)
    feeder: WindowFeeder | None = None
    ticker = EngineTicker(settings)
    try:
        ingest_thread.start()
        for edge in edges:
            node = EdgeNode(
                edge_settings(
                    broker.url,
                    workdir / edge,
                    None,
                    cloud_url=broker.url,
                    public_key=public_key,
                    edge_id=edge,
                    site_broker=MqttSettings(
                        url=broker.url,
                        topic_prefix=f"site-{edge}/v1",
                        reconnect_min_s=0.5,
                        reconnect_max_s=1.0,
                    ),
                )
            )
            node.start()
            state.nodes[edge] = node
        feeder = WindowFeeder(broker.url, edges)
        feeder.start()
        wait_for(
            lambda: all(state.edge_state(e) == "online" for e in edges), "every edge online in the registry"
        )
        ticker.start()
        state.ticker = ticker
        yield state
    finally:
        ticker.stop()
        if feeder is not None:
            feeder.stop()
        for node in state.nodes.values():
            node.stop()
        ingest.stop_event.set()
        ingest_thread.join(10)
        ingest.close()
        broker.stop()


# -- what the learning pipeline records ----------------------------------------------------------------


@dataclass
class LearningHistory:
    """Ids of what ``seed_learning_history`` recorded."""

    previous_id: int
    base_id: int
    int8_id: int
    run_id: int
    trigger_id: int


def seed_learning_history(settings: CloudSettings) -> LearningHistory:
    """Two pipeline runs of ``vib`` as the pipeline records them: r1 published (its int8 variant is
    production), then a drift trigger and r2 retrained from it, with timed steps (dataset 2 s, train
    12 s, compress 3.5 s, gate 1.5 s), a float32 base and a signed int8 candidate that passed the
    gate against production re-scored at 88 %."""
    url = settings.resolved_database_url
    artifact = settings.data_dir / "seeded" / "r2-int8.tflite"
    artifact.parent.mkdir(parents=True, exist_ok=True)
    artifact.write_bytes(b"TFL3" * 5000)
    manifest = sign(manifest_for(artifact, "r2-int8"), settings)  # dev mode: a generated key pair
    with session_scope(url) as session:
        dataset = crud.get_or_create_dataset(
            session,
            name="vibration",
            source="builtin:vibration",
            sha256="ab" * 32,
            n_samples=1200,
            input_shape=[128, 3],
            class_names=["normal", "imbalance", "bearing"],
        )
        run1 = crud.create_run(
            session, model_name="vib", config={"deploy_variant": "int8"}, dataset_id=dataset.id
        )
        run1.started_at = time.time() - 86400
        previous = crud.create_model_version(
            session,
            name="vib",
            version="r1-int8",
            variant="int8",
            dataset_id=dataset.id,
            run_id=run1.id,
            training_config={"training": {"epochs": 10, "lr": 0.001}},
            metrics={"accuracy": 0.90, "size_bytes": 20_000, "latency_us_b1": 80.0},
            quantization="int8",
        )
        previous.status = "production"
        previous.created_at = run1.started_at + 30
        crud.finish_run(session, run_id=run1.id, state="published")
        run1.finished_at = run1.started_at + 25
        trigger = crud.record_trigger(
            session, kind="drift_accuracy", reason="accuracy 0.81 below 0.85 on edge-1", model_name="vib"
        )
        run2 = crud.create_run(
            session,
            model_name="vib",
            config={"deploy_variant": "int8"},
            dataset_id=dataset.id,
            trigger_id=trigger.id,
        )
        base = crud.create_model_version(
            session,
            name="vib",
            version="r2-float32",
            variant="float32",
            dataset_id=dataset.id,
            parent_id=previous.id,
            run_id=run2.id,
            training_config={"training": {"epochs": 12, "lr": 0.001}},
            metrics={"accuracy": 0.95, "size_bytes": 80_000, "gzip_bytes": 70_000, "latency_us_b1": 150.0},
            quantization="float32",
        )
        int8 = crud.create_model_version(
            session,
            name="vib",
            version="r2-int8",
            variant="int8",
            dataset_id=dataset.id,
            parent_id=base.id,
            run_id=run2.id,
            training_config={"training": {"epochs": 12, "lr": 0.001}, "compression": {"variants": ["int8"]}},
            metrics={
                "accuracy": 0.94,
                "macro_f1": 0.93,
                "size_bytes": 21_000,
                "gzip_bytes": 15_000,
                "latency_us_b1": 60.0,
                "throughput_b64": 9000.0,
                "confidence_mean": 0.91,
            },
            quantization="int8",
        )
        int8.artifact_size = 21_000
        int8.manifest = manifest.model_dump(mode="json")
        int8.signature = manifest.signature
        int8.key_id = manifest.key_id
        crud.set_gate_result(session, model_id=int8.id, passed=True, reason="0.94 >= 0.90 + 0.00")
        run2.started_at = started = time.time() - 120
        for offset, step in ((2.0, "dataset"), (14.0, "train"), (17.5, "compress:int8"), (19.0, "gate")):
            detail = {"production_accuracy": 0.88} if step == "gate" else {}
            event = crud.record_step(session, run_id=run2.id, step=step, detail=detail)
            event.ts = started + offset
        crud.finish_run(session, run_id=run2.id, state="published")
        run2.finished_at = started + 20
        return LearningHistory(previous.id, base.id, int8.id, run2.id, trigger.id)
