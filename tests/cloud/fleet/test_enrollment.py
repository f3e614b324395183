"""Enrollment, claim tokens and revocation (cloud/fleet/enrollment.py, `edgefleet fleet enroll ...`):
the bundle's contents, the CLI's JSON, revocation and re-enrollment, reserved ids, durations, the
audit log; bundle files (shared/enrollment.py); the settings that consume a bundle on the device and
the edge."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from cloud.fleet import enrollment
from cloud.registry import identities
from cloud.registry.db import session_scope, upgrade
from cloud.registry.models import AuditLog
from shared.cli import cli
from shared.enrollment import (
    EnrollmentBundle,
    EnrollmentError,
    load_bundle,
    read_claim_token,
    split_claim_token,
    write_bundle,
)
from shared.identity import verify_broker_hash
from shared.settings import AgentSettings, CloudSettings, EdgeSettings, load_settings
from shared.signing import key_id

FAKE_CA = "-----BEGIN CERTIFICATE-----\nMIIBfake\n-----END CERTIFICATE-----\n"
SITE_URL = "mqtts://broker.example:8883"
CLOUD_URL = "mqtts://broker.example:8884"


@pytest.fixture
def settings(tmp_path: Path) -> CloudSettings:
    ca = tmp_path / "ca.crt"
    ca.write_text(FAKE_CA)
    cloud = CloudSettings(
        dev_mode=True,
        data_dir=tmp_path / "cloud",
        database_url=f"sqlite:///{tmp_path / 'registry.db'}",
        enrollment={"site_broker_url": SITE_URL, "cloud_broker_url": CLOUD_URL, "ca_file": ca},
    )
    upgrade(cloud.resolved_database_url)
    return cloud


@pytest.fixture
def config_file(tmp_path: Path, settings: CloudSettings) -> Path:
    path = tmp_path / "cloud.yaml"
    path.write_text(
        json.dumps(
            {
                "dev_mode": True,
                "data_dir": str(settings.data_dir),
                "database_url": settings.resolved_database_url,
                "enrollment": {
                    "site_broker_url": SITE_URL,
                    "cloud_broker_url": CLOUD_URL,
                    "ca_file": str(settings.enrollment.ca_file),
                },
            }
        )
    )
    return path


def _run(config_file: Path, *args: str) -> tuple[int, str, str]:
    runner = CliRunner()
    env = {"EDGEFLEET_CLOUD_CONFIG": str(config_file), "USER": "alice", "LOGNAME": "alice"}
    result = runner.invoke(cli, ["fleet", *args], env=env, catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def _audit(settings: CloudSettings) -> list[AuditLog]:
    with session_scope(settings.resolved_database_url) as session:
        rows = list(session.query(AuditLog).order_by(AuditLog.id))
        session.expunge_all()
    return rows


# -- the bundle -------------------------------------------------------------------------------------


def test_device_bundle_has_everything_a_device_needs_and_only_the_hash_is_kept(
    settings: CloudSettings,
) -> None:
    bundle = enrollment.enroll_identity(
        settings=settings, identity_id="pump-1", kind="device", actor="cli:alice"
    )
    assert bundle.identity_id == bundle.username == bundle.client_id == "pump-1"
    assert bundle.broker_url == SITE_URL
    assert bundle.ca_certificate == FAKE_CA
    public = settings.key_paths()[1].read_bytes()
    assert bundle.cloud_public_key == public.decode()
    assert bundle.cloud_key_id == key_id(public)
    assert bundle.password
    with session_scope(settings.resolved_database_url) as session:
        stored = identities.get_identity(session, identity_id="pump-1")
        assert stored is not None
        assert stored.secret_hash != bundle.password
        assert bundle.password not in (stored.secret_hash or "")
        assert verify_broker_hash(bundle.password, stored.secret_hash or "")
    assert "password" not in repr(bundle) or bundle.password not in repr(bundle)


def test_service_bundles_point_at_the_cloud_listener_operators_get_a_role(settings: CloudSettings) -> None:
    service = enrollment.enroll_identity(settings=settings, identity_id="cloud", kind="service", actor="t")
    assert service.broker_url == CLOUD_URL
    operator = enrollment.enroll_identity(
        settings=settings, identity_id="ops-ana", kind="operator", actor="t"
    )
    assert operator.role == "viewer"
    assert operator.broker_url == SITE_URL
    admin = enrollment.enroll_identity(
        settings=settings, identity_id="ops-bob", kind="operator", role="admin", actor="t"
    )
    assert admin.role == "admin"
    with pytest.raises(EnrollmentError, match="only operators"):
        enrollment.enroll_identity(
            settings=settings, identity_id="pump-2", kind="device", role="admin", actor="t"
        )


def test_reserved_and_malformed_ids_are_refused_and_nothing_is_stored(settings: CloudSettings) -> None:
    for bad in ("cloud", "ops", "claim-abc", "edgefleet-x", "broker-claims", "a/b", "x" * 65, "$SYS"):
        with pytest.raises(EnrollmentError):
            enrollment.enroll_identity(settings=settings, identity_id=bad, kind="device", actor="t")
    assert enrollment.list_identity_rows(settings=settings) == []


def test_revoke_then_reenroll_gives_a_new_secret_reissue_only_on_request(settings: CloudSettings) -> None:
    first = enrollment.enroll_identity(
        settings=settings, identity_id="edge-1", kind="edge", actor="cli:alice"
    )
    with pytest.raises(EnrollmentError, match="enrolled already"):
        enrollment.enroll_identity(settings=settings, identity_id="edge-1", kind="edge", actor="cli:alice")
    with pytest.raises(EnrollmentError, match=r"enrolled as a edge|not a device"):
        enrollment.enroll_identity(
            settings=settings, identity_id="edge-1", kind="device", reissue=True, actor="t"
        )
    row = enrollment.revoke_identity(settings=settings, identity_id="edge-1", actor="cli:alice")
    assert row["status"] == "revoked"
    assert row["revoked_at"] is not None
    again = enrollment.enroll_identity(
        settings=settings, identity_id="edge-1", kind="edge", actor="cli:alice"
    )
    assert again.password != first.password
    reissued = enrollment.enroll_identity(
        settings=settings, identity_id="edge-1", kind="edge", reissue=True, actor="cli:alice"
    )
    with session_scope(settings.resolved_database_url) as session:
        stored = identities.get_identity(session, identity_id="edge-1")
        assert stored is not None
        assert stored.status == "active"
        assert verify_broker_hash(reissued.password or "", stored.secret_hash or "")
        assert not verify_broker_hash(again.password or "", stored.secret_hash or "")
        assert not verify_broker_hash(first.password or "", stored.secret_hash or "")
    actions = [(a.actor, a.action, a.target) for a in _audit(settings)]
    assert actions == [
        ("cli:alice", "enroll", "edge:edge-1"),
        ("cli:alice", "revoke", "edge:edge-1"),
        ("cli:alice", "re-enroll", "edge:edge-1"),
        ("cli:alice", "reissue", "edge:edge-1"),
    ]
    with pytest.raises(Exception, match="no identity"):
        enrollment.revoke_identity(settings=settings, identity_id="nobody", actor="t")


def test_label_trust_only_for_devices(settings: CloudSettings) -> None:
    enrollment.enroll_identity(settings=settings, identity_id="pump-1", kind="device", actor="t")
    enrollment.enroll_identity(settings=settings, identity_id="edge-1", kind="edge", actor="t")
    assert enrollment.set_label_trust(settings=settings, identity_id="pump-1", trusted=True, actor="t")[
        "label_trusted"
    ]
    with pytest.raises(EnrollmentError, match="only devices"):
        enrollment.set_label_trust(settings=settings, identity_id="edge-1", trusted=True, actor="t")


def test_edge_bundle_needs_the_cloud_key(tmp_path: Path) -> None:
    cloud = CloudSettings(data_dir=tmp_path, database_url=f"sqlite:///{tmp_path / 'r.db'}")  # no keys, no dev
    upgrade(cloud.resolved_database_url)
    with pytest.raises(EnrollmentError, match="public key"):
        enrollment.enroll_identity(settings=cloud, identity_id="edge-9", kind="edge", actor="t")
    assert enrollment.list_identity_rows(settings=cloud) == []  # nothing enrolled whose secret nobody saw
    device = enrollment.enroll_identity(settings=cloud, identity_id="pump-9", kind="device", actor="t")
    assert device.cloud_public_key is None
    assert device.broker_url == cloud.broker.url


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("30m", 1800), ("1h", 3600), ("2d", 172800), ("1w", 604800), ("45", 45)],
)
def test_durations(text: str, seconds: float) -> None:
    assert enrollment.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "1x", "h", "-5m", "0s", "1h30m", "ten"])
def test_bad_durations_say_what_is_expected(text: str) -> None:
    with pytest.raises(EnrollmentError, match="duration"):
        enrollment.parse_duration(text)


def test_claim_tokens_are_shown_once_and_stored_hashed(settings: CloudSettings) -> None:
    tokens = enrollment.create_claim_tokens(settings=settings, count=3, ttl_s=3600, actor="cli:alice")
    assert len(set(tokens)) == 3
    rows = {r["token_id"]: r for r in enrollment.claim_token_rows(settings=settings)}
    for token in tokens:
        token_id, secret = split_claim_token(token)
        assert rows[token_id]["used_at"] is None
        with session_scope(settings.resolved_database_url) as session:
            stored = identities.get_claim_token(session, token_id=token_id)
            assert stored is not None
            assert verify_broker_hash(secret, stored.secret_hash)
            assert secret not in stored.secret_hash
    with pytest.raises(EnrollmentError, match="count"):
        enrollment.create_claim_tokens(settings=settings, count=0, ttl_s=60, actor="t")
    with pytest.raises(EnrollmentError, match="at most"):
        enrollment.create_claim_tokens(settings=settings, count=1, ttl_s=365 * 86400, actor="t")
    with pytest.raises(EnrollmentError, match="devices or edges"):
        enrollment.create_claim_tokens(settings=settings, count=1, ttl_s=60, kind="operator", actor="t")
    assert [a.action for a in _audit(settings)] == ["create_claim_token"] * 3


# -- the CLI ----------------------------------------------------------------------------------------


def test_cli_enroll_json_and_out_file(config_file: Path, tmp_path: Path, settings: CloudSettings) -> None:
    code, out, _err = _run(config_file, "enroll", "pump-1", "--kind", "device", "--json")
    assert code == 0
    data = json.loads(out)
    for key in ("username", "password", "client_id", "broker_url", "ca_certificate", "cloud_public_key"):
        assert key in data
    assert data["username"] == data["client_id"] == "pump-1"
    assert data["broker_url"] == SITE_URL
    assert data["ca_certificate"] == FAKE_CA
    assert data["cloud_public_key"].startswith("-----BEGIN PUBLIC KEY-----")
    EnrollmentBundle.model_validate(data)  # the CLI prints exactly the contract devices read

    bundle_file = tmp_path / "out" / "edge-1.json"
    code, out, _err = _run(
        config_file, "enroll", "edge-1", "--kind", "edge", "--out", str(bundle_file), "--json"
    )
    assert code == 0
    shown = json.loads(out)
    assert shown["password"] is None
    assert shown["written_to"] == str(bundle_file)
    assert stat.S_IMODE(bundle_file.stat().st_mode) == 0o600
    written = load_bundle(bundle_file)
    assert written.password
    assert written.password not in out

    code, out, _err = _run(config_file, "enroll", "op-1", "--kind", "operator", "--role", "admin")
    assert code == 0
    assert "password:" in out
    assert "client id:   op-1" in out

    code, out, _err = _run(config_file, "identities", "--json")
    assert code == 0
    rows = json.loads(out)
    assert [r["identity_id"] for r in rows] == ["pump-1", "edge-1", "op-1"]
    assert all("hash" not in key for row in rows for key in row)
    assert "$7$" not in out
    code, out, _err = _run(config_file, "identities", "--kind", "edge", "--json")
    assert [r["identity_id"] for r in json.loads(out)] == ["edge-1"]
    code, out, _err = _run(config_file, "identities")
    assert code == 0
    assert "pump-1" in out
    assert "$7$" not in out

    assert [(a.actor, a.action) for a in _audit(settings)] == [
        ("cli:alice", "enroll"),
        ("cli:alice", "enroll"),
        ("cli:alice", "enroll"),
    ]


def test_cli_refusals_are_one_line_errors(config_file: Path) -> None:
    code, _out, err = _run(config_file, "enroll", "cloud", "--kind", "device")
    assert code == 1
    assert "reserved" in err
    assert _run(config_file, "enroll", "pump-1", "--kind", "device")[0] == 0
    code, _out, err = _run(config_file, "enroll", "pump-1", "--kind", "device")
    assert code == 1
    assert "--reissue" in err
    assert _run(config_file, "enroll", "pump-1", "--kind", "device", "--reissue")[0] == 0
    code, _out, err = _run(config_file, "revoke", "nobody")
    assert code == 1
    assert "no identity" in err
    code, _out, err = _run(config_file, "enroll-token", "create", "--ttl", "1x")
    assert code == 2
    assert "duration '1x'" in err


def test_cli_revoke_reenroll_label_trust_tokens(config_file: Path, settings: CloudSettings) -> None:
    assert _run(config_file, "enroll", "pump-1", "--kind", "device")[0] == 0
    code, out, _err = _run(config_file, "revoke", "pump-1")
    assert (code, out.strip()) == (0, "device pump-1: revoked")
    code, out, _err = _run(config_file, "identities", "--status", "revoked", "--json")
    assert [r["identity_id"] for r in json.loads(out)] == ["pump-1"]
    code, out, _err = _run(config_file, "enroll", "pump-1", "--kind", "device", "--json")
    assert code == 0
    assert json.loads(out)["password"]
    code, out, _err = _run(config_file, "set-label-trust", "pump-1", "on")
    assert code == 0
    assert "train models" in out

    code, out, _err = _run(config_file, "enroll-token", "create", "--count", "2", "--ttl", "30m", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["kind"] == "device"
    assert len(data["tokens"]) == 2
    ids = {split_claim_token(t)[0] for t in data["tokens"]}
    code, out, _err = _run(config_file, "enroll-token", "list", "--json")
    listed = json.loads(out)
    assert {r["token_id"] for r in listed} == ids
    assert all(r["created_by"] == "cli:alice" for r in listed)
    assert "$7$" not in out
    actions = [(a.actor, a.action) for a in _audit(settings)]
    assert actions == [
        ("cli:alice", "enroll"),
        ("cli:alice", "revoke"),
        ("cli:alice", "re-enroll"),
        ("cli:alice", "set_label_trust"),
        ("cli:alice", "create_claim_token"),
        ("cli:alice", "create_claim_token"),
    ]


# -- bundle files -----------------------------------------------------------------------------------


def _bundle(**changes: object) -> EnrollmentBundle:
    base: dict[str, object] = {
        "identity_id": "pump-1",
        "kind": "device",
        "username": "pump-1",
        "password": "s3cret-s3cret-s3cret",
        "client_id": "pump-1",
        "broker_url": "mqtt://127.0.0.1:1883",
    }
    return EnrollmentBundle.model_validate({**base, **changes})


def test_bundle_file_is_0600_and_loads_back(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "enrollment.json"
    old_umask = os.umask(0)
    try:
        write_bundle(_bundle(), path)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_bundle(path) == _bundle().model_copy(update={"issued_at": load_bundle(path).issued_at})


def test_bundle_files_that_cannot_be_used_say_why(tmp_path: Path) -> None:
    path = tmp_path / "bundle.json"
    with pytest.raises(EnrollmentError, match="does not exist"):
        load_bundle(path)
    path.write_text("{not json")
    with pytest.raises(EnrollmentError, match="not JSON"):
        load_bundle(path)
    path.write_text(json.dumps({"identity_id": "x", "surprise": 1}))
    with pytest.raises(EnrollmentError, match="not an enrollment bundle"):
        load_bundle(path)
    write_bundle(_bundle(password=None), path)
    with pytest.raises(EnrollmentError, match="no password"):
        load_bundle(path)
    with pytest.raises(ValueError, match="URL"):
        _bundle(broker_url="http://x")
    with pytest.raises(ValueError, match="credentials"):
        _bundle(broker_url="mqtt://u:p@x:1883")
    with pytest.raises(ValueError, match="PEM"):
        _bundle(ca_certificate="not a cert")


def test_claim_token_files_hold_one_token(tmp_path: Path) -> None:
    path = tmp_path / "token"
    with pytest.raises(EnrollmentError, match="does not exist"):
        read_claim_token(path)
    path.write_text("# for pump-7\n abcdef123456.0123456789abcdefXYZ \n")
    assert read_claim_token(path) == ("abcdef123456", "0123456789abcdefXYZ")
    path.write_text("abcdef123456.0123456789abcdefXYZ\nabcdef123457.0123456789abcdefXYZ\n")
    with pytest.raises(EnrollmentError, match="exactly one"):
        read_claim_token(path)
    path.write_text("no-dot-here")
    with pytest.raises(EnrollmentError, match=r"TOKEN_ID\.SECRET"):
        read_claim_token(path)


# -- consumers of a bundle --------------------------------------------------------------------------


def test_agent_settings_take_the_device_id_and_credentials_from_the_bundle(tmp_path: Path) -> None:
    from device_agent.enrollment import resolve  # noqa: PLC0415

    path = tmp_path / "enrollment.json"
    write_bundle(_bundle(broker_url="mqtts://site.example:8883", ca_certificate=FAKE_CA), path)
    agent = load_settings(AgentSettings, None, enrollment_file=path, data_dir=tmp_path / "agent")
    assert agent.device_id == "pump-1"
    resolved = resolve(agent)
    assert resolved.broker.url == "mqtts://site.example:8883"
    assert resolved.broker.credentials() == ("pump-1", "s3cret-s3cret-s3cret")
    assert resolved.client_id == "pump-1"
    assert resolved.broker.tls_ca is not None
    assert resolved.broker.tls_ca.read_text() == FAKE_CA
    # An explicit broker URL wins over the bundle's; the credentials still come from the bundle.
    explicit = load_settings(
        AgentSettings, None, enrollment_file=path, broker={"url": "mqtt://10.0.0.5:1883"}, data_dir=tmp_path
    )
    resolved = resolve(explicit)
    assert resolved.broker.url == "mqtt://10.0.0.5:1883"
    assert resolved.broker.tls_ca is None
    assert resolved.broker.credentials() == ("pump-1", "s3cret-s3cret-s3cret")
    other = load_settings(AgentSettings, None, device_id="pump-2", enrollment_file=path, data_dir=tmp_path)
    with pytest.raises(EnrollmentError, match="pump-2"):
        resolve(other)
    missing = load_settings(
        AgentSettings, None, device_id="pump-3", enrollment_file=tmp_path / "none.json", data_dir=tmp_path
    )
    with pytest.raises(EnrollmentError, match="claim_token_file"):
        resolve(missing)


def test_edge_settings_take_identity_credentials_and_cloud_key_from_the_bundle(tmp_path: Path) -> None:
    from edge_node.enrollment import apply  # noqa: PLC0415

    path = tmp_path / "edge.json"
    key = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAfake\n-----END PUBLIC KEY-----\n"
    write_bundle(
        _bundle(
            identity_id="edge-1",
            kind="edge",
            username="edge-1",
            client_id="edge-1",
            broker_url="mqtt://site.example:1883",
            cloud_public_key=key,
            cloud_key_id="abcd",
        ),
        path,
    )
    edge = load_settings(EdgeSettings, None, enrollment_file=path, data_dir=tmp_path / "edge")
    assert edge.edge_id == "edge-1"
    applied = apply(edge)
    assert applied.site_broker.url == applied.cloud.url == "mqtt://site.example:1883"
    assert applied.site_broker.credentials() == ("edge-1", "s3cret-s3cret-s3cret")
    assert applied.cloud.credentials() == ("edge-1", "s3cret-s3cret-s3cret")
    assert applied.model.public_key is not None
    assert applied.model.public_key.read_text() == key
    device_bundle = tmp_path / "device.json"
    write_bundle(_bundle(), device_bundle)
    wrong = load_settings(
        EdgeSettings, None, edge_id="edge-1", enrollment_file=device_bundle, data_dir=tmp_path
    )
    with pytest.raises(EnrollmentError, match="not an edge"):
        apply(wrong)


# -- the admin API ------------------------------------------------------------------------------------


def test_api_enrolls_lists_and_revokes_for_admins_only(settings: CloudSettings) -> None:
    import httpx  # noqa: PLC0415

    from cloud.api.auth import create_token  # noqa: PLC0415
    from tests.support.api_server import running_api  # noqa: PLC0415

    url = settings.resolved_database_url
    admin = {"Authorization": f"Bearer {create_token(database_url=url, name='adm', role='admin')}"}
    operator = {"Authorization": f"Bearer {create_token(database_url=url, name='opr', role='operator')}"}
    with running_api(settings) as base, httpx.Client(base_url=base, timeout=30) as client:
        body = {"identity_id": "pump-1", "kind": "device"}
        assert client.post("/v1/identities", json=body, headers=operator).status_code == 403
        assert client.get("/v1/identities", headers=operator).status_code == 403
        assert client.post("/v1/identities", json=body).status_code == 401
        created = client.post("/v1/identities", json=body, headers=admin)
        assert created.status_code == 201, created.text
        bundle = EnrollmentBundle.model_validate(created.json())
        assert bundle.password
        assert bundle.enrolled_via == "api"
        again = client.post("/v1/identities", json=body, headers=admin)
        assert again.status_code == 400
        assert "--reissue" in again.json()["detail"]
        reserved = client.post(
            "/v1/identities", json={"identity_id": "cloud", "kind": "device"}, headers=admin
        )
        assert reserved.status_code == 400
        listed = client.get("/v1/identities", headers=admin)
        assert [r["identity_id"] for r in listed.json()] == ["pump-1"]
        assert "$7$" not in listed.text
        revoked = client.post("/v1/identities/pump-1/revoke", headers=admin)
        assert revoked.json()["status"] == "revoked"
        assert client.post("/v1/identities/nobody/revoke", headers=admin).status_code == 404
    assert [(a.actor, a.action) for a in _audit(settings) if a.action in ("enroll", "revoke")] == [
        ("api:adm", "enroll"),
        ("api:adm", "revoke"),
    ]
