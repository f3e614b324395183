"""``edgefleet tail`` against a real mosquitto: JSON fields, --count, filters, bad payloads, sessions."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import click
import pytest

from shared.codec import encode_window
from shared.mqtt import MqttLink
from shared.schemas import Command, Decision, DeviceStatus, Heartbeat, OnlineState, Severity, encode_message
from shared.settings import MqttSettings
from shared.tail import subscription_filters
from shared.topics import EdgeTopic, Topics
from tests.support.brokers import Mosquitto

REPO = Path(__file__).resolve().parents[2]
TOPICS = Topics()
WAIT_S = 20.0


class Tail:
    """``edgefleet tail`` in a subprocess; stdout and stderr read by threads into queues."""

    def __init__(self, *args: str, block_numpy: bool = False) -> None:
        # A suite started in the background by a shell without job control inherits SIGINT ignored,
        # and Python then installs no Ctrl-C handler: give the child the one a terminal's tail has.
        code = "import signal, sys\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
        if block_numpy:
            code += "sys.modules['numpy'] = None  # as on a device with only the agent extra\n"
        code += "from shared.cli import main\nsys.argv = ['edgefleet', *sys.argv[1:]]\nmain()\n"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, "tail", *args],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.out: queue.SimpleQueue[str] = queue.SimpleQueue()
        self.err: queue.SimpleQueue[str] = queue.SimpleQueue()
        self.stderr_lines: list[str] = []
        assert self.proc.stdout is not None
        assert self.proc.stderr is not None
        self._threads = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, self.out), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stderr, self.err), daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    @staticmethod
    def _pump(stream: IO[str], sink: queue.SimpleQueue[str]) -> None:
        for line in stream:
            sink.put(line.rstrip("\n"))

    def wait_stderr(self, needle: str, timeout: float = WAIT_S) -> None:
        while True:
            try:
                line = self.err.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no {needle!r} on stderr; got {self.stderr_lines}") from None
            self.stderr_lines.append(line)
            if needle in line:
                return

    def wait_ready(self) -> None:
        self.wait_stderr("subscribed to")

    def lines(self, n: int, timeout: float = WAIT_S) -> list[str]:
        out = []
        for _ in range(n):
            try:
                out.append(self.out.get(timeout=timeout))
            except queue.Empty:
                raise AssertionError(
                    f"got {len(out)} of {n} lines: {out}; stderr {self.stderr_lines}"
                ) from None
        return out

    def records(self, n: int) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines(n)]

    def wait_exit(self, timeout: float = WAIT_S) -> int:
        code = self.proc.wait(timeout)
        self.close()
        return code

    def interrupt(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        return self.wait_exit()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for thread in self._threads:
            thread.join(5)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def tails() -> Iterator[list[Tail]]:
    started: list[Tail] = []
    yield started
    for tail in started:
        tail.close()


@pytest.fixture
def publisher(mosquitto: Mosquitto) -> Iterator[MqttLink]:
    link = MqttLink(MqttSettings(url=mosquitto.url), client_id="tail-test-publisher")
    link.connect()
    yield link
    link.stop()


def publish_acked(link: MqttLink, topic: str, payload: bytes, retain: bool = False) -> None:
    """Publish at QoS1 and wait until the broker has it (PUBACK)."""
    assert link.publish(topic, payload, qos=1, retain=retain).wait(WAIT_S)


def window(device_id: str, seq: int, **kwargs: Any) -> bytes:
    return encode_window(
        device_id=device_id,
        seq=seq,
        ts=1_700_000_000.0 + seq,
        sample_rate_hz=100.0,
        channels=("x", "y", "z"),
        values=[[0.5, -1.0, 2.0], [1.5, 0.25, -0.5]],
        **kwargs,
    )


def decision(edge_id: str, device_id: str, seq: int) -> bytes:
    return encode_message(
        Decision(
            edge_id=edge_id,
            device_id=device_id,
            rule="stop-on-fault",
            class_name="bearing_fault",
            probability=0.97,
            severity=Severity.HIGH,
            window_seq=seq,
        )
    )


def test_json_records_carry_topic_type_ids_and_seq_and_count_exits(mosquitto, publisher, tails):
    tail = Tail("--broker", mosquitto.url, "--json", "--count", "4")
    tails.append(tail)
    tail.wait_ready()
    status = DeviceStatus(device_id="pump-1", state=OnlineState.ONLINE, sensor="simulated")
    publish_acked(publisher, TOPICS.telemetry("pump-1"), window("pump-1", 7, label="normal"))
    publish_acked(publisher, TOPICS.device_status("pump-1"), encode_message(status), retain=True)
    publish_acked(publisher, TOPICS.edge("edge-a", EdgeTopic.DECISION), decision("edge-a", "pump-1", 7))
    command = Command.create(device_id="pump-1", name="ping", sender="test")
    publish_acked(publisher, TOPICS.command("pump-1"), encode_message(command))
    telemetry, birth, alert, cmd = tail.records(4)
    assert tail.wait_exit() == 0

    assert telemetry["topic"] == "ef/v1/dev/pump-1/telemetry"
    assert telemetry["type"] == "telemetry"
    assert telemetry["device_id"] == "pump-1"
    assert telemetry["seq"] == 7
    assert telemetry["message"]["samples"] == 2
    assert telemetry["message"]["channels"] == ["x", "y", "z"]
    assert telemetry["message"]["label"] == "normal"
    assert "values" not in telemetry["message"]

    assert birth["type"] == "device_status"
    assert birth["message"]["state"] == "online"
    assert "seq" not in birth

    assert alert["type"] == "decision"
    assert alert["edge_id"] == "edge-a"
    assert alert["device_id"] == "pump-1"
    assert alert["seq"] == 7
    assert alert["message"]["class_name"] == "bearing_fault"

    assert cmd["type"] == "command"
    assert cmd["message"]["command_id"] == command.command_id


def test_undecodable_messages_are_printed_and_never_stop_it(mosquitto, publisher, tails):
    tail = Tail("--broker", mosquitto.url, "--json", "--count", "5", "--device", "pump-1")
    tails.append(tail)
    tail.wait_ready()
    heartbeat = Heartbeat(
        device_id="pump-1",
        uptime_s=1,
        sensor="simulated",
        rate_hz=100,
        window=100,
        hop=100,
        next_seq=1,
        outbox_depth=0,
        published_windows=0,
        acked_windows=0,
        dropped_windows=0,
        publish_rate_hz=0,
        cpu_core_fraction=0,
        rss_mb=1,
    )
    publish_acked(publisher, TOPICS.telemetry("pump-1"), b"\x00garbage")
    publish_acked(publisher, TOPICS.ack("pump-1"), b'{"type": "command_ack", "oops"')
    publish_acked(publisher, TOPICS.command("pump-1"), encode_message(heartbeat))  # wrong schema here
    publish_acked(publisher, TOPICS.telemetry("pump-1"), window("pump-2", 1))  # id differs from topic
    publish_acked(publisher, TOPICS.telemetry("pump-1"), window("pump-1", 2))
    records = tail.records(5)
    assert tail.wait_exit() == 0
    assert [r["type"] for r in records] == ["undecodable"] * 4 + ["telemetry"]
    assert "header" in records[0]["error"]
    assert records[0]["size"] == 8
    assert records[0]["device_id"] == "pump-1"
    assert "SchemaError" in records[1]["error"]
    assert "SchemaError" in records[2]["error"]
    assert "device_id" in records[3]["error"]
    assert records[4]["seq"] == 2


def test_device_filter_narrows_device_and_edge_messages(mosquitto, publisher, tails):
    tail = Tail("--broker", mosquitto.url, "--json", "--count", "2", "--device", "pump-1")
    tails.append(tail)
    tail.wait_ready()
    publish_acked(publisher, TOPICS.telemetry("pump-2"), window("pump-2", 1))
    publish_acked(publisher, TOPICS.edge("edge-a", EdgeTopic.DECISION), decision("edge-a", "pump-2", 1))
    publish_acked(publisher, TOPICS.edge("edge-a", EdgeTopic.DECISION), decision("edge-a", "pump-1", 3))
    publish_acked(publisher, TOPICS.telemetry("pump-1"), window("pump-1", 4))
    first, second = tail.records(2)
    assert tail.wait_exit() == 0
    assert (first["type"], first["device_id"], first["seq"]) == ("decision", "pump-1", 3)
    assert (second["type"], second["device_id"], second["seq"]) == ("telemetry", "pump-1", 4)


def test_kind_filter_and_readable_lines_and_ctrl_c_exits_zero(mosquitto, publisher, tails):
    tail = Tail("--broker", mosquitto.url, "--kind", "telemetry")
    tails.append(tail)
    tail.wait_ready()
    publish_acked(publisher, TOPICS.edge("edge-a", EdgeTopic.DECISION), decision("edge-a", "pump-1", 1))
    publish_acked(publisher, TOPICS.telemetry("pump-9"), window("pump-9", 42, label="imbalance"))
    (line,) = tail.lines(1)
    assert "ef/v1/dev/pump-9/telemetry telemetry seq=42" in line
    assert "label=imbalance" in line
    assert "channels=x,y,z" in line
    assert tail.interrupt() == 0
    assert tail.out.empty()  # the decision was never subscribed to


def test_values_without_numpy(mosquitto, publisher, tails):
    """Only the agent extra installed: the codec's ``array`` fallback decodes, int16 included."""
    tail = Tail("--broker", mosquitto.url, "--json", "--values", "--count", "2", block_numpy=True)
    tails.append(tail)
    tail.wait_ready()
    publish_acked(publisher, TOPICS.telemetry("pump-1"), window("pump-1", 1))
    publish_acked(publisher, TOPICS.telemetry("pump-1"), window("pump-1", 2, dtype="int16", scale=0.25))
    as_float, as_int16 = tail.records(2)
    assert tail.wait_exit() == 0
    assert as_float["message"]["values"] == [[0.5, -1.0, 2.0], [1.5, 0.25, -0.5]]
    assert as_int16["message"]["values"] == [[0.5, -1.0, 2.0], [1.5, 0.25, -0.5]]


