"""Attack: one device's credentials grow an edge without bound (issue 11, item 7).

Found: one device sending windows with varied labels grew an edge by 830 MiB, because the decoder's
descriptor cache was keyed with the label. Now the label is not part of the key and the cache is an
LRU bounded in bytes: whatever labels, channel names and shapes one device sends, the cache stays
under its cap, the evictions are counted and exported, and every legitimate window is still
classified, exactly once. A real mosquitto and a real edge node; no timing assertions.
"""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import numpy as np
from prometheus_client import generate_latest

from edge_node import synthetic
from shared.codec import encode_window
from shared.mqtt import MqttLink
from shared.settings import MqttSettings
from shared.topics import Topics
from tests.support.brokers import Mosquitto
from tests.support.edge_fixtures import (
    Seen,
    edge_models_fixture,  # noqa: F401  (fixture)
    edge_settings,
    make_window,
    running_node,
    wait_for,
)

TOPICS = Topics()
CAP = 64 * 1024  # the edge's decoder_cache_max_bytes in this test


def metric(exposition: str, name: str) -> float:
    lines = [line for line in exposition.splitlines() if line.startswith(name + " ")]
    assert lines, f"{name} is not exported"
    return float(lines[0].split()[1])


def test_one_device_varying_labels_and_shapes_cannot_grow_the_edge(
    mosquitto: Mosquitto, edge_models: dict[str, Path], tmp_path: Path
) -> None:
    settings = edge_settings(
        mosquitto.url, tmp_path / "edge", edge_models["int8"], decoder_cache_max_bytes=CAP
    )
    # The attacker: one device's credentials, publishing on its own telemetry topic only.
    attacker = MqttLink(MqttSettings(url=mosquitto.url), client_id="dev-attacker")
    attacker.connect()
    honest = MqttLink(MqttSettings(url=mosquitto.url), client_id="dev-honest")
    honest.connect()
    topic = TOPICS.telemetry("dev-attacker")
    rng = np.random.default_rng(11)
    seen = Seen()
    labelled, reshaped, honest_total = 1500, 600, 200
    deepest = 0
    stop = threading.Event()

    with running_node(settings, observer=seen) as node:
        decoder = node.ingest.decoder

        def watch() -> None:  # the cache's size all along the attack, not only at the end
            nonlocal deepest
            while not stop.wait(0.005):
                deepest = max(deepest, decoder.cache_bytes)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()

        # 1. Valid windows, each with its own long label: classified, and one descriptor in the cache.
        for seq in range(labelled):
            label = f"{seq}-" + "L" * 240
            attacker.publish(topic, make_window("dev-attacker", seq, label=label), qos=1)
        wait_for(lambda: len(seen.windows) >= labelled, "the labelled windows classified")
        assert decoder.cache_entries <= 2
        assert decoder.evictions == 0

        # 2. Varied channel names and shapes (rejected by the model's input check, but decoded first),
        #    interleaved with an honest device's windows.
        for i in range(reshaped):
            samples = int(rng.integers(1, synthetic.SAMPLES))  # never the model's input length
            channels = [f"c{i}_{k}_{'n' * 20}" for k in range(int(rng.integers(1, 8)))]
            payload = encode_window(
                device_id="dev-attacker",
                seq=labelled + i,
                ts=1_700_000_000.0,
                sample_rate_hz=synthetic.SAMPLE_RATE_HZ,
                channels=channels,
                values=rng.normal(size=(samples, len(channels))).astype(np.float32),
                label=f"x{i}",
            )
            attacker.publish(topic, payload, qos=1)
            if i % 3 == 0:
                seq = i // 3
                honest.publish(TOPICS.telemetry("dev-honest"), make_window("dev-honest", seq), qos=1)
        wait_for(lambda: node.dead.total >= reshaped, "every reshaped window dead-lettered")
        wait_for(
            lambda: len(seen.windows) >= labelled + honest_total,
            "the honest device's windows classified",
        )
        stop.set()
        watcher.join(5)

        assert decoder.cache_bytes <= CAP
        assert deepest <= CAP
        assert decoder.evictions > 0  # the cap was reached and held
        counts = Counter((device, seq) for device, seq, _ in seen.windows)
        assert max(counts.values()) == 1
        assert {seq for device, seq in counts if device == "dev-honest"} == set(range(honest_total))
        assert {seq for device, seq in counts if device == "dev-attacker"} == set(range(labelled))
        assert node.dead.by_reason["shape"] == reshaped

        exposition = generate_latest(node.registry).decode()
        assert metric(exposition, "edge_decoder_cache_evictions_total") > 0
        assert metric(exposition, "edge_decoder_cache_bytes") <= CAP
    attacker.stop()
    honest.stop()
