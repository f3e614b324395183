"""Edge metrics: cheap counters on the hot path, a Prometheus endpoint and periodic ``EdgeMetrics``.

The decision thread updates plain counters and numpy histograms once per batch; Prometheus reads
them at scrape time through a custom collector, so scraping costs the hot path nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final

import numpy as np
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from shared.schemas import EdgeMetrics, LatencySummary

logger = logging.getLogger(__name__)

LATENCY_BUCKETS_S: Final = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
BATCH_BUCKETS: Final = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
CONFIDENCE_BUCKETS: Final = tuple(round(0.1 * i, 1) for i in range(1, 11))
RECENT_SAMPLES: Final = 20_000  # latencies kept for the percentiles of EdgeMetrics
DEVICES_SEEN_WINDOW_S: Final = 3600.0  # default: "devices seen" counts the devices of about this long
DEVICES_SEEN_MAX: Final = 100_000  # device ids kept per generation of ``RecentDevices``


class FastHistogram:
    """Cumulative-bucket histogram fed with numpy arrays (one lock per batch, not per value)."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.bounds = np.asarray(buckets, dtype=np.float64)
        self.counts = np.zeros(len(buckets) + 1, dtype=np.int64)  # last one is +Inf
        self.total = 0.0
        self._lock = threading.Lock()

    def observe(self, values: np.ndarray | float) -> None:
        """Add one value or an array of values."""
        arr = np.atleast_1d(np.asarray(values, dtype=np.float64))
        idx = np.searchsorted(self.bounds, arr, side="left")
        binned = np.bincount(idx, minlength=len(self.counts))
        with self._lock:
            self.counts += binned
            self.total += float(arr.sum())

    def family(self, name: str, doc: str) -> HistogramMetricFamily:
        """The histogram as a Prometheus metric family."""
        with self._lock:
            cumulative = np.cumsum(self.counts)
            total = self.total
        buckets = [(repr(float(b)), int(c)) for b, c in zip(self.bounds, cumulative[:-1], strict=True)]
        buckets.append(("+Inf", int(cumulative[-1])))
        return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=total)


