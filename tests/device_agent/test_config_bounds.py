"""A device refuses settings and command arguments beyond their upper bounds, saying which and why:
in the command's ack, or as its desired config's ``config_error``."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from device_agent.actuators import MAX_ACTUATOR_TARGETS
from device_agent.agent import Agent
from device_agent.errors import CommandError
from shared.schemas import (
    MAX_ARG_NAME,
    MAX_HEARTBEAT_INTERVAL_S,
    MAX_OUTBOX_WINDOWS,
    MAX_RATE_HZ,
    DeviceDesired,
    encode_message,
)
from tests.device_agent.test_agent import TOPICS, agent_settings, wait_for
from tests.device_agent.test_commands import DEVICE, Operator, operator, start_agent  # noqa: F401  (fixture)
from tests.support.brokers import Mosquitto


def raw_command(command_id: str, name: str, args: dict[str, Any]) -> bytes:
    """A command as a sender that skipped the contract's checks would publish it."""
    now = time.time()
    return json.dumps(
        {
            "type": "command",
            "command_id": command_id,
            "device_id": DEVICE,
            "name": name,
            "args": args,
            "issued_at": now,
            "expires_at": now + 60,
        }
    ).encode()


def test_set_config_beyond_a_limit_is_refused_naming_the_setting_and_the_limit(tmp_path: Path) -> None:
    agent = Agent(agent_settings("mqtt://127.0.0.1:1", tmp_path / "agent", device_id=DEVICE))
    before = agent.settings
    cases = {
        "outbox_max_windows": (10**12, str(MAX_OUTBOX_WINDOWS)),
        "heartbeat_interval_s": (1e12, str(int(MAX_HEARTBEAT_INTERVAL_S))),
        "rate_hz": (1e7, str(int(MAX_RATE_HZ))),
    }
    for field, (value, limit) in cases.items():
        with pytest.raises(CommandError) as refused:
            agent.set_config({field: value})
        assert f"config.{field}:" in str(refused.value)
        assert limit in str(refused.value)
    assert agent.settings == before  # nothing applied
    assert agent.set_config({"outbox_max_windows": MAX_OUTBOX_WINDOWS})["changed"] == {
        "outbox_max_windows": MAX_OUTBOX_WINDOWS
    }


def test_commands_and_desired_configs_beyond_limits_are_refused_on_receipt(
    mosquitto: Mosquitto,
    tmp_path: Path,
    operator: Operator,  # noqa: F811  (fixture)
) -> None:
    agent = start_agent(mosquitto.url, tmp_path / "agent", operator)
    try:
        operator.send_raw(raw_command("big-1", "set_config", {"outbox_max_windows": 10**12}))
        ack = operator.ack("big-1")
        assert ack["status"] == "error"
        assert "args.outbox_max_windows:" in ack["error"]
        assert str(MAX_OUTBOX_WINDOWS) in ack["error"]

        operator.send_raw(raw_command("big-2", "set_rate", {"rate_hz": 1e9}))
        ack = operator.ack("big-2")
        assert ack["status"] == "error"
        assert "args.rate_hz:" in ack["error"]
        assert str(int(MAX_RATE_HZ)) in ack["error"]

        operator.send_raw(
            raw_command("big-3", "actuate", {"action": "set", "target": "t" * 500, "state": "x"})
        )
        ack = operator.ack("big-3")
        assert ack["status"] == "error"
        assert "args.target:" in ack["error"]
        assert str(MAX_ARG_NAME) in ack["error"]

        # Targets within their length but too many of them: the actuator state stays bounded.
        for i in range(MAX_ACTUATOR_TARGETS):
            assert operator.command("actuate", {"action": "set", "target": f"t{i}", "state": "on"})["ok"]
        ack = operator.command("actuate", {"action": "set", "target": "one-too-many", "state": "on"})
        assert ack["status"] == "error"
        assert "args.target:" in ack["error"]
        assert str(MAX_ACTUATOR_TARGETS) in ack["error"]
        assert len(agent.actuator.states) == MAX_ACTUATOR_TARGETS

        # A desired config is not a Command: the device bounds it when it applies it.
        desired = DeviceDesired(device_id=DEVICE, revision=1, config={"max_in_flight": 10**6})
        operator.link.publish(TOPICS.device_desired(DEVICE), encode_message(desired), qos=1, retain=True)
        wait_for(lambda: agent.config_revision == 1, 30, "the desired config handled")
        assert agent.config_error is not None
        assert "config.max_in_flight:" in agent.config_error
        assert "1000" in agent.config_error
        assert agent.settings.max_in_flight != 10**6
        wait_for(
            lambda: (
                operator.rx.poll(),
                any(s.config_revision == 1 and s.config_error for s in operator.rx.status),
            )[1],
            30,
            "the refusal reported in the birth",
        )
        pong = operator.command("ping")  # and it carries on
        assert pong["status"] == "ok"
        # Its own inbox is bounded too: a flood of commands is dropped and counted, not queued in memory.
        assert agent.link is not None
        assert agent.link.inbox_max == agent.settings.command_inbox_max
        assert pong["result"]["commands"]["inbox_full"] == 0
    finally:
        agent.shutdown()
