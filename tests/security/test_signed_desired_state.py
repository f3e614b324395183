"""Signed desired state against a real mosquitto and the real edge (issue 11, item 4).

Each attack that worked while only the model manifest was signed is replayed over the broker to a
running edge node (real MqttLinks, real LiteRT), and must now be refused: reported as a
``DeploymentProgress`` with stage ``refused`` and the reason, counted in
``edge_desired_refused_total{reason}``, logged, and the old model keeps serving. The legitimate path
(deploy, newer deploy, explicit signed rollback to a named older version, key rotation and
revocation through the cloud's real key ring) keeps working, across an edge restart.
"""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from cloud.fleet import rollouts
from cloud.fleet.desired_state import signed_order
from cloud.fleet.keyring import CloudKeyRing
from cloud.registry import crud, fleet
from cloud.registry.db import session_scope
from edge_node.node import EdgeNode
from shared.mqtt import MqttLink
from shared.schemas import (
    DeploymentProgress,
    DeployStage,
    DesiredAction,
    DesiredState,
    ModelManifest,
    encode_message,
    manifest_digest,
)
from shared.settings import CloudSettings, EdgeSettings, MqttSettings
from shared.signing import generate_keypair, load_private_key, sign_desired, sign_manifest
from shared.topics import EdgeTopic, Topics
from tests.support.brokers import Mosquitto
from tests.support.edge_fixtures import (
    Keys,
    Wire,
    edge_models_fixture,  # noqa: F401  (fixture)
    edge_settings,
    manifest_for,
    running_node,
    signed_desired,
    signing_keys_fixture,  # noqa: F401  (fixture)
    wait_for,
)
from tests.support.identities import enroll_fleet
from tests.support.rollout_fleet import running_fleet

TOPICS = Topics()
EDGE = "edge-1"
DESIRED = TOPICS.edge(EDGE, EdgeTopic.DESIRED)
FINAL = (DeployStage.SWAPPED, DeployStage.FAILED, DeployStage.ROLLED_BACK, DeployStage.REFUSED)
NOW = time.time()


def signed_manifest(path: Path, version: str, keys: Keys, *, age_s: float) -> ModelManifest:
    """A manifest signed by ``keys``, created ``age_s`` seconds ago (its place in the "older" order)."""
    manifest = manifest_for(path, version).model_copy(update={"created_at": NOW - age_s})
    return sign_manifest(manifest, load_private_key(keys.private), key_id=keys.key_id)


@pytest.fixture
def models(edge_models: dict[str, Path], signing_keys: Keys) -> dict[str, ModelManifest]:
    """v1 < v2 < v3 by their signed created_at (v3 has v1's bytes under a newer release)."""
    return {
        "v1": signed_manifest(edge_models["float32"], "1.0.0", signing_keys, age_s=300),
        "v2": signed_manifest(edge_models["float32_v2"], "2.0.0", signing_keys, age_s=200),
        "v3": signed_manifest(edge_models["float32"], "3.0.0", signing_keys, age_s=100),
    }


@pytest.fixture
def other_keys(tmp_path: Path) -> Keys:
    """A key pair the edge has never heard of (an attacker's, or a cloud it does not belong to)."""
    private, public = tmp_path / "other" / "k.key", tmp_path / "other" / "k.pub"
    return Keys(private, public, generate_keypair(private, public))


class Ops(Wire):
    """The attacker's / operator's client: publishes orders, watches the edge's deploy reports."""

    def send(self, order: DesiredState | bytes) -> None:
        payload = order if isinstance(order, bytes) else encode_message(order)
        self.publish(DESIRED, payload, retain=True)

    def final(self, revision: int, stage: DeployStage | None = None) -> DeploymentProgress:
        def done() -> DeploymentProgress | None:
            seen = [
                p
                for p in self.decoded("/deploy", DeploymentProgress)
                if p.revision == revision and p.stage in FINAL and (stage is None or p.stage is stage)
            ]
            return seen[-1] if seen else None

        result: DeploymentProgress = wait_for(done, f"the verdict on revision {revision}")
        return result

    def refused(self, revision: int, code: str) -> DeploymentProgress:
        verdict = self.final(revision, DeployStage.REFUSED)
        assert not verdict.ok
        assert verdict.edge_id == EDGE
        assert f"refused ({code})" in (verdict.reason or ""), verdict.reason
        return verdict

    def applied(self, order: DesiredState, stage: DeployStage = DeployStage.SWAPPED) -> None:
        self.send(order)
        verdict = self.final(order.revision)
        assert verdict.stage is stage, verdict
        assert verdict.ok, verdict


