"""Outbox, windowing and clock logic of the device agent (pure logic, no network)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

import device_agent.outbox as outbox_module
from device_agent.errors import AgentError
from device_agent.outbox import DROP_AGE, DROP_FULL, Outbox
from device_agent.sampling import SampleClock, Windower
from device_agent.state import DataDirLock


def rows(start: int, n: int) -> list[tuple[float, ...]]:
    return [(float(i),) for i in range(start, start + n)]


def test_windower_hop_smaller_equal_and_larger_than_window():
    w = Windower(4, 2)
    out = w.feed(rows(0, 3))
    assert out == []
    assert w.needed() == 1
    out = w.feed(rows(3, 5))
    assert [[r[0] for r in win] for win in out] == [[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7]]

    w = Windower(3, 3)
    assert [[r[0] for r in win] for win in w.feed(rows(0, 7))] == [[0, 1, 2], [3, 4, 5]]

    w = Windower(2, 5)  # take 2, skip 3
    collected = []
    for i in range(0, 20, 3):
        collected += w.feed(rows(i, 3))
    assert [[r[0] for r in win] for win in collected] == [[0, 1], [5, 6], [10, 11], [15, 16]]


def test_windower_needed_lands_exactly_on_window_end():
    w = Windower(5, 7)
    fed = 0
    ends = []
    for _ in range(4):
        n = w.needed()
        out = w.feed(rows(fed, n))
        fed += n
        assert len(out) == 1
        ends.append(out[0][-1][0])
    assert ends == [4, 11, 18, 25]


def test_sample_clock_catches_up_in_bulk():
    clock = SampleClock(100.0, now=1000.0)
    assert clock.due(1000.0) == 1
    assert clock.due(1000.995) == 100
    clock.taken += 100
    assert clock.due(1001.5) == 51  # a late wake-up finds everything due at once
    assert clock.time_of(200) == pytest.approx(1002.0)


def test_outbox_seq_survives_reopen_and_acks_remove(tmp_path: Path):
    path = tmp_path / "d.sqlite"
    box = Outbox(path, max_windows=100, max_age_s=3600)
    seqs = [box.allocate_seq() for _ in range(5)]
    box.commit(windows=[(s, b"w%d" % s) for s in seqs])
    box.commit(acked=[0, 1])
    assert box.depth == 3
    box.conn.close()  # like kill -9: no clean close
    box = Outbox(path, max_windows=100, max_age_s=3600)
    assert box.next_seq == 5
    assert box.depth == 3
    assert box.pending_after(-1, 10) == [(2, b"w2"), (3, b"w3"), (4, b"w4")]
    assert box.pending_after(3, 10) == [(4, b"w4")]
    box.commit(acked=[2, 3, 4])
    box.close()
    box = Outbox(path, max_windows=100, max_age_s=3600)
    assert box.next_seq == 5  # never reused even with an empty outbox
    assert box.depth == 0
    box.close()


def test_outbox_drops_oldest_not_in_flight_and_counts_persistently(tmp_path: Path):
    path = tmp_path / "d.sqlite"
    box = Outbox(path, max_windows=10, max_age_s=3600)
    for _ in range(15):
        s = box.allocate_seq()
        box.commit(windows=[(s, b"x")], in_flight=[0, 1])
    assert box.depth == 10
    assert box.drops == {DROP_FULL: 5}
    remaining = [s for s, _ in box.pending_after(-1, 100)]
    assert remaining == [0, 1, *range(7, 15)]  # in-flight 0, 1 kept; 2..6 dropped
    box.close()
    box = Outbox(path, max_windows=10, max_age_s=3600)
    assert box.drops == {DROP_FULL: 5}
    assert box.dropped == 5
    box.close()


def test_outbox_age_expiry(tmp_path: Path):
    box = Outbox(tmp_path / "d.sqlite", max_windows=100, max_age_s=60)
    old = [box.allocate_seq() for _ in range(3)]
    box.commit(windows=[(s, b"o") for s in old], now=1000.0)
    new = box.allocate_seq()
    box.commit(windows=[(new, b"n")], now=2000.0)
    assert box.expire(protect=[0], now=2010.0) == 2
    assert [s for s, _ in box.pending_after(-1, 10)] == [0, 3]
    assert box.drops == {DROP_AGE: 2}
    box.close()


def test_outbox_is_wal(tmp_path: Path):
    box = Outbox(tmp_path / "d.sqlite", max_windows=100, max_age_s=60)
    assert box.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    box.close()
    conn = sqlite3.connect(tmp_path / "d.sqlite")
    try:
        assert conn.execute("SELECT value FROM meta WHERE key='clean'").fetchone()[0] == "1"
    finally:
        conn.close()


def test_data_dir_lock_is_exclusive(tmp_path: Path):
    a = DataDirLock(tmp_path / "d.lock")
    b = DataDirLock(tmp_path / "d.lock")
    a.acquire()
    try:
        with pytest.raises(AgentError, match="another agent"):
            b.acquire()
    finally:
        a.release()
    b.acquire()
    b.release()


def test_seq_jumps_after_unclean_stop_and_reboot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = tmp_path / "d.sqlite"
    monkeypatch.setattr(outbox_module, "boot_id", lambda: "boot-a")
    box = Outbox(path, max_windows=100, max_age_s=3600)
    box.commit(windows=[(box.allocate_seq(), b"x")])
    box.conn.close()  # unclean: power cut
    monkeypatch.setattr(outbox_module, "boot_id", lambda: "boot-b")
    box = Outbox(path, max_windows=100, max_age_s=3600)
    assert box.next_seq == 1 + outbox_module.SEQ_REBOOT_SKIP  # a possibly published seq is never reused
    box.close()  # clean stop
    monkeypatch.setattr(outbox_module, "boot_id", lambda: "boot-c")
    box = Outbox(path, max_windows=100, max_age_s=3600)
    assert box.next_seq == 1 + outbox_module.SEQ_REBOOT_SKIP  # clean stop before the reboot: no jump
    box.conn.close()  # unclean, but the same boot (kill -9): no jump either
    box = Outbox(path, max_windows=100, max_age_s=3600)
    assert box.next_seq == 1 + outbox_module.SEQ_REBOOT_SKIP
    box.close()
