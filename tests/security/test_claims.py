"""Claims (cloud/fleet/claims.py, device_agent/enrollment.py): the attacks that must fail and the
legitimate path working.

- the cloud's claim handler, called as ``edgefleet broker run`` calls it: a token used twice, an
  expired or unknown token, a reserved id, an enrolled (or revoked) device's id claimed to steal it, a
  weak or absurdly costly hash, a malformed request; a retried identical request gets the same answer;
- over a real broker run by ``edgefleet broker run`` (tests/support/secure_broker.py): a device agent
  with only a claim token file claims its identity and streams telemetry with it; the same token is
  refused to a second device; an expired token cannot even log in.
"""

from __future__ import annotations

import json
import os
import queue
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from cloud.fleet import enrollment
from cloud.fleet.claims import handle_claim
from cloud.registry import crud, identities
from cloud.registry.db import downgrade, engine_for, session_scope, upgrade
from cloud.registry.models import AuditLog
from device_agent.agent import Agent
from device_agent.enrollment import ClaimError, claim
from shared.enrollment import (
    CLAIM_HASH_MIN_ITERATIONS,
    ClaimRequest,
    ClaimResponse,
    decode_claim_response,
    load_bundle,
    split_claim_token,
)
from shared.identity import broker_hash, new_secret, verify_broker_hash
from shared.mqtt import MqttLink, Received
from shared.settings import AgentSettings, CloudSettings
from shared.settings.cloud import EnrollmentSettings
from tests.support.secure_broker import SecureBroker

ITER = CLAIM_HASH_MIN_ITERATIONS  # the cheapest hash a claim may carry: these tests check the logic


