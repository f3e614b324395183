"""Hard-example mining and the durable uplink of samples to the cloud.

Mining picks windows with a low top-1 probability or a small top-1/top-2 margin, plus a small
random share of ordinary ones, within a budget of samples per minute. Samples wait in an SQLite
queue on disk (surviving broker and cloud outages and edge restarts) and are deleted only once the
cloud broker acknowledged them (QoS1 PUBACK). A full queue drops its oldest rows, counted.
"""

from __future__ import annotations

import base64
import logging
import queue
import sqlite3
import threading
import time
from pathlib import Path
from typing import Final

import numpy as np

from edge_node.ingest import WindowItem
from shared.mqtt import MqttLink, PublishHandle
from shared.schemas import HardExample, ModelManifest, Privacy, SampleReason, encode_message, new_id
from shared.settings.edge import UplinkSettings

logger = logging.getLogger(__name__)

IDLE_S: Final = 0.05
FETCH_ROWS: Final = 50


class HardExampleMiner:
    """Decides which windows become samples; enforces the per-minute budget (token bucket)."""

    def __init__(self, edge_id: str, settings: UplinkSettings, seed: int | None = None) -> None:
        self.edge_id = edge_id
        self.settings = settings
        self._rng = np.random.default_rng(seed)
        self._tokens = float(settings.budget_per_minute)
        self._refilled = time.monotonic()
        self.selected: dict[str, int] = {r.value: 0 for r in SampleReason}
        self.over_budget = 0

    def _take_token(self) -> bool:
        now = time.monotonic()
        budget = self.settings.budget_per_minute
        self._tokens = min(float(budget), self._tokens + (now - self._refilled) * budget / 60.0)
        self._refilled = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def select(self, probs: np.ndarray) -> list[tuple[int, SampleReason]]:
        """Rows of a batch's probabilities (n, classes) that become samples, within the budget."""
        if not self.settings.enabled or len(probs) == 0:
            return []
        ordered = np.sort(probs, axis=1)
        top1 = ordered[:, -1]
        top2 = ordered[:, -2] if ordered.shape[1] > 1 else np.zeros_like(top1)
        low = top1 < self.settings.low_confidence
        small = (top1 - top2) < self.settings.min_margin
        lucky = self._rng.random(len(probs)) < self.settings.random_fraction
        out: list[tuple[int, SampleReason]] = []
        for i in np.flatnonzero(low | small | lucky):
            reason = (
                SampleReason.LOW_CONFIDENCE
                if low[i]
                else SampleReason.SMALL_MARGIN
                if small[i]
                else SampleReason.RANDOM
            )
            if not self._take_token():
                self.over_budget += 1
                continue
            self.selected[reason.value] += 1
            out.append((int(i), reason))
        return out

    def build(
        self, item: WindowItem, probs: np.ndarray, manifest: ModelManifest, reason: SampleReason
    ) -> HardExample:
        """The hard example to uplink for one window, with the privacy the settings ask for."""
        window = item.window
        top = int(np.argmax(probs))
        privacy = self.settings.privacy
        return HardExample(
            sample_id=new_id(),
            edge_id=self.edge_id,
            device_id=window.device_id,
            seq=window.seq,
            ts=window.ts,
            model_name=manifest.name,
            model_version=manifest.version,
            predicted=manifest.class_names[top],
            probabilities=[min(1.0, max(0.0, float(p))) for p in probs],
            class_names=list(manifest.class_names),
            reason=reason,
            label=window.label,
            privacy=privacy,
            window_b64=base64.b64encode(item.payload).decode() if privacy is Privacy.FULL else None,
            features=summary_features(item.values, window.channels) if privacy is Privacy.SUMMARY else None,
        )


def summary_features(values: np.ndarray, channels: tuple[str, ...]) -> dict[str, float]:
    """Per-channel mean, std, min, max and RMS: enough to see drift, not enough to replay the signal."""
    out: dict[str, float] = {}
    for i, name in enumerate(channels):
        col = values[:, i].astype(np.float64)
        out[f"{name}_mean"] = float(col.mean())
        out[f"{name}_std"] = float(col.std())
        out[f"{name}_min"] = float(col.min())
        out[f"{name}_max"] = float(col.max())
        out[f"{name}_rms"] = float(np.sqrt((col * col).mean()))
    return out


