"""The ingest's per-edge limits as pure logic: the token bucket, the per-edge buckets and the bounded
dead-letter budget (times are given, nothing sleeps); the cache of active edges against a registry."""

from __future__ import annotations

from pathlib import Path

import pytest

import cloud.ingest
from cloud.ingest import EdgeLimits, EdgeTrust, Rejection, TokenBucket
from cloud.registry import identities
from cloud.registry.db import session_scope, upgrade
from tests.support.identities import enroll_fleet


def test_bucket_starts_full_and_refuses_past_its_burst() -> None:
    bucket = TokenBucket(rate=10.0, burst=3, now=100.0)
    assert [bucket.take(100.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.tokens(100.0) == pytest.approx(0.0)


def test_bucket_refills_at_its_rate_up_to_its_burst() -> None:
    bucket = TokenBucket(rate=10.0, burst=3, now=0.0)
    for _ in range(3):
        assert bucket.take(0.0)
    assert not bucket.take(0.05)  # half a token
    assert bucket.take(0.1)  # one token after 0.1 s at 10/s
    assert not bucket.take(0.1)
    assert bucket.tokens(1000.0) == pytest.approx(3.0)  # never more than the burst
    assert [bucket.take(1000.0) for _ in range(4)] == [True, True, True, False]


def test_bucket_sustains_its_rate_and_ignores_time_going_backwards() -> None:
    bucket = TokenBucket(rate=5.0, burst=1, now=0.0)
    # 100 messages a second for 10 s: about 5 a second get through (plus the initial token).
    taken = sum(bucket.take(i / 100) for i in range(1000))
    assert 49 <= taken <= 51
    before = bucket.tokens(10.0)
    assert not bucket.take(5.0)  # an earlier time adds nothing (and takes nothing it does not have)
    assert bucket.tokens(10.0) == pytest.approx(before)


def test_bucket_takes_several_tokens_only_when_it_has_them() -> None:
    bucket = TokenBucket(rate=1.0, burst=5, now=0.0)
    assert bucket.take(0.0, tokens=4)
    assert not bucket.take(0.0, tokens=2)  # nothing taken on a refusal
    assert bucket.take(0.0, tokens=1)


@pytest.mark.parametrize(("rate", "burst"), [(0.0, 5), (-1.0, 5), (1.0, 0)])
def test_bucket_refuses_nonsense(rate: float, burst: float) -> None:
    with pytest.raises(ValueError, match="token bucket"):
        TokenBucket(rate=rate, burst=burst, now=0.0)


def test_each_edge_has_its_own_bucket_and_forgotten_edges_start_full() -> None:
    limits = EdgeLimits(rate=1.0, burst=2, dead_letters_per_minute=5, max_edges=2)
    assert [limits.allow("e1", 0.0) for _ in range(3)] == [True, True, False]
    assert [limits.allow("e2", 0.0) for _ in range(3)] == [True, True, False]  # e1's flood is not e2's
    assert not limits.allow("e1", 0.0)  # e1 used last: e2 is the least recently heard
    assert limits.allow("e3", 0.0)  # a third edge: e2's bucket is forgotten (bounded memory) ...
    assert not limits.allow("e1", 0.5)  # (e1's is kept: heard more recently)
    assert limits.allow("e1", 1.0)  # refilled at 1/s
    assert limits.allow("e2", 1.0)  # ... so e2 starts full again
    assert limits.allow("e2", 1.0)


def test_dead_letter_budget_is_per_edge_per_minute_and_bounded() -> None:
    limits = EdgeLimits(rate=1.0, burst=1, dead_letters_per_minute=2, max_edges=2, window_s=60.0)
    assert [limits.store_dead_letter("e1", 0.0) for _ in range(3)] == [True, True, False]
    assert limits.store_dead_letter("e2", 1.0)  # its own budget
    assert not limits.store_dead_letter("e3", 2.0)  # past max_edges edges this minute: only counted
    assert not limits.store_dead_letter("e1", 59.9)
    assert limits.store_dead_letter("e1", 60.0)  # the next minute
    assert limits.store_dead_letter("e3", 60.0)
    no_budget = EdgeLimits(rate=1.0, burst=1, dead_letters_per_minute=0)
    assert not no_budget.store_dead_letter("e1", 0.0)


def test_active_edges_are_cached_until_the_identities_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    upgrade(url)
    enroll_fleet(url, edges=["e1", "e2"], devices=["d1"], migrate=False)
    now = [0.0]
    trust = EdgeTrust(clock=lambda: now[0])
    with session_scope(url) as session:
        assert trust.check(session, "e1") is None
        assert trust.check(session, "nobody") is Rejection.UNKNOWN_EDGE
        assert trust.check(session, "d1") is Rejection.NOT_AN_EDGE
    assert trust.reloads == 1
    with session_scope(url) as session:
        identities.revoke(session, identity_id="e1", actor="tests")
    with session_scope(url) as session:
        now[0] = 0.5  # within IDENTITY_REFRESH_S: the cache still answers
        assert trust.check(session, "e1") is None
        now[0] = 1.0
        assert trust.check(session, "e1") is Rejection.REVOKED_EDGE
        assert trust.check(session, "e2") is None
    assert trust.reloads == 2
    with session_scope(url) as session:
        now[0] = 10.0  # polled again, nothing changed: no reload
        assert trust.check(session, "e2") is None
    assert trust.reloads == 2
    monkeypatch.setattr(cloud.ingest, "IDENTITY_REFRESH_S", 0.0)  # tests may poll on every batch
    enroll_fleet(url, edges=["e1"], migrate=False)
    with session_scope(url) as session:
        assert trust.check(session, "e1") is None
    assert trust.reloads == 3
