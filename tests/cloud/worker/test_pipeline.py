"""The whole learning chain on a real Celery worker (subprocess) against a real Redis, end to end:
prepare -> train -> compress + evaluate (per variant) -> gate -> sign -> publish, with lineage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from kombu.connection import Connection

from cloud.registry import crud
from cloud.registry.db import session_scope
from shared.mqtt import MqttLink
from shared.schemas import DesiredState, ModelManifest, decode_message
from shared.settings import MqttSettings
from shared.signing import load_public_key, verify_manifest
from shared.topics import EdgeTopic, Topics
from tests.support.brokers import Mosquitto, RedisServer
from tests.support.celery_worker import celery_worker

WORKER_START_S = 60.0
PIPELINE_TIMEOUT_S = 240.0


def _small_dataset(path: Path) -> Path:
    """A user's .npz: 4 classes of noisy sine windows (100 x 3) with string labels."""
    rng = np.random.default_rng(1)
    t = np.arange(100) / 100.0
    xs, ys = [], []
    names = ["low", "mid", "high", "flat"]
    for i in range(320):
        k = i % 4
        freq = (2.0, 6.0, 14.0, 0.0)[k]
        base = np.sin(2 * np.pi * freq * t + rng.uniform(0, 6.28))[:, None] * np.array([1.0, 0.5, 0.2])
        xs.append((base + rng.normal(0, 0.3, (100, 3))).astype(np.float32))
        ys.append(names[k])
    np.savez(path, X=np.stack(xs), y=np.array(ys), class_names=np.array(names))
    return path


