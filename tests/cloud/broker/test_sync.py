"""The sync between the registry and the broker's files (a SQLite registry; no broker needed here:
tests/security/test_broker_identities.py runs the whole thing against mosquitto)."""

from __future__ import annotations

import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud.broker import sync as broker_sync
from cloud.broker.sync import AuthSync, read_snapshot, write_private
from cloud.registry import identities
from cloud.registry.db import engine_for, session_scope, upgrade
from shared.broker_auth import BrokerLayout, InternalUsers
from shared.errors import BrokerError
from shared.identity import broker_hash, verify_broker_hash
from shared.topics import Topics

FAST = 1_000


@pytest.fixture
def db_url(tmp_path: Path) -> Iterator[str]:
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    upgrade(url)
    yield url
    engine_for(url).dispose()


def enroll(url: str, identity_id: str, kind: str = "device") -> None:
    with session_scope(url) as session:
        identities.enroll(
            session, identity_id=identity_id, kind=kind, secret_hash=broker_hash("s", iterations=FAST)
        )


def add_token(url: str, token_id: str, expires_at: float) -> None:
    with session_scope(url) as session:
        identities.add_claim_token(
            session, token_id=token_id, secret_hash=broker_hash("t", iterations=FAST), expires_at=expires_at
        )


def make_sync(url: str, tmp_path: Path, reloads: list[int]) -> AuthSync:
    data = tmp_path / "broker"
    data.mkdir(exist_ok=True)
    return AuthSync(
        database_url=url,
        layout=BrokerLayout(data_dir=data, port=1883, cloud_port=1884),
        topics=Topics(),
        internal=InternalUsers(),
        reload=lambda: reloads.append(1),
    )


def site_users(tmp_path: Path) -> list[str]:
    return [line.split(":", 1)[0] for line in (tmp_path / "broker" / "passwd-site").read_text().splitlines()]


def test_snapshot_holds_active_identities_and_usable_tokens_only(db_url: str) -> None:
    now = time.time()
    enroll(db_url, "dev-1")
    enroll(db_url, "dev-2")
    add_token(db_url, "live", now + 600)
    add_token(db_url, "gone", now + 0.01)
    add_token(db_url, "used", now + 600)
    with session_scope(db_url) as session:
        identities.revoke(session, identity_id="dev-2")
        identities.use_claim_token(session, token_id="used", identity_id="dev-9")
    with session_scope(db_url) as session:
        snapshot = read_snapshot(session, now=now + 1)
        assert snapshot.revision == identities.auth_revision(session)
    assert [e.identity_id for e in snapshot.identities] == ["dev-1"]
    assert [c.token_id for c in snapshot.claims] == ["live"]


def test_files_follow_the_registry_and_reload_only_on_change(db_url: str, tmp_path: Path) -> None:
    reloads: list[int] = []
    sync = make_sync(db_url, tmp_path, reloads)
    enroll(db_url, "dev-1")
    assert sync.sync_once(force=True) is False  # before the broker runs: files written, no reload
    assert site_users(tmp_path) == ["dev-1"]
    sync.broker_started()
    assert sync.sync_once() is False  # nothing changed
    enroll(db_url, "dev-2")
    assert sync.sync_once() is True
    assert site_users(tmp_path) == ["dev-1", "dev-2"]
    with session_scope(db_url) as session:
        identities.set_label_trust(session, identity_id="dev-1", trusted=True)  # no auth change
        identities.revoke(session, identity_id="dev-1")
    assert sync.sync_once() is True
    assert site_users(tmp_path) == ["dev-2"]
    assert len(reloads) == 2
    with session_scope(db_url) as session:
        assert sync.applied_revision == identities.auth_revision(session)
    for name in ("passwd-site", "acl-site", "passwd-cloud", "acl-cloud"):
        mode = stat.S_IMODE((tmp_path / "broker" / name).stat().st_mode)
        assert mode == 0o600, f"{name} is {oct(mode)}"
    assert not list((tmp_path / "broker").glob(".*.tmp"))


def test_an_expiring_claim_token_is_dropped_without_a_registry_change(db_url: str, tmp_path: Path) -> None:
    reloads: list[int] = []
    sync = make_sync(db_url, tmp_path, reloads)
    add_token(db_url, "soon", time.time() + 0.5)
    sync.sync_once(force=True)
    sync.broker_started()
    assert site_users(tmp_path) == ["claim-soon"]
    deadline = time.monotonic() + 10
    while site_users(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.05)
        sync.sync_once()
    assert site_users(tmp_path) == []
    assert reloads == [1]


def test_the_loop_picks_changes_up_and_survives_registry_errors(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(broker_sync, "SYNC_INTERVAL_S", 0.05)
    reloads: list[int] = []
    sync = make_sync(db_url, tmp_path, reloads)
    sync.sync_once(force=True)
    sync.broker_started()
    sync.start()
    try:
        enroll(db_url, "dev-1")
        deadline = time.monotonic() + 10
        while "dev-1" not in site_users(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert site_users(tmp_path) == ["dev-1"]
        good_url, sync.database_url = sync.database_url, f"sqlite:///{tmp_path / 'missing' / 'no.db'}?mode=ro"
        deadline = time.monotonic() + 10
        while "broker auth sync failed" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.02)
        assert "broker auth sync failed" in caplog.text
        assert site_users(tmp_path) == ["dev-1"]  # kept as they were
        sync.database_url = good_url
        enroll(db_url, "dev-2")
        deadline = time.monotonic() + 10
        while "dev-2" not in site_users(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert site_users(tmp_path) == ["dev-1", "dev-2"]
    finally:
        sync.stop()


def test_write_private_replaces_atomically_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_text("old")
    path.chmod(0o644)
    write_private(path, "new")
    assert path.read_text() == "new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_a_reload_counts_only_once_the_broker_confirms_it(db_url: str, tmp_path: Path) -> None:
    reloads: list[int] = []
    answers = [False]
    markers: list[str] = []

    def confirm(marker: str) -> bool:
        markers.append(marker)
        return answers[-1]

    sync = make_sync(db_url, tmp_path, reloads)
    sync.confirm = confirm
    sync.sync_once(force=True)
    sync.broker_started()
    enroll(db_url, "dev-1")
    with pytest.raises(BrokerError, match="did not confirm"):
        sync.sync_once()
    assert sync.applied_revision < 1
    answers.append(True)
    assert sync.sync_once() is True  # written and signalled again, with a new marker
    with session_scope(db_url) as session:
        assert sync.applied_revision == identities.auth_revision(session)
    assert len(reloads) == 2
    assert len(set(markers)) == 2
    passwd = (tmp_path / "broker" / "passwd-cloud").read_text()
    assert passwd.startswith("broker-sync:$7$1000$")  # the marker user, on the claims listener
    assert verify_broker_hash(markers[-1], passwd.split(":", 1)[1].strip())
