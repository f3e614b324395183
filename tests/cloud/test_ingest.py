"""The uplink ingest against a real mosquitto and a real registry: idempotent by message id, bounded
batches, malformed messages counted and dead-lettered, labels from device / teacher / none."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import create_engine, text

from cloud.ingest import Ingest, Teacher
from cloud.learning.compression import convert
from cloud.learning.evaluation import LiteRTModel
from cloud.learning.training import TrainingConfig, build_model, set_seeds
from cloud.registry import crud, fleet
from cloud.registry.db import engine_for, session_scope, upgrade
from edge_node.preprocessing import InputSpec, normalize_fitted, prepare_window
from shared.codec import decode_window, encode_window
from shared.mqtt import MqttLink
from shared.schemas import (
    DeadLetter,
    Decision,
    DeploymentProgress,
    DeployStage,
    EdgeMetrics,
    EdgeStatus,
    HardExample,
    ModelManifest,
    Normalization,
    OnlineState,
    Preprocessing,
    Privacy,
    Quantization,
    ReportedState,
    SampleReason,
    Severity,
    encode_message,
)
from shared.settings import CloudSettings, MqttSettings
from shared.topics import EdgeTopic
from tests.support.brokers import Mosquitto
from tests.support.identities import enroll_fleet

CLASSES = ["normal", "imbalance", "misalignment", "bearing_fault"]


def _window(seq: int) -> bytes:
    values = np.random.default_rng(seq).normal(size=(100, 3)).astype(np.float32)
    return encode_window(
        device_id="d1",
        seq=seq,
        ts=1000.0 + seq,
        sample_rate_hz=100.0,
        channels=("x", "y", "z"),
        values=values,
    )


def _sample(i: int, *, label: str | None, window: bool = True, edge: str = "e1") -> HardExample:
    return HardExample(
        sample_id=f"s{i}",
        edge_id=edge,
        device_id="d1",
        seq=i,
        ts=1000.0 + i,
        model_name="vib",
        model_version="r1-int8",
        predicted="normal",
        probabilities=[0.4, 0.3, 0.2, 0.1],
        class_names=CLASSES,
        reason=SampleReason.LOW_CONFIDENCE,
        label=label,
        privacy=Privacy.FULL if window else Privacy.NONE,
        window_b64=base64.b64encode(_window(i)).decode() if window else None,
    )


def _settings(tmp_path: Path, broker: Mosquitto, **overrides: object) -> CloudSettings:
    return CloudSettings(
        data_dir=tmp_path,
        broker=MqttSettings(url=broker.url),
        ingest_batch=5,
        ingest_flush_s=0.2,
        **overrides,
    )


def _publish_all(broker: Mosquitto, messages: list[tuple[str, bytes]]) -> None:
    link = MqttLink(MqttSettings(url=broker.url), client_id=f"pub-{uuid.uuid4().hex[:8]}")
    link.connect()
    handles = [link.publish(topic, payload, qos=1) for topic, payload in messages]
    deadline = time.monotonic() + 10
    acked = all(h.wait(max(0.0, deadline - time.monotonic())) for h in handles)
    link.stop()
    assert acked


def test_ingest_stores_every_kind_dedups_and_dead_letters(tmp_path: Path, mosquitto: Mosquitto) -> None:
    settings = _settings(tmp_path, mosquitto)
    enroll_fleet(settings.resolved_database_url, edges=["e1", "e2"], devices=["d1"])
    topics = settings.broker.topics
    ingest = Ingest(settings)
    ingest.link.connect()
    assert ingest.link.wait_subscribed()
    try:
        good: list[tuple[str, bytes]] = [
            (topics.edge("e1", EdgeTopic.SAMPLES), encode_message(_sample(1, label="imbalance"))),
            (topics.edge("e1", EdgeTopic.SAMPLES), encode_message(_sample(2, label=None))),
            (topics.edge("e1", EdgeTopic.SAMPLES), encode_message(_sample(3, label=None, window=False))),
            (
                topics.edge("e1", EdgeTopic.SAMPLES),
                encode_message(_sample(1, label="imbalance")),
            ),  # duplicate
            (
                topics.edge("e1", EdgeTopic.METRICS),
                encode_message(
                    EdgeMetrics(
                        edge_id="e1",
                        ts=5.0,
                        interval_s=10,
                        windows_total=100,
                        windows_per_s=10,
                        confidence_mean=0.8,
                        labelled_windows=50,
                        labelled_correct=45,
                        model_version="r1-int8",
                    )
                ),
            ),
            (
                topics.edge("e1", EdgeTopic.STATUS),
                encode_message(
                    EdgeStatus(
                        edge_id="e1",
                        state=OnlineState.ONLINE,
                        reported=ReportedState(model_version="r1-int8"),
                    )
                ),
            ),
            (
                topics.edge("e1", EdgeTopic.DEPLOY),
                encode_message(
                    DeploymentProgress(
                        edge_id="e1", revision=1, stage=DeployStage.SWAPPED, ok=True, model_version="r1-int8"
                    )
                ),
            ),
            (
                topics.edge("e1", EdgeTopic.DECISION),
                encode_message(
                    Decision(
                        decision_id="dec1",
                        edge_id="e1",
                        device_id="d1",
                        rule="fault",
                        class_name="imbalance",
                        probability=0.97,
                        severity=Severity.HIGH,
                        window_seq=3,
                    )
                ),
            ),
            (
                topics.edge("e1", EdgeTopic.DEAD),
                encode_message(
                    DeadLetter(
                        edge_id="e1",
                        topic="ef/v1/dev/d1/telemetry",
                        reason="bad magic",
                        payload_b64="AAEC",
                        payload_size=3,
                    )
                ),
            ),
        ]
        bad: list[tuple[str, bytes]] = [
            (topics.edge("e1", EdgeTopic.SAMPLES), b"{not json"),
            (topics.edge("e1", EdgeTopic.METRICS), encode_message(_sample(9, label=None))),  # wrong type
            (
                topics.edge("e2", EdgeTopic.SAMPLES),
                encode_message(_sample(10, label=None)),
            ),  # edge id mismatch
        ]
        _publish_all(mosquitto, good + bad)
        stats = ingest.run(max_messages=len(good) + len(bad), idle_exit_s=10)
    finally:
        ingest.close()
    assert stats.received == 12
    assert stats.duplicates == 1
    assert stats.malformed == 3
    assert stats.stored == 8
    assert stats.labels_by_source == {"device": 1, "none": 2}
    assert stats.batches >= 3  # bounded: at most 5 messages per transaction

    url = settings.resolved_database_url
    with session_scope(url) as s:
        assert crud.count_samples(s) == 3
        assert crud.count_samples(s, labelled=True) == 1
        assert crud.count_dead_letters(s, source="ingest") == 3
        assert crud.count_dead_letters(s, source="e1") == 1
        edges = crud.list_edges(s)
        assert [(e.edge_id, e.state, e.model_version) for e in edges] == [("e1", "online", "r1-int8")]
        metrics = crud.recent_metrics(s, since=0)
        assert metrics[0].labelled_correct == 45

    # Redelivery of everything (e.g. after a crash before PUBACK) stores nothing twice.
    again = Ingest(settings, client_id="ingest-second")
    again.link.connect()
    assert again.link.wait_subscribed()
    try:
        _publish_all(mosquitto, good)
        stats2 = again.run(max_messages=len(good), idle_exit_s=10)
    finally:
        again.close()
    assert stats2.duplicates == len(good) - 1  # the retained-state status is re-applied, not deduplicated
    with session_scope(url) as s:
        assert crud.count_samples(s) == 3


@pytest.mark.parametrize(("threshold", "expected"), [(0.0, "teacher"), (1.0, "none")])
def test_teacher_pseudo_labels_above_threshold(
    tmp_path: Path, mosquitto: Mosquitto, threshold: float, expected: str
) -> None:

    set_seeds(0)
    model = build_model(TrainingConfig(filters=[4], dense_units=0), [100, 3], 4)
    artifact = tmp_path / "teacher.tflite"
    artifact.write_bytes(convert(model, "float32"))
    settings = _settings(tmp_path, mosquitto, thresholds={"pseudo_label_confidence": threshold or 1e-9})
    url = settings.resolved_database_url
    upgrade(url)
    enroll_fleet(url, edges=["e1"])
    with session_scope(url) as s:
        run = crud.create_run(s, model_name="vib", config={})
        teacher = crud.create_model_version(
            s,
            name="vib",
            version=f"r{run.id}-float32",
            variant="float32",
            run_id=run.id,
            artifact_path=str(artifact),
            training_config={"normalization": {"mean": [0.0] * 3, "std": [1.0] * 3}, "class_names": CLASSES},
        )
        crud.promote(s, model_id=teacher.id)
    ingest = Ingest(settings)
    ingest.link.connect()
    assert ingest.link.wait_subscribed()
    try:
        _publish_all(
            mosquitto,
            [(settings.broker.topics.edge("e1", EdgeTopic.SAMPLES), encode_message(_sample(1, label=None)))],
        )
        stats = ingest.run(max_messages=1, idle_exit_s=10)
    finally:
        ingest.close()
    assert stats.labels_by_source == {expected: 1}
    with session_scope(url) as s:
        sample = crud.list_samples(s)[0]
        assert sample.label_source == expected
        assert (sample.label in CLASSES) == (expected == "teacher")


@pytest.fixture(scope="module")
def teacher_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A float32 teacher taking (10, 3) windows."""
    set_seeds(0)
    model = build_model(TrainingConfig(filters=[4], dense_units=0), [10, 3], 4)
    artifact = tmp_path_factory.mktemp("teacher") / "teacher.tflite"
    artifact.write_bytes(convert(model, "float32"))
    return artifact


