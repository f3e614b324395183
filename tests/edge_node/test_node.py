"""Edge node against a real mosquitto with real .tflite models: ingest, dedup, dead letters, rules, acks."""

from __future__ import annotations

import base64
import struct
import threading
from collections import Counter
from pathlib import Path

from edge_node.rules import RuleSpec
from shared.codec import encode_window
from shared.schemas import DeadLetter, Decision, EdgeMetrics
from shared.topics import EdgeTopic, Topics
from tests.support.brokers import Mosquitto
from tests.support.edge_fixtures import (
    CHANNELS,
    FakeDevice,
    Seen,
    Wire,
    edge_models_fixture,  # noqa: F401  (fixture)
    edge_settings,
    make_window,
    running_node,
    wait_for,
)

TOPICS = Topics()


def test_dedup_and_dead_letters_for_each_kind_of_bad_payload(
    mosquitto: Mosquitto, edge_models: dict[str, Path], tmp_path: Path
) -> None:
    settings = edge_settings(mosquitto.url, tmp_path / "edge", edge_models["float32"])
    ops = Wire(mosquitto.url, "ops", [TOPICS.edge("edge-1", EdgeTopic.DEAD)])
    good = make_window("dev-1", 1)
    header_ok = bytearray(good)
    bad_version = bytearray(good)
    bad_version[2] = 9
    nan_payload = bytearray(good)
    nan_payload[-4:] = struct.pack("<f", float("nan"))
    short = encode_window(
        device_id="dev-1",
        seq=50,
        ts=1.0,
        sample_rate_hz=100.0,
        channels=CHANNELS,
        values=[[0.0, 0.0, 0.0]] * 50,
    )
    bad = {
        "codec: magic": b"XX" + bytes(header_ok[2:]),
        "codec: header": b"EF\x01",
        "codec: version": bytes(bad_version),
        "codec: values": good[:-7],  # truncated body
        "codec: values: contains NaN": bytes(nan_payload),
        "shape": short,
        "device_id": make_window("dev-2", 7),  # sent on dev-1's topic
    }
    seen = Seen()
    with running_node(settings) as node:
        node.observer = seen
        for payload in bad.values():
            ops.publish(TOPICS.telemetry("dev-1"), payload)
        ops.publish("ef/v1/dev/dev-1/health", good)  # subscribed filter only matches telemetry
        ops.publish(TOPICS.telemetry("dev-1"), good)
        ops.publish(TOPICS.telemetry("dev-1"), good)  # duplicate (device, seq)
        ops.publish(TOPICS.telemetry("dev-1"), make_window("dev-1", 2))
        wait_for(lambda: len(ops.on("/dead")) >= len(bad), "dead letters")
        wait_for(lambda: node.stats.windows_total >= 2 and node.ingest.duplicates >= 1, "good windows")
        letters = [DeadLetter.model_validate_json(p) for p in ops.on("/dead")]
        reasons = [letter.reason for letter in letters]
        for expected in bad:
            assert any(r.startswith(expected) for r in reasons), (expected, reasons)
        assert any("does not match the model input [100, 3]" in r for r in reasons)
        assert all(letter.payload_size > 0 and base64.b64decode(letter.payload_b64) for letter in letters)
        assert node.dead.total == len(bad)
        assert node.ingest.duplicates == 1
        assert sorted(seq for _, seq, _ in seen.windows) == [1, 2]
        assert node.stats.windows_total == 2
    ops.close()


