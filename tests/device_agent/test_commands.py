"""Commands to a running agent over a real mosquitto: round trips, bad input, expiry, duplicates."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from device_agent.agent import Agent
from shared.codec import decode_window
from shared.mqtt import MqttLink
from shared.schemas import Command, CommandName, encode_message
from shared.settings import MqttSettings
from tests.device_agent.test_agent import TOPICS, Receiver, agent_settings, wait_for
from tests.support.brokers import Mosquitto

DEVICE = "dev-c"


class Operator:
    """Publishes commands to the device and collects acks (via a Receiver on the device's topics)."""

    def __init__(self, url: str) -> None:
        self.rx = Receiver(url, DEVICE, client_id="test-operator")
        self.link = MqttLink(MqttSettings(url=url), client_id="test-operator-pub")
        self.link.connect()

    def send_raw(self, payload: bytes) -> None:
        self.link.publish(TOPICS.command(DEVICE), payload, qos=1)

    def send(self, command: Command) -> dict[str, Any]:
        self.send_raw(encode_message(command))
        return self.ack(command.command_id)

    def command(self, name: str, args: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
        return self.send(Command.create(device_id=DEVICE, name=name, args=args or {}, sender="test", **kw))

    def acks_for(self, command_id: str) -> list[dict[str, Any]]:
        self.rx.poll()
        return [a for a in self.rx.acks if a["command_id"] == command_id]

    def ack(self, command_id: str, nth: int = 1) -> dict[str, Any]:
        wait_for(lambda: len(self.acks_for(command_id)) >= nth, 30, f"ack #{nth} of {command_id}")
        return self.acks_for(command_id)[nth - 1]

    def stop(self) -> None:
        self.link.stop()
        self.rx.stop()


@pytest.fixture
def operator(mosquitto: Mosquitto) -> Iterator[Operator]:
    op = Operator(mosquitto.url)
    yield op
    op.stop()


def start_agent(url: str, data_dir: Path, operator: Operator) -> Agent:
    """Start an agent and wait for its birth: it publishes the birth after subscribing to commands."""
    operator.rx.poll()
    births = len(operator.rx.status)
    agent = Agent(agent_settings(url, data_dir, device_id=DEVICE, heartbeat_interval_s=0.2))
    agent.start()
    wait_for(
        lambda: (operator.rx.poll(), any(s.state == "online" for s in operator.rx.status[births:]))[1],
        30,
        "the agent's birth",
    )
    return agent


def test_command_round_trips(mosquitto: Mosquitto, tmp_path: Path, operator: Operator):
    agent = start_agent(mosquitto.url, tmp_path / "agent", operator)
    try:
        ack = operator.command("ping")
        assert ack["status"] == "ok"
        assert ack["ok"] is True
        assert ack["result"]["pong"] is True
        assert ack["device_id"] == DEVICE

        ack = operator.command("set_rate", {"rate_hz": 500.0})
        assert ack["status"] == "ok", ack
        ack = operator.command("set_window", {"window": 25, "hop": 20})
        assert ack["status"] == "ok", ack
        wait_for(
            lambda: (
                operator.rx.poll(),
                any(s.window == 25 and s.rate_hz == 500.0 and s.hop == 20 for s in operator.rx.status),
            )[1],
            10,
            "a new birth with the new rate and window",
        )
        before = agent.outbox.next_seq if agent.outbox else 0
        wait_for(
            lambda: operator.rx.seqs() and max(operator.rx.seqs()) > before + 3, what="windows at 500 Hz"
        )
        latest = decode_window(operator.rx.payloads[max(operator.rx.seqs())])
        assert latest.sample_rate_hz == 500.0
        assert latest.values.shape == (25, 3)

        ack = operator.command("inject_fault", {"fault": "bearing_fault", "severity": 0.8})
        assert ack["status"] == "ok", ack
        mark = agent.outbox.next_seq if agent.outbox else 0
        wait_for(
            lambda: (
                any(s > mark + 1 and lab == "bearing_fault" for s, lab in operator.rx.labels.items())
                if operator.rx.seqs()
                else False
            ),
            what="windows labelled bearing_fault",
        )
        ack = operator.command("clear_fault")
        assert ack["status"] == "ok"

        ack = operator.command("set_config", {"sensor": {"options": {"drift": 0.5}}, "send_labels": True})
        assert ack["status"] == "ok", ack
        assert ack["result"]["changed"]["sensor"]["options"]["drift"] == 0.5

        ack = operator.command("actuate", {"action": "stop_motor"})
        assert ack["status"] == "ok"
        assert ack["result"] == {"target": "motor", "state": "stopped"}
        wait_for(
            lambda: (
                operator.rx.poll(),
                any(h.actuators.get("motor") == "stopped" for h in operator.rx.heartbeats),
            )[1],
            10,
            "the actuator state in a heartbeat",
        )
        ack = operator.command("restart_sensor")
        assert ack["status"] == "ok"
    finally:
        agent.shutdown()


def test_bad_commands_get_error_acks_and_never_crash(
    mosquitto: Mosquitto, tmp_path: Path, operator: Operator
):
    agent = start_agent(mosquitto.url, tmp_path / "agent", operator)
    try:
        operator.send_raw(b"{not json")  # no id to ack: counted, logged
        operator.send_raw(b"\xff\xfe")
        operator.send_raw(json.dumps({"command_id": "bad-1", "name": "ping"}).encode())  # missing fields
        ack = operator.ack("bad-1")
        assert ack["status"] == "error"
        assert "device_id" in ack["error"]

        unknown = Command.create(device_id=DEVICE, name="ping").model_dump(mode="json")
        unknown.update(command_id="unknown-1", name="self_destruct")
        operator.send_raw(json.dumps(unknown).encode())
        ack = operator.ack("unknown-1")
        assert ack["status"] == "error"
        assert "name" in ack["error"]

        now = time.time()
        expired = Command(device_id=DEVICE, name=CommandName.PING, issued_at=now - 20, expires_at=now - 10)
        ack = operator.send(expired)
        assert ack["status"] == "expired"
        assert ack["ok"] is False

        other = Command.create(device_id="someone-else", name="ping")
        ack = operator.send(other)
        assert ack["status"] == "rejected"
        assert "someone-else" in ack["error"]

        ack = operator.command("set_config", {"broker": {"url": "mqtt://evil:1883"}})
        assert ack["status"] == "error"
        assert "cannot change at runtime" in ack["error"]
        ack = operator.command("set_config", {"rate_hz": -5})
        assert ack["status"] == "error"
        assert "rate_hz" in ack["error"]
        ack = operator.command("set_config", {"no_such_setting": 1})
        assert "unknown setting" in ack["error"]
        ack = operator.command("set_rate", {"hz": 3})
        assert ack["status"] == "error"
        assert "rate_hz" in ack["error"]
        ack = operator.command("inject_fault", {"fault": "gremlins"})
        assert "unknown fault" in ack["error"]
        ack = operator.command("actuate", {"action": "launch"})
        assert "unknown action" in ack["error"]

        ack = operator.command("ping")  # still alive, and it counted the unackable payloads
        assert ack["status"] == "ok"
        assert ack["result"]["commands"]["unackable"] == 2
    finally:
        agent.shutdown()


def test_duplicate_command_runs_once_even_across_restart(
    mosquitto: Mosquitto, tmp_path: Path, operator: Operator
):
    agent = start_agent(mosquitto.url, tmp_path / "agent", operator)
    cmd = Command.create(
        device_id=DEVICE, name="actuate", args={"action": "set", "target": "fan", "state": "on"}
    )
    try:
        first = operator.send(cmd)
        assert first["status"] == "ok"
        assert first["duplicate"] is False
        operator.send_raw(encode_message(cmd))
        second = operator.ack(cmd.command_id, nth=2)
        assert second["duplicate"] is True
        assert second["result"] == first["result"]
        executed = operator.command("ping")["result"]["commands"]["executed"]
        assert executed == 1  # the actuate, once (ping counts after its own ack is built)
    finally:
        agent.shutdown()
    agent = start_agent(mosquitto.url, tmp_path / "agent", operator)
    try:
        operator.send_raw(encode_message(cmd))
        third = operator.ack(cmd.command_id, nth=3)
        assert third["duplicate"] is True
        assert third["status"] == "ok"
        assert agent.actuator.states == {"fan": "on"}  # restored from disk, not re-run
        assert operator.command("ping")["result"]["commands"]["executed"] == 0
    finally:
        agent.shutdown()
