"""Split brokers: a site mosquitto bridged to a cloud mosquitto with the configuration
``edgefleet edge bridge-config`` prints. Devices speak only to the site broker, the cloud (ingest,
``command send``, ``fleet set-config``) only to the cloud broker:

- the device's status (birth and LWT) crosses up, so the registry sees it online and offline;
- a command crosses down and its ack up, recorded by the sender;
- a desired config set while the device is offline reaches it (retained through the bridge) when it
  reconnects, and what it reports comes back up;
- a command sent while the site broker is down waits in the bridge's session on the cloud broker and
  runs when the site is back;
- telemetry stays on the site."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from cloud.ingest import Ingest
from cloud.registry import fleet
from cloud.registry.db import session_scope
from cloud.registry.models import CommandRecord
from shared.bridge import bridged_topics, mosquitto_bridge_config
from shared.cli import cli as edgefleet
from shared.errors import ConfigError
from shared.mqtt import MqttLink
from shared.settings import MqttSettings
from shared.settings.cloud import CloudSettings
from shared.topics import DeviceTopic, Topics
from tests.support.agent_process import start_agent_process
from tests.support.brokers import Mosquitto
from tests.support.edge_fixtures import wait_for

WAIT_S = 30.0
DEVICE = "pump-b"


class SplitBrokers:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.cloud_broker = Mosquitto(workdir=tmp_path / "cloud-broker")
        self.cloud_broker.start()
        result = CliRunner().invoke(
            edgefleet,
            ["edge", "bridge-config", "--cloud-broker", self.cloud_broker.url, "--name", "site-test"],
        )
        assert result.exit_code == 0, result.output
        self.bridge_conf = result.output
        self.site_broker = Mosquitto(workdir=tmp_path / "site-broker", extra_conf=self.bridge_conf)
        self.site_broker.start()
        self.settings = CloudSettings(
            data_dir=tmp_path / "cloud",
            database_url=f"sqlite:///{tmp_path / 'registry.db'}",
            broker=MqttSettings(url=self.cloud_broker.url),
        )
        self.cli_env = {
            "EDGEFLEET_DATABASE_URL": self.settings.resolved_database_url,
            "EDGEFLEET_DATA_DIR": str(tmp_path / "cloud"),
            "EDGEFLEET_BROKER__URL": self.cloud_broker.url,
        }
        self.ingest = Ingest(self.settings)
        self.ingest_thread = threading.Thread(target=self.ingest.run, daemon=True)
        self.ingest_thread.start()
        self.agent: subprocess.Popen[bytes] | None = None

    def start_agent(self) -> None:
        self.agent = start_agent_process(
            DEVICE, self.site_broker.url, self.tmp_path / DEVICE, self.tmp_path / "agent.log"
        )

    def kill_agent(self) -> None:
        if self.agent is not None:
            self.agent.send_signal(signal.SIGKILL)
            self.agent.wait(10)
            self.agent = None

    def cli(self, *args: str) -> Any:
        result = CliRunner().invoke(edgefleet, list(args), env=self.cli_env)
        assert result.exit_code == 0, result.output
        return json.loads(result.output) if "--json" in args else result.output

    def wait_device(self, what: str, **expected: Any) -> dict[str, Any]:
        def matches() -> dict[str, Any] | None:
            with session_scope(self.settings.resolved_database_url) as session:
                if fleet.get_device(session, device_id=DEVICE) is None:
                    return None
                row = fleet.fleet_device(session, device_id=DEVICE)
            return row if all(row.get(k) == v for k, v in expected.items()) else None

        try:
            found: dict[str, Any] = wait_for(matches, f"{DEVICE}: {what}", WAIT_S)
        except AssertionError:
            for log in (
                self.tmp_path / "agent.log",
                self.site_broker.log_path,
                self.cloud_broker.log_path,
            ):
                if log.exists():
                    print(log, log.read_text(errors="replace")[-2000:])
            raise
        return found

    def close(self) -> None:
        self.kill_agent()
        self.ingest.stop_event.set()
        self.ingest_thread.join(10)
        self.ingest.close()
        self.site_broker.stop()
        self.cloud_broker.stop()


@pytest.fixture
def split(tmp_path: Path) -> Iterator[SplitBrokers]:
    state = SplitBrokers(tmp_path)
    try:
        wait_for(lambda: state.ingest.link.connected, "the ingest connected")
        yield state
    finally:
        state.close()


def _telemetry_on(url: str, seconds: float) -> int:
    """How many telemetry messages a subscriber on ``url`` sees in ``seconds``."""
    link = MqttLink(MqttSettings(url=url), client_id=f"probe-{os.getpid()}-{time.monotonic_ns()}")
    link.subscribe(Topics().all_devices(DeviceTopic.TELEMETRY))
    link.connect()
    try:
        assert link.wait_subscribed(), "the probe's subscription was not confirmed"
        seen = 0
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                link.inbox.get(timeout=left)
                seen += 1
            except queue.Empty:
                break
        return seen
    finally:
        link.stop()


def test_commands_status_and_desired_config_cross_the_site_bridge(split: SplitBrokers) -> None:
    split.start_agent()
    split.wait_device("online through the bridge", state="online")

    report = split.cli("command", "send", DEVICE, "ping", "--wait", "30", "--json")
    assert report["summary"] == {"targets": 1, "acked": 1, "failed": 0, "timed_out": 0}

    split.kill_agent()
    split.wait_device("offline by its last will, through the bridge", state="offline", reason="lwt")
    row = split.cli("fleet", "set-config", DEVICE, "rate_hz=20", "--json")
    assert (row["desired_config_revision"], row["config_in_sync"]) == (1, False)

    split.start_agent()
    applied = split.wait_device("config r1 applied", state="online", reported_config_revision=1)
    assert applied["config_in_sync"] is True
    assert applied["reported_config"]["rate_hz"] == 20.0

    # The site is cut off: a command sent meanwhile waits in the bridge's session on the cloud broker
    # and runs when the site is back; the ingest records its late ack.
    split.site_broker.stop()
    result = CliRunner().invoke(
        edgefleet, ["command", "send", DEVICE, "ping", "--wait", "0.5", "--json"], env=split.cli_env
    )
    assert result.exit_code == 1, result.output  # not acked yet
    command_id = json.loads(result.output)["outcomes"][0]["command_id"]
    split.site_broker.start()

    def acked() -> bool:
        with session_scope(split.settings.resolved_database_url) as session:
            record = session.scalar(select(CommandRecord).where(CommandRecord.command_id == command_id))
            return record is not None and record.ack_status == "ok"

    wait_for(acked, "the command sent while the site was cut off to be acked", WAIT_S)

    # At rate_hz=20 and 50-sample windows the device sends a window every 2.5 s.
    assert _telemetry_on(split.site_broker.url, 10.0) > 0
    assert _telemetry_on(split.cloud_broker.url, 6.0) == 0  # telemetry stays on the site


def test_bridge_config_follows_the_prefix_and_refuses_bad_input() -> None:
    cloud = MqttSettings(url="mqtts://site-a:secret@cloud.example:8883", topic_prefix="acme/v1")
    text = mosquitto_bridge_config(cloud=cloud, name="site-a")
    assert "address cloud.example:8883" in text
    assert "remote_username site-a" in text
    assert "bridge_capath /etc/ssl/certs" in text
    assert [line for line in text.splitlines() if line.startswith("topic ")] == [
        "topic acme/v1/dev/+/cmd in 1",
        "topic acme/v1/dev/+/desired in 1",
        "topic acme/v1/dev/+/ack out 1",
        "topic acme/v1/dev/+/status out 1",
    ]
    assert len(bridged_topics(Topics())) == 4
    with pytest.raises(ConfigError, match="bridge name"):
        mosquitto_bridge_config(cloud=cloud, name="site a")
    result = CliRunner().invoke(
        edgefleet, ["edge", "bridge-config", "--cloud-broker", "http://x", "--name", "site-a"]
    )
    assert result.exit_code != 0
    assert "scheme must be mqtt" in result.output