def _teacher(
    tmp_path: Path,
    artifact: Path,
    *,
    training_config: dict[str, object],
    manifest: ModelManifest | None = None,
) -> Teacher:
    """A ``Teacher`` over a registry whose production ``vib`` is ``artifact``: the run's float32 version
    (``training_config``), or without a run the signed ``manifest``'s version."""
    url = CloudSettings(data_dir=tmp_path).resolved_database_url
    upgrade(url)
    with session_scope(url) as s:
        run_id = crud.create_run(s, model_name="vib", config={}).id if manifest is None else None
        teacher = crud.create_model_version(
            s,
            name="vib",
            version=f"r{run_id}-float32" if run_id is not None else "v1",
            variant="float32",
            run_id=run_id,
            artifact_path=str(artifact),
            training_config=training_config,
        )
        if manifest is not None:
            teacher.manifest = manifest.model_dump(mode="json")
        crud.promote(s, model_id=teacher.id)
    return Teacher(url)


def _raw(n: int, channels: tuple[str, ...], seed: int = 3) -> bytes:
    scale = np.array([1.0, 5.0, 20.0], dtype=np.float32)
    values = (np.random.default_rng(seed).normal(size=(n, 3)) * scale + 50.0).astype(np.float32)
    return encode_window(
        device_id="d1", seq=seed, ts=1.0, sample_rate_hz=100.0, channels=channels, values=values
    )