@pytest.fixture
def cloud_env(tmp_path: Path, redis_server: RedisServer, mosquitto: Mosquitto) -> dict[str, str]:
    db = tmp_path / "registry.db"
    env = {
        **os.environ,
        "EDGEFLEET_BROKER__URL": mosquitto.url,
        "EDGEFLEET_DATA_DIR": str(tmp_path / "cloud"),
        "EDGEFLEET_DATABASE_URL": f"sqlite:///{db}",
        "EDGEFLEET_REDIS_URL": redis_server.url,
        "EDGEFLEET_DEV_MODE": "true",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    subprocess.run(
        [sys.executable, "-m", "shared.cli", "cloud", "db", "upgrade"],
        env=env,
        check=True,
        capture_output=True,
    )
    return env


@pytest.fixture
def worker(cloud_env: dict[str, str], tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    with celery_worker(cloud_env, tmp_path / "worker.log", name="test") as proc:
        yield proc


def _run_pipeline(env: dict[str, str], config: dict[str, object], tmp_path: Path) -> dict[str, object]:
    """Launch the canvas from a separate process (as the CLI does) and wait for its result."""
    script = (
        "import json, sys\n"
        "from cloud.worker.tasks import start_pipeline\n"
        "from cloud.learning.pipeline import PipelineConfig\n"
        "run_id, result = start_pipeline(config=PipelineConfig.model_validate(json.loads(sys.argv[1])))\n"
        f"ref = result.get(timeout={PIPELINE_TIMEOUT_S}, propagate=True)\n"
        "print(json.dumps({'run_id': run_id, 'ref': ref}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, json.dumps(config)],
        env=env,
        capture_output=True,
        timeout=PIPELINE_TIMEOUT_S + 60,
        check=False,
    )
    if out.returncode != 0:
        worker_log = (tmp_path / "worker.log").read_text(errors="replace")[-4000:]
        pytest.fail(f"pipeline failed: {out.stderr.decode()[-3000:]}\n--- worker log ---\n{worker_log}")
    return json.loads(out.stdout.decode().strip().splitlines()[-1])


def test_pipeline_runs_on_real_worker_and_publishes_signed_model(
    cloud_env: dict[str, str], worker: subprocess.Popen[bytes], tmp_path: Path, mosquitto: Mosquitto
) -> None:
    data = _small_dataset(tmp_path / "waves.npz")
    config = {
        "model_name": "waves",
        "dataset": str(data),
        "training": {
            "filters": [8, 16],
            "dense_units": 16,
            "epochs": 12,
            "early_stopping_patience": 0,
            "learning_rate": 0.01,
        },
        "compression": {"variants": ["float32", "int8", "pruned_int8"], "pruning_epochs": 1},
        "deploy_variant": "int8",
        "deploy_edges": ["edge-1"],
    }
    first = _run_pipeline(cloud_env, config, tmp_path)
    assert first["ref"] == f"waves@r{first['run_id']}-int8"
    assert worker.poll() is None

    url = cloud_env["EDGEFLEET_DATABASE_URL"]
    with session_scope(url) as session:
        run = crud.get_run(session, run_id=int(first["run_id"]))
        assert run.state == "published"
        steps = {e.step for e in run.steps}
        assert steps >= {
            "dataset",
            "train",
            "compress:float32",
            "compress:int8",
            "compress:pruned_int8",
            "evaluate:float32",
            "evaluate:int8",
            "evaluate:pruned_int8",
            "gate",
            "sign",
            "publish",
        }
        model = crud.get_model_version(session, ref=str(first["ref"]))
        assert model.status == "production"
        assert model.gate_passed is True
        assert "no production model yet" in (model.gate_reason or "")
        assert model.parent is not None
        assert model.parent.variant == "float32"
        assert model.dataset is not None
        assert model.dataset.n_samples == 320
        assert model.metrics["accuracy"] > 0.5
        pruned = crud.get_model_version(session, ref=f"waves@r{first['run_id']}-pruned_int8")
        pruned_step = next(e for e in run.steps if e.step == "compress:pruned_int8")
        assert pruned_step.detail["sparsity"] >= 0.5
        assert pruned.metrics["gzip_bytes"] < pruned.metrics["size_bytes"]
        manifest = ModelManifest.model_validate(model.manifest)

    assert manifest.input_dtype == "int8"
    assert manifest.output_dtype == "int8"
    assert manifest.input_shape == [100, 3]
    assert manifest.output_shape == [4]
    assert manifest.class_names == ["low", "mid", "high", "flat"]
    assert manifest.normalization is not None
    assert len(manifest.normalization.mean) == 3
    assert manifest.url.startswith("file://")
    artifact = Path(manifest.url.removeprefix("file://"))
    assert artifact.is_file()
    assert artifact.stat().st_size == manifest.size_bytes
    public = Path(cloud_env["EDGEFLEET_DATA_DIR"]) / "keys" / "signing.pub"
    verify_manifest(manifest, load_public_key(public))

    # deploy_edges: the published model went to the edge as its retained desired state.
    link = MqttLink(MqttSettings(url=mosquitto.url), client_id="desired-reader")
    link.connect()
    link.subscribe(Topics("ef/v1").edge("edge-1", EdgeTopic.DESIRED), qos=1)
    try:
        received = link.inbox.get(timeout=10)
    finally:
        link.stop()
    desired = decode_message(received.payload, DesiredState)
    assert received.retain
    assert desired.revision == 1
    assert desired.model == manifest

    # A second run: the gate compares against production re-scored on the new held-out split.
    second = _run_pipeline(cloud_env, config, tmp_path)
    with session_scope(url) as session:
        run = crud.get_run(session, run_id=int(second["run_id"]))
        assert run.state in ("published", "rejected")
        gate_step = next(e for e in run.steps if e.step == "gate")
        assert gate_step.detail["production"] == first["ref"]
        assert "re-evaluated" in gate_step.detail["reason"]


_DRIFT_SCRIPT = """
import sys, time
from cloud.worker.app import get_settings
from cloud.registry import crud
from cloud.registry.db import session_scope
from cloud.worker.triggers import _launch_via_celery, check_and_fire

settings = get_settings()
url = settings.resolved_database_url
with session_scope(url) as s:
    production = crud.production_model(s, name="waves")
    crud.add_metrics(s, edge_id="e1", ts=time.time(), model_version=production.version, windows_total=500,
                     confidence_mean=0.3, labelled_windows=500, labelled_correct=100, data={})
fired = check_and_fire(database_url=url, thresholds=settings.thresholds, launch=_launch_via_celery)
assert len(fired) == 1, fired
deadline = time.monotonic() + float(sys.argv[1])
while time.monotonic() < deadline:
    with session_scope(url) as s:
        runs = [r for r in crud.list_runs(s) if r.trigger_id is not None]
        if runs and runs[0].state in ("published", "rejected", "failed"):
            print(runs[0].id, runs[0].state, runs[0].trigger_id)
            break
    time.sleep(0.5)
"""


def test_drift_trigger_retrains_through_celery(
    cloud_env: dict[str, str], worker: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    """Edges report accuracy far below production's: beat's check records the trigger, sends
    edgefleet.pipeline.start to the worker, and a retraining run linked to the trigger finishes."""
    data = _small_dataset(tmp_path / "waves.npz")
    config = {
        "model_name": "waves",
        "dataset": str(data),
        "training": {
            "filters": [8],
            "dense_units": 8,
            "epochs": 6,
            "early_stopping_patience": 0,
            "learning_rate": 0.01,
        },
        "compression": {"variants": ["int8"]},
    }
    _run_pipeline(cloud_env, config, tmp_path)
    out = subprocess.run(
        [sys.executable, "-c", _DRIFT_SCRIPT, str(PIPELINE_TIMEOUT_S)],
        env=cloud_env,
        capture_output=True,
        timeout=PIPELINE_TIMEOUT_S + 60,
        check=False,
    )
    assert out.returncode == 0, out.stderr.decode()[-3000:]
    run_id, state, trigger_id = out.stdout.decode().split()
    assert state in ("published", "rejected")
    with session_scope(cloud_env["EDGEFLEET_DATABASE_URL"]) as session:
        triggers = {t.id: t for t in crud.list_triggers(session)}
        assert triggers[int(trigger_id)].run_id == int(run_id)
        assert {t.kind for t in triggers.values()} == {"drift_accuracy", "drift_confidence"}
        run = crud.get_run(session, run_id=int(run_id))
        assert run.config["include_samples"] is True
        assert worker.poll() is None


def test_failed_step_marks_run_failed(
    cloud_env: dict[str, str], worker: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    del worker
    script = (
        "from cloud.worker.tasks import start_pipeline\n"
        "from cloud.learning.pipeline import PipelineConfig\n"
        "config = PipelineConfig(model_name='bad', dataset='/nonexistent/x.npz')\n"
        "run_id, result = start_pipeline(config=config)\n"
        "try:\n"
        f"    result.get(timeout={PIPELINE_TIMEOUT_S})\n"
        "except Exception as exc:\n"
        "    print(run_id, type(exc).__name__)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], env=cloud_env, capture_output=True, timeout=300, check=True
    )
    run_id = int(out.stdout.decode().split()[0])

    deadline = time.monotonic() + 30
    while True:
        with session_scope(cloud_env["EDGEFLEET_DATABASE_URL"]) as session:
            run = crud.get_run(session, run_id=run_id)
            if run.state == "failed" or time.monotonic() > deadline:
                break
        time.sleep(0.2)
    assert run.state == "failed"
    assert "does not exist" in (run.error or "")


def test_pipeline_on_sqlite_broker_without_redis(tmp_path: Path) -> None:
    """The fallback when no Redis is reachable: kombu's sqla+sqlite transport, results in SQLite."""
    env = {
        **os.environ,
        "EDGEFLEET_DATA_DIR": str(tmp_path / "cloud"),
        "EDGEFLEET_DATABASE_URL": f"sqlite:///{tmp_path / 'registry.db'}",
        "EDGEFLEET_REDIS_URL": "redis://127.0.0.1:1/0",  # nothing listens here: must not be used
        "EDGEFLEET_CELERY_BROKER_URL": f"sqla+sqlite:///{tmp_path / 'celery-broker.db'}",
        "EDGEFLEET_DEV_MODE": "true",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    subprocess.run([sys.executable, "-m", "shared.cli", "cloud", "db", "upgrade"], env=env, check=True)
    config = {
        "model_name": "waves",
        "dataset": str(_small_dataset(tmp_path / "waves.npz")),
        "training": {"filters": [8], "dense_units": 0, "epochs": 2, "early_stopping_patience": 0},
        "compression": {"variants": ["int8"]},
    }
    with celery_worker(env, tmp_path / "worker.log", name="test"):
        result = _run_pipeline(env, config, tmp_path)
    assert result["ref"] == f"waves@r{result['run_id']}-int8"
    with session_scope(env["EDGEFLEET_DATABASE_URL"]) as session:
        assert crud.get_run(session, run_id=int(result["run_id"])).state in ("published", "rejected")


_FIRST_USE_SCRIPT = """
import sys, time
from kombu import Connection
from cloud.worker.app import prepare_sqlite_broker, sqlite_broker_transport_options
url, start_at = sys.argv[1], float(sys.argv[2])
time.sleep(max(0.0, start_at - time.time()))
prepare_sqlite_broker(url)
with Connection(url, transport_options=sqlite_broker_transport_options()) as conn:
    queue = conn.SimpleQueue("celery")
    queue.put({"from": sys.argv[3]})
    queue.close()
"""


def test_sqlite_broker_first_use_by_several_processes_at_once(tmp_path: Path) -> None:
    """A worker and clients starting together on a fresh broker file used to race in kombu's lazy
    table/queue creation (UNIQUE constraint failed: kombu_queue.name); every publish must land."""
    env = {**os.environ, "EDGEFLEET_DEV_MODE": "true", "EDGEFLEET_DATA_DIR": str(tmp_path / "cloud")}
    for round_no in range(4):
        url = f"sqla+sqlite:///{tmp_path / f'broker-{round_no}.db'}"
        start_at = time.time() + 3.0  # after every process has imported
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", _FIRST_USE_SCRIPT, url, str(start_at), str(i)],
                env=env,
                stderr=subprocess.PIPE,
            )
            for i in range(4)
        ]
        for proc in procs:
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err.decode()[-2000:]
        # kombu's table models use a loader strategy SQLAlchemy 2.1 deprecates (not ours to fix).
        with warnings.catch_warnings(), Connection(url) as conn:
            warnings.simplefilter("ignore", DeprecationWarning)
            queue = conn.SimpleQueue("celery")
            received = {queue.get(timeout=5).payload["from"] for _ in range(4)}
            queue.close()
        assert received == {"0", "1", "2", "3"}
