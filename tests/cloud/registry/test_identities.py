"""Broker identities and claim tokens in the registry (migration 0006), on SQLite and PostgreSQL."""

from __future__ import annotations

import time

import pytest

from cloud.errors import NotFoundError
from cloud.registry import identities
from cloud.registry.db import session_scope
from cloud.registry.models import AuditLog
from shared.identity import (
    IdentityError,
    broker_hash,
    check_identity_id,
    connection_username,
    edge_connections,
    identity_of_username,
    verify_broker_hash,
)

FAST = 1_000  # iterations: these tests check the bookkeeping, not the hash's cost


def test_hash_is_mosquittos_format_and_verifies() -> None:
    stored = broker_hash("s3cret", iterations=FAST)
    assert stored.startswith(f"$7${FAST}$")
    assert verify_broker_hash("s3cret", stored)
    assert not verify_broker_hash("s3cret!", stored)
    assert not verify_broker_hash("s3cret", "$6$nope")


def test_reserved_and_malformed_ids_are_refused() -> None:
    for bad in ("cloud", "edgefleet-edge-x", "claim-1", "a/b", "", "x" * 65):
        with pytest.raises(IdentityError):
            check_identity_id(bad, kind="device")
    assert check_identity_id("cloud", kind="service") == "cloud"
    assert connection_username("edge-1", "site-3") == "edge-1/site-3"
    assert identity_of_username("edge-1/site-3") == "edge-1"
    assert "cloud-0" in edge_connections(1)
    with pytest.raises(IdentityError):
        connection_username("edge-1", "Site/x")


def test_enroll_revoke_reenroll_are_counted_and_audited(db_url: str) -> None:
    with session_scope(db_url) as session:
        assert identities.auth_revision(session) == 0
        identities.enroll(
            session, identity_id="dev-1", kind="device", secret_hash=broker_hash("a", iterations=FAST)
        )
        with pytest.raises(ValueError, match="enrolled already"):
            identities.enroll(
                session, identity_id="dev-1", kind="device", secret_hash=broker_hash("b", iterations=FAST)
            )
        with pytest.raises(ValueError, match=r"not a edge|not an edge|enrolled as a device"):
            identities.enroll(
                session,
                identity_id="dev-1",
                kind="edge",
                secret_hash=broker_hash("b", iterations=FAST),
                reissue=True,
            )
    with session_scope(db_url) as session:
        identities.revoke(session, identity_id="dev-1", actor="admin")
        assert identities.active_identity(session, identity_id="dev-1") is None
        again = identities.enroll(
            session, identity_id="dev-1", kind="device", secret_hash=broker_hash("c", iterations=FAST)
        )
        assert again.status == "active"
        assert verify_broker_hash("c", again.secret_hash or "")
        with pytest.raises(NotFoundError):
            identities.revoke(session, identity_id="nobody")
    with session_scope(db_url) as session:
        actions = [row.action for row in session.query(AuditLog).order_by(AuditLog.id)]
        assert actions == ["enroll", "revoke", "re-enroll"]
        assert identities.auth_revision(session) == 3


def test_label_trust_only_for_active_devices(db_url: str) -> None:
    with session_scope(db_url) as session:
        identities.enroll(
            session, identity_id="dev-1", kind="device", secret_hash=broker_hash("a", iterations=FAST)
        )
        identities.enroll(
            session, identity_id="edge-1", kind="edge", secret_hash=broker_hash("a", iterations=FAST)
        )
        identities.set_label_trust(session, identity_id="dev-1", trusted=True)
        with pytest.raises(ValueError, match="only devices"):
            identities.set_label_trust(session, identity_id="edge-1", trusted=True)
        assert identities.label_trusted_devices(session) == {"dev-1"}
        identities.revoke(session, identity_id="dev-1")
        assert identities.label_trusted_devices(session) == set()


def test_claim_tokens_are_one_time_and_expire(db_url: str) -> None:
    now = time.time()
    with session_scope(db_url) as session:
        identities.add_claim_token(
            session, token_id="t1", secret_hash=broker_hash("x", iterations=FAST), expires_at=now + 60
        )
        identities.add_claim_token(
            session, token_id="t2", secret_hash=broker_hash("y", iterations=FAST), expires_at=now - 1
        )
        assert [t.token_id for t in identities.usable_claim_tokens(session)] == ["t1"]
        identities.use_claim_token(session, token_id="t1", identity_id="dev-9")
        with pytest.raises(ValueError, match="used already"):
            identities.use_claim_token(session, token_id="t1", identity_id="dev-10")
        with pytest.raises(ValueError, match="expired"):
            identities.use_claim_token(session, token_id="t2", identity_id="dev-10")
        assert identities.usable_claim_tokens(session) == []