def test_session_misses_nothing_across_its_own_and_the_brokers_restarts(mosquitto, publisher, tails):
    args = ("--broker", mosquitto.url, "--json", "--session", "ops-1", "--kind", "telemetry")
    first = Tail(*args, "--count", "3")
    tails.append(first)
    first.wait_ready()
    for seq in range(5):  # two more than it will print before exiting: they stay unacknowledged
        publish_acked(publisher, TOPICS.telemetry("pump-1"), window("pump-1", seq))
    assert [r["seq"] for r in first.records(3)] == [0, 1, 2]
    assert first.wait_exit() == 0

    for seq in range(5, 8):  # tail is offline: the broker queues these for the session
        publish_acked(publisher, TOPICS.telemetry("pump-1"), window("pump-1", seq))
    mosquitto.restart()  # ... and keeps them across its own restart (persistence on)
    assert publisher.wait_connected(WAIT_S)
    publish_acked(publisher, TOPICS.telemetry("pump-1"), window("pump-1", 8))

    second = Tail(*args)
    tails.append(second)
    seqs = [r["seq"] for r in second.records(6)]
    assert seqs == [3, 4, 5, 6, 7, 8]

    mosquitto.restart(down_for=0.5)  # while it runs: it reconnects to the same session
    second.wait_stderr("reconnected")
    assert publisher.wait_connected(WAIT_S)
    publish_acked(publisher, TOPICS.telemetry("pump-1"), window("pump-1", 9))
    after: list[int] = []
    while 9 not in after:
        after.extend(r["seq"] for r in second.records(1))
    # At least once: windows printed shortly before the restart may come again (their PUBACKs may
    # still have been in the client's output buffer when the broker stopped), never a gap.
    assert set(after) <= set(range(3, 10)), after
    assert set(seqs) | set(after) == set(range(3, 10))
    assert second.interrupt() == 0