class UplinkQueue:
    """A FIFO of encoded messages in SQLite (WAL); safe to use from several threads."""

    def __init__(self, path: Path, max_rows: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.max_rows = max_rows
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS uplink (id INTEGER PRIMARY KEY AUTOINCREMENT, payload BLOB)"
        )
        self._lock = threading.Lock()
        self.dropped = 0
        self.enqueued = 0
        self._depth = int(self._db.execute("SELECT COUNT(*) FROM uplink").fetchone()[0])

    def put(self, payload: bytes) -> None:
        """Append one encoded message, dropping the oldest beyond ``max_rows`` (counted)."""
        with self._lock:
            self._db.execute("INSERT INTO uplink (payload) VALUES (?)", (payload,))
            self._depth += 1
            self.enqueued += 1
            if self._depth > self.max_rows:
                excess = self._depth - self.max_rows
                self._db.execute(
                    "DELETE FROM uplink WHERE id IN (SELECT id FROM uplink ORDER BY id LIMIT ?)", (excess,)
                )
                self._depth -= excess
                self.dropped += excess

    def after(self, last_id: int, limit: int) -> list[tuple[int, bytes]]:
        """Up to ``limit`` queued rows after row id ``last_id``, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, payload FROM uplink WHERE id > ? ORDER BY id LIMIT ?", (last_id, limit)
            ).fetchall()
        return [(int(r[0]), bytes(r[1])) for r in rows]

    def delete(self, row_ids: list[int]) -> None:
        """Delete delivered rows."""
        if not row_ids:
            return
        with self._lock:
            cur = self._db.executemany("DELETE FROM uplink WHERE id = ?", [(i,) for i in row_ids])
            self._depth = max(0, self._depth - max(cur.rowcount, 0))

    @property
    def depth(self) -> int:
        """Rows queued."""
        return self._depth

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()


class UplinkSender:
    """Publishes queued samples at QoS1 on the cloud link; deletes each row once PUBACKed."""

    def __init__(self, store: UplinkQueue, link: MqttLink, topic: str, inflight_max: int) -> None:
        self.queue = store
        self.link = link
        self.topic = topic
        self.inflight_max = inflight_max
        self.stop_event = threading.Event()
        self.sent = 0
        self.delivered = 0
        self._thread: threading.Thread | None = None
        self._acked: queue.SimpleQueue[PublishHandle] = queue.SimpleQueue()  # filled by the link

    def start(self) -> None:
        """Start the sender thread."""
        self._thread = threading.Thread(target=self._run, name="edge-uplink", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the sender thread (rows not yet acknowledged stay queued)."""
        self.stop_event.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        inflight: dict[PublishHandle, int] = {}  # -> row id
        last_id = 0
        connects = -1
        while not self.stop_event.is_set():
            try:
                if not self.link.connected:
                    self.stop_event.wait(IDLE_S)
                    continue
                if self.link.connects != connects:
                    # A new connection: anything not PUBACKed is sent again (the cloud dedups sample_id).
                    connects = self.link.connects
                    inflight.clear()
                    last_id = 0
                done: list[int] = []
                while True:
                    try:
                        handle = self._acked.get_nowait()
                    except queue.Empty:
                        break
                    row_id = inflight.pop(handle, None)  # None: sent on an earlier connection
                    if row_id is not None:
                        done.append(row_id)
                self.queue.delete(done)
                self.delivered += len(done)
                room = self.inflight_max - len(inflight)
                rows = self.queue.after(last_id, min(room, FETCH_ROWS)) if room > 0 else []
                for row_id, payload in rows:
                    inflight[self.link.publish(self.topic, payload, qos=1, on_done=self._acked.put)] = row_id
                    last_id = row_id
                    self.sent += 1
                if not rows and not done:
                    self.stop_event.wait(IDLE_S)
            except Exception:  # the uplink must outlive any single failure
                logger.exception("uplink sender error")
                self.stop_event.wait(1.0)


def encode_sample(sample: HardExample) -> bytes:
    """A hard example as the bytes published on the samples topic."""
    return encode_message(sample)
