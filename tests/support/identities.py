"""Enrolling test fleets in the registry: the ingest stores uplink only from enrolled, active edges and
device reports only of enrolled devices (``ingest.require_enrolled_edges``), and a device's labels
train models only when it is a trusted labeller.

Secrets are hashed with 1000 PBKDF2 iterations (fast; the broker is not involved here)."""

from __future__ import annotations

from collections.abc import Iterable

from cloud.registry import crud, identities
from cloud.registry.db import session_scope, upgrade
from shared.identity import IdentityKind, broker_hash

TEST_SECRET = "test-secret-not-for-production"
TEST_HASH_ITERATIONS = 1000


def enroll_fleet(
    database_url: str,
    *,
    edges: Iterable[str] = (),
    devices: Iterable[str] = (),
    label_trusted: Iterable[str] = (),
    group: str | None = None,
    migrate: bool = True,
) -> None:
    """Enroll ``edges`` and ``devices`` (and the devices of ``label_trusted``, marked trusted labellers)
    as active identities; an identity already active is left as it is (idempotent). ``group``: put the
    edges in that registry group (edges of one site: each may report the others' devices)."""
    if migrate:
        upgrade(database_url)
    trusted = list(label_trusted)
    with session_scope(database_url) as session:
        for kind, ids in ((IdentityKind.EDGE, list(edges)), (IdentityKind.DEVICE, [*devices, *trusted])):
            for identity_id in dict.fromkeys(ids):
                if identities.active_identity(session, identity_id=identity_id, kind=kind) is None:
                    identities.enroll(
                        session,
                        identity_id=identity_id,
                        kind=kind,
                        secret_hash=broker_hash(TEST_SECRET, iterations=TEST_HASH_ITERATIONS),
                        actor="tests",
                    )
                if kind is IdentityKind.EDGE and group is not None:
                    crud.assign(session, edge_id=identity_id, group=group)
        for device_id in trusted:
            identities.set_label_trust(session, identity_id=device_id, trusted=True, actor="tests")