@pytest.fixture(params=["sqlite", "postgresql"])
def cloud(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[CloudSettings]:
    url = (
        f"sqlite:///{tmp_path / 'registry.db'}"
        if request.param == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    settings = CloudSettings(
        dev_mode=True,
        data_dir=tmp_path / "cloud",
        database_url=url,
        enrollment={"site_broker_url": "mqtt://site.example:1883"},
    )
    upgrade(url)
    yield settings
    engine_for(url).dispose()
    if request.param == "postgresql":
        downgrade(url, "base")


def _token(cloud: CloudSettings, ttl_s: float = 3600, kind: str = "device") -> str:
    (token,) = enrollment.create_claim_tokens(settings=cloud, count=1, ttl_s=ttl_s, kind=kind, actor="cli:op")
    return split_claim_token(token)[0]


def _request(device_id: str, secret: str, *, kind: str = "device", request_id: str = "r1") -> bytes:
    body = ClaimRequest(
        device_id=device_id,
        kind=kind,  # type: ignore[arg-type]
        secret_hash=broker_hash(secret, iterations=ITER),
        request_id=request_id,
    )
    return body.model_dump_json().encode()


def _claim(cloud: CloudSettings, token_id: str, payload: bytes) -> ClaimResponse:
    return decode_claim_response(handle_claim(settings=cloud, token_id=token_id, payload=payload))


def _stored_hash(cloud: CloudSettings, identity_id: str) -> str | None:
    with session_scope(cloud.resolved_database_url) as session:
        identity = identities.get_identity(session, identity_id=identity_id)
        return None if identity is None else identity.secret_hash


def test_a_claim_enrolls_the_device_with_its_own_secret_and_answers_without_it(cloud: CloudSettings) -> None:
    token_id = _token(cloud)
    secret = new_secret()
    payload = _request("pump-7", secret)
    response = _claim(cloud, token_id, payload)
    assert response.ok, response.message
    assert response.request_id == "r1"
    assert response.bundle is not None
    assert response.bundle.identity_id == response.bundle.username == response.bundle.client_id == "pump-7"
    assert response.bundle.password is None
    assert response.bundle.broker_url == "mqtt://site.example:1883"
    assert response.bundle.enrolled_via == f"claim:{token_id}"
    stored = _stored_hash(cloud, "pump-7")
    assert stored is not None
    assert verify_broker_hash(secret, stored)
    raw = handle_claim(settings=cloud, token_id=token_id, payload=payload)  # the device asks again
    again = decode_claim_response(raw)
    assert again.ok
    assert again.bundle is not None
    assert again.bundle.model_copy(update={"issued_at": 0}) == response.bundle.model_copy(
        update={"issued_at": 0}
    )
    assert secret.encode() not in raw
    with session_scope(cloud.resolved_database_url) as session:
        token = identities.get_claim_token(session, token_id=token_id)
        assert token is not None
        assert token.used_by == "pump-7"
        audit = [(a.actor, a.action, a.target) for a in session.query(AuditLog).order_by(AuditLog.id)]
    assert audit[-2:] == [
        (f"claim:{token_id}", "use_claim_token", f"claim:{token_id}"),
        (f"claim:{token_id}", "enroll", "device:pump-7"),
    ]


def test_a_used_token_is_refused_to_anyone_else(cloud: CloudSettings) -> None:
    token_id = _token(cloud)
    assert _claim(cloud, token_id, _request("pump-7", new_secret())).ok
    # Another device (or an attacker who copied the token) with another id, or the same id and its
    # own secret: refused, and the first device's secret is untouched.
    before = _stored_hash(cloud, "pump-7")
    for device_id in ("pump-8", "pump-7"):
        response = _claim(cloud, token_id, _request(device_id, new_secret()))
        assert not response.ok
        assert response.error == "token_used"
        assert response.bundle is None
    assert _stored_hash(cloud, "pump-7") == before
    assert _stored_hash(cloud, "pump-8") is None
    with session_scope(cloud.resolved_database_url) as session:
        refusals = session.query(AuditLog).filter(AuditLog.action == "claim_refused").count()
    assert refusals == 2


def test_claiming_an_enrolled_devices_id_does_not_steal_it(cloud: CloudSettings) -> None:
    victim = enrollment.enroll_identity(settings=cloud, identity_id="pump-1", kind="device", actor="cli:op")
    victim_hash = _stored_hash(cloud, "pump-1")
    token_id = _token(cloud)
    response = _claim(cloud, token_id, _request("pump-1", new_secret()))
    assert (response.ok, response.error) == (False, "id_taken")
    assert _stored_hash(cloud, "pump-1") == victim_hash
    assert verify_broker_hash(victim.password or "", victim_hash or "")
    # The token is not spent by a refused claim: the legitimate device can still use it.
    assert _claim(cloud, token_id, _request("pump-2", new_secret())).ok


def test_a_token_does_not_revive_a_revoked_id(cloud: CloudSettings) -> None:
    enrollment.enroll_identity(settings=cloud, identity_id="pump-1", kind="device", actor="cli:op")
    enrollment.set_label_trust(settings=cloud, identity_id="pump-1", trusted=True, actor="cli:op")
    enrollment.revoke_identity(settings=cloud, identity_id="pump-1", actor="cli:op")
    response = _claim(cloud, _token(cloud), _request("pump-1", new_secret()))
    assert (response.ok, response.error) == (False, "id_taken")
    assert "revoked" in (response.message or "")
    with session_scope(cloud.resolved_database_url) as session:
        assert identities.active_identity(session, identity_id="pump-1") is None


@pytest.mark.parametrize("device_id", ["cloud", "ops", "health", "broker-claims", "claim-abc", "edgefleet-x"])
def test_reserved_ids_cannot_be_claimed(cloud: CloudSettings, device_id: str) -> None:
    token_id = _token(cloud)
    response = _claim(cloud, token_id, _request(device_id, new_secret()))
    assert (response.ok, response.error) == (False, "id_reserved")
    assert _stored_hash(cloud, device_id) is None


def test_expired_and_unknown_tokens_are_refused(cloud: CloudSettings) -> None:
    token_id = _token(cloud, ttl_s=3600)
    with session_scope(cloud.resolved_database_url) as session:
        token = identities.get_claim_token(session, token_id=token_id)
        assert token is not None
        token.expires_at = time.time() - 1
    response = _claim(cloud, token_id, _request("pump-7", new_secret()))
    assert (response.ok, response.error) == (False, "token_expired")
    for unknown in ("abcdef000000", "../../x", "Cloud"):
        assert _claim(cloud, unknown, _request("pump-7", new_secret())).error == "token_unknown"
    assert _stored_hash(cloud, "pump-7") is None


def test_malformed_or_abusive_requests_are_refused(cloud: CloudSettings) -> None:
    token_id = _token(cloud)
    secret = new_secret()
    good = json.loads(_request("pump-7", secret))
    cases = [
        b"not json",
        b"{}",
        json.dumps({**good, "role": "admin"}).encode(),  # no field beyond the contract
        json.dumps({**good, "secret_hash": "plain-text-secret"}).encode(),
        json.dumps({**good, "device_id": "a/b"}).encode(),
        json.dumps({**good, "secret_hash": broker_hash(secret, iterations=1_000)}).encode(),  # too cheap
        json.dumps({**good, "secret_hash": "$7$999999999$" + good["secret_hash"].split("$", 3)[3]}).encode(),
        b"{" + b" " * 10_000 + b"}",  # too big
    ]
    for payload in cases:
        response = _claim(cloud, token_id, payload)
        assert (response.ok, response.error) == (False, "bad_request"), payload[:80]
    assert _claim(cloud, token_id, _request("pump-7", secret)).ok  # the token was not spent


def test_a_device_the_fleet_has_heard_from_cannot_be_claimed(cloud: CloudSettings) -> None:
    # Rows from before enrollment (e.g. devices on the shared compose password): not a token's to take.
    with session_scope(cloud.resolved_database_url) as session:
        crud.upsert_device(session, device_id="pump-old", edge_id="edge-1", last_seen=time.time())
        crud.upsert_device(session, device_id="pump-planned")  # registered, never heard from
    token_id = _token(cloud)
    response = _claim(cloud, token_id, _request("pump-old", new_secret()))
    assert (response.ok, response.error) == (False, "id_taken")
    assert "seen in the fleet" in (response.message or "")
    assert _claim(cloud, token_id, _request("pump-planned", new_secret())).ok


def test_a_token_of_another_kind_is_refused_unused(cloud: CloudSettings) -> None:
    token_id = _token(cloud, kind="edge")
    response = _claim(cloud, token_id, _request("pump-7", new_secret()))  # a device agent asks
    assert (response.ok, response.error) == (False, "wrong_kind")
    assert _stored_hash(cloud, "pump-7") is None
    assert _claim(cloud, token_id, _request("edge-7", new_secret(), kind="edge")).ok


def test_an_edge_token_enrolls_an_edge(cloud: CloudSettings) -> None:
    token_id = _token(cloud, kind="edge")
    response = _claim(cloud, token_id, _request("edge-5", new_secret(), kind="edge"))
    assert response.ok
    assert response.bundle is not None
    assert response.bundle.kind == "edge"
    assert response.bundle.cloud_public_key is not None


# -- over a real broker run by `edgefleet broker run` --------------------------------------------------


def _write_token(path: Path, token: str) -> Path:
    path.write_text(token + "\n")
    path.chmod(0o600)
    return path


def _ensure_login(broker: SecureBroker, username: str, secret: str) -> None:
    """Wait until ``username`` may log in. mosquitto 2.0 loses a SIGHUP that arrives while it is still
    reloading for the previous one (it clears its reload flag after reading the files), which tests
    that change the registry twice in a row can hit: send another until the change shows."""
    for _attempt in range(5):
        probe = broker.link(username, secret, client_id=username)
        connected = probe.wait_connected(3)
        probe.stop()
        if connected:
            return
        broker.runner.reload()
    pytest.fail(f"the broker never let {username} log in; mosquitto log:\n{broker.runner.log_tail()}")


def _first_message(link: MqttLink, proc: subprocess.Popen[bytes], log_path: Path) -> Received:
    """The first message ``link`` receives while the agent process runs (it fails fast on a refusal)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the agent exited ({proc.returncode}):\n{log_path.read_text()[-3000:]}")
        try:
            return link.inbox.get(timeout=0.5)
        except queue.Empty:
            continue
    pytest.fail(f"no telemetry from the claimed agent; its log:\n{log_path.read_text()[-3000:]}")


def _agent_settings(
    broker: SecureBroker, tmp_path: Path, device_id: str, token: str, **extra: object
) -> AgentSettings:
    return AgentSettings(
        device_id=device_id,
        broker={"url": f"mqtt://127.0.0.1:{broker.port}", "reconnect_min_s": 0.5, "reconnect_max_s": 1},
        enrollment_file=tmp_path / device_id / "enrollment.json",
        claim_token_file=_write_token(tmp_path / f"{device_id}.token", token),
        data_dir=tmp_path / device_id / "data",
        **extra,
    )


def test_agent_claims_its_identity_and_streams_telemetry(secure_broker: SecureBroker, tmp_path: Path) -> None:
    cloud = secure_broker.settings
    site_url = f"mqtt://127.0.0.1:{secure_broker.port}"
    cloud.enrollment = EnrollmentSettings(site_broker_url=site_url)  # what bundles tell devices
    (token,) = enrollment.create_claim_tokens(settings=cloud, count=1, ttl_s=600, actor="cli:op")
    watch_secret = secure_broker.enroll("ops-watch", kind="operator")
    watch = secure_broker.link("ops-watch", watch_secret, start=False)
    telemetry = secure_broker.topics.telemetry("pump-claimed")
    watch.subscribe(telemetry, qos=1)
    secure_broker.wait_synced()
    _ensure_login(secure_broker, "ops-watch", watch_secret)  # the latest change (after the token's)
    watch.start()
    assert watch.wait_connected(10)
    assert watch.wait_subscribed(10)

    # A real agent process, configured as on a device: a YAML file naming the two files.
    settings = _agent_settings(secure_broker, tmp_path, "pump-claimed", token)
    config = tmp_path / "agent.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "device_id": "pump-claimed",
                "broker": {"url": site_url, "reconnect_min_s": 0.5, "reconnect_max_s": 1},
                "enrollment_file": str(settings.enrollment_file),
                "claim_token_file": str(settings.claim_token_file),
                "data_dir": str(settings.data_dir),
                "rate_hz": 200,
                "window": 20,
            }
        )
    )
    log_path = tmp_path / "agent.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "device_agent", "run", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")},
        )
    try:
        message = _first_message(watch, proc, log_path)
        assert message.topic == telemetry
    finally:
        proc.terminate()
        proc.wait(30)
    assert settings.enrollment_file is not None
    bundle = load_bundle(settings.enrollment_file)
    assert (bundle.identity_id, bundle.username, bundle.client_id) == ("pump-claimed",) * 3
    assert bundle.broker_url == site_url
    assert bundle.enrolled_via == f"claim:{split_claim_token(token)[0]}"
    assert stat.S_IMODE(settings.enrollment_file.stat().st_mode) == 0o600
    assert bundle.password is not None
    assert bundle.password not in token
    assert verify_broker_hash(bundle.password, _stored_hash(cloud, "pump-claimed") or "")
    assert not settings.enrollment_file.with_name("enrollment.json.claim").exists()
    assert bundle.password not in log_path.read_text()

    # A restart needs only the enrollment file: no token, no device_id, no broker URL (the bundle's).
    restarted = Agent(AgentSettings(enrollment_file=settings.enrollment_file, data_dir=settings.data_dir))
    assert restarted.device_id == "pump-claimed"
    restarted.start()
    try:
        assert restarted.link is not None
        assert restarted.link.wait_connected(30)
    finally:
        restarted.shutdown()

    # The same token, copied to a second device: the broker no longer lets it log in.
    copycat = _agent_settings(secure_broker, tmp_path, "pump-copycat", token, claim_timeout_s=5.0)
    with pytest.raises(ClaimError, match="unknown, used or expired"):
        claim(copycat)
    assert _stored_hash(cloud, "pump-copycat") is None
    assert copycat.enrollment_file is not None
    assert not copycat.enrollment_file.exists()


def test_an_expired_token_cannot_claim(secure_broker: SecureBroker, tmp_path: Path) -> None:
    cloud = secure_broker.settings
    (token,) = enrollment.create_claim_tokens(settings=cloud, count=1, ttl_s=600, actor="cli:op")
    with session_scope(cloud.resolved_database_url) as session:
        stored = identities.get_claim_token(session, token_id=split_claim_token(token)[0])
        assert stored is not None
        stored.expires_at = time.time() - 1
    secure_broker.wait_synced()
    settings = _agent_settings(secure_broker, tmp_path, "pump-late", token, claim_timeout_s=5.0)
    # Refused at login (the broker dropped the expired token) or, if the broker has not noticed yet,
    # by the claim handler: either way no identity.
    with pytest.raises(ClaimError, match=r"unknown, used or expired|token_expired"):
        claim(settings)
    assert _stored_hash(cloud, "pump-late") is None
    assert settings.enrollment_file is not None
    assert not settings.enrollment_file.exists()


def test_a_claim_token_cannot_claim_an_enrolled_devices_id(
    secure_broker: SecureBroker, tmp_path: Path
) -> None:
    victim_secret = secure_broker.enroll("pump-1")
    victim_hash = _stored_hash(secure_broker.settings, "pump-1")
    (token,) = enrollment.create_claim_tokens(settings=secure_broker.settings, count=1, ttl_s=600, actor="t")
    secure_broker.wait_synced()
    token_id, token_secret = split_claim_token(token)
    _ensure_login(secure_broker, f"claim-{token_id}", token_secret)
    thief = _agent_settings(secure_broker, tmp_path, "pump-1", token, claim_timeout_s=30.0)
    with pytest.raises(ClaimError, match="id_taken"):
        claim(thief)
    assert _stored_hash(secure_broker.settings, "pump-1") == victim_hash
    victim = secure_broker.link("pump-1", victim_secret, client_id="pump-1")
    assert victim.wait_connected(10)