class RecentDevices:
    """The ids of the devices seen in about the last ``window_s``: the edge's "devices seen".

    Two generations of ids: reading (``len``) starts a new one every half window and drops the one
    before, so the count covers the last half window to window, and a silent device leaves it. ``add``
    stays one set insert on the decision thread (no clock read, no lock: readers only swap whole sets
    and CPython set operations on str ids are atomic under the GIL). A generation is also closed at
    ``max_devices`` ids, so the memory stays bounded even if nothing reads.
    """

    def __init__(
        self,
        window_s: float = DEVICES_SEEN_WINDOW_S,
        max_devices: int = DEVICES_SEEN_MAX,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window_s = window_s
        self.max_devices = max_devices
        self._clock = clock  # monotonic; tests pass a fake one
        self._current: set[str] = set()
        self._previous: set[str] = set()
        self._rotated = clock()
        self._lock = threading.Lock()

    def add(self, device_id: str) -> None:
        """Note one device (decision thread)."""
        current = self._current
        if len(current) >= self.max_devices:
            with self._lock:
                self._rotate(self._clock())
            current = self._current
        current.add(device_id)

    def update(self, device_ids: Iterable[str]) -> None:
        """Note several devices."""
        for device_id in device_ids:
            self.add(device_id)

    def _rotate(self, now: float) -> None:
        """Start a new generation; lock held."""
        self._previous, self._current = self._current, set()
        self._rotated = now

    def __len__(self) -> int:
        with self._lock:
            now = self._clock()
            if now - self._rotated >= self.window_s:  # not read for a whole window: both are old news
                self._rotate(now)
                self._rotate(now)
            elif now - self._rotated >= self.window_s / 2:
                self._rotate(now)
            return len(self._previous.union(self._current))


class EdgeStats:
    """Everything the edge counts. Written by the decision thread; read by scrapes and the publisher."""

    def __init__(self, *, devices_window_s: float = DEVICES_SEEN_WINDOW_S) -> None:
        self.windows_total = 0
        self.decisions_total = 0
        self.nonfinite_total = 0
        self.labelled_windows = 0
        self.labelled_correct = 0
        self.class_counts: Counter[str] = Counter()
        self.devices = RecentDevices(devices_window_s)  # bounded: not every device ever seen
        self.batch_size = FastHistogram(BATCH_BUCKETS)
        self.inference_s = FastHistogram(LATENCY_BUCKETS_S)
        self.e2e_s = FastHistogram(LATENCY_BUCKETS_S)
        self.confidence = FastHistogram(CONFIDENCE_BUCKETS)
        self.recent_inference_s: deque[float] = deque(maxlen=RECENT_SAMPLES)
        self.recent_e2e_s: deque[float] = deque(maxlen=RECENT_SAMPLES)
        self.confidence_sum = 0.0
        self.started = time.monotonic()


class RateMeter:
    """Windows per second from a running total, recomputed at most once a second."""

    def __init__(self) -> None:
        self.rate = 0.0
        self._last = (time.monotonic(), 0)

    def update(self, total: int) -> float:
        """The rate as of ``total`` windows now (the previous one within a second of the last)."""
        now = time.monotonic()
        then, count = self._last
        if now - then >= 1.0:
            self.rate = max(0.0, (total - count) / (now - then))
            self._last = (now, total)
        return self.rate


def percentiles(values: deque[float]) -> LatencySummary:
    """p50, p95 and p99 of ``values`` (seconds), in milliseconds."""
    if not values:
        return LatencySummary()
    arr = np.fromiter(values, dtype=np.float64) * 1000.0
    p50, p95, p99 = np.percentile(arr, [50, 95, 99])
    return LatencySummary(
        p50_ms=max(0.0, float(p50)), p95_ms=max(0.0, float(p95)), p99_ms=max(0.0, float(p99))
    )


class EdgeCollector:
    """Builds the Prometheus metric families from a snapshot function of the node."""

    def __init__(self, stats: EdgeStats, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.stats = stats
        self.snapshot = snapshot

    def describe(self) -> list[Any]:
        """Nothing to describe up front (``auto_describe`` is off)."""
        return []

    def collect(self) -> Iterator[Any]:
        """The node's metric families, built from a fresh snapshot on every scrape."""
        s = self.stats
        snap = self.snapshot()
        yield CounterMetricFamily("edge_windows", "windows classified", value=s.windows_total)
        yield CounterMetricFamily("edge_decisions", "decisions taken by rules", value=s.decisions_total)
        yield CounterMetricFamily(
            "edge_nonfinite_outputs", "windows whose model output was NaN/inf", value=s.nonfinite_total
        )
        yield CounterMetricFamily(
            "edge_labelled_windows", "windows carrying a ground-truth label", value=s.labelled_windows
        )
        yield CounterMetricFamily(
            "edge_labelled_correct", "labelled windows predicted correctly", value=s.labelled_correct
        )
        per_class = CounterMetricFamily("edge_class_windows", "windows per predicted class", labels=["cls"])
        for name, count in s.class_counts.items():
            per_class.add_metric([name], count)
        yield per_class
        dead = CounterMetricFamily("edge_dead_letters", "rejected payloads by reason", labels=["reason"])
        for reason, count in snap["dead_by_reason"].items():
            dead.add_metric([reason], count)
        yield dead
        dropped = CounterMetricFamily("edge_dropped_windows", "windows dropped, by why", labels=["reason"])
        for reason, count in snap["dropped"].items():
            dropped.add_metric([reason], count)
        yield dropped
        yield s.batch_size.family("edge_batch_size", "windows per inference invoke")
        yield s.inference_s.family("edge_inference_seconds", "inference time per batch")
        yield s.e2e_s.family("edge_e2e_latency_seconds", "device timestamp -> decision taken")
        yield s.confidence.family("edge_confidence", "top-1 probability per window")
        gauges = {
            "edge_cache_hit_rate": ("result cache hit rate", snap["cache_hit_rate"]),
            "edge_uplink_queue_depth": ("samples waiting on disk for the cloud", snap["uplink_depth"]),
            "edge_work_queue_depth": ("windows waiting for inference", snap["work_depth"]),
            "edge_devices_seen": (
                "devices with a classified window within about device_ttl_s",
                len(s.devices),
            ),
            "edge_windows_per_second": ("windows per second since the last metrics message", snap["rate"]),
            "edge_decoder_cache_bytes": (
                "bytes held by the telemetry decoder's descriptor cache (at most decoder_cache_max_bytes)",
                snap.get("decoder_cache_bytes", 0),
            ),
            "edge_decoder_cache_entries": (
                "window descriptors in the telemetry decoder's cache",
                snap.get("decoder_cache_entries", 0),
            ),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(name, doc, value=value)
        counters = {
            "edge_duplicates": ("duplicate windows dropped", snap["duplicates"]),
            "edge_commands_sent": ("commands sent to devices", snap["commands_sent"]),
            "edge_uplink_dropped": (
                "samples dropped because the uplink queue was full",
                snap["uplink_dropped"],
            ),
            "edge_uplink_delivered": ("samples acknowledged by the cloud broker", snap["uplink_delivered"]),
            "edge_model_swaps": ("model swaps", snap["swaps"]),
            "edge_errors": ("inference errors", snap["errors"]),
            "edge_decisions_unconfirmed": (
                "decided windows PUBACKed before the cloud broker confirmed their decisions",
                snap.get("decisions_unconfirmed", 0),
            ),
            "edge_inbox_full": (
                (
                    "site messages not queued because the inbox was full (batching.inbox_max): QoS1 "
                    "ones left un-PUBACKed for the broker to redeliver, the rest in edge_dropped_windows"
                ),
                snap.get("inbox_full", 0),
            ),
            "edge_inbox_resyncs": (
                "site reconnections made to have messages held back by a full inbox redelivered",
                snap.get("inbox_resyncs", 0),
            ),
            "edge_decoder_cache_evictions": (
                "window descriptors evicted from the telemetry decoder's cache (byte bound reached)",
                snap.get("decoder_cache_evictions", 0),
            ),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(name, doc, value=value)
        tables = snap.get("device_tables", {})  # per-device state: dedup, rules, device table
        tracked = GaugeMetricFamily("edge_device_table_size", "devices held per table", labels=["table"])
        evicted = CounterMetricFamily(
            "edge_device_table_evictions",
            "devices dropped per table: idle (silent for device_ttl_s) or full (at its limit; for the "
            "device table: messages of devices not added)",
            labels=["table", "reason"],
        )
        for table, counts in tables.items():
            tracked.add_metric([table], counts["tracked"])
            evicted.add_metric([table, "idle"], counts["evicted_idle"])
            evicted.add_metric([table, "full"], counts["evicted_full"])
        yield tracked
        yield evicted
        refused = CounterMetricFamily(
            "edge_desired_refused",
            "desired-state orders refused (unsigned, unknown or revoked key, bad signature, wrong edge, "
            "expired, stale revision, digest mismatch, downgrade, ...), by reason",
            labels=["reason"],
        )
        for reason, count in sorted(snap.get("desired_refused", {}).items()):
            refused.add_metric([reason], count)
        yield refused
        acks = CounterMetricFamily("edge_command_acks", "command acks by status", labels=["status"])
        for status, count in snap["acks"].items():
            acks.add_metric([status], count)
        yield acks
        info = GaugeMetricFamily("edge_model_info", "the active model", labels=["name", "version"])
        if snap["model_version"] is not None:
            info.add_metric([snap["model_name"], snap["model_version"]], 1.0)
        yield info


def start_endpoint(registry: CollectorRegistry, port: int, bind: str) -> Any:
    """Serve ``registry`` on ``bind:port``; returns the server (``shutdown()`` to stop)."""
    server, thread = start_http_server(port, addr=bind, registry=registry)
    logger.info("prometheus metrics on http://%s:%d/metrics", bind, server.server_port)
    return server, thread


def build_metrics_message(
    edge_id: str, stats: EdgeStats, snap: dict[str, Any], interval_s: float, rate: float
) -> EdgeMetrics:
    """The periodic ``EdgeMetrics`` message from the node's stats and snapshot."""
    with stats.confidence._lock:
        conf_counts = stats.confidence.counts.copy()
    hist = [int(c) for c in conf_counts[:10]]
    hist[-1] += int(conf_counts[10])
    windows = stats.windows_total
    return EdgeMetrics(
        edge_id=edge_id,
        interval_s=interval_s,
        model_version=snap["model_version"],
        windows_total=windows,
        windows_per_s=max(0.0, rate),
        duplicates_total=snap["duplicates"],
        dead_letters_total=snap["dead_total"],
        decisions_total=stats.decisions_total,
        errors_total=snap["errors"],
        cache_hit_rate=min(1.0, max(0.0, snap["cache_hit_rate"])),
        inference_latency=percentiles(stats.recent_inference_s),
        e2e_latency=percentiles(stats.recent_e2e_s),
        uplink_queue_depth=snap["uplink_depth"],
        uplink_dropped_total=snap["uplink_dropped"],
        confidence_mean=min(1.0, max(0.0, stats.confidence_sum / windows)) if windows else None,
        confidence_histogram=hist,
        class_counts=dict(stats.class_counts),
        labelled_windows=stats.labelled_windows,
        labelled_correct=stats.labelled_correct,
        devices_seen=len(stats.devices),
    )
