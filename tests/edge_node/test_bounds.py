"""Per-device state of the edge stays small and bounded, and silent devices are forgotten (no broker)."""

from __future__ import annotations

import gc
import random
import time
import tracemalloc
from collections import deque
from typing import Any

import numpy as np
import pytest

from edge_node.cache import ResultCache
from edge_node.devices import DeviceTracker
from edge_node.ingest import SEQ_RESET_GAP, DeadLetters, Deduplicator, Ingest
from edge_node.metrics import EdgeCollector, EdgeStats, RecentDevices
from edge_node.rules import RuleEngine, RuleSpec
from shared.codec import encode_window
from shared.mqtt import Received
from shared.schemas import DeviceReport, decode_message
from shared.settings import EdgeSettings
from shared.topics import Topics
from tests.support.edge_fixtures import CLASS_NAMES

TOPICS = Topics()
HOT, COLD = [0.0, 0.0, 0.0, 0.95], [0.9, 0.05, 0.05, 0.0]


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _traced_bytes(fill: Any) -> int:
    """Bytes still allocated after ``fill()`` (whose result is kept alive while measuring)."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = fill()
        gc.collect()
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    del kept
    return used


# -- dedup ------------------------------------------------------------------------------------------


class _ReferenceDedup:
    """The dedup rules spelled out plainly: every seq seen, the newest, resets."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.seen: dict[str, set[int]] = {}
        self.highest: dict[str, int] = {}

    def check(self, device: str, seq: int) -> str | None:
        seen = self.seen.setdefault(device, set())
        highest = self.highest.setdefault(device, seq)
        if seq > highest - self.window and seq in seen:
            return "duplicate"
        if seq < highest - SEQ_RESET_GAP:
            seen.clear()
            self.highest[device] = seq
        elif seq <= highest - self.window:
            return "stale"
        seen.add(seq)
        self.highest[device] = max(self.highest[device], seq)
        return None


@pytest.mark.parametrize("window", [1, 4, 64, 1024])
def test_dedup_agrees_with_the_plain_rules(window: int) -> None:
    rng = random.Random(window)
    dedup, reference = Deduplicator(window, 100), _ReferenceDedup(window)
    newest = {"a": 0, "b": 0}
    for _ in range(20_000):
        device = rng.choice("ab")
        roll = rng.random()
        if roll < 0.6:  # in order, sometimes skipping ahead
            seq = newest[device] + rng.choice([1, 1, 1, 2, 5, window, window + 3])
        elif roll < 0.95:  # late, a duplicate, or stale
            seq = max(0, newest[device] - rng.randrange(0, 2 * window + 2))
        elif roll < 0.98:  # far ahead
            seq = newest[device] + SEQ_RESET_GAP + rng.randrange(1, 10)
        else:  # a restarted device
            seq = rng.randrange(0, 3)
        newest[device] = max(newest[device], seq)
        expected = reference.check(device, seq)
        assert dedup.check(device, seq, now=0.0) == expected, (device, seq)
        if expected is None and seq < newest[device] - SEQ_RESET_GAP:
            newest[device] = seq
    assert dedup.resets > 0


def test_dedup_memory_is_bounded_per_device() -> None:
    window = 1024
    ids = [f"device-{i:05d}" for i in range(10_000)]

    def steady() -> Deduplicator:  # 200 devices through 1,100 seqs each, a duplicate now and then
        dedup = Deduplicator(window, 100_000)
        for seq in range(1_100):
            for device in ids[:200]:
                dedup.check(device, seq, now=0.0)
                if seq % 100 == 0:
                    assert dedup.check(device, seq, now=0.0) == "duplicate"
        return dedup

    def wide() -> Deduplicator:  # 10,000 devices, every window at its full 1,024 bits
        dedup = Deduplicator(window, 100_000)
        for device in ids:
            for seq in (0, 512, window - 1):
                dedup.check(device, seq, now=0.0)
        return dedup

    # A set and a deque of 1,024 seqs took ~42 KB per device (420 MB for 10,000 devices).
    assert _traced_bytes(steady) / 200 < 600
    assert _traced_bytes(wide) < 10_000 * 600  # 6 MB


