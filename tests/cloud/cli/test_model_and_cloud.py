"""CLI and desired-state publication: `edgefleet cloud publish-desired` sends a retained, signed
DesiredState to each edge over a real mosquitto; `model list/show/diff/label`, keygen, db upgrade;
the fleet/rollout/command/admin/demo groups say they are not implemented and hold no commands."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cloud.errors import PublishError
from cloud.fleet.desired_state import publish_desired_state, sign
from cloud.registry import crud
from cloud.registry.db import session_scope, upgrade
from shared.cli import cli
from shared.mqtt import MqttLink
from shared.schemas import DesiredState, ModelManifest, decode_message
from shared.settings import CloudSettings, MqttSettings
from shared.signing import load_public_key, verify_manifest
from shared.topics import EdgeTopic
from tests.support.brokers import Mosquitto


def _env(tmp_path: Path, broker_url: str = "mqtt://127.0.0.1:1") -> dict[str, str]:
    return {
        "EDGEFLEET_DATA_DIR": str(tmp_path),
        "EDGEFLEET_DEV_MODE": "true",
        "EDGEFLEET_BROKER__URL": broker_url,
        "EDGEFLEET_DATABASE_URL": f"sqlite:///{tmp_path / 'registry.db'}",
    }


def _seed_signed_model(settings: CloudSettings) -> str:
    url = settings.resolved_database_url
    upgrade(url)
    data = b"tflite-bytes"
    manifest = ModelManifest(
        name="vib",
        version="r1-int8",
        quantization="int8",
        sha256=hashlib.sha256(data).hexdigest(),
        size_bytes=len(data),
        url="http://127.0.0.1:8765/vib/r1-int8/model.tflite",
        input_shape=[100, 3],
        input_dtype="int8",
        output_shape=[2],
        output_dtype="int8",
        class_names=["a", "b"],
    )
    signed = sign(manifest, settings)
    with session_scope(url) as s:
        base = crud.create_model_version(
            s,
            name="vib",
            version="r1-float32",
            variant="float32",
            metrics={"accuracy": 0.9, "size_bytes": 400.0},
        )
        model = crud.create_model_version(
            s,
            name="vib",
            version="r1-int8",
            variant="int8",
            parent_id=base.id,
            metrics={"accuracy": 0.89, "size_bytes": 100.0},
        )
        model.manifest = signed.model_dump(mode="json")
        model.signature = signed.signature
        crud.promote(s, model_id=model.id)
        crud.add_sample(
            s,
            sample_id="s1",
            edge_id="e1",
            device_id="d1",
            seq=1,
            ts=1.0,
            predicted="a",
            confidence=0.4,
            reason="low_confidence",
            privacy="none",
        )
    return "vib@r1-int8"


def _retained(broker: Mosquitto, topic: str) -> DesiredState:
    link = MqttLink(MqttSettings(url=broker.url), client_id=f"sub-{uuid.uuid4().hex[:8]}")
    link.connect()
    link.subscribe(topic, qos=1)
    try:
        received = link.inbox.get(timeout=10)
    finally:
        link.stop()
    assert received.retain
    return decode_message(received.payload, DesiredState)


def test_publish_desired_state_retained_and_revisioned(tmp_path: Path, mosquitto: Mosquitto) -> None:
    settings = CloudSettings(data_dir=tmp_path, dev_mode=True, broker=MqttSettings(url=mosquitto.url))
    ref = _seed_signed_model(settings)
    sent = publish_desired_state(settings=settings, edge_ids=["e1", "e2"], model_ref=ref)
    assert [(d.edge_id, d.revision) for d in sent] == [("e1", 1), ("e2", 1)]

    result = CliRunner().invoke(
        cli,
        ["cloud", "publish-desired", "--edge", "e1", "--model", "vib@production"],
        env=_env(tmp_path, mosquitto.url),
    )
    assert result.exit_code == 0, result.output
    assert "e1: revision 2 -> vib@r1-int8" in result.output

    desired = _retained(mosquitto, settings.broker.topics.edge("e1", EdgeTopic.DESIRED))
    assert desired.revision == 2
    assert desired.action.value == "deploy"
    assert desired.model is not None
    assert desired.model.ref == ref
    verify_manifest(desired.model, load_public_key(settings.key_paths()[1]))
    with session_scope(settings.resolved_database_url) as s:
        assert crud.next_desired_revision(s, edge_id="e1") == 3
        assert crud.next_desired_revision(s, edge_id="e2") == 2


def test_unsigned_model_is_not_deployed(tmp_path: Path) -> None:
    settings = CloudSettings(data_dir=tmp_path, dev_mode=True)
    upgrade(settings.resolved_database_url)
    with session_scope(settings.resolved_database_url) as s:
        crud.create_model_version(s, name="vib", version="r9-int8", variant="int8")

    with pytest.raises(PublishError, match="not signed"):
        publish_desired_state(settings=settings, edge_ids=["e1"], model_ref="vib@r9-int8")


def test_model_commands_read_the_registry(tmp_path: Path) -> None:
    settings = CloudSettings(data_dir=tmp_path, dev_mode=True)
    _seed_signed_model(settings)
    runner = CliRunner()
    env = _env(tmp_path)
    listed = runner.invoke(cli, ["model", "list"], env=env)
    assert listed.exit_code == 0, listed.output
    assert "vib@r1-int8" in listed.output
    assert "production" in listed.output
    shown = runner.invoke(cli, ["model", "show", "vib@production"], env=env)
    assert shown.exit_code == 0, shown.output
    assert '"parent": "vib@r1-float32"' in shown.output
    diffed = runner.invoke(cli, ["model", "diff", "vib@r1-float32", "vib@r1-int8"], env=env)
    assert diffed.exit_code == 0, diffed.output
    assert "accuracy" in diffed.output
    assert "-0.01" in diffed.output
    unlabelled = runner.invoke(cli, ["model", "label"], env=env)
    assert "s1" in unlabelled.output
    labelled = runner.invoke(cli, ["model", "label", "--sample", "s1", "--label", "b"], env=env)
    assert labelled.exit_code == 0
    assert "labelled b" in labelled.output
    with session_scope(settings.resolved_database_url) as s:
        assert crud.count_samples(s, labelled=True) == 1
    missing = runner.invoke(cli, ["model", "show", "vib@nope"], env=env)
    assert missing.exit_code != 0


def test_keygen_and_db_upgrade(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["cloud", "keygen", "--out", str(tmp_path / "keys")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "keys" / "signing.key").stat().st_mode & 0o777 == 0o600
    again = runner.invoke(cli, ["cloud", "keygen", "--out", str(tmp_path / "keys")])
    assert again.exit_code != 0
    assert "--force" in again.output
    url = f"sqlite:///{tmp_path / 'x.db'}"
    upgraded = runner.invoke(cli, ["cloud", "db", "upgrade", "--url", url])
    assert upgraded.exit_code == 0, upgraded.output
    assert (tmp_path / "x.db").exists()


@pytest.mark.parametrize("group", ["fleet", "rollout", "command", "admin", "model", "cloud"])
def test_operator_groups_have_commands(group: str) -> None:
    result = CliRunner().invoke(cli, [group, "--help"])
    assert result.exit_code == 0, result.output
    assert "Not implemented yet" not in result.output
    assert "Commands:" in result.output


def test_services_do_not_import_tensorflow() -> None:
    """The ingest, registry, CLI and task modules import TensorFlow only inside training functions."""
    code = (
        "import sys, cloud.ingest, cloud.registry.crud, cloud.cli.cloud, cloud.worker.tasks\n"
        "import cloud.worker.triggers, cloud.artifacts\n"
        "print('tensorflow' in sys.modules or 'keras' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True, text=True)
    assert out.stdout.strip() == "False"


def test_model_train_compress_evaluate_in_process(tmp_path: Path) -> None:
    """`edgefleet model train` runs the pipeline's task functions in-process and prints the variant table;
    `model compress` adds a variant to the same run and `model evaluate` re-scores one."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 20, 2)).astype(np.float32)
    y = (x[:, :, 0].mean(axis=1) > 0).astype(np.int64)
    x[y == 1] += 0.5
    np.savez(tmp_path / "toy.npz", X=x, y=y, class_names=np.array(["low", "high"]))
    env = _env(tmp_path)
    runner = CliRunner()
    config = tmp_path / "pipeline.yaml"
    config.write_text(
        "training: {filters: [4], dense_units: 0, epochs: 2, early_stopping_patience: 0}\n"
        "compression: {representative_samples: 20}\n"
    )
    trained = runner.invoke(
        cli,
        [
            "model",
            "train",
            "--dataset",
            str(tmp_path / "toy.npz"),
            "--name",
            "toy",
            "--variant",
            "int8",
            "--pipeline-config",
            str(config),
        ],
        env=env,
    )
    assert trained.exit_code == 0, trained.output
    assert "run 1: published" in trained.output
    assert "toy@r1-int8" in trained.output
    compressed = runner.invoke(cli, ["model", "compress", "toy@r1-int8", "--variant", "float16"], env=env)
    assert compressed.exit_code == 0, compressed.output
    assert "toy@r1-float16" in compressed.output
    evaluated = runner.invoke(cli, ["model", "evaluate", "toy@r1-float16"], env=env)
    assert evaluated.exit_code == 0, evaluated.output
    with session_scope(f"sqlite:///{tmp_path / 'registry.db'}") as s:
        model = crud.get_model_version(s, ref="toy@production")
        assert model.version == "r1-int8"
        assert model.dataset is not None
        assert model.dataset.input_shape == [20, 2]
        assert crud.get_model_version(s, ref="toy@r1-float16").metrics["size_bytes"] > 0