def test_subscription_filters_come_from_topics():
    topics = Topics("site/x")
    assert subscription_filters(topics, device_id=None, edge_id=None, kind="all") == [
        "site/x/dev/+/+",
        "site/x/edge/+/+",
    ]
    assert subscription_filters(topics, device_id="d1", edge_id=None, kind="telemetry") == [
        "site/x/dev/d1/telemetry"
    ]
    assert subscription_filters(topics, device_id=None, edge_id=None, kind="status") == [
        "site/x/dev/+/status",
        "site/x/edge/+/status",
    ]
    assert subscription_filters(topics, device_id=None, edge_id="e1", kind="all") == ["site/x/edge/e1/+"]
    assert subscription_filters(topics, device_id="d1", edge_id=None, kind="decision") == [
        "site/x/edge/+/decision"
    ]
    with pytest.raises(click.UsageError, match="device topic"):
        subscription_filters(topics, device_id=None, edge_id="e1", kind="telemetry")


def test_bad_arguments_are_usage_errors():
    for args in (["--device", "bad/id"], ["--broker", "http://x"], ["--session", "no spaces"]):
        proc = subprocess.run(
            [sys.executable, "-m", "shared.cli", "tail", *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=False,
        )
        assert proc.returncode == 2, (args, proc.stderr)
        assert "Error" in proc.stderr
