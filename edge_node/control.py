"""What an edge's supervisor and its worker processes say to each other, and how their counters add up.

One Unix socket pair per worker process (the worker's end inherited as a file descriptor) carries
pickled messages (``multiprocessing.connection.Connection``)::

    supervisor -> worker   Init (settings, index, current model), Prepare, Commit, Abort, Stop
    worker -> supervisor   Ready, Prepared, Committed, Stats (every STATS_INTERVAL_S)

Counters: a worker exports its ``EdgeStats`` as plain data (``StatsExporter``: numbers, counters and
histogram buckets whole; sets as what is new since the last report; the tail of each recent-sample
deque); the supervisor adds them up over its workers (``StatsAggregator``) into one ``EdgeStats``,
which the Prometheus collector and the ``EdgeMetrics`` message read exactly as in a single process.
A worker that exits leaves its last report's counters in the sums, so edge counters never go back.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Final

import numpy as np

from edge_node.devices import DeviceTracker
from edge_node.metrics import EdgeStats, FastHistogram
from shared.schemas import ModelManifest
from shared.settings.edge import EdgeSettings
from shared.topics import Topics

logger = logging.getLogger(__name__)

STATS_INTERVAL_S: Final = 0.5  # how often a worker reports its counters
RECENT_SENT: Final = 5_000  # latest latency samples per worker per report (percentiles are over these)
_SKIPPED: Final = frozenset({"started"})  # per-process values that do not add up
# Snapshot keys that are gauges of the moment: not carried over from a worker that exited.
GAUGE_KEYS: Final = frozenset(
    {
        "uplink_depth",
        "work_depth",
        "cache_hit_rate",
        "rate",
        "devices_known",
        "swaps",
        "model_name",
        "model_version",
        "decoder_cache_bytes",
        "decoder_cache_entries",
    }
)


# -- messages -------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A verified artifact for the workers: read it at ``path``; it is ``stored_path`` once committed."""

    path: str
    stored_path: str
    manifest: ModelManifest


@dataclass(frozen=True, slots=True)
class Init:
    """The first message to a worker: its settings, its index and the model the edge serves now."""

    settings: EdgeSettings
    index: int
    model: ModelSpec | None
    log_level: int = logging.INFO


@dataclass(frozen=True, slots=True)
class Prepare:
    """Build and warm up interpreters of ``spec``, keep them ready, answer ``Prepared``."""

    token: int
    spec: ModelSpec


@dataclass(frozen=True, slots=True)
class Commit:
    """Swap in the model prepared under ``token`` (between two batches), answer ``Committed``."""

    token: int


@dataclass(frozen=True, slots=True)
class Abort:
    """Drop the model prepared under ``token``: another worker could not prepare it."""

    token: int


@dataclass(frozen=True, slots=True)
class Stop:
    """Finish the batches in hand and exit (as ``EdgeNode.stop``)."""


@dataclass(frozen=True, slots=True)
class Ready:
    """The worker serves (site link up, telemetry subscribed if it has a model)."""

    index: int
    pid: int
    model_version: str | None


@dataclass(frozen=True, slots=True)
class Prepared:
    """The answer to ``Prepare``: ready to commit, or why not."""

    index: int
    token: int
    ok: bool
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class Committed:
    """The answer to ``Commit``: the worker serves ``model_version`` from now on."""

    index: int
    token: int
    model_version: str | None


@dataclass(frozen=True, slots=True)
class Stats:
    """A worker's counters (``StatsExporter.export``), its snapshot and the devices it classified."""

    index: int
    stats: dict[str, Any]
    snapshot: dict[str, Any]
    seen: dict[str, float] = field(default_factory=dict)