def test_dedup_forgets_silent_devices_and_counts_them() -> None:
    dedup = Deduplicator(4, max_devices=3, ttl_s=60.0)
    assert dedup.check("a", 1, now=0.0) is None
    assert dedup.check("b", 1, now=30.0) is None
    assert dedup.check("a", 2, now=50.0) is None
    assert dedup.check("c", 1, now=100.0) is None  # b was silent for 70 s: forgotten
    assert (len(dedup), dedup.evicted_idle) == (2, 1)
    assert dedup.check("b", 1, now=100.5) is None  # new to the edge again
    assert dedup.check("a", 2, now=105.0) == "duplicate"  # a redelivery is not hearing from a
    assert dedup.check("c", 2, now=111.0) is None  # a: last new window at 50, cutoff 51
    assert dedup.evicted_idle == 2
    assert dedup.check("a", 2, now=111.5) is None
    assert dedup.check("d", 1, now=112.0) is None  # over max_devices: the least recently heard goes
    assert (len(dedup), dedup.evicted_full) == (3, 1)
    assert dedup.check("b", 1, now=112.5) is None  # it was b


def test_ingest_dedups_on_receive_time_and_forgets_silent_topics() -> None:
    dedup = Deduplicator(16, 100, ttl_s=60.0)
    ingest = Ingest(TOPICS, dedup, DeadLetters("e1", lambda _p: None), lambda: None)

    def received(device: str, seq: int, at: float) -> Received:
        payload = encode_window(
            device_id=device,
            seq=seq,
            ts=time.time(),
            sample_rate_hz=100.0,
            channels=("x", "y", "z"),
            values=np.zeros((100, 3), dtype=np.float32),
        )
        return Received(TOPICS.telemetry(device), payload, 1, False, received_at=at)

    assert ingest.handle(received("d1", 0, 1.0)) is not None
    assert ingest.handle(received("d2", 0, 2.0)) is not None
    assert ingest.handle(received("d1", 0, 3.0)) is None
    assert ingest.duplicates == 1
    assert ingest.handle(received("d1", 1, 50.0)) is not None
    assert ingest.handle(received("d1", 2, 100.0)) is not None  # d2 silent since 2.0: forgotten
    assert (len(dedup), dedup.evicted_idle) == (1, 1)
    assert ingest.handle(received("d2", 0, 101.0)) is not None  # new to the edge again
    for device, at in (("d3", 400.0), ("d4", 600.0)):  # two generations later: d1 and d2 are gone
        assert ingest.handle(received(device, 0, at)) is not None
    cached = {**ingest._topic_devices, **ingest._topic_devices_old}
    assert sorted(cached.values()) == ["d3", "d4"]


# -- rules --------------------------------------------------------------------------------------------


def _rule(**kw: object) -> RuleSpec:
    return RuleSpec.model_validate({"name": "r", "class": "bearing_fault", **kw})


@pytest.mark.parametrize(("k", "n"), [(1, 1), (3, 5), (40, 64), (100, 300)])
def test_k_of_n_bits_agree_with_a_deque(k: int, n: int) -> None:
    engine = RuleEngine([_rule(min_probability=0.5, k=k, n=n)], CLASS_NAMES)
    rng = random.Random(n)
    recent: deque[bool] = deque(maxlen=n)
    for i in range(3 * n + 50):
        hit = rng.random() < k / n
        recent.append(hit)
        fired = bool(engine.evaluate("d1", HOT if hit else COLD, i, 0.0, now=float(i)))
        assert fired == (sum(recent) >= k), i


def test_rule_state_is_bounded_and_forgets_idle_devices() -> None:
    engine = RuleEngine([_rule(min_probability=0.9, k=2, n=3)], CLASS_NAMES, device_ttl_s=60.0, max_devices=2)
    assert not engine.evaluate("d1", HOT, 0, 0.0, now=0.0)
    assert not engine.evaluate("d2", HOT, 0, 0.0, now=10.0)
    assert not engine.evaluate("d3", HOT, 0, 0.0, now=20.0)  # over max_devices: d1 goes
    assert (len(engine), engine.evicted_full) == (2, 1)
    assert not engine.evaluate("d1", HOT, 1, 0.0, now=21.0)  # its first hit was forgotten; d2 goes
    assert not engine.evaluate("d3", COLD, 1, 0.0, now=75.0)  # d3 idle for 55 s: kept
    assert (engine.evicted_idle, engine.evicted_full) == (0, 2)
    assert not engine.evaluate("d4", HOT, 0, 0.0, now=200.0)  # d1 and d3 idle for the TTL
    assert (len(engine), engine.evicted_idle) == (1, 2)