def _expected(artifact: Path, x: np.ndarray) -> tuple[str, float]:
    probabilities = LiteRTModel(artifact.read_bytes(), num_threads=1).predict(x[np.newaxis])[0]
    return CLASSES[int(probabilities.argmax())], float(probabilities.max())


def _values(payload: bytes) -> np.ndarray:
    return np.asarray(decode_window(payload).values, dtype=np.float32)


def test_teacher_labels_windows_through_its_training_configs_preprocessing(
    tmp_path: Path, teacher_artifact: Path
) -> None:
    """Per-series, resampled, channels in the model's order: as an edge serving the model would."""
    pre = Preprocessing(normalize="per_series", length="resample")
    teacher = _teacher(
        tmp_path,
        teacher_artifact,
        training_config={
            "normalization": None,
            "preprocessing": pre.model_dump(mode="json"),
            "input_shape": [10, 3],
            "channels": ["x", "y", "z"],
            "class_names": CLASSES,
        },
    )
    window = _raw(100, ("z", "x", "y"))  # 100 samples, another channel order
    spec = InputSpec(input_shape=(10, 3), channels=("x", "y", "z"), preprocessing=pre)
    edge_input = prepare_window(_values(window), ("z", "x", "y"), spec)
    label = teacher.label("vib", window)
    assert label is not None
    expected = _expected(teacher_artifact, edge_input)
    assert label[0] == expected[0]
    assert label[1] == pytest.approx(expected[1], rel=1e-5)
    # A window the edge would dead-letter (unknown channel) gets no pseudo-label.
    assert teacher.label("vib", _raw(100, ("x", "y", "w"))) is None


