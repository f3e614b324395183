"""Store-and-forward outbox: windows are committed here before publishing, removed on PUBACK.

Owned by the agent's pump thread. Bounded by ``max_windows`` and ``max_age_s``; when a bound is
hit the OLDEST windows not currently in flight are dropped, and every drop is counted by reason
in the ``drops`` table (persistent, reported in the heartbeat).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Final

from device_agent.state import boot_id, connect, transaction

logger = logging.getLogger(__name__)

SEQ_REBOOT_SKIP: Final = 1_000_000
SYNC_INTERVAL_S: Final = 5.0
DROP_LOG_INTERVAL_S: Final = 10.0
DROP_FULL: Final = "outbox_full"
DROP_AGE: Final = "max_age"
_EXPIRED: Final = "FROM outbox WHERE created < ? AND seq NOT IN (SELECT value FROM json_each(?))"
_EXPIRED_STATS: Final = "SELECT COUNT(*), MIN(seq), MAX(seq) " + _EXPIRED
_EXPIRED_DELETE: Final = "DELETE " + _EXPIRED


class Outbox:
    """Windows kept on disk (SQLite) from creation until the broker acknowledged them."""

    def __init__(self, path: Path, *, max_windows: int, max_age_s: float) -> None:
        self.path = path
        self.max_windows = max_windows
        self.max_age_s = max_age_s
        self.conn = connect(path)
        self._last_sync = time.monotonic()
        self._last_drop_log = -DROP_LOG_INTERVAL_S
        row = self.conn.execute("SELECT COUNT(*), MIN(seq), MAX(seq) FROM outbox").fetchone()
        self.depth: int = row[0]
        self.last_seq: int = row[2] if row[2] is not None else -1
        meta = dict(self.conn.execute("SELECT key, value FROM meta").fetchall())
        next_seq = max(int(meta.get("next_seq", 0)), self.last_seq + 1)
        boot = boot_id()
        if meta.get("clean") == "0" and boot is not None and meta.get("boot_id") not in (None, boot):
            # Unclean stop, then a reboot: a power loss may have rolled back commits whose seq
            # numbers were already published. Never reuse them.
            logger.warning(
                "outbox: unclean stop before a reboot; skipping seq %d -> %d",
                next_seq,
                next_seq + SEQ_REBOOT_SKIP,
            )
            next_seq += SEQ_REBOOT_SKIP
        self.next_seq: int = next_seq
        self.drops: dict[str, int] = dict(self.conn.execute("SELECT reason, count FROM drops").fetchall())
        with transaction(self.conn) as c:
            self._set_meta(c, "next_seq", next_seq)
            self._set_meta(c, "boot_id", boot or "")
            self._set_meta(c, "clean", 0)
        if self.depth:
            logger.info("outbox: %d windows pending from before (seq %d..%d)", self.depth, row[1], row[2])

    @staticmethod
    def _set_meta(conn: sqlite3.Connection, key: str, value: object) -> None:
        conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, str(value)))

    @property
    def dropped(self) -> int:
        """Windows dropped on the device so far, all reasons together."""
        return sum(self.drops.values())

    def commit(
        self,
        *,
        acked: Iterable[int] = (),
        windows: Sequence[tuple[int, bytes]] = (),
        in_flight: Iterable[int] = (),
        now: float | None = None,
    ) -> None:
        """One transaction: remove acked seqs, add new windows, enforce the bounds."""
        acked = list(acked)
        if not acked and not windows:
            return
        created = time.time() if now is None else now
        with transaction(self.conn) as c:
            if acked:
                before = c.total_changes
                c.executemany("DELETE FROM outbox WHERE seq = ?", ((s,) for s in acked))
                self.depth -= c.total_changes - before
            if windows:
                c.executemany(
                    "INSERT INTO outbox (seq, created, payload) VALUES (?, ?, ?)",
                    ((seq, created, payload) for seq, payload in windows),
                )
                self.depth += len(windows)
                self.last_seq = max(self.last_seq, windows[-1][0])
                self._set_meta(c, "next_seq", self.next_seq)
                excess = self.depth - self.max_windows
                if excess > 0:
                    self._drop_oldest(c, excess, set(in_flight), DROP_FULL)

    def allocate_seq(self) -> int:
        """The next sequence number; persisted by the ``commit`` that stores its window."""
        seq = self.next_seq
        self.next_seq += 1
        return seq

    def _drop_oldest(self, c: sqlite3.Connection, count: int, protect: set[int], reason: str) -> None:
        rows = c.execute("SELECT seq FROM outbox ORDER BY seq LIMIT ?", (count + len(protect),)).fetchall()
        victims = [s for (s,) in rows if s not in protect][:count]
        self._delete_dropped(c, victims, reason)

    def _delete_dropped(self, c: sqlite3.Connection, seqs: list[int], reason: str) -> None:
        if not seqs:
            return
        c.executemany("DELETE FROM outbox WHERE seq = ?", ((s,) for s in seqs))
        self._count_dropped(c, len(seqs), reason, seqs[0], seqs[-1])

    def _count_dropped(self, c: sqlite3.Connection, count: int, reason: str, first: int, last: int) -> None:
        self.depth -= count
        self.drops[reason] = self.drops.get(reason, 0) + count
        c.execute(
            "INSERT INTO drops (reason, count) VALUES (?, ?) "
            "ON CONFLICT(reason) DO UPDATE SET count = count + excluded.count",
            (reason, count),
        )
        now = time.monotonic()
        if now - self._last_drop_log >= DROP_LOG_INTERVAL_S:  # rate-limited: the counts are what matter
            self._last_drop_log = now
            logger.warning(
                "outbox: dropping oldest windows (%s; now seq %d..%d); dropped so far: %s",
                reason,
                first,
                last,
                self.drops,
            )

    def count_drop(self, reason: str, count: int) -> None:
        """Count windows lost before reaching the outbox (e.g. the sampler fell far behind)."""
        if count <= 0:
            return
        with transaction(self.conn) as c:
            self.drops[reason] = self.drops.get(reason, 0) + count
            c.execute(
                "INSERT INTO drops (reason, count) VALUES (?, ?) "
                "ON CONFLICT(reason) DO UPDATE SET count = count + excluded.count",
                (reason, count),
            )

    def expire(self, protect: Iterable[int], now: float | None = None) -> int:
        """Drop windows older than ``max_age_s`` (except those in flight)."""
        cutoff = (time.time() if now is None else now) - self.max_age_s
        oldest = self.conn.execute("SELECT created FROM outbox ORDER BY seq LIMIT 1").fetchone()
        if oldest is None or oldest[0] >= cutoff:  # windows are stored in time order: nothing is old
            return 0
        keep = json.dumps(sorted(set(protect)))
        with transaction(self.conn) as c:
            count, first, last = c.execute(_EXPIRED_STATS, (cutoff, keep)).fetchone()
            if count:
                c.execute(_EXPIRED_DELETE, (cutoff, keep))
                self._count_dropped(c, count, DROP_AGE, first, last)
        return int(count)

    def enforce_size(self, protect: Iterable[int]) -> None:
        """Apply a lowered ``max_windows`` right away."""
        excess = self.depth - self.max_windows
        if excess > 0:
            with transaction(self.conn) as c:
                self._drop_oldest(c, excess, set(protect), DROP_FULL)

    def pending_after(self, seq: int, limit: int) -> list[tuple[int, bytes]]:
        """Windows with a sequence number above ``seq``, oldest first."""
        if limit <= 0 or seq >= self.last_seq:
            return []
        return self.conn.execute(
            "SELECT seq, payload FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?", (seq, limit)
        ).fetchall()

    def payload(self, seq: int) -> bytes | None:
        """The stored window ``seq``, or None when it is no longer in the outbox."""
        row = self.conn.execute("SELECT payload FROM outbox WHERE seq = ?", (seq,)).fetchone()
        return bytes(row[0]) if row is not None else None

    def sync(self, force: bool = False) -> None:
        """Checkpoint the WAL (fsync) every ``SYNC_INTERVAL_S``: bounds what a power loss can undo."""
        now = time.monotonic()
        if force or now - self._last_sync >= SYNC_INTERVAL_S:
            self._last_sync = now
            self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def close(self) -> None:
        """Record a clean stop and close."""
        try:
            with transaction(self.conn) as c:
                self._set_meta(c, "next_seq", self.next_seq)
                self._set_meta(c, "clean", 1)
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            self.conn.close()
