"""Model manager against a real broker: hot swap under load, rejections, restart, rollback."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

from shared.schemas import DeploymentProgress, DeployStage, EdgeStatus, OnlineState
from shared.signing import generate_keypair
from shared.topics import EdgeTopic, Topics
from tests.support.brokers import Mosquitto
from tests.support.edge_fixtures import (
    FakeDevice,
    Keys,
    Seen,
    Wire,
    artifact_server,
    desired,
    edge_models_fixture,  # noqa: F401  (fixture)
    edge_settings,
    manifest_for,
    running_node,
    signing_keys_fixture,  # noqa: F401  (fixture)
    wait_for,
)

TOPICS = Topics()
DESIRED = TOPICS.edge("edge-1", EdgeTopic.DESIRED)


def progress_of(ops: Wire, revision: int) -> list[DeploymentProgress]:
    return [p for p in ops.decoded("/deploy", DeploymentProgress) if p.revision == revision]


def final_stage(ops: Wire, revision: int) -> DeploymentProgress | None:
    done = [
        p
        for p in progress_of(ops, revision)
        if p.stage in (DeployStage.SWAPPED, DeployStage.FAILED, DeployStage.ROLLED_BACK)
    ]
    return done[-1] if done else None


def test_hot_swap_under_load_loses_nothing_and_runs_nothing_twice(
    mosquitto: Mosquitto, edge_models: dict[str, Path], signing_keys: Keys, tmp_path: Path
) -> None:
    settings = edge_settings(
        mosquitto.url, tmp_path / "edge", edge_models["float32"], public_key=signing_keys.public
    )
    ops = Wire(mosquitto.url, "ops", [TOPICS.edge("edge-1", EdgeTopic.DEPLOY)])
    devices = [FakeDevice(mosquitto.url, f"dev-{i}") for i in range(3)]
    per_device = 400
    seen = Seen()
    with running_node(settings) as node:
        node.observer = seen
        first_version = node.holder.current.version  # type: ignore[union-attr]
        half_sent = threading.Event()

        def load() -> None:
            for seq in range(per_device):
                for device in devices:
                    device.send(seq, cls=seq % 4)
                if seq == per_device // 4:
                    half_sent.set()

        sender = threading.Thread(target=load)
        sender.start()
        half_sent.wait(60)
        with artifact_server(edge_models["float32_v2"].parent) as base_url:  # over HTTP this time
            url = f"{base_url}/{edge_models['float32_v2'].name}"
            manifest = manifest_for(edge_models["float32_v2"], "2.0.0", keys=signing_keys, url=url)
            ops.publish(DESIRED, desired("edge-1", 1, manifest, keys=signing_keys), retain=True)
            wait_for(lambda: final_stage(ops, 1), "the deploy result")
        sender.join(120)
        total = per_device * len(devices)
        try:
            wait_for(lambda: len(seen.windows) >= total, "every window classified")
        except AssertionError:
            print("DIAG", len(seen.windows), node.snapshot(), node.ingest.accepted, node.decision_errors)
            raise
        done = wait_for(lambda: final_stage(ops, 1), "the deploy result")
        assert done.stage is DeployStage.SWAPPED, done
        stages = [p.stage for p in progress_of(ops, 1)]
        assert stages == [
            DeployStage.RECEIVED,
            DeployStage.DOWNLOADING,
            DeployStage.VERIFYING,
            DeployStage.WARMING_UP,
            DeployStage.SWAPPED,
        ]
        counts = Counter((dev, seq) for dev, seq, _ in seen.windows)
        assert len(counts) == total  # none lost
        assert max(counts.values()) == 1  # none twice
        versions = Counter(version for _, _, version in seen.windows)
        assert set(versions) == {first_version, "2.0.0"}
        assert node.holder.current.version == "2.0.0"  # type: ignore[union-attr]
        assert node.stats.windows_total == total
        assert node.workers.failed_windows == 0
    for device in devices:
        device.close()
    ops.close()


def test_bad_models_are_rejected_and_the_old_one_keeps_serving(
    mosquitto: Mosquitto, edge_models: dict[str, Path], signing_keys: Keys, tmp_path: Path
) -> None:
    settings = edge_settings(
        mosquitto.url, tmp_path / "edge", edge_models["float32"], public_key=signing_keys.public
    )
    good = edge_models["float32_v2"]
    truncated = tmp_path / "truncated.tflite"
    truncated.write_bytes(good.read_bytes()[:-100])
    other_keys_dir = tmp_path / "other"
    other_kid = generate_keypair(other_keys_dir / "k", other_keys_dir / "k.pub")
    other = Keys(other_keys_dir / "k", other_keys_dir / "k.pub", other_kid)
    signed = manifest_for(good, "3.0.0", keys=signing_keys)
    cases = {
        "sha256": manifest_for(good, "3.0.1", keys=signing_keys, sha256="0" * 64),
        "signature: model vib@3.0.2 is signed by key": manifest_for(good, "3.0.2", keys=other),
        "tampered": signed.model_copy(update={"version": "3.0.3"}),
        "unsigned": manifest_for(good, "3.0.4"),
        "size": manifest_for(
            truncated, "3.0.5", keys=signing_keys, sha256=signed.sha256, size_bytes=signed.size_bytes
        ),
        "input shape [50, 3] does not match the manifest's [100, 3]": manifest_for(
            edge_models["short_input"], "3.0.6", keys=signing_keys
        ),
        "NaN": manifest_for(edge_models["nan"], "3.0.7", keys=signing_keys),
    }
    expected_reason = {
        "tampered": "signature does not verify",
        "unsigned": "is unsigned",
    }
    ops = Wire(
        mosquitto.url,
        "ops",
        [TOPICS.edge("edge-1", EdgeTopic.DEPLOY), TOPICS.edge("edge-1", EdgeTopic.STATUS)],
    )
    device = FakeDevice(mosquitto.url, "dev-1")
    with running_node(settings) as node:
        original = node.holder.current
        assert original is not None
        for revision, (case, manifest) in enumerate(cases.items(), start=1):
            ops.publish(DESIRED, desired("edge-1", revision, manifest, keys=signing_keys), retain=True)
            done = wait_for(lambda r=revision: final_stage(ops, r), f"the verdict on {case}")
            assert done.stage is DeployStage.FAILED, (case, done)
            assert not done.ok
            assert expected_reason.get(case, case) in (done.reason or ""), (case, done.reason)
            assert node.holder.current is original, case
            device.send(revision)
            wait_for(lambda r=revision: node.stats.windows_total >= r, f"serving after {case}")

        def reported_failure() -> EdgeStatus | None:
            for payload in reversed(ops.on("/status")):
                status = EdgeStatus.model_validate_json(payload)
                if status.reported.desired_revision == len(cases):
                    return status
            return None

        status = wait_for(reported_failure, "the retained status with the last failure")
        assert status.state is OnlineState.ONLINE
        assert status.reported.last_deploy_ok is False
        assert status.reported.model_version == original.version
        assert node.manager.deploys_failed == len(cases)
    device.close()
    ops.close()


def test_restart_keeps_the_active_model_and_rollback_restores_last_good(
    mosquitto: Mosquitto, edge_models: dict[str, Path], signing_keys: Keys, tmp_path: Path
) -> None:
    settings = edge_settings(
        mosquitto.url, tmp_path / "edge", edge_models["int8"], public_key=signing_keys.public
    )
    ops = Wire(mosquitto.url, "ops", [TOPICS.edge("edge-1", EdgeTopic.DEPLOY)])
    device = FakeDevice(mosquitto.url, "dev-1")
    manifest = manifest_for(edge_models["float32_v2"], "2.0.0", keys=signing_keys)
    with running_node(settings) as node:
        local_version = node.holder.current.version  # type: ignore[union-attr]
        ops.publish(DESIRED, desired("edge-1", 5, manifest, keys=signing_keys), retain=True)
        assert wait_for(lambda: final_stage(ops, 5), "deploy").stage is DeployStage.SWAPPED
    # Restart: the deployed model comes back from disk; the retained order (same revision) is not redone.
    with running_node(settings) as node:
        assert node.holder.current.version == "2.0.0"  # type: ignore[union-attr]
        device.send(1)
        wait_for(lambda: node.stats.windows_total >= 1, "serving after restart")
        assert node.manager.reported().last_good_version == local_version
        ops.publish(
            DESIRED,
            desired("edge-1", 6, None, action="rollback", keys=signing_keys, rollback_to=local_version),
            retain=True,
        )
        done = wait_for(lambda: final_stage(ops, 6), "rollback")
        assert done.stage is DeployStage.ROLLED_BACK, done
        assert node.holder.current.version == local_version  # type: ignore[union-attr]
        device.send(2)
        wait_for(lambda: node.stats.windows_total >= 2, "serving after rollback")
    assert len(progress_of(ops, 5)) == 5  # the restart did not re-run revision 5
    with running_node(settings) as node:
        assert node.holder.current.version == local_version  # type: ignore[union-attr]
    device.close()
    ops.close()
