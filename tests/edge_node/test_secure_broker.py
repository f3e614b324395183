"""An edge with credentials on ``broker run``: each of its links logs in as ``EDGE/site`` /
``EDGE/cloud`` and the ACLs generated for an edge let it do its whole job; more worker processes than
it has connection names for are refused at start."""

from __future__ import annotations

import queue
from pathlib import Path

import pytest

from edge_node.supervisor import EdgeSupervisor, check_worker_count
from shared.errors import ConfigError
from shared.identity import MAX_EDGE_WORKERS
from shared.mqtt import Received
from shared.schemas import decode_message
from shared.topics import EdgeTopic
from tests.support.edge_fixtures import (
    edge_models_fixture,  # noqa: F401  (fixture)
    edge_settings,
    make_window,
    running_node,
    wait_for,
)
from tests.support.secure_broker import SecureBroker


def test_an_edge_logs_in_per_connection_and_serves_its_devices(
    edge_models: dict[str, Path], tmp_path: Path
) -> None:
    with SecureBroker(tmp_path / "broker", claim_handler=None) as broker:
        topics = broker.topics
        cloud = broker.link("cloud", broker.enroll("cloud", kind="service"), listener="cloud")
        cloud.subscribe(topics.edge("edge-1", EdgeTopic.STATUS))
        cloud.subscribe(topics.edge("edge-1", EdgeTopic.METRICS))
        assert cloud.wait_subscribed(10)
        device = broker.link("dev-1", broker.enroll("dev-1"))
        assert device.wait_connected(10)
        settings = edge_settings(
            "mqtt://unused:1",
            tmp_path / "edge",
            edge_models["int8"],
            site_broker=broker.mqtt("edge-1", broker.enroll("edge-1", kind="edge")),
        )
        with running_node(settings) as node:
            for seq in range(5):
                device.publish(topics.telemetry("dev-1"), make_window("dev-1", seq), qos=1)
            wait_for(lambda: node.stats.windows_total >= 5, "the edge to classify the device's windows")
            seen: dict[str, Received] = {}

            def status_and_metrics() -> bool:
                try:
                    message = cloud.inbox.get(timeout=0.1)
                except queue.Empty:
                    return False
                seen[message.topic] = message
                return len(seen) == 2

            wait_for(status_and_metrics, "the edge's status and metrics at the cloud")
            status = decode_message(seen[topics.edge("edge-1", EdgeTopic.STATUS)].payload)
            assert getattr(status, "edge_id", None) == "edge-1"
        log = broker.runner.log_path.read_text()
        assert "u'edge-1/site'" in log
        assert "u'edge-1/cloud'" in log


def test_more_worker_processes_than_connection_names_are_refused_with_credentials(tmp_path: Path) -> None:
    plain = edge_settings("mqtt://127.0.0.1:1883", tmp_path / "a", None)
    check_worker_count(plain, MAX_EDGE_WORKERS + 1)  # no credentials: the broker binds no names
    secured = edge_settings(
        "mqtt://edge-1:secret@127.0.0.1:1883", tmp_path / "b", None, processes=MAX_EDGE_WORKERS + 1
    )
    check_worker_count(secured, MAX_EDGE_WORKERS)
    with pytest.raises(ConfigError, match=f"at most {MAX_EDGE_WORKERS}"):
        check_worker_count(secured, MAX_EDGE_WORKERS + 1)
    with pytest.raises(ConfigError, match="--processes"):  # refused before any process starts
        EdgeSupervisor(secured, MAX_EDGE_WORKERS + 1)