def test_teacher_labels_windows_as_its_signed_manifest_says(tmp_path: Path, teacher_artifact: Path) -> None:
    """Without a float32 run version, production's own manifest: reordered, padded, fitted statistics."""
    norm = Normalization(mean=[50.0, 40.0, 60.0], std=[1.0, 5.0, 20.0])
    manifest = ModelManifest(
        name="vib",
        version="v1",
        quantization=Quantization.FLOAT32,
        sha256="ab" * 32,
        size_bytes=teacher_artifact.stat().st_size,
        url=f"file://{teacher_artifact}",
        input_shape=[10, 3],
        input_dtype="float32",
        output_shape=[4],
        output_dtype="float32",
        class_names=CLASSES,
        normalization=norm,
        channels=["x", "y", "z"],
        preprocessing=Preprocessing(normalize="fitted", length="pad", pad_value=0.0),
    )
    teacher = _teacher(tmp_path, teacher_artifact, training_config={}, manifest=manifest)
    window = _raw(7, ("y", "z", "x"))  # shorter: padded to 10
    mean, std = np.asarray(norm.mean, np.float32), np.asarray(norm.std, np.float32)
    edge_input = normalize_fitted(prepare_window(_values(window), ("y", "z", "x"), manifest), mean, std)
    label = teacher.label("vib", window)
    assert label is not None
    expected = _expected(teacher_artifact, edge_input)
    assert label[0] == expected[0]
    assert label[1] == pytest.approx(expected[1], rel=1e-5)
    assert teacher.label("vib", _raw(11, ("x", "y", "z"))) is None  # longer than pad accepts


def test_teacher_trained_before_preprocessing_keeps_the_exact_shape(
    tmp_path: Path, teacher_artifact: Path
) -> None:
    """No preprocessing recorded: exact shape, channel names not checked, the recorded statistics."""
    norm = {"mean": [50.0, 50.0, 50.0], "std": [2.0, 2.0, 2.0]}
    teacher = _teacher(
        tmp_path, teacher_artifact, training_config={"normalization": norm, "class_names": CLASSES}
    )
    window = _raw(10, ("a", "b", "c"))
    x = normalize_fitted(
        _values(window), np.asarray(norm["mean"], np.float32), np.asarray(norm["std"], np.float32)
    )
    label = teacher.label("vib", window)
    assert label is not None
    expected = _expected(teacher_artifact, x)
    assert label[0] == expected[0]
    assert label[1] == pytest.approx(expected[1], rel=1e-5)
    assert teacher.label("vib", _raw(12, ("a", "b", "c"))) is None  # another length: skipped, as before


