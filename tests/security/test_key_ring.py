"""The signing key ring: ``edgefleet cloud keys rotate|revoke|list`` (real registry, real mosquitto),
the retained ``KeyRing`` announcement, and the edge's ``TrustRing`` accepting only what a key it
already trusts signed (never a self-revocation, never a revoked key back)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from cloud.fleet.keyring import CloudKeyRing, publish_if_needed
from cloud.registry import crud
from cloud.registry.db import session_scope
from edge_node.trust import TrustRing
from shared.cli import cli
from shared.mqtt import MqttLink
from shared.schemas import KeyAction, KeyAnnouncement, KeyRing, decode_message
from shared.settings import CloudSettings, MqttSettings
from shared.signing import generate_keypair, load_private_key, sign_announcement
from shared.topics import Topics
from tests.support.brokers import Mosquitto
from tests.support.edge_fixtures import Wire, wait_for


def _env(tmp_path: Path, broker_url: str) -> dict[str, str]:
    return {
        "EDGEFLEET_DATA_DIR": str(tmp_path / "cloud"),
        "EDGEFLEET_DEV_MODE": "true",
        "EDGEFLEET_BROKER__URL": broker_url,
        "EDGEFLEET_DATABASE_URL": f"sqlite:///{tmp_path / 'registry.db'}",
    }


def _keys(runner: CliRunner, env: dict[str, str]) -> list[dict[str, object]]:
    result = runner.invoke(cli, ["cloud", "keys", "list", "--json"], env=env)
    assert result.exit_code == 0, result.output
    rows: list[dict[str, object]] = json.loads(result.output)
    return rows


def test_rotate_revoke_list_announce_and_audit(mosquitto: Mosquitto, tmp_path: Path) -> None:
    env = _env(tmp_path, mosquitto.url)
    runner = CliRunner()
    watcher = Wire(mosquitto.url, "keys-watcher", [Topics().keys()])
    try:
        (first,) = _keys(runner, env)
        assert first["state"] == "active"
        assert first["signing"] is True
        result = runner.invoke(cli, ["cloud", "keys", "revoke", str(first["key_id"])], env=env)
        assert result.exit_code != 0
        assert "last active key" in result.output

        result = runner.invoke(cli, ["cloud", "keys", "rotate"], env=env)
        assert result.exit_code == 0, result.output
        assert "announced on ef/v1/cloud/keys" in result.output
        second, old = _keys(runner, env)
        assert second["signing"] is True
        assert old["key_id"] == first["key_id"]
        assert old["signing"] is False

        result = runner.invoke(cli, ["cloud", "keys", "revoke", str(first["key_id"])], env=env)
        assert result.exit_code == 0, result.output
        rows = {r["key_id"]: r for r in _keys(runner, env)}
        assert rows[first["key_id"]]["state"] == "revoked"
        assert rows[second["key_id"]]["state"] == "active"

        # The retained ring: both announcements, replayable by an edge that only knows the first key.
        ring = wait_for(
            lambda: [m for m in watcher.decoded("/keys", KeyRing) if len(m.announcements) == 2],
            "the retained key ring",
        )[-1]
        assert [(a.seq, a.action) for a in ring.announcements] == [(1, KeyAction.ADD), (2, KeyAction.REVOKE)]
        assert ring.announcements[0].signer_key_id == first["key_id"]
        assert ring.announcements[1].signer_key_id == second["key_id"]
        settings = CloudSettings(data_dir=tmp_path / "cloud", dev_mode=True)
        edge_ring = TrustRing(tmp_path / "edge-trust", settings.key_paths()[1])
        update = edge_ring.apply(ring)
        assert update.added == [second["key_id"]]
        assert update.revoked == [first["key_id"]]
        assert edge_ring.active_ids() == [second["key_id"]]

        with session_scope(env["EDGEFLEET_DATABASE_URL"]) as session:
            audit = {(a.action, a.target) for a in crud.list_audit(session, limit=20)}
        assert ("key_rotate", second["key_id"]) in audit
        assert ("key_revoke", first["key_id"]) in audit
        # keygen still writes a standalone pair.
        result = runner.invoke(cli, ["cloud", "keygen", "--out", str(tmp_path / "kg")], env=env)
        assert result.exit_code == 0, result.output
        assert (tmp_path / "kg" / "signing.key").exists()
    finally:
        watcher.close()


def test_a_ring_changed_while_the_broker_was_away_goes_out_before_the_next_order(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    settings = CloudSettings(
        data_dir=tmp_path / "cloud", dev_mode=True, broker=MqttSettings(url=mosquitto.url)
    )
    ring = CloudKeyRing(settings)
    ring.rotate()  # not published (as if the broker were away)
    assert CloudKeyRing(settings).unpublished
    watcher = Wire(mosquitto.url, "keys-watcher", [Topics().keys()])
    link = MqttLink(settings.broker, client_id="publisher")
    link.connect()
    try:
        publish_if_needed(settings, link)  # what publish_desired_state and the rollout engine do first
        wait_for(lambda: watcher.decoded("/keys", KeyRing), "the key ring")
        assert not CloudKeyRing(settings).unpublished
    finally:
        link.stop()
        watcher.close()


def _announcement(
    seq: int, action: KeyAction, subject: str, signer: tuple[Path, str], public: str | None = None
) -> KeyAnnouncement:
    ann = KeyAnnouncement(seq=seq, action=action, key_id=subject, public_key=public)
    return sign_announcement(ann, load_private_key(signer[0]), signer_key_id=signer[1])


@pytest.fixture
def pairs(tmp_path: Path) -> dict[str, tuple[Path, Path, str]]:
    out = {}
    for name in ("root", "next", "evil"):
        private, public = tmp_path / f"{name}.key", tmp_path / f"{name}.pub"
        out[name] = (private, public, generate_keypair(private, public))
    return out


def test_the_edge_ring_accepts_only_what_a_trusted_key_signed(
    tmp_path: Path, pairs: dict[str, tuple[Path, Path, str]]
) -> None:
    root, nxt, evil = pairs["root"], pairs["next"], pairs["evil"]
    ring = TrustRing(tmp_path / "trust", root[1])
    # An attacker's key, announced by itself: refused, as is its claim to revoke the root.
    bogus = KeyRing(
        announcements=[
            _announcement(1, KeyAction.ADD, evil[2], (evil[0], evil[2]), evil[1].read_text()),
            _announcement(2, KeyAction.REVOKE, root[2], (evil[0], evil[2])),
        ]
    )
    update = ring.apply(bogus)
    assert not update.changed
    assert len(update.refused) == 2
    assert ring.active_ids() == [root[2]]
    # A key id that is not the announced key's.
    mislabelled = _announcement(1, KeyAction.ADD, "0123456789abcdef", (root[0], root[2]), nxt[1].read_text())
    assert not ring.apply(KeyRing(announcements=[mislabelled])).changed
    # A key cannot revoke itself.
    assert not ring.apply(
        KeyRing(announcements=[_announcement(1, KeyAction.REVOKE, root[2], (root[0], root[2]))])
    ).changed
    # The real chain: next added by root, root revoked by next.
    chain = [
        _announcement(1, KeyAction.ADD, nxt[2], (root[0], root[2]), nxt[1].read_text()),
        _announcement(2, KeyAction.REVOKE, root[2], (nxt[0], nxt[2])),
    ]
    update = ring.apply(KeyRing(announcements=chain))
    assert (update.added, update.revoked) == ([nxt[2]], [root[2]])
    # A revoked key never comes back, even announced by a trusted key; and it signs nothing more.
    back = _announcement(3, KeyAction.ADD, root[2], (nxt[0], nxt[2]), root[1].read_text())
    late = _announcement(4, KeyAction.ADD, evil[2], (root[0], root[2]), evil[1].read_text())
    update = ring.apply(KeyRing(announcements=[*chain, back, late]))
    assert not update.changed
    assert len(update.refused) == 2
    # Persisted: a new ring from the same store (an edge restart) knows all of it.
    again = TrustRing(tmp_path / "trust", root[1])
    assert again.active_ids() == [nxt[2]]
    assert again.is_revoked(root[2])
    assert again.seq == 2
    decoded = decode_message(KeyRing(announcements=chain).model_dump_json(), KeyRing)
    assert decoded.announcements == chain