def test_rule_fires_sends_command_and_records_ack(
    mosquitto: Mosquitto, edge_models: dict[str, Path], tmp_path: Path
) -> None:
    rule = RuleSpec.model_validate(
        {
            "name": "stop-on-anything",
            "class": "normal",
            "min_probability": 0.0,
            "k": 2,
            "n": 3,
            "severity": "high",
            "command": {"name": "actuate", "args": {"action": "stop_motor"}},
            "cooldown_s": 3600,
        }
    )
    settings = edge_settings(mosquitto.url, tmp_path / "edge", edge_models["int8"])
    device = FakeDevice(mosquitto.url, "dev-9")
    ops = Wire(
        mosquitto.url, "ops", [TOPICS.all_edges(EdgeTopic.DECISION), TOPICS.all_edges(EdgeTopic.METRICS)]
    )
    with running_node(settings, rules=[rule]) as node:
        for seq in range(1, 6):
            device.send(seq, label="normal")
        wait_for(lambda: node.commands.acks["ok"] >= 1, "the ack")
        wait_for(lambda: node.stats.windows_total >= 5, "all windows")
        record = node.commands.records[-1]
        assert record.ack is not None
        assert record.ack.ok
        assert record.command.args == {"action": "stop_motor"}
        # k=2 of n=3: fires on the second window; the cooldown holds back the rest.
        assert len(device.commands) == 1
        assert device.commands[0].command_id == record.command.command_id
        decisions = wait_for(lambda: ops.decoded("/decision", Decision), "the decision at the cloud")
        assert len(decisions) == 1
        assert decisions[0].command_id == record.command.command_id
        assert decisions[0].severity == "high"
        wait_for(lambda: node.rules.suppressed_cooldown == 3, "the cooldown to hold back 3 firings")

        def final_metrics() -> EdgeMetrics | None:
            for payload in reversed(ops.on("/metrics")):
                m = EdgeMetrics.model_validate_json(payload)
                if m.labelled_windows == 5 and m.decisions_total == 1:
                    return m
            return None

        metrics = wait_for(final_metrics, "metrics counting every window")
        assert metrics.model_version is not None
        assert metrics.windows_total == 5
    device.close()
    ops.close()


def test_edge_restart_under_load_loses_no_window_and_runs_none_twice(
    mosquitto: Mosquitto, edge_models: dict[str, Path], tmp_path: Path
) -> None:
    """Persistent session + PUBACK after the decision: what the edge had not decided comes back."""
    settings = edge_settings(mosquitto.url, tmp_path / "edge", edge_models["int8"])
    device = FakeDevice(mosquitto.url, "dev-1")
    seen = Seen()
    total = 1500
    sent = threading.Event()

    def load() -> None:
        for seq in range(total):
            device.send(seq)
        sent.set()

    sender = threading.Thread(target=load)
    with running_node(settings, observer=seen):
        sender.start()
        wait_for(lambda: len(seen.windows) >= 200, "the first windows")
    restarted_at = len(seen.windows)
    with running_node(settings, observer=seen) as node:
        sent.wait(120)
        wait_for(lambda: len(seen.windows) >= total, "every window, across the restart")
        assert node.ingest.duplicates == 0
    sender.join(10)
    counts = Counter(seq for _, seq, _ in seen.windows)
    assert len(counts) == total
    assert max(counts.values()) == 1
    assert restarted_at < total  # the restart really happened mid-stream
    device.close()


def test_two_edges_in_a_share_group_split_the_devices_without_overlap(
    mosquitto: Mosquitto, edge_models: dict[str, Path], tmp_path: Path
) -> None:
    seen_a, seen_b = Seen(), Seen()
    common = {"share_group": "site-a"}
    settings_a = edge_settings(mosquitto.url, tmp_path / "a", edge_models["int8"], **common)
    settings_b = edge_settings(mosquitto.url, tmp_path / "b", edge_models["int8"], edge_id="edge-2", **common)
    devices = [FakeDevice(mosquitto.url, f"dev-{i}") for i in range(4)]
    with running_node(settings_a, observer=seen_a), running_node(settings_b, observer=seen_b):
        for seq in range(100):
            for device in devices:
                device.send(seq)
        wait_for(lambda: len(seen_a.windows) + len(seen_b.windows) >= 400, "every window")
    both = Counter((dev, seq) for dev, seq, _ in seen_a.windows + seen_b.windows)
    assert len(both) == 400
    assert max(both.values()) == 1
    assert seen_a.windows
    assert seen_b.windows
    for device in devices:
        device.close()


def test_a_site_broker_restart_loses_nothing(
    mosquitto: Mosquitto, edge_models: dict[str, Path], tmp_path: Path
) -> None:
    settings = edge_settings(mosquitto.url, tmp_path / "edge", edge_models["int8"])
    seen = Seen()
    with running_node(settings, observer=seen) as node:
        device = FakeDevice(mosquitto.url, "dev-1")
        for seq in range(100):
            device.send(seq)
        wait_for(lambda: len(seen.windows) >= 100, "the first windows")
        device.close()
        mosquitto.restart(down_for=0.5)
        wait_for(lambda: node.site_link.connected, "the edge to reconnect")
        device = FakeDevice(mosquitto.url, "dev-1")
        for seq in range(100, 200):
            device.send(seq)
        wait_for(lambda: len(seen.windows) >= 200, "the windows after the restart")
        device.close()
    counts = Counter(seq for _, seq, _ in seen.windows)
    assert sorted(counts) == list(range(200))
    assert max(counts.values()) == 1
