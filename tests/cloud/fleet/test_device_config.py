"""Devices in ``edgefleet fleet ls|show``: real agents (processes, killed for a real LWT), a real edge
relaying what it hears on its site broker, the real ingest and registry, one private mosquitto.

- online / offline (LWT) / unreachable (its edge went away) and back, with the edge that serves it;
- a desired device config set while the device is offline converges when it reconnects, and a
  config the device refuses shows as such."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from cloud.api.auth import create_token
from cloud.errors import DeviceConfigUnpublishedError
from cloud.fleet.device_config import set_device_config
from cloud.ingest import Ingest
from cloud.registry import fleet
from cloud.registry.db import session_scope
from edge_node.node import EdgeNode
from shared.cli import cli as edgefleet
from shared.mqtt import MqttLink
from shared.private_broker import free_port
from shared.settings import MqttSettings
from shared.settings.cloud import CloudSettings
from shared.topics import Topics
from tests.support.agent_process import start_agent_process
from tests.support.api_server import running_api
from tests.support.brokers import Mosquitto, RedisServer
from tests.support.celery_worker import celery_worker
from tests.support.edge_fixtures import edge_settings, wait_for
from tests.support.identities import enroll_fleet

WAIT_S = 30.0
DEVICES = [f"pump-{i}" for i in range(1, 5)]  # enrolled: the ingest records reports of enrolled devices


class Env:
    def __init__(self, tmp_path: Path, broker: Mosquitto) -> None:
        self.tmp_path = tmp_path
        self.broker = broker
        self.settings = CloudSettings(
            data_dir=tmp_path / "cloud",
            database_url=f"sqlite:///{tmp_path / 'registry.db'}",
            broker=MqttSettings(url=broker.url),
        )
        enroll_fleet(self.settings.resolved_database_url, edges=["edge-1"], devices=DEVICES)
        self.cli_env = {
            "EDGEFLEET_DATABASE_URL": self.settings.resolved_database_url,
            "EDGEFLEET_DATA_DIR": str(tmp_path / "cloud"),
            "EDGEFLEET_BROKER__URL": broker.url,
        }
        self.ingest = Ingest(self.settings)
        self.thread = threading.Thread(target=self.ingest.run, daemon=True)
        self.agents: dict[str, subprocess.Popen[bytes]] = {}
        self.edge: EdgeNode | None = None

    def start_edge(self) -> None:
        settings = edge_settings(self.broker.url, self.tmp_path / "edge-1", None, edge_id="edge-1")
        self.edge = EdgeNode(settings)
        self.edge.start()

    def stop_edge(self) -> None:
        assert self.edge is not None
        self.edge.stop()
        self.edge = None

    def start_agent(self, device_id: str) -> None:
        self.agents[device_id] = start_agent_process(
            device_id, self.broker.url, self.tmp_path / device_id, self.tmp_path / f"{device_id}.log"
        )

    def kill_agent(self, device_id: str) -> None:
        proc = self.agents.pop(device_id)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def cli(self, *args: str, env: dict[str, str] | None = None) -> Any:
        result = CliRunner().invoke(edgefleet, list(args), env={**self.cli_env, **(env or {})})
        assert result.exit_code == 0, result.output
        return json.loads(result.output) if "--json" in args else result.output

    def device(self, device_id: str) -> dict[str, Any] | None:
        with session_scope(self.settings.resolved_database_url) as session:
            if fleet.get_device(session, device_id=device_id) is None:
                return None
            return fleet.fleet_device(session, device_id=device_id)

    def wait_device(self, device_id: str, what: str, **expected: Any) -> dict[str, Any]:
        def matches() -> dict[str, Any] | None:
            row = self.device(device_id)
            if row is not None and all(row.get(k) == v for k, v in expected.items()):
                return row
            return None

        try:
            found: dict[str, Any] = wait_for(matches, f"{device_id}: {what}", WAIT_S)
        except AssertionError:
            print("device now:", self.device(device_id))
            for path in self.tmp_path.glob("*.log"):
                print(path.name, path.read_text(errors="replace")[-2000:])
            raise
        return found

    def close(self) -> None:
        for device_id in list(self.agents):
            self.kill_agent(device_id)
        if self.edge is not None:
            self.stop_edge()
        self.ingest.stop_event.set()
        self.thread.join(10)
        self.ingest.close()


@pytest.fixture
def env(tmp_path: Path, mosquitto: Mosquitto) -> Iterator[Env]:
    state = Env(tmp_path, mosquitto)
    state.thread.start()
    wait_for(lambda: state.ingest.link.connected, "the ingest connected")
    try:
        yield state
    finally:
        state.close()


def _ls_device(env: Env, device_id: str) -> dict[str, Any]:
    listing = env.cli("fleet", "ls", "--json")
    rows = [d for d in listing["devices"] if d["device_id"] == device_id]
    assert len(rows) == 1, listing
    row: dict[str, Any] = rows[0]
    return row


def test_device_online_offline_and_unreachable_in_fleet_ls(env: Env) -> None:
    env.start_edge()
    env.start_agent("pump-1")
    env.wait_device("pump-1", "online behind edge-1", state="online", edge_id="edge-1")
    row = _ls_device(env, "pump-1")
    assert (row["state"], row["edge_id"], row["health"]) == ("online", "edge-1", "ok")
    assert row["last_seen"] is not None
    shown = env.cli("fleet", "show", "pump-1", "--json")
    assert shown["reported_by"] == "edge-1"
    assert shown["reported_config"]["rate_hz"] == 100.0
    assert shown["reported_config"]["window"] == 50

    # kill -9: the broker publishes the device's last will.
    env.kill_agent("pump-1")
    env.wait_device("pump-1", "offline by its last will", state="offline", reason="lwt")
    assert _ls_device(env, "pump-1")["state"] == "offline"

    env.start_agent("pump-1")
    env.wait_device("pump-1", "online again", state="online")

    # Its edge goes away: nobody serves the device any more, so not a stale "online".
    env.stop_edge()
    env.wait_device("pump-1", "unreachable with its edge offline", state="unreachable")
    assert _ls_device(env, "pump-1")["state"] == "unreachable"
    # The edge returns: its first report (on connecting to the cloud broker) says online again.
    env.start_edge()
    env.wait_device("pump-1", "online with its edge back", state="online", edge_id="edge-1")
    human = env.cli("fleet", "ls")
    assert "pump-1" in human
    assert "edge-1" in human


def test_desired_device_config_converges_when_the_device_reconnects(env: Env) -> None:
    env.start_edge()
    env.start_agent("pump-2")
    env.wait_device("pump-2", "online", state="online")
    env.kill_agent("pump-2")
    env.wait_device("pump-2", "offline", state="offline")

    # Set while the device is offline: recorded and published retained, not yet applied.
    row = env.cli("fleet", "set-config", "pump-2", "rate_hz=50", "heartbeat_interval_s=2", "--json")
    assert row["desired_config_revision"] == 1
    assert row["desired_config"] == {"rate_hz": 50, "heartbeat_interval_s": 2}
    assert row["config_in_sync"] is False
    assert _ls_device(env, "pump-2")["config_in_sync"] is False

    # It reconnects: the retained desired config arrives, is applied and reported in its birth.
    env.start_agent("pump-2")
    shown = env.wait_device("pump-2", "config r1 applied", state="online", reported_config_revision=1)
    assert shown["config_in_sync"] is True
    assert shown["reported_config"]["rate_hz"] == 50.0
    assert shown["reported_config"]["heartbeat_interval_s"] == 2.0
    assert shown["config_diff"]["rate_hz"] == {"desired": 50, "reported": 50.0}
    listed = _ls_device(env, "pump-2")
    assert (listed["desired_config_revision"], listed["reported_config_revision"]) == (1, 1)
    assert listed["config_in_sync"] is True
    human = env.cli("fleet", "show", "pump-2")
    assert "rate_hz" in human

    # A value the device refuses: not in sync, and health says why.
    env.cli("fleet", "set-config", "pump-2", "window=0")
    refused = env.wait_device("pump-2", "config r2 refused", reported_config_revision=2)
    assert refused["config_in_sync"] is False
    assert refused["health"].startswith("config refused")
    # Removing the bad key publishes r3, which the device applies (rate 50 stays wanted).
    env.cli("fleet", "set-config", "pump-2", "--unset", "window")
    fixed = env.wait_device("pump-2", "config r3 applied", reported_config_revision=3)
    assert fixed["config_in_sync"] is True
    assert fixed["desired_config"] == {"rate_hz": 50, "heartbeat_interval_s": 2}

    # The registry refuses settings a running device cannot take; nothing is recorded.
    result = CliRunner().invoke(
        edgefleet, ["fleet", "set-config", "pump-2", "device_id=other"], env=env.cli_env
    )
    assert result.exit_code != 0
    assert "cannot be set on a running device" in result.output
    with session_scope(env.settings.resolved_database_url) as session:
        desired = fleet.device_desired_config(session, device_id="pump-2")
        assert desired is not None
        assert desired.revision == 3


def test_device_show_and_desired_config_through_the_api(env: Env) -> None:
    """``fleet show|set-config --api``: the same registry functions over HTTP, audited as the token."""
    env.start_edge()
    env.start_agent("pump-3")
    env.wait_device("pump-3", "online behind edge-1", state="online", edge_id="edge-1")
    token = create_token(database_url=env.settings.resolved_database_url, name="ops-alice")
    with running_api(env.settings) as api:
        through_api = {"EDGEFLEET_API_URL": api, "EDGEFLEET_API_TOKEN": token}
        shown = env.cli("fleet", "show", "pump-3", "--json", env=through_api)
        assert (shown["device_id"], shown["state"], shown["edge_id"]) == ("pump-3", "online", "edge-1")
        assert env.cli("fleet", "show", "edge-1", "--json", env=through_api)["edge_id"] == "edge-1"

        row = env.cli("fleet", "set-config", "pump-3", "rate_hz=20", "--json", env=through_api)
        assert (row["desired_config_revision"], row["desired_config"]) == (1, {"rate_hz": 20})
        applied = env.wait_device("pump-3", "config r1 applied", reported_config_revision=1)
        assert applied["config_in_sync"] is True
        assert applied["reported_config"]["rate_hz"] == 20.0

        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=api, timeout=30) as client:
            audit = client.get("/v1/audit", params={"action": "device_config"}, headers=headers).json()
            assert audit[0]["actor"] == "api:ops-alice"
            assert audit[0]["target"] == "pump-3"
            path = "/v1/fleet/devices/pump-3/config"
            assert client.put(path, json={"set": {"rate_hz": 5}}).status_code == 401
            refused = client.put(path, json={"set": {"device_id": "x"}}, headers=headers)
            assert refused.status_code == 400
            assert "cannot be set on a running device" in refused.json()["detail"]
            assert client.put(path, json={"rate_hz": 5}, headers=headers).status_code == 422
            assert client.get("/v1/fleet/devices/nobody", headers=headers).status_code == 404

        missing = CliRunner().invoke(
            edgefleet, ["fleet", "show", "nobody"], env={**env.cli_env, **through_api}
        )
        assert missing.exit_code != 0
        assert "no edge or device nobody" in missing.output
    with session_scope(env.settings.resolved_database_url) as session:
        desired = fleet.device_desired_config(session, device_id="pump-3")
        assert desired is not None
        assert desired.revision == 1  # the refused and malformed requests recorded nothing


def test_config_recorded_while_the_broker_is_down_is_published_by_beat(
    env: Env, redis_server: RedisServer
) -> None:
    """The broker does not take a new revision: it is recorded unpublished, the CLI says so, and the
    cloud's beat (a real Celery worker with ``-B``) publishes it once the broker answers; the
    device applies it. Then the retained message is lost (as when a broker without persistence
    restarts) and the device restarts from its own file: beat sends the revision again."""
    env.start_edge()
    env.start_agent("pump-4")
    env.wait_device("pump-4", "online", state="online")

    unreachable = env.settings.model_copy(
        update={"broker": MqttSettings(url=f"mqtt://127.0.0.1:{free_port()}")}
    )
    with pytest.raises(DeviceConfigUnpublishedError, match="recorded but not published"):
        set_device_config(settings=unreachable, device_id="pump-4", changes={"rate_hz": 25})
    with session_scope(env.settings.resolved_database_url) as session:
        assert [r.device_id for r in fleet.unpublished_device_configs(session)] == ["pump-4"]
    assert env.device("pump-4") is not None

    worker_env = {
        **os.environ,
        **env.cli_env,
        "EDGEFLEET_REDIS_URL": redis_server.url,
        "EDGEFLEET_DEV_MODE": "true",
        "EDGEFLEET_DEVICE_CONFIG_CHECK_S": "1",
        "EDGEFLEET_DEVICE_CONFIG_STALE_S": "3",
    }
    worker_log = env.tmp_path / "worker.log"
    with celery_worker(worker_env, worker_log, name="devcfg", beat_schedule=env.tmp_path / "beat"):
        applied = env.wait_device("pump-4", "config r1 applied", reported_config_revision=1)
        assert applied["config_in_sync"] is True
        assert applied["reported_config"]["rate_hz"] == 25.0
        assert applied["desired_config_published_at"] is not None

        env.kill_agent("pump-4")
        env.wait_device("pump-4", "offline", state="offline")
        _clear_retained(env.broker.url, Topics().device_desired("pump-4"))
        env.start_agent("pump-4")
        env.wait_device("pump-4", "back online", state="online")
        again = env.wait_device("pump-4", "r1 sent again and applied", reported_config_revision=1)
        assert again["config_in_sync"] is True
        assert again["reported_config"]["rate_hz"] == 25.0
    # Beat's own record: r1 published when the broker was back, and again after the loss.
    sent = worker_log.read_text(errors="replace").count("desired config r1 republished to pump-4")
    assert sent >= 2, worker_log.read_text(errors="replace")[-3000:]
    with session_scope(env.settings.resolved_database_url) as session:
        assert fleet.unpublished_device_configs(session) == []


def _clear_retained(broker_url: str, topic: str) -> None:
    """Delete a retained message (an empty retained publish), as a broker restarted without
    persistence would have forgotten it."""
    link = MqttLink(MqttSettings(url=broker_url), client_id=f"clear-{os.getpid()}")
    link.connect()
    try:
        assert link.publish(topic, b"", qos=1, retain=True).wait(WAIT_S), "the broker's PUBACK"
    finally:
        link.stop()
