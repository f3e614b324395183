"""The device agent against a real mosquitto: delivery, order, outages, kill -9, bounds, imports."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from device_agent.agent import Agent
from device_agent.outbox import DROP_FULL
from shared.codec import decode_window
from shared.mqtt import MqttLink
from shared.schemas import DeviceStatus, Heartbeat, OnlineState, decode_message
from shared.settings import AgentSettings, MqttSettings, load_settings
from shared.topics import DeviceTopic, Topics
from tests.support.brokers import Mosquitto

TOPICS = Topics()
REPO = Path(__file__).resolve().parents[2]


def wait_for(predicate: Callable[[], bool], timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class Receiver:
    """A subscriber with a persistent QoS1 session (as an edge node holds) on one device's topics."""

    def __init__(self, url: str, device_id: str, client_id: str = "test-receiver") -> None:
        self.device_id = device_id
        self.link = MqttLink(
            MqttSettings(url=url, reconnect_max_s=2.0), client_id=client_id, clean_session=False
        )
        self.link.subscribe(TOPICS.device_filter(device_id, None), qos=1)
        self.link.connect()
        self.payloads: dict[int, bytes] = {}
        self.arrivals: list[int] = []
        self.duplicates = 0
        self.labels: dict[int, str | None] = {}
        self.heartbeats: list[Heartbeat] = []
        self.status: list[DeviceStatus] = []
        self.acks: list[Any] = []

    def poll(self) -> None:
        while not self.link.inbox.empty():
            msg = self.link.inbox.get()
            kind = TOPICS.parse(msg.topic).kind
            if kind is DeviceTopic.TELEMETRY:
                window = decode_window(msg.payload)
                if window.seq in self.payloads:
                    self.duplicates += 1
                    # at-least-once redelivery of the very same window, nothing else
                    assert self.payloads[window.seq] == msg.payload, f"seq {window.seq} reused"
                else:
                    self.payloads[window.seq] = msg.payload
                    self.labels[window.seq] = window.label
                self.arrivals.append(window.seq)
            elif kind is DeviceTopic.HEALTH:
                self.heartbeats.append(decode_message(msg.payload, Heartbeat))
            elif kind is DeviceTopic.STATUS:
                self.status.append(decode_message(msg.payload, DeviceStatus))
            elif kind is DeviceTopic.ACK:
                self.acks.append(json.loads(msg.payload))

    def seqs(self) -> set[int]:
        self.poll()
        return set(self.payloads)

    def contiguous_upto(self) -> int:
        """Highest n such that every seq 0..n has arrived (-1 if none)."""
        got = self.seqs()
        n = -1
        while n + 1 in got:
            n += 1
        return n

    def stop(self) -> None:
        self.link.stop()


@pytest.fixture
def receiver_factory() -> Iterator[Callable[..., Receiver]]:
    made: list[Receiver] = []

    def make(url: str, device_id: str, client_id: str = "test-receiver") -> Receiver:
        r = Receiver(url, device_id, client_id)
        made.append(r)
        return r

    yield make
    for r in made:
        r.stop()


def agent_settings(url: str, data_dir: Path, device_id: str = "dev-1", **extra: Any) -> AgentSettings:
    values: dict[str, Any] = {
        "device_id": device_id,
        "broker": {"url": url, "reconnect_max_s": 2.0},
        "data_dir": data_dir,
        "rate_hz": 1000.0,
        "window": 50,
        "sensor": {"kind": "simulated", "options": {"seed": 1}},
    }
    values.update(extra)
    return load_settings(AgentSettings, None, **values)


def assert_in_order(arrivals: list[int]) -> None:
    """Each first arrival of a seq comes after every lower seq's first arrival."""
    firsts: list[int] = []
    seen: set[int] = set()
    for s in arrivals:
        if s not in seen:
            seen.add(s)
            firsts.append(s)
    assert firsts == sorted(firsts)


def test_agent_publishes_windows_in_order(mosquitto: Mosquitto, tmp_path: Path, receiver_factory):
    rx = receiver_factory(mosquitto.url, "dev-1")
    agent = Agent(agent_settings(mosquitto.url, tmp_path / "agent"))
    agent.start()
    try:
        wait_for(lambda: rx.contiguous_upto() >= 59, what="60 windows")
    finally:
        agent.shutdown()
    rx.poll()
    assert rx.arrivals[:60] == list(range(60))
    windows = [decode_window(rx.payloads[s]) for s in range(60)]
    assert all(w.device_id == "dev-1" and w.channels == ("x", "y", "z") for w in windows)
    assert all(w.values.shape == (50, 3) and w.sample_rate_hz == 1000.0 for w in windows)
    assert all(w.label == "normal" for w in windows)
    steps = [b.ts - a.ts for a, b in itertools.pairwise(windows)]
    assert steps == pytest.approx([0.05] * 59, abs=1e-6)  # timestamps from the sample clock
    online = [s for s in rx.status if s.state is OnlineState.ONLINE]
    assert online
    assert online[0].sensor == "simulated"
    assert online[0].window == 50
    assert online[0].channels == ("x", "y", "z")
    wait_for(lambda: (rx.poll(), any(s.reason == "shutdown" for s in rx.status))[1], 10, "offline status")


