"""The edge's site inbox is bounded: a flood beyond it stays un-PUBACKed on the broker and is
redelivered once the edge caught up; every window is classified exactly once, and it is counted."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from prometheus_client import generate_latest

from tests.support.brokers import Mosquitto
from tests.support.edge_fixtures import (
    FakeDevice,
    Seen,
    edge_models_fixture,  # noqa: F401  (fixture)
    edge_settings,
    running_node,
    wait_for,
)


def test_a_flood_beyond_the_inbox_is_held_on_the_broker_and_classified_exactly_once(
    mosquitto: Mosquitto, edge_models: dict[str, Path], tmp_path: Path
) -> None:
    total, bound = 800, 60
    # Several workers: paho's network thread fills the inbox (one worker owns the loop instead and
    # simply stops reading its socket while full: tests/shared/test_mqtt_inbox.py).
    settings = edge_settings(
        mosquitto.url,
        tmp_path / "edge",
        edge_models["int8"],
        batching={"max_batch": 16, "max_wait_ms": 1.0, "workers": 2, "inbox_max": bound},
    )
    with running_node(settings):
        pass  # the edge's persistent session and its telemetry subscription now exist
    device = FakeDevice(mosquitto.url, "dev-flood")
    for seq in range(total):  # queued on the broker for the edge: it gets them all at once
        device.send(seq)
    wait_for(lambda: device.link.pending == 0, "the broker to take every window")

    seen = Seen()
    with running_node(settings, observer=seen) as node:
        wait_for(lambda: len(seen.windows) >= total, "every window", timeout=180)
        counts = Counter(seq for _, seq, _ in seen.windows)
        assert set(counts) == set(range(total))
        assert max(counts.values()) == 1  # classified exactly once (redeliveries are duplicates)
        assert node.site_link.inbox_full > 0
        assert node.site_link.inbox_dropped == 0  # held back on the broker, never dropped
        assert node.site_link.inbox_resyncs > 0
        snap = node.snapshot()
        assert snap["inbox_full"] > 0
        assert snap["dropped"]["inbox_full"] == 0
        assert snap["dropped"]["overload"] == 0
        exposition = generate_latest(node.registry).decode()
        full = [line for line in exposition.splitlines() if line.startswith("edge_inbox_full_total ")]
        assert full
        assert float(full[0].split()[1]) > 0
        assert node.stats.windows_total == total
    device.close()