def test_cli_ingest_receives_what_arrived_while_it_was_down(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """The ingest's persistent session: messages published while it is stopped are delivered on restart."""
    settings = _settings(tmp_path, mosquitto)
    enroll_fleet(settings.resolved_database_url, edges=["e1"])
    first = Ingest(settings, client_id="ingest-cli")
    first.link.connect()
    assert first.link.wait_subscribed()
    first.close()
    topic = settings.broker.topics.edge("e1", EdgeTopic.SAMPLES)
    _publish_all(mosquitto, [(topic, encode_message(_sample(i, label="normal"))) for i in range(3)])
    env = {
        **os.environ,
        "EDGEFLEET_DATA_DIR": str(tmp_path),
        "EDGEFLEET_BROKER__URL": mosquitto.url,
    }
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "shared.cli",
            "cloud",
            "ingest",
            "--client-id",
            "ingest-cli",
            "--max-messages",
            "3",
            "--idle-exit",
            "30",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    stats = json.loads(out.stdout.strip().splitlines()[-1])
    assert stats["stored"] == 3
    assert stats["labels_by_source"] == {"device": 3}
    with session_scope(settings.resolved_database_url) as s:
        assert crud.count_samples(s, labelled=True) == 3


def test_ingest_keeps_batches_while_the_registry_is_down(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """The registry (PostgreSQL) does not exist yet: the batch is kept and retried, nothing is acked
    or lost, and everything is stored once the database comes up."""
    name = f"edgefleet_ingest_{uuid.uuid4().hex[:10]}"
    url = f"postgresql+psycopg2://postgres@127.0.0.1:5432/{name}"
    # The registry (and so its identities) does not exist yet: this test is about the outage alone.
    settings = _settings(tmp_path, mosquitto, database_url=url, ingest={"require_enrolled_edges": False})
    ingest = Ingest(settings, migrate=False)
    ingest.link.connect()
    assert ingest.link.wait_subscribed()
    topic = settings.broker.topics.edge("e1", EdgeTopic.SAMPLES)
    _publish_all(mosquitto, [(topic, encode_message(_sample(i, label="normal"))) for i in range(4)])
    worker = threading.Thread(target=ingest.run, kwargs={"max_messages": 4, "idle_exit_s": 60}, daemon=True)
    worker.start()
    admin = create_engine(
        "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres", isolation_level="AUTOCOMMIT"
    )
    try:
        deadline = time.monotonic() + 30
        while ingest.stats.store_retries == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ingest.stats.store_retries >= 1
        assert ingest.stats.stored == 0
        # Created and migrated under another name, then renamed: the retrying ingest never finds a
        # database without its tables (that is a broken registry, not an unreachable one).
        staging = f"{name}_new"
        staging_url = url.replace(name, staging)
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{staging}"'))
        upgrade(staging_url)
        engine_for(staging_url).dispose()
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{staging}" RENAME TO "{name}"'))
        worker.join(timeout=90)
        assert not worker.is_alive()
        assert ingest.stats.stored == 4
        with session_scope(url) as s:
            assert crud.count_samples(s) == 4
    finally:
        ingest.stop_event.set()
        worker.join(timeout=10)
        ingest.close()
        engine_for(url).dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}_new" WITH (FORCE)'))
        admin.dispose()


def test_device_birth_and_shutdown_reach_fleet_ls(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """A real agent's retained birth and its shutdown status go through the broker into the registry
    (``fleet ls``: online / offline, last status time, what it reported); an older status replayed
    later (a retained message on a re-subscribe) changes nothing."""
    from device_agent.agent import Agent  # noqa: PLC0415
    from shared.schemas import DeviceStatus, OnlineState  # noqa: PLC0415
    from shared.settings import AgentSettings, load_settings  # noqa: PLC0415

    settings = _settings(tmp_path, mosquitto)
    ingest = Ingest(settings)
    worker = threading.Thread(target=ingest.run, daemon=True)
    worker.start()
    url = settings.resolved_database_url

    def device() -> dict[str, object] | None:
        with session_scope(url) as session:
            rows = [d for d in fleet.fleet_devices(session) if d["device_id"] == "pump-7"]
            return rows[0] if rows else None

    def wait_state(state: str) -> dict[str, object]:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            row = device()
            if row is not None and row["state"] == state:
                return row
            time.sleep(0.05)
        raise AssertionError(f"pump-7 never {state}: {device()}")

    agent = Agent(
        load_settings(
            AgentSettings,
            None,
            device_id="pump-7",
            broker={"url": mosquitto.url},
            data_dir=tmp_path / "agent",
            hold_unrouted=False,
        )
    )
    try:
        agent.start()
        online = wait_state("online")
        assert isinstance(online["last_seen"], float)
        with session_scope(url) as session:
            info = crud.upsert_device(session, device_id="pump-7").info
        assert info["sensor"] == "simulated"
        assert info["channels"] == ["x", "y", "z"]
    finally:
        agent.shutdown()
    offline = wait_state("offline")
    stale = DeviceStatus(device_id="pump-7", state=OnlineState.ONLINE, ts=1000.0)
    _publish_all(mosquitto, [(settings.broker.topics.device_status("pump-7"), encode_message(stale))])
    time.sleep(1.0)
    assert device() == offline
    ingest.stop_event.set()
    worker.join(10)
    ingest.close()