def refused_total(node: EdgeNode, code: str) -> float:
    """``edge_desired_refused_total{reason=code}`` as the Prometheus endpoint exports it."""
    text = generate_latest(node.registry).decode()
    for line in text.splitlines():
        if line.startswith(f'edge_desired_refused_total{{reason="{code}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def serving(node: EdgeNode) -> str:
    current = node.holder.current
    assert current is not None
    return current.version


@pytest.fixture
def ops(mosquitto: Mosquitto) -> Iterator[Ops]:
    wire = Ops(mosquitto.url, "ops", [TOPICS.edge(EDGE, EdgeTopic.DEPLOY)])
    yield wire
    wire.close()


@pytest.fixture
def settings(
    mosquitto: Mosquitto, edge_models: dict[str, Path], signing_keys: Keys, tmp_path: Path
) -> EdgeSettings:
    return edge_settings(
        mosquitto.url, tmp_path / "edge", edge_models["float32"], public_key=signing_keys.public
    )


# -- the legitimate path --------------------------------------------------------------------------------


def test_deploy_newer_deploy_named_rollback_and_key_rotation_work(
    mosquitto: Mosquitto,
    settings: EdgeSettings,
    ops: Ops,
    models: dict[str, ModelManifest],
    signing_keys: Keys,
    tmp_path: Path,
) -> None:
    cloud = CloudSettings(
        data_dir=tmp_path / "cloud",
        signing_private_key=signing_keys.private,
        signing_public_key=signing_keys.public,
        broker=MqttSettings(url=mosquitto.url),
    )
    ring = CloudKeyRing(cloud)
    link = MqttLink(cloud.broker, client_id="cloud-keys")
    link.connect()
    try:
        with running_node(settings) as node:
            ops.applied(signed_order(cloud, edge_id=EDGE, revision=1, model=models["v1"]))
            assert serving(node) == "1.0.0"
            ops.applied(signed_order(cloud, edge_id=EDGE, revision=2, model=models["v2"]))
            assert serving(node) == "2.0.0"
            # Back to an older version: only as an explicit, signed rollback naming it.
            rollback = signed_order(
                cloud, edge_id=EDGE, revision=3, action=DesiredAction.ROLLBACK, model=models["v1"]
            )
            assert rollback.rollback_to == "1.0.0"
            ops.applied(rollback, DeployStage.ROLLED_BACK)
            assert serving(node) == "1.0.0"

            # Rotation: the cloud's new key, announced signed by the old one, signs from now on.
            old = signing_keys.key_id
            new = ring.rotate()
            assert ring.current.key_id == new.key_id
            assert ring.publish(link)
            wait_for(lambda: new.key_id in node.manager.ring.active_ids(), "the edge trusting the new key")
            order = signed_order(cloud, edge_id=EDGE, revision=4, model=models["v2"])
            assert order.key_id == new.key_id
            ops.applied(order)
            assert serving(node) == "2.0.0"

            # Revocation of the old key, signed by the new one: its orders are refused from now on.
            ring.revoke(old)
            ring.publish(link)
            wait_for(lambda: node.manager.ring.is_revoked(old), "the edge revoking the old key")
            ops.send(signed_desired(EDGE, 5, models["v3"], keys=signing_keys))
            ops.refused(5, "revoked_key")
            assert serving(node) == "2.0.0"
        # A restart keeps what the edge learned: the new key trusted, the old one revoked, revision 4.
        with running_node(settings) as node:
            assert serving(node) == "2.0.0"
            assert node.manager.ring.is_revoked(old)
            assert new.key_id in node.manager.ring.active_ids()
            ops.applied(signed_order(cloud, edge_id=EDGE, revision=6, model=models["v3"]))
            assert serving(node) == "3.0.0"
            assert node.manager.reported().desired_revision == 6
    finally:
        link.stop()


# -- attacks that worked before ---------------------------------------------------------------------------


def test_replayed_old_manifest_cannot_downgrade_the_edge(
    settings: EdgeSettings,
    ops: Ops,
    models: dict[str, ModelManifest],
    signing_keys: Keys,
) -> None:
    first = signed_desired(EDGE, 1, models["v1"], keys=signing_keys)
    with running_node(settings) as node:
        ops.applied(first)
        ops.applied(signed_desired(EDGE, 2, models["v2"], keys=signing_keys))
        # The old signed manifest in a new desired state: without the cloud's key, it is unsigned.
        ops.send(DesiredState(edge_id=EDGE, revision=3, model=models["v1"], expires_at=NOW + 3600))
        ops.refused(3, "unsigned")
        # Even an order the cloud signed may not install an older model unless it is a rollback.
        ops.send(signed_desired(EDGE, 4, models["v1"], keys=signing_keys))
        verdict = ops.refused(4, "downgrade")
        assert "older than the serving vib@2.0.0" in (verdict.reason or "")
        assert serving(node) == "2.0.0"
        assert refused_total(node, "unsigned") == 1
        assert refused_total(node, "downgrade") == 1
    # The old signed order itself, replayed verbatim after a restart: the applied revision persisted.
    with running_node(settings) as node:
        before = len(ops.decoded("/deploy", DeploymentProgress))
        ops.send(first)
        wait_for(lambda: len(ops.decoded("/deploy", DeploymentProgress)) > before, "a verdict")
        ops.refused(1, "stale_revision")
        assert serving(node) == "2.0.0"
        assert node.manager.reported().desired_revision == 2


def test_a_huge_revision_cannot_pin_the_edge(
    settings: EdgeSettings,
    ops: Ops,
    models: dict[str, ModelManifest],
    signing_keys: Keys,
    other_keys: Keys,
) -> None:
    pin = 2**62
    with running_node(settings) as node:
        ops.applied(signed_desired(EDGE, 1, models["v1"], keys=signing_keys))
        ops.send(DesiredState(edge_id=EDGE, revision=pin, model=models["v2"], expires_at=NOW + 3600))
        ops.refused(pin, "unsigned")
        ops.send(signed_desired(EDGE, pin + 1, models["v2"], keys=other_keys))
        ops.refused(pin + 1, "unknown_key")
        assert node.manager.reported().desired_revision == 1  # nothing taken from the attacker
        # The cloud's next order is not ignored.
        ops.applied(signed_desired(EDGE, 2, models["v3"], keys=signing_keys))
        assert serving(node) == "3.0.0"
        assert node.manager.reported().desired_revision == 2


def test_an_unsigned_rollback_is_not_obeyed(
    settings: EdgeSettings,
    ops: Ops,
    models: dict[str, ModelManifest],
    signing_keys: Keys,
) -> None:
    with running_node(settings) as node:
        ops.applied(signed_desired(EDGE, 1, models["v1"], keys=signing_keys))
        ops.applied(signed_desired(EDGE, 2, models["v2"], keys=signing_keys))
        assert node.manager.reported().last_good_version == "1.0.0"
        ops.send(
            DesiredState(
                edge_id=EDGE,
                revision=3,
                action=DesiredAction.ROLLBACK,
                rollback_to="1.0.0",
                expires_at=NOW + 3600,
            )
        )
        ops.refused(3, "unsigned")
        # Signed, but not naming the version it goes back to.
        unnamed = DesiredState(edge_id=EDGE, revision=4, action=DesiredAction.ROLLBACK, expires_at=NOW + 3600)
        ops.send(sign_desired(unnamed, load_private_key(signing_keys.private), key_id=signing_keys.key_id))
        ops.refused(4, "rollback_unnamed")
        assert serving(node) == "2.0.0"
        # The cloud's signed rollback naming last-good (no manifest: restored from the edge's store).
        ops.applied(
            signed_desired(EDGE, 5, None, "rollback", keys=signing_keys, rollback_to="1.0.0"),
            DeployStage.ROLLED_BACK,
        )
        assert serving(node) == "1.0.0"


def test_orders_for_another_edge_expired_unknown_key_or_tampered_are_refused(
    settings: EdgeSettings,
    ops: Ops,
    models: dict[str, ModelManifest],
    signing_keys: Keys,
    other_keys: Keys,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="edge_node.models")
    signed = signed_desired(EDGE, 6, models["v2"], keys=signing_keys)
    retargeted = signed_desired(EDGE, 7, models["v2"], keys=signing_keys)
    cases: list[tuple[str, DesiredState]] = [
        ("wrong_edge", signed_desired("edge-2", 2, models["v2"], keys=signing_keys)),
        (
            "expired",
            signed_desired(
                EDGE, 3, models["v2"], keys=signing_keys, issued_at=NOW - 7200, expires_at=NOW - 3600
            ),
        ),
        ("unknown_key", signed_desired(EDGE, 4, models["v2"], keys=other_keys)),
        # Signed by an unknown key while claiming the trusted key's id.
        (
            "bad_signature",
            sign_desired(
                DesiredState(edge_id=EDGE, revision=5, model=models["v2"], expires_at=NOW + 3600),
                load_private_key(other_keys.private),
                key_id=signing_keys.key_id,
            ),
        ),
        # Tampered fields, the signature kept: the revision, the edge, the model (with its digest).
        ("bad_signature", signed.model_copy(update={"revision": 8})),
        (
            "bad_signature",
            retargeted.model_copy(
                update={"model": models["v3"], "model_digest": manifest_digest(models["v3"])}
            ),
        ),
        ("bad_signature", signed.model_copy(update={"revision": 9, "expires_at": NOW + 10 * 86400})),
        # Signed as sent, but its digest does not name the model it carries.
        (
            "digest_mismatch",
            _sign_as_is(
                DesiredState(
                    edge_id=EDGE,
                    revision=10,
                    model=models["v2"],
                    model_digest="0" * 64,
                    expires_at=NOW + 3600,
                ),
                signing_keys,
            ),
        ),
    ]
    with running_node(settings) as node:
        ops.applied(signed_desired(EDGE, 1, models["v1"], keys=signing_keys))
        for code, order in cases:
            ops.send(order)
            ops.refused(order.revision, code)
            assert serving(node) == "1.0.0", code
        assert node.manager.reported().desired_revision == 1
        assert refused_total(node, "wrong_edge") == 1
        assert refused_total(node, "expired") == 1
        assert refused_total(node, "unknown_key") == 1
        assert refused_total(node, "bad_signature") == 4
        assert refused_total(node, "digest_mismatch") == 1
        # Not a syntax error either: an undecodable payload is counted and logged too.
        ops.send(b'{"type": "desired_state", "revision": "many"}')
        wait_for(lambda: refused_total(node, "malformed") == 1, "the malformed order counted")
        # The edge still follows the cloud.
        ops.applied(signed_desired(EDGE, 11, models["v2"], keys=signing_keys))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for code in ("wrong_edge", "expired", "unknown_key", "bad_signature", "digest_mismatch", "malformed"):
        assert any(f"refused ({code})" in w for w in warnings), code


def _sign_as_is(order: DesiredState, keys: Keys) -> DesiredState:
    """Sign ``order`` exactly as it is (``sign_desired`` would make its digest consistent)."""
    unsigned = order.model_copy(update={"signature": None, "key_id": keys.key_id})
    signature = load_private_key(keys.private).sign(unsigned.signing_bytes())
    return unsigned.model_copy(update={"signature": base64.b64encode(signature).decode()})


# -- the rollout engine -------------------------------------------------------------------------------


def test_the_rollout_engine_counts_a_refused_order_as_a_failure(
    tmp_path: Path, edge_models: dict[str, Path], other_keys: Keys
) -> None:
    """A real fleet (registry, ingest, engine ticking, edges): an attacker's pinning order is refused so
    the engine's order is carried out, and an edge that refuses the engine's own order (it trusts
    another key) fails its target (the wave breaches) instead of counting as handled."""
    # edge-x is an enrolled edge of this fleet (enrolled before the ingest starts, as running_fleet does).
    enroll_fleet(f"sqlite:///{tmp_path / 'registry.db'}", edges=["edge-x"])
    with running_fleet(tmp_path, edge_models, edges=("edge-a",)) as env:
        with session_scope(env.settings.resolved_database_url) as session:
            v2 = ModelManifest.model_validate(crud.get_model_version(session, ref=env.models["v2"]).manifest)
        attacker = Wire(env.broker.url, "attacker")
        pin = DesiredState(edge_id="edge-a", revision=2**62, model=v2, expires_at=NOW + 3600)
        attacker.publish(TOPICS.edge("edge-a", EdgeTopic.DESIRED), encode_message(pin), retain=True)
        wait_for(lambda: env.nodes["edge-a"].manager.refused["unsigned"] == 1, "the pinning order refused")
        stranger = EdgeNode(
            edge_settings(
                env.broker.url,
                tmp_path / "edge-x",
                None,
                cloud_url=env.broker.url,
                public_key=other_keys.public,
                edge_id="edge-x",
                site_broker=MqttSettings(url=env.broker.url, topic_prefix="site-edge-x/v1"),
            )
        )
        stranger.start()
        try:
            wait_for(lambda: env.edge_state("edge-x") == "online", "edge-x online in the registry")
            rollout_id = rollouts.start_rollout(
                settings=env.settings,
                model_ref=env.models["v1"],
                edge_ids=["edge-a", "edge-x"],
                canary=0,
                waves=1,
                params={"min_windows": 10, "soak_s": 0},
                actor="test",
            )
            status = wait_for(
                lambda: (
                    (s := rollouts.status(settings=env.settings, rollout_id=rollout_id))["state"]
                    in ("completed", "halted")
                    and s
                ),
                "the rollout's verdict",
            )
            assert status["state"] == "halted", status
            assert "order refused by edge-x" in status["reason"], status["reason"]
            by_edge = {t["edge_id"]: t for t in status["targets"]}
            assert by_edge["edge-x"]["state"] != "serving"
            with session_scope(env.settings.resolved_database_url) as session:
                row = fleet.deployment_target(
                    session, edge_id="edge-x", revision=by_edge["edge-x"]["revision"]
                )
                assert row is not None
                assert row.stage == "refused"
                assert "unknown_key" in (row.reason or "")
            assert stranger.manager.refused["unknown_key"] >= 1
            assert stranger.holder.current is None  # never ran anything of this cloud
            # edge-a carried out the engine's order, not the attacker's.
            wait_for(lambda: env.reported("edge-a").get("model_version") == "1.0.0", "edge-a on v1")
            assert env.reported("edge-a")["desired_revision"] < 2**62
        finally:
            stranger.stop()
            attacker.close()