class Channel:
    """One end of the control channel: ``send`` from any thread, ``recv`` from one."""

    def __init__(self, fd: int) -> None:
        self.conn = Connection(fd)
        self._send_lock = threading.Lock()

    def send(self, message: object) -> bool:
        """Send ``message``; ``False`` if the other end is gone."""
        with self._send_lock:
            try:
                self.conn.send(message)
            except (OSError, ValueError):
                return False
        return True

    def recv(self) -> object:
        """The next message; ``EOFError`` / ``OSError`` once the other end is gone."""
        return self.conn.recv()

    def poll(self, timeout: float) -> bool:
        """Whether a message (or the end of the channel) is there within ``timeout`` seconds."""
        try:
            return self.conn.poll(timeout)
        except (OSError, ValueError):
            return True  # closed: the next recv raises

    def close(self) -> None:
        """Close this end."""
        self.conn.close()


# -- devices --------------------------------------------------------------------------------------------
class SeenDevices(DeviceTracker):
    """A worker's device table: it only notes which devices it classified and when, for the supervisor,
    which relays the devices' status and health to the cloud once per edge (not once per worker)."""

    def __init__(self, edge_id: str, topics: Topics) -> None:
        super().__init__(edge_id, topics, lambda _payload: None, lambda: 0)
        self._seen: dict[str, float] = {}
        self._seen_lock = threading.Lock()

    def saw(self, device_ids: Iterable[str], ts: float) -> None:
        """Note the devices of a classified batch (on the decision thread)."""
        with self._seen_lock:
            self._seen.update(dict.fromkeys(device_ids, ts))

    def on_message(self, topic: str, payload: bytes) -> None:
        """Device status and health are the supervisor's: nothing to do here."""

    def report_loop(self, stop: threading.Event, connected: Any) -> None:  # noqa: ARG002
        """No reports from a worker: the supervisor sends them."""
        return

    def drain(self) -> dict[str, float]:
        """The devices classified since the last call, with when."""
        with self._seen_lock:
            seen, self._seen = self._seen, {}
        return seen


# -- counters -------------------------------------------------------------------------------------------
class StatsExporter:
    """Worker side: an ``EdgeStats`` as plain, picklable data (every field by its type, so fields added
    to ``EdgeStats`` later are carried too)."""

    def __init__(self, stats: EdgeStats) -> None:
        self.stats = stats
        self._sent_sets: dict[str, set[Any]] = {}

    def export(self) -> dict[str, Any]:
        """``{"num", "counter", "set" (new members only), "hist" (counts, total), "recent" (tails)}``."""
        out: dict[str, dict[str, Any]] = {"num": {}, "counter": {}, "set": {}, "hist": {}, "recent": {}}
        for name, value in list(vars(self.stats).items()):
            if name.startswith("_") or name in _SKIPPED or isinstance(value, bool):
                continue
            if isinstance(value, int | float):
                out["num"][name] = value
            elif isinstance(value, Counter):
                out["counter"][name] = dict(value.copy())
            elif isinstance(value, set):
                sent = self._sent_sets.setdefault(name, set())
                new = value.copy() - sent
                sent |= new
                out["set"][name] = new
            elif isinstance(value, FastHistogram):
                with value._lock:
                    out["hist"][name] = (value.counts.tolist(), value.total)
            elif isinstance(value, deque):
                tail = value.copy()
                out["recent"][name] = list(tail)[-RECENT_SENT:]
        return out


def merge_snapshots(snapshots: list[dict[str, Any]]) -> dict[str, Any]:
    """Numbers summed, dicts merged key by key the same way, anything else from the first that has it."""
    merged: dict[str, Any] = {}
    for snap in snapshots:
        for key, value in snap.items():
            have = merged.get(key)
            if isinstance(value, bool) or value is None:
                merged.setdefault(key, value)
            elif isinstance(value, int | float):
                merged[key] = (have if isinstance(have, int | float) else 0) + value
            elif isinstance(value, dict):
                merged[key] = merge_snapshots([have if isinstance(have, dict) else {}, value])
            elif have is None:
                merged[key] = value
    return merged