def test_broker_restart_loses_nothing(mosquitto: Mosquitto, tmp_path: Path, receiver_factory):
    rx = receiver_factory(mosquitto.url, "dev-1")
    agent = Agent(agent_settings(mosquitto.url, tmp_path / "agent"))
    agent.start()
    try:
        wait_for(lambda: rx.contiguous_upto() >= 20, what="first windows")
        mosquitto.restart(down_for=1.5)
        assert agent.outbox is not None
        target = agent.outbox.next_seq + 60  # well past the outage
        wait_for(lambda: rx.contiguous_upto() >= target, 90, "every window through the outage")
    finally:
        agent.shutdown()
    received = rx.seqs()
    assert set(range(target + 1)) <= received
    assert_in_order(rx.arrivals)


def write_config(path: Path, url: str, data_dir: Path, **extra: Any) -> Path:
    config = {
        "device_id": "dev-k",
        "broker": {"url": url, "reconnect_max_s": 2.0},
        "data_dir": str(data_dir),
        "rate_hz": 1000.0,
        "window": 50,
        "heartbeat_interval_s": 0.5,
        "sensor": {"kind": "simulated", "options": {"seed": 3}},
    }
    config.update(extra)
    path.write_text(yaml.safe_dump(config))
    return path


def spawn_agent(config: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with log.open("ab") as handle:
        return subprocess.Popen(
            [sys.executable, "-m", "device_agent", "run", "--config", str(config)],
            stdout=handle,
            stderr=handle,
            env=env,
            cwd=REPO,
        )


def test_kill9_restart_resumes_outbox_and_seq(mosquitto: Mosquitto, tmp_path: Path, receiver_factory):
    rx = receiver_factory(mosquitto.url, "dev-k")
    config = write_config(tmp_path / "agent.yaml", mosquitto.url, tmp_path / "agent")
    log = tmp_path / "agent.log"
    proc = spawn_agent(config, log)
    try:
        wait_for(lambda: rx.contiguous_upto() >= 30, what="first windows")
        # Take the broker away so windows pile up in the outbox, then kill -9 the agent.
        mosquitto.stop()
        time.sleep(0.5)
        proc.kill()
        proc.wait()
        before = rx.contiguous_upto()
        mosquitto.start()
        proc = spawn_agent(config, log)
        wait_for(lambda: rx.contiguous_upto() >= before + 100, 90, "outbox drained and new windows")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    wait_for(lambda: (rx.poll(), any(s.reason == "shutdown" for s in rx.status))[1], 10, "offline status")
    received = rx.seqs()
    top = max(received)
    assert set(range(top + 1)) == received, "a window was lost"
    assert_in_order(rx.arrivals)
    # the window stuck in the outbox at kill time came from the first run, published by the second
    text = log.read_text()
    assert "windows pending from before" in text, text[-3000:]


def test_outbox_bound_drop_counted_in_heartbeat(mosquitto: Mosquitto, tmp_path: Path, receiver_factory):
    rx = receiver_factory(mosquitto.url, "dev-1")
    settings = agent_settings(
        mosquitto.url,
        tmp_path / "agent",
        rate_hz=2000.0,
        window=20,
        outbox_max_windows=10,
        max_in_flight=3,
        heartbeat_interval_s=0.2,
    )
    agent = Agent(settings)
    agent.start()
    try:
        wait_for(lambda: rx.contiguous_upto() >= 10, what="first windows")
        mosquitto.stop()
        assert agent.outbox is not None
        wait_for(lambda: agent.outbox is not None and agent.outbox.dropped >= 20, what="drops while offline")
        mosquitto.start()

        def heartbeat_shows_drops() -> bool:
            rx.poll()
            return any(h.dropped_by_reason.get(DROP_FULL, 0) >= 20 for h in rx.heartbeats)

        wait_for(heartbeat_shows_drops, 30, "a heartbeat reporting the drops")
        # Slow the sensor to one window a second so a stall on a loaded machine cannot overflow the
        # outbox again while we settle the accounting: then every drop happened before `target`.
        agent.set_config({"rate_hz": 20.0})
        wait_for(lambda: agent.outbox is not None and agent.outbox.depth <= 2, 60, "the outbox to drain")
        target = agent.outbox.next_seq + 2
        wait_for(
            lambda: rx.contiguous_upto() >= 0 and max(rx.seqs()) >= target, 60, "delivery after the outage"
        )
        dropped = agent.outbox.drops[DROP_FULL]
    finally:
        agent.shutdown()
    beat = next(h for h in reversed(rx.heartbeats) if h.dropped_windows)
    assert beat.dropped_windows == sum(beat.dropped_by_reason.values())
    assert beat.rss_mb > 0
    # Exact accounting: every seq below the newest delivered one arrived or was counted as dropped.
    received = rx.seqs()
    missing = set(range(target)) - received
    assert len(missing) == dropped


def test_agent_imports_no_numpy_or_tensorflow(mosquitto: Mosquitto, tmp_path: Path, receiver_factory):
    receiver_factory(mosquitto.url, "dev-imp")  # a subscriber: else no window is ever delivered
    script = f"""
import json, sys, time
import device_agent.agent, device_agent.cli
from device_agent.agent import Agent
from shared.settings import AgentSettings, load_settings
settings = load_settings(AgentSettings, None, device_id="dev-imp", broker={{"url": "{mosquitto.url}"}},
                         data_dir="{tmp_path / "agent"}", rate_hz=1000.0, window=50)
agent = Agent(settings)
agent.start()
deadline = time.monotonic() + 60
while agent.acked_windows < 3 and time.monotonic() < deadline:
    time.sleep(0.05)
acked = agent.acked_windows
agent.shutdown()
HEAVY = ("numpy", "tensorflow", "keras", "cryptography", "scipy")
heavy = sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)
print(json.dumps({{"acked": acked, "heavy": heavy}}))
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["acked"] >= 3
    assert result["heavy"] == []


def test_agent_started_while_broker_is_down_delivers_later(
    mosquitto: Mosquitto, tmp_path: Path, receiver_factory
):
    rx = receiver_factory(mosquitto.url, "dev-1")  # its persistent session exists before the outage
    mosquitto.stop()
    agent = Agent(agent_settings(mosquitto.url, tmp_path / "agent"))
    agent.start()  # no broker: it samples into the outbox
    try:
        wait_for(
            lambda: agent.outbox is not None and agent.outbox.depth >= 20, what="windows buffered offline"
        )
        mosquitto.start()
        wait_for(lambda: rx.contiguous_upto() >= 40, 60, "buffered and new windows")
    finally:
        agent.shutdown()
    assert_in_order(rx.arrivals)


def _shared_receiver(url: str, device_id: str) -> MqttLink:
    link = MqttLink(
        MqttSettings(url=url, reconnect_max_s=2.0), client_id="test-edge-like", clean_session=False
    )
    link.subscribe(Topics.shared("site", TOPICS.telemetry(device_id)), qos=1)
    return link


def test_windows_no_subscriber_took_stay_in_the_outbox(mosquitto: Mosquitto, tmp_path: Path):
    """With nobody subscribed (as after a broker restart: mosquitto restores persistent sessions but
    not their shared subscriptions) the broker PUBACKs with "no matching subscribers" (MQTT 5); the
    agent keeps those windows and sends them again, so a subscriber that comes late gets them all."""
    agent = Agent(agent_settings(mosquitto.url, tmp_path / "agent", heartbeat_interval_s=0.5))
    agent.start()
    link = _shared_receiver(mosquitto.url, "dev-1")
    try:
        wait_for(lambda: agent.unrouted_windows >= 5, what="windows routed to nobody")
        assert agent.outbox is not None
        assert agent.outbox.depth >= 5  # kept, not acknowledged away
        assert agent.acked_windows == 0
        link.connect()
        assert link.wait_subscribed(10)
        target = agent.outbox.next_seq + 20
        seen: set[int] = set()

        def drained() -> bool:
            while not link.inbox.empty():
                seen.add(decode_window(link.inbox.get().payload).seq)
            return set(range(target + 1)) <= seen

        wait_for(drained, 60, "every window, the unrouted ones included")
        assert agent.heartbeat().unrouted_windows >= 5
    finally:
        agent.shutdown()
        link.stop()


def test_without_hold_unrouted_a_puback_means_delivered(mosquitto: Mosquitto, tmp_path: Path):
    """The MQTT 3.1.1 behaviour it replaces: windows nobody subscribed to are acknowledged and gone."""
    settings = agent_settings(mosquitto.url, tmp_path / "agent", hold_unrouted=False)
    agent = Agent(settings)
    agent.start()
    try:
        wait_for(lambda: agent.acked_windows >= 5, what="acknowledged windows")
        assert agent.unrouted_windows == 0
    finally:
        agent.shutdown()