def test_rule_state_outlives_a_cooldown_longer_than_the_ttl() -> None:
    engine = RuleEngine([_rule(min_probability=0.9, cooldown_s=600)], CLASS_NAMES, device_ttl_s=60.0)
    assert engine.ttl_s == 600
    assert engine.evaluate("d1", HOT, 0, 0.0, now=0.0)
    assert not engine.evaluate("d1", HOT, 1, 0.0, now=300.0)  # silent 300 s: still in its cooldown
    assert engine.suppressed_cooldown == 1
    assert engine.evaluate("d1", HOT, 2, 0.0, now=1000.0)


def test_device_globs_are_still_honoured() -> None:
    engine = RuleEngine([_rule(min_probability=0.5, devices=["pump-*"])], CLASS_NAMES)
    assert engine.evaluate("pump-1", HOT, 0, 0.0, now=0.0)
    assert not engine.evaluate("fan-1", HOT, 0, 0.0, now=0.0)


# -- device table -----------------------------------------------------------------------------------


def test_device_table_drops_silent_devices() -> None:
    clock = FakeClock()
    sent: list[bytes] = []
    tracker = DeviceTracker("e1", TOPICS, sent.append, lambda: 0, ttl_s=60.0, clock=clock, max_devices=3)
    tracker.saw(["d1", "d2"], time.time())
    clock.now += 40
    tracker.saw(["d2"], time.time())
    clock.now += 30
    assert tracker.expire() == 1  # d1: silent for 70 s
    assert [d.device_id for d in tracker.snapshot()] == ["d2"]
    tracker.report(full=True)
    assert [d.device_id for d in decode_message(sent[-1], DeviceReport).devices] == ["d2"]
    tracker.saw(["d3", "d4", "d5"], time.time())  # only 3 fit
    assert (len(tracker), tracker.refused, tracker.evicted_idle) == (3, 1, 1)
    clock.now += 61
    assert tracker.expire() == 3
    assert len(tracker) == 0
    assert tracker.report(full=False) == 0  # no change left for devices already dropped


def test_the_device_ttl_setting_has_a_floor() -> None:
    assert EdgeSettings(edge_id="e1").device_ttl_s == 3600.0
    with pytest.raises(ValueError, match="device_ttl_s"):
        EdgeSettings(edge_id="e1", device_ttl_s=5)


# -- devices seen, cache, metrics ---------------------------------------------------------------------


def test_devices_seen_is_a_window_not_every_device_ever() -> None:
    clock = FakeClock()
    seen = RecentDevices(window_s=100.0, max_devices=1_000, clock=clock)
    seen.update(["a", "b"])
    assert len(seen) == 2
    clock.now += 60
    assert len(seen) == 2  # a new generation: a and b are still counted
    seen.add("c")
    assert len(seen) == 3
    clock.now += 60  # a and b were not seen for over half a window: gone
    assert len(seen) == 1
    clock.now += 200
    assert len(seen) == 0
    for i in range(2_500):  # nobody reading: a generation still closes at max_devices
        seen.add(f"d{i}")
    assert len(seen) <= 2_000


def test_cached_rows_do_not_keep_their_batch_alive() -> None:
    cache = ResultCache(4)
    batch = np.ones((64, 4), dtype=np.float32)
    cache.put(b"k", batch[3])
    row = cache.get(b"k")
    assert row is not None
    assert row.base is None
    assert row.tolist() == [1.0] * 4


def test_evictions_are_exported() -> None:
    snap: dict[str, Any] = {
        "dead_by_reason": {},
        "dropped": {},
        "cache_hit_rate": 0.0,
        "uplink_depth": 0,
        "work_depth": 0,
        "rate": 0.0,
        "duplicates": 0,
        "commands_sent": 0,
        "uplink_dropped": 0,
        "uplink_delivered": 0,
        "swaps": 0,
        "errors": 0,
        "acks": {},
        "model_name": None,
        "model_version": None,
        "device_tables": {"dedup": {"tracked": 7, "evicted_idle": 3, "evicted_full": 1}},
    }
    stats = EdgeStats()
    stats.devices.add("d1")
    families = {f.name: f for f in EdgeCollector(stats, lambda: snap).collect()}
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for s in families["edge_device_table_evictions"].samples
    }
    assert samples[("edge_device_table_evictions_total", (("reason", "idle"), ("table", "dedup")))] == 3
    assert samples[("edge_device_table_evictions_total", (("reason", "full"), ("table", "dedup")))] == 1
    assert families["edge_device_table_size"].samples[0].value == 7
    assert families["edge_devices_seen"].samples[0].value == 1