class StatsAggregator:
    """Supervisor side: the sum of every worker's latest report plus what exited workers had counted,
    kept in one ``EdgeStats`` (updated in place: readers hold a reference to it)."""

    def __init__(self) -> None:
        self.stats = EdgeStats()
        self._lock = threading.Lock()
        self._live: dict[int, Stats] = {}
        self._retired_stats: dict[str, Any] = {"num": {}, "counter": {}, "hist": {}}
        self._retired_snapshot: dict[str, Any] = {}
        self._sets: dict[str, set[Any]] = {}
        self._retired_windows: dict[int, int] = {}

    def update(self, report: Stats) -> None:
        """A worker's report came in."""
        with self._lock:
            self._live[report.index] = report
            for name, new in report.stats.get("set", {}).items():
                self._sets.setdefault(name, set()).update(new)
            self._rebuild()

    def retire(self, index: int) -> None:
        """Worker ``index`` exited: keep what it had counted (its next incarnation counts from 0)."""
        with self._lock:
            report = self._live.pop(index, None)
            if report is None:
                return
            self._retired_stats = _add_stats(self._retired_stats, report.stats)
            self._retired_windows[index] = self._retired_windows.get(index, 0) + _windows(report)
            kept = {k: v for k, v in report.snapshot.items() if k not in GAUGE_KEYS}
            self._retired_snapshot = merge_snapshots([self._retired_snapshot, kept])
            self._rebuild()

    def windows_by_worker(self) -> dict[int, int]:
        """Windows classified by each worker index, over all its incarnations."""
        with self._lock:
            counts = dict(self._retired_windows)
            for index, report in self._live.items():
                counts[index] = counts.get(index, 0) + _windows(report)
        return counts

    def snapshot(self) -> dict[str, Any]:
        """The workers' snapshots merged (gauges of running workers only)."""
        with self._lock:
            reports = list(self._live.values())
            retired = dict(self._retired_snapshot)
        merged = merge_snapshots([retired, *(r.snapshot for r in reports)])
        rates = [r.snapshot.get("cache_hit_rate", 0.0) for r in reports]
        merged["cache_hit_rate"] = float(sum(rates) / len(rates)) if rates else 0.0
        return merged

    def _rebuild(self) -> None:
        total = self._retired_stats
        for report in self._live.values():
            total = _add_stats(total, report.stats)
        stats = self.stats
        for name, value in total["num"].items():
            setattr(stats, name, value)
        for name, value in total["counter"].items():
            counter = getattr(stats, name, None)
            if isinstance(counter, Counter):
                counter.clear()
                counter.update(value)
        for name, members in self._sets.items():
            target = getattr(stats, name, None)
            if isinstance(target, set):
                target.update(members)
        for name, (counts, hist_total) in total["hist"].items():
            hist = getattr(stats, name, None)
            if isinstance(hist, FastHistogram) and len(hist.counts) == len(counts):
                with hist._lock:
                    hist.counts[:] = np.asarray(counts, dtype=np.int64)
                    hist.total = float(hist_total)
        recent: dict[str, list[float]] = {}
        for report in self._live.values():
            for name, values in report.stats.get("recent", {}).items():
                recent.setdefault(name, []).extend(values)
        for name, values in recent.items():
            target = getattr(stats, name, None)
            if isinstance(target, deque):
                target.clear()
                target.extend(values)


def _windows(report: Stats) -> int:
    return int(report.stats.get("num", {}).get("windows_total", 0))


def _add_stats(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """The sum of two exports' numbers, counters and histograms (sets and samples are not summed)."""
    num = dict(a.get("num", {}))
    for name, value in b.get("num", {}).items():
        num[name] = num.get(name, 0) + value
    counter: dict[str, dict[str, int]] = {k: dict(v) for k, v in a.get("counter", {}).items()}
    for name, value in b.get("counter", {}).items():
        into = counter.setdefault(name, {})
        for key, count in value.items():
            into[key] = into.get(key, 0) + count
    hist = dict(a.get("hist", {}))
    for name, (counts, total) in b.get("hist", {}).items():
        have = hist.get(name)
        if have is None or len(have[0]) != len(counts):
            hist[name] = (list(counts), total)
        else:
            hist[name] = ([x + y for x, y in zip(have[0], counts, strict=True)], have[1] + total)
    return {"num": num, "counter": counter, "hist": hist}
