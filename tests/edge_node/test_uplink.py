"""Hard-example uplink: budget, privacy, durable queue across a cloud-broker outage and an edge restart."""

from __future__ import annotations

from pathlib import Path

from edge_node.rules import RuleSpec
from shared.schemas import HardExample, Privacy
from shared.topics import EdgeTopic, Topics
from tests.support.brokers import Mosquitto
from tests.support.edge_fixtures import (
    FakeDevice,
    Wire,
    edge_models_fixture,  # noqa: F401  (fixture)
    edge_settings,
    running_node,
    wait_for,
)

TOPICS = Topics()


def test_hard_examples_stay_on_disk_through_a_cloud_outage_and_respect_the_budget(
    mosquitto: Mosquitto, edge_models: dict[str, Path], tmp_path: Path
) -> None:
    cloud = Mosquitto(workdir=tmp_path / "cloud-broker")
    cloud.start()
    cloud_url = cloud.url
    cloud.stop()  # the cloud is unreachable from the start
    budget = 5
    settings = edge_settings(
        mosquitto.url,
        tmp_path / "edge",
        edge_models["float32"],
        cloud_url=cloud_url,
        uplink={
            "low_confidence": 1.0,
            "min_margin": 1.0,
            "budget_per_minute": budget,
            "random_fraction": 0.0,
        },
    )
    rule = RuleSpec.model_validate(
        {"name": "always", "class": "normal", "min_probability": 0.0, "command": {"name": "ping"}}
    )
    device = FakeDevice(mosquitto.url, "dev-1")
    with running_node(settings, rules=[rule], wait_cloud=False) as node:
        for seq in range(1, 21):
            device.send(seq, label="imbalance")
        wait_for(lambda: node.stats.windows_total >= 20, "all windows classified")
        # Local decisions work without the cloud: every window fired the rule and was acked.
        wait_for(lambda: node.commands.acks["ok"] >= 20, "acks from the device")
        wait_for(lambda: node.miner.over_budget == 15, "mining to finish the last batch")
        assert node.uplink.depth == budget
        assert not node.cloud_link.connected
    # The edge restarts while the cloud is still down: the queue is on disk.
    with running_node(settings, rules=[rule], wait_cloud=False) as node:
        assert node.uplink.depth == budget
        cloud.start()
        ops = Wire(cloud_url, "cloud-ops", [TOPICS.edge("edge-1", EdgeTopic.SAMPLES)])
        wait_for(lambda: node.uplink.depth == 0, "the queue to drain to the cloud")
        samples = wait_for(
            lambda: (
                (got := ops.decoded("/samples", HardExample))
                and len({s.sample_id for s in got}) >= budget
                and got
            ),
            "samples at the cloud",
        )
        assert len({s.sample_id for s in samples}) == budget
        for sample in samples:
            assert sample.label == "imbalance"
            assert sample.privacy is Privacy.FULL
            assert sample.window_bytes() is not None
            assert sample.model_version == node.holder.current.version  # type: ignore[union-attr]
            assert len(sample.probabilities) == 4
        ops.close()
    device.close()
    cloud.stop()
