"""The broker's config, password and ACL files rendered from a registry snapshot (pure functions)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from shared.broker_auth import (
    CLAIMS_USER,
    HEALTH_USER,
    MAX_QUEUED_BYTES,
    MAX_QUEUED_MESSAGES,
    MESSAGE_SIZE_LIMIT,
    AuthSnapshot,
    BrokerLayout,
    ClaimEntry,
    IdentityEntry,
    InternalUsers,
    TlsFiles,
    render_auth_files,
    render_config,
)
from shared.codec import DEFAULT_MAX_PAYLOAD
from shared.identity import MAX_EDGE_WORKERS, broker_hash
from shared.private_broker import DURABLE
from shared.topics import Topics

H = broker_hash("secret", iterations=10)
TOPICS = Topics()
INTERNAL = InternalUsers(
    claims_hash=broker_hash("c", iterations=10), health_hash=broker_hash("h", iterations=10)
)
SNAPSHOT = AuthSnapshot(
    revision=7,
    identities=(
        IdentityEntry("dev-1", "device", H),
        IdentityEntry("edge-1", "edge", H),
        IdentityEntry("cloud", "service", H),
        IdentityEntry("ingest-2", "service", H),
        IdentityEntry("ann", "operator", H, "viewer"),
        IdentityEntry("bob", "operator", H, "admin"),
    ),
    claims=(ClaimEntry("tok1", H, 2_000_000_000.0), ClaimEntry("tok2", H, 1_900_000_000.0)),
)


def layout(tmp_path: Path, **kwargs: object) -> BrokerLayout:
    return BrokerLayout(data_dir=tmp_path, port=1883, cloud_port=1884, **kwargs)  # type: ignore[arg-type]


def sections(conf: str) -> list[str]:
    """The global part, then one part per listener."""
    return re.split(r"\n(?=listener )", conf)


def acl_blocks(acl: str) -> dict[str, list[str]]:
    blocks: dict[str, list[str]] = {}
    user = None
    for line in acl.splitlines():
        if line.startswith("user "):
            user = line[5:]
            blocks[user] = []
        elif line.startswith("topic "):
            assert user is not None, f"a topic line outside a user block: {line}"
            blocks[user].append(line[6:])
        else:
            assert not line.strip() or line.startswith("#"), f"unexpected ACL line {line!r}"
    return blocks


def users(passwd: str) -> list[str]:
    return [line.split(":", 1)[0] for line in passwd.splitlines()]


def test_config_has_two_locked_listeners_and_the_limits(tmp_path: Path) -> None:
    conf = render_config(layout(tmp_path))
    head, site, cloud = sections(conf)
    assert "per_listener_settings true" in head
    assert "set_tcp_nodelay true" in head
    assert f"message_size_limit {MESSAGE_SIZE_LIMIT}" in head
    assert DEFAULT_MAX_PAYLOAD < MESSAGE_SIZE_LIMIT < 2 * 1024 * 1024
    assert f"max_inflight_messages {DURABLE.max_inflight_messages}" in head
    assert f"max_queued_messages {MAX_QUEUED_MESSAGES}" in head
    assert f"max_queued_bytes {MAX_QUEUED_BYTES}" in head
    assert MAX_QUEUED_MESSAGES > 0  # bounded (0 would be unlimited)
    assert MAX_QUEUED_BYTES > 0
    assert f"persistence_location {tmp_path.resolve()}/" in head
    assert ("user root" in head) == (os.geteuid() == 0)
    assert site.startswith("listener 1883 127.0.0.1")
    assert cloud.startswith("listener 1884 127.0.0.1")
    for part, name in ((site, "site"), (cloud, "cloud")):
        assert "allow_anonymous false" in part
        assert f"password_file {tmp_path.resolve()}/passwd-{name}" in part
        assert f"acl_file {tmp_path.resolve()}/acl-{name}" in part
        assert "cafile" not in part
    assert "use_username_as_clientid true" in site
    assert "use_username_as_clientid" not in cloud  # the cloud's processes share one identity
    assert "allow_anonymous true" not in conf
    assert "pattern" not in conf


def test_no_cloud_listener_with_cloud_port_0(tmp_path: Path) -> None:
    lay = BrokerLayout(data_dir=tmp_path, port=1883, cloud_port=0)
    assert len(sections(render_config(lay))) == 2
    files = render_auth_files(lay, SNAPSHOT, TOPICS, INTERNAL)
    assert set(files) == {"passwd-site", "acl-site"}
    # The claim handler then logs in on the site listener; services have nowhere to log in.
    assert CLAIMS_USER in users(files["passwd-site"])
    assert "cloud" not in users(files["passwd-site"])


def test_tls_makes_every_listener_tls_only(tmp_path: Path) -> None:
    tls = TlsFiles(cert=tmp_path / "s.crt", key=tmp_path / "s.key", ca=tmp_path / "ca.crt")
    _head, *listeners = sections(render_config(layout(tmp_path, tls=tls)))
    assert len(listeners) == 2  # no plaintext listener next to them
    for part in listeners:
        assert f"certfile {tls.cert.resolve()}" in part
        assert f"keyfile {tls.key.resolve()}" in part
        assert f"cafile {tls.ca.resolve()}" in part
        assert "tls_version tlsv1.2" in part


def test_the_client_certificate_listener(tmp_path: Path) -> None:
    tls = TlsFiles(
        cert=tmp_path / "s.crt", key=tmp_path / "s.key", ca=tmp_path / "ca.crt", crl=tmp_path / "ca.crl"
    )
    lay = layout(tmp_path, tls=tls, x509_port=8884)
    _head, site, _cloud, x509 = sections(render_config(lay))
    assert x509.startswith("listener 8884 127.0.0.1")
    for line in (
        "require_certificate true",
        "use_identity_as_username true",
        "use_username_as_clientid true",
    ):
        assert line in x509
    assert "password_file" not in x509
    assert f"crlfile {tls.crl.resolve()}" in x509  # type: ignore[union-attr]
    assert "crlfile" not in site
    files = render_auth_files(lay, SNAPSHOT, TOPICS, INTERNAL)
    blocks = acl_blocks(files["acl-x509"])
    assert blocks["dev-1"] == acl_blocks(files["acl-site"])["dev-1"]
    assert "edge-1/site" in blocks
    assert not {"claim-tok1", HEALTH_USER, CLAIMS_USER} & set(blocks)
    with pytest.raises(ValueError, match="needs the TLS files"):
        BrokerLayout(data_dir=tmp_path, port=1883, x509_port=8884)
    with pytest.raises(ValueError, match="distinct ports"):
        BrokerLayout(data_dir=tmp_path, port=1883, cloud_port=1883)


def test_site_users_one_line_per_edge_connection(tmp_path: Path) -> None:
    files = render_auth_files(layout(tmp_path), SNAPSHOT, TOPICS, INTERNAL)
    site = users(files["passwd-site"])
    edge_lines = [u for u in site if u.startswith("edge-1/")]
    assert len(edge_lines) == 2 + 2 * MAX_EDGE_WORKERS
    assert {"edge-1/site", "edge-1/cloud", "edge-1/site-0", f"edge-1/cloud-{MAX_EDGE_WORKERS - 1}"} <= set(
        edge_lines
    )
    assert "edge-1" not in site
    assert {"dev-1", "ann", "bob", "claim-tok1", "claim-tok2", HEALTH_USER} <= set(site)
    assert not {"cloud", "ingest-2", CLAIMS_USER} & set(site)
    assert users(files["passwd-cloud"]) == ["cloud", "ingest-2", CLAIMS_USER]
    for line in files["passwd-site"].splitlines():
        assert line.split(":", 1)[1].startswith("$7$")


def test_device_acl_is_its_own_topics_only(tmp_path: Path) -> None:
    blocks = acl_blocks(render_auth_files(layout(tmp_path), SNAPSHOT, TOPICS, INTERNAL)["acl-site"])
    assert sorted(blocks["dev-1"]) == sorted(
        [
            "write ef/v1/dev/dev-1/telemetry",
            "write ef/v1/dev/dev-1/status",
            "write ef/v1/dev/dev-1/health",
            "write ef/v1/dev/dev-1/ack",
            "read ef/v1/dev/dev-1/cmd",
            "read ef/v1/dev/dev-1/desired",
        ]
    )


def test_edge_acl_reads_its_orders_and_its_devices(tmp_path: Path) -> None:
    blocks = acl_blocks(render_auth_files(layout(tmp_path), SNAPSHOT, TOPICS, INTERNAL)["acl-site"])
    rules = blocks["edge-1/site-3"]
    assert rules == blocks["edge-1/cloud"]
    assert "read ef/v1/edge/edge-1/desired" in rules
    assert not any(
        r.endswith("ef/v1/edge/edge-1/desired") and r.startswith(("write", "readwrite")) for r in rules
    )
    for kind in ("status", "decision", "samples", "metrics", "deploy", "dead", "devices"):
        assert f"readwrite ef/v1/edge/edge-1/{kind}" in rules
    assert "read ef/v1/dev/+/telemetry" in rules
    assert "read $share/+/ef/v1/dev/+/telemetry" in rules
    assert "write ef/v1/dev/+/cmd" in rules
    assert "read ef/v1/cloud/keys" in rules  # the key ring: read only
    assert not any(r.startswith(("write", "readwrite")) and "/cloud/" in r for r in rules)
    # Nothing of another edge, no wildcard over edges, no device topic it could forge.
    assert all("edge/+" not in r and "#" not in r for r in rules)
    assert not any(
        r.startswith(("write", "readwrite")) and "/dev/" in r and not r.endswith("/cmd") for r in rules
    )


def test_operators_services_claims_and_internal_users(tmp_path: Path) -> None:
    files = render_auth_files(layout(tmp_path), SNAPSHOT, TOPICS, INTERNAL)
    site, cloud = acl_blocks(files["acl-site"]), acl_blocks(files["acl-cloud"])
    # Never the claim answers (they carry new secrets).
    assert site["ann"] == ["read ef/v1/dev/#", "read ef/v1/edge/#", "read ef/v1/cloud/keys"]
    assert site["bob"] == ["readwrite ef/v1/dev/#", "readwrite ef/v1/edge/#", "read ef/v1/cloud/keys"]
    assert site["claim-tok1"] == ["write ef/v1/claim/tok1/request", "read ef/v1/claim/tok1/response"]
    assert site[HEALTH_USER] == ["read $SYS/#"]
    assert cloud["cloud"] == ["readwrite ef/v1/#"]
    assert cloud[CLAIMS_USER] == ["read ef/v1/claim/+/request", "write ef/v1/claim/+/response"]
    assert "pattern" not in files["acl-site"] + files["acl-cloud"]


def test_a_custom_prefix_is_used_everywhere(tmp_path: Path) -> None:
    files = render_auth_files(layout(tmp_path), SNAPSHOT, Topics("site7/x"), INTERNAL)
    topics = [line.split(" ", 2)[2] for line in files["acl-site"].splitlines() if line.startswith("topic ")]
    assert all(t.startswith(("site7/x/", "$share/+/site7/x/", "$SYS")) for t in topics)


@pytest.mark.parametrize(
    "entry",
    [
        IdentityEntry("dev:1", "device", H),  # ':' would split the password-file line
        IdentityEntry("dev 1", "device", H),
        IdentityEntry("dev/1", "device", H),
        IdentityEntry("dev-2", "device", "plaintext"),  # not a $7$ hash
        IdentityEntry("dev-3", "device", H + "\nevil:" + H),  # a line break smuggled in
    ],
)
def test_unusable_entries_are_left_out(tmp_path: Path, entry: IdentityEntry) -> None:
    snapshot = AuthSnapshot(identities=(entry, IdentityEntry("dev-ok", "device", H)))
    files = render_auth_files(layout(tmp_path), snapshot, TOPICS, InternalUsers())
    assert users(files["passwd-site"]) == ["dev-ok"]
    assert list(acl_blocks(files["acl-site"])) == ["dev-ok"]


def test_bad_claim_token_ids_are_left_out(tmp_path: Path) -> None:
    snapshot = AuthSnapshot(
        claims=(ClaimEntry("-bad", H, 1.0), ClaimEntry("a:b", H, 1.0), ClaimEntry("ok", H, 1.0))
    )
    files = render_auth_files(layout(tmp_path), snapshot, TOPICS, InternalUsers())
    assert users(files["passwd-site"]) == ["claim-ok"]


def test_next_expiry_is_the_earliest_claim() -> None:
    assert SNAPSHOT.next_expiry == 1_900_000_000.0
    assert AuthSnapshot().next_expiry is None
