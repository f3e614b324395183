"""What a mosquitto with per-identity credentials needs, rendered from a list of identities (pure
functions, standard library only: the edge's benchmark renders them too, and ``shared`` is installed
on devices): its config (``render_config``; the listener blocks alone: ``render_listener``), and a
password file and an ACL file per listener. ``cloud.broker`` (``edgefleet broker run``) renders them
from an ``AuthSnapshot`` of the registry and keeps them equal to it.

Two listeners (three with client certificates), ``per_listener_settings true``:

- *site* (``--port``): devices, edges, operators and claim tokens. ``use_username_as_clientid true``:
  the client id is the username, so a client id belongs to exactly one identity (a client cannot take
  over another's session by reusing its client id). An edge logs in once per connection, as
  ``EDGE/site``, ``EDGE/cloud``, ``EDGE/site-K``, ``EDGE/cloud-K`` (``shared.identity``): one
  password-file line per connection name, all with the edge's hash.
- *cloud* (``--cloud-port``, default port + 1, 0 = none): the cloud's service identities only, with
  free client ids (the cloud runs many processes under one identity), and the broker's own claim
  handler.
- *x509* (``--x509-port``, with TLS only): ``require_certificate true``, ``use_identity_as_username
  true``: a client certificate of the CA is the credential and its CN the username (``dev-1``,
  ``edge-1/site``, ...), with the site listener's ACL per identity (no claim tokens). Revoking the
  identity removes its ACL (the live connection keeps its socket but may neither publish nor
  receive); refusing the certificate itself needs a CRL (``crl``).

ACLs are literal topics per user, built only with ``shared.topics.Topics``; there is no ``pattern``
line (a pattern applies to every user of the file: with one, a device could write as a fake edge
named after itself). Revoked identities and used or expired claim tokens are simply absent: mosquitto
refuses them, and a SIGHUP closes their live connections.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from shared.codec import DEFAULT_MAX_PAYLOAD as CODEC_MAX_PAYLOAD
from shared.identity import (
    CONNECTION_SEPARATOR,
    MAX_EDGE_WORKERS,
    IdentityKind,
    OperatorRole,
    check_broker_hash,
    connection_username,
    edge_connections,
)
from shared.topics import DeviceTopic, EdgeTopic, Topics, validate_id

logger = logging.getLogger(__name__)

# mosquitto drops (silently, for MQTT 3.1.1 QoS 0/1) any PUBLISH whose payload is larger than this.
# The codec's cap on a sensor window is CODEC_MAX_PAYLOAD (1 MiB); the margin leaves room for the
# largest JSON control message next to it, while a 2 MiB payload is dropped at the broker.
MESSAGE_SIZE_MARGIN: Final = 64 * 1024
MESSAGE_SIZE_LIMIT: Final = CODEC_MAX_PAYLOAD + MESSAGE_SIZE_MARGIN
# Per-client queue bounds. An edge's site session is persistent: while the edge is offline the broker
# queues every telemetry window of its devices for it. A 1,000-device site at one window per device
# per second (100 Hz x 100 samples x 3 axes float32 is ~1.3 KB with the header) is 1,000 windows/s:
# 300,000 messages and 384 MiB hold ~5 minutes of it (an edge restart, a short outage), after which
# mosquitto drops further QoS1 messages for that client instead of growing without bound (which a
# malicious persistent subscriber could otherwise make it do). Devices receive a few commands: far
# below either bound.
MAX_QUEUED_MESSAGES: Final = 300_000
MAX_QUEUED_BYTES: Final = 384 * 1024 * 1024
# As shared.private_broker.DURABLE: edges PUBACK only after deciding, so nothing caps what is in flight.
MAX_INFLIGHT_MESSAGES: Final = 0
# With persistence: how often the in-memory state is saved (a clean stop saves it too).
AUTOSAVE_INTERVAL_S: Final = 10

CONFIG_NAME: Final = "mosquitto.conf"
SITE: Final = "site"
CLOUD: Final = "cloud"
X509: Final = "x509"  # client certificates: CN = broker username
# Internal users of the broker itself; reserved names (shared.identity): nobody can enroll them.
CLAIMS_USER: Final = "broker-claims"  # the claim handler inside ``broker run`` (cloud listener)
HEALTH_USER: Final = "health"  # reads $SYS/# (a compose healthcheck); site listener
# Logs in (no topic rights) with a secret new at every sync: once it is let in, mosquitto has loaded
# that sync's files (``broker run`` confirms each reload so).
SYNC_USER: Final = "broker-sync"
SYS_TOPICS: Final = "$SYS/#"
# Edge topics an edge may only read: what the cloud orders it.
EDGE_READ_ONLY: Final = frozenset({"desired", "keys"})


def passwd_name(listener: str) -> str:
    """The password file of a listener, e.g. ``passwd-site``."""
    return f"passwd-{listener}"


def acl_name(listener: str) -> str:
    """The ACL file of a listener, e.g. ``acl-site``."""
    return f"acl-{listener}"


@dataclass(frozen=True, slots=True)
class IdentityEntry:
    """One active identity as the broker needs it."""

    identity_id: str
    kind: str
    secret_hash: str
    role: str | None = None


@dataclass(frozen=True, slots=True)
class ClaimEntry:
    """One usable (not used, not expired) claim token."""

    token_id: str
    secret_hash: str
    expires_at: float


@dataclass(frozen=True, slots=True)
class AuthSnapshot:
    """What the registry says at one ``auth_revision``: active identities and usable claim tokens."""

    revision: int = 0
    identities: tuple[IdentityEntry, ...] = ()
    claims: tuple[ClaimEntry, ...] = ()

    @property
    def next_expiry(self) -> float | None:
        """When the next usable claim token expires (the files must be rendered again then)."""
        return min((claim.expires_at for claim in self.claims), default=None)


@dataclass(frozen=True, slots=True)
class InternalUsers:
    """The broker's own users (hashes of secrets ``broker run`` generates at start)."""

    claims_hash: str | None = None
    health_hash: str | None = None
    sync_hash: str | None = None  # SYNC_USER's, on the claims listener


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """Server certificate, key and the CA (``cafile``) of the TLS listeners; ``crl``: a certificate
    revocation list of that CA for the client-certificate listener (re-read on every SIGHUP)."""

    cert: Path
    key: Path
    ca: Path
    crl: Path | None = None


@dataclass(frozen=True, slots=True)
class BrokerLayout:
    """Where and how the broker listens, and where its files go."""

    data_dir: Path
    port: int
    cloud_port: int = 0  # 0: no cloud listener
    host: str = "127.0.0.1"
    tls: TlsFiles | None = None
    x509_port: int = 0  # 0: no client-certificate listener (it needs ``tls``)
    log_types: tuple[str, ...] = ("error", "warning", "notice")

    def __post_init__(self) -> None:
        if self.x509_port and self.tls is None:
            raise ValueError("a client-certificate listener (x509_port) needs the TLS files")
        ports = [p for p in (self.port, self.cloud_port, self.x509_port) if p]
        if len(set(ports)) != len(ports):
            raise ValueError(f"the listeners need distinct ports, not {ports}")

    @property
    def listeners(self) -> tuple[str, ...]:
        """The listeners this layout has: ``site``; ``cloud`` and ``x509`` when they have a port."""
        return (SITE,) + ((CLOUD,) if self.cloud_port else ()) + ((X509,) if self.x509_port else ())

    @property
    def claims_listener(self) -> str:
        """Where the broker's claim handler logs in: the cloud listener, else the site listener."""
        return CLOUD if self.cloud_port else SITE

    @property
    def connect_host(self) -> str:
        """Where a local client reaches the listeners (loopback when they bind every address)."""
        return "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host

    def port_of(self, listener: str) -> int:
        """The port of ``listener``."""
        return {SITE: self.port, CLOUD: self.cloud_port, X509: self.x509_port}[listener]


# -- mosquitto.conf -------------------------------------------------------------------------------


def render_config(layout: BrokerLayout) -> str:
    """The text of ``mosquitto.conf`` for ``layout`` (``edgefleet broker run``'s)."""
    data_dir = layout.data_dir.resolve()
    lines = [
        "# Generated by edgefleet broker run: edits are overwritten at the next start.",
        "per_listener_settings true",
        "set_tcp_nodelay true",
        "persistence true",
        f"persistence_location {data_dir}/",
        f"autosave_interval {AUTOSAVE_INTERVAL_S}",
        f"message_size_limit {MESSAGE_SIZE_LIMIT}",
        f"max_inflight_messages {MAX_INFLIGHT_MESSAGES}",
        f"max_queued_messages {MAX_QUEUED_MESSAGES}",
        f"max_queued_bytes {MAX_QUEUED_BYTES}",
        "log_dest stderr",
        "connection_messages true",
        *(f"log_type {kind}" for kind in layout.log_types),
    ]
    if os.geteuid() == 0:
        # As shared.private_broker: started as root mosquitto drops to user "mosquitto", which cannot
        # read the 0600 password and ACL files nor write the persistence file in the data dir.
        lines.append("user root")
    for listener in layout.listeners:
        lines += ["", *render_listener(layout, listener)]
    return "\n".join(lines) + "\n"


def render_listener(layout: BrokerLayout, listener: str) -> list[str]:
    """The lines of one listener's block: no anonymous clients, its password file (or client
    certificates), its ACL file, client id = username (site and x509), the TLS files. The files are
    named ``passwd_name`` / ``acl_name`` in ``layout.data_dir``. With ``per_listener_settings true``
    in the global part, the block is all a listener's security."""
    data_dir = layout.data_dir.resolve()
    lines = [f"listener {layout.port_of(listener)} {layout.host}", "allow_anonymous false"]
    if listener == X509:
        # The certificate is the credential: CN = username (and so client id); no password file.
        lines += ["require_certificate true", "use_identity_as_username true"]
    else:
        lines.append(f"password_file {data_dir / passwd_name(listener)}")
    if listener in (SITE, X509):
        lines.append("use_username_as_clientid true")
    lines.append(f"acl_file {data_dir / acl_name(listener)}")
    if layout.tls is not None:
        lines += [
            f"cafile {layout.tls.ca.resolve()}",
            f"certfile {layout.tls.cert.resolve()}",
            f"keyfile {layout.tls.key.resolve()}",
            "tls_version tlsv1.2",
        ]
        if listener == X509 and layout.tls.crl is not None:
            lines.append(f"crlfile {layout.tls.crl.resolve()}")
    return lines


# -- users ------------------------------------------------------------------------------------------


def _safe_username(username: str) -> bool:
    # ':' ends the username in a password file; whitespace ends it in an ACL "user" line.
    return bool(username) and ":" not in username and not any(c.isspace() for c in username)


def _hash_ok(owner: str, secret_hash: str) -> bool:
    try:
        check_broker_hash(secret_hash)
    except ValueError:
        logger.warning("broker user %s left out: its stored secret hash is not a $7$ hash", owner)
        return False
    return True


def _claim_username(token_id: str) -> str:
    return f"claim-{token_id}"


def _valid_claims(claims: tuple[ClaimEntry, ...]) -> list[ClaimEntry]:
    valid = []
    for claim in claims:
        try:
            validate_id(claim.token_id, what="claim token id")
        except ValueError as exc:
            logger.warning("claim token left out of the broker: %s", exc)
            continue
        if _safe_username(_claim_username(claim.token_id)) and _hash_ok(
            f"claim:{claim.token_id}", claim.secret_hash
        ):
            valid.append(claim)
    return valid


def _valid_identities(snapshot: AuthSnapshot, kinds: set[str]) -> list[IdentityEntry]:
    valid = []
    for entry in snapshot.identities:
        if entry.kind not in kinds:
            continue
        try:
            validate_id(entry.identity_id, what="identity id")
        except ValueError as exc:
            logger.warning("identity left out of the broker: %s", exc)
            continue
        if not _safe_username(entry.identity_id) or CONNECTION_SEPARATOR in entry.identity_id:
            logger.error("identity %r left out of the broker: not usable as a username", entry.identity_id)
            continue
        if _hash_ok(entry.identity_id, entry.secret_hash):
            valid.append(entry)
    return valid


def site_users(
    snapshot: AuthSnapshot,
    internal: InternalUsers,
    *,
    claims_here: bool = False,
    max_edge_workers: int = MAX_EDGE_WORKERS,
) -> list[tuple[str, str]]:
    """``(username, hash)`` of every user of the site listener, in a stable order."""
    users: list[tuple[str, str]] = []
    site_kinds = {str(IdentityKind.DEVICE), str(IdentityKind.EDGE), str(IdentityKind.OPERATOR)}
    for entry in _valid_identities(snapshot, site_kinds):
        if entry.kind == IdentityKind.EDGE:
            users += [
                (connection_username(entry.identity_id, name), entry.secret_hash)
                for name in edge_connections(max_edge_workers)
            ]
        else:
            users.append((entry.identity_id, entry.secret_hash))
    users += [
        (_claim_username(claim.token_id), claim.secret_hash) for claim in _valid_claims(snapshot.claims)
    ]
    if internal.health_hash is not None:
        users.append((HEALTH_USER, internal.health_hash))
    if claims_here and internal.claims_hash is not None:
        users.append((CLAIMS_USER, internal.claims_hash))
    if claims_here and internal.sync_hash is not None:
        users.append((SYNC_USER, internal.sync_hash))
    return users


def cloud_users(snapshot: AuthSnapshot, internal: InternalUsers) -> list[tuple[str, str]]:
    """``(username, hash)`` of every user of the cloud listener: service identities and the claim handler."""
    users = [(e.identity_id, e.secret_hash) for e in _valid_identities(snapshot, {str(IdentityKind.SERVICE)})]
    if internal.claims_hash is not None:
        users.append((CLAIMS_USER, internal.claims_hash))
    if internal.sync_hash is not None:
        users.append((SYNC_USER, internal.sync_hash))
    return users


def render_passwd(users: list[tuple[str, str]]) -> str:
    """A mosquitto password file: ``username:$7$...`` per line."""
    return "".join(f"{username}:{secret_hash}\n" for username, secret_hash in users)


# -- ACLs -------------------------------------------------------------------------------------------


def device_rules(topics: Topics, device_id: str) -> list[tuple[str, str]]:
    """A device writes only its own telemetry, status, health and acks; reads only its cmd and desired."""
    writes = (DeviceTopic.TELEMETRY, DeviceTopic.STATUS, DeviceTopic.HEALTH, DeviceTopic.ACK)
    reads = (DeviceTopic.CMD, DeviceTopic.DESIRED)
    return [("write", topics.device(device_id, kind)) for kind in writes] + [
        ("read", topics.device(device_id, kind)) for kind in reads
    ]


def edge_rules(topics: Topics, edge_id: str) -> list[tuple[str, str]]:
    """An edge reads and writes its own edge topics, except those the cloud orders it (``desired``:
    read only); it reads its devices' telemetry (plain and shared), acks, status and health, writes
    their commands, and reads the cloud's key ring (``keys``)."""
    rules: list[tuple[str, str]] = []
    for kind in EdgeTopic:
        access = "read" if kind.value in EDGE_READ_ONLY else "readwrite"
        rules.append((access, topics.edge(edge_id, kind)))
    telemetry = topics.all_devices(DeviceTopic.TELEMETRY)
    rules += [("read", telemetry), ("read", topics.any_shared(telemetry))]
    for dev_kind in (DeviceTopic.ACK, DeviceTopic.STATUS, DeviceTopic.HEALTH):
        rules.append(("read", topics.all_devices(dev_kind)))
        rules.append(("read", topics.any_shared(topics.all_devices(dev_kind))))
    rules.append(("write", topics.all_devices(DeviceTopic.CMD)))
    rules.append(("read", topics.keys()))  # the cloud's signing key ring: the cloud writes it
    return rules


def operator_rules(topics: Topics, role: str | None) -> list[tuple[str, str]]:
    """An operator reads (viewer) or reads and writes (admin) every device and edge topic, and reads
    the key ring; never the claim topics: a claim response carries a new identity's secret."""
    access = "readwrite" if role == OperatorRole.ADMIN else "read"
    return [(access, topics.all_device_topics()), (access, topics.all_edge_topics()), ("read", topics.keys())]


def claim_rules(topics: Topics, token_id: str) -> list[tuple[str, str]]:
    """A claim token writes only its request and reads only its response."""
    return [("write", topics.claim_request(token_id)), ("read", topics.claim_response(token_id))]


def claims_handler_rules(topics: Topics) -> list[tuple[str, str]]:
    """The broker's claim handler reads every claim request and writes every claim response."""
    return [("read", topics.all_claim_requests()), ("write", topics.all_claim_responses())]


def render_acl(blocks: list[tuple[str, list[tuple[str, str]]]]) -> str:
    """A mosquitto ACL file: a ``user`` line and its ``topic`` lines per user, no ``pattern`` lines."""
    out = ["# Generated by edgefleet broker run from the registry: edits are overwritten.\n"]
    for username, rules in blocks:
        out.append(f"\nuser {username}\n")
        out += [f"topic {access} {topic}\n" for access, topic in rules]
    return "".join(out)


def site_acl(
    snapshot: AuthSnapshot,
    topics: Topics,
    internal: InternalUsers,
    *,
    claims_here: bool = False,
    with_claims: bool = True,
    max_edge_workers: int = MAX_EDGE_WORKERS,
) -> str:
    """The site listener's ACL file (``with_claims=False``, no internal users: the certificate listener's)."""
    blocks: list[tuple[str, list[tuple[str, str]]]] = []
    site_kinds = {str(IdentityKind.DEVICE), str(IdentityKind.EDGE), str(IdentityKind.OPERATOR)}
    for entry in _valid_identities(snapshot, site_kinds):
        if entry.kind == IdentityKind.DEVICE:
            blocks.append((entry.identity_id, device_rules(topics, entry.identity_id)))
        elif entry.kind == IdentityKind.EDGE:
            rules = edge_rules(topics, entry.identity_id)
            blocks += [
                (connection_username(entry.identity_id, name), rules)
                for name in edge_connections(max_edge_workers)
            ]
        else:
            blocks.append((entry.identity_id, operator_rules(topics, entry.role)))
    for claim in _valid_claims(snapshot.claims) if with_claims else ():
        blocks.append((_claim_username(claim.token_id), claim_rules(topics, claim.token_id)))
    if internal.health_hash is not None:
        blocks.append((HEALTH_USER, [("read", SYS_TOPICS)]))
    if claims_here and internal.claims_hash is not None:
        blocks.append((CLAIMS_USER, claims_handler_rules(topics)))
    return render_acl(blocks)


def cloud_acl(snapshot: AuthSnapshot, topics: Topics, internal: InternalUsers) -> str:
    """The cloud listener's ACL file: services read and write everything under the prefix."""
    blocks: list[tuple[str, list[tuple[str, str]]]] = [
        (e.identity_id, [("readwrite", topics.everything())])
        for e in _valid_identities(snapshot, {str(IdentityKind.SERVICE)})
    ]
    if internal.claims_hash is not None:
        blocks.append((CLAIMS_USER, claims_handler_rules(topics)))
    return render_acl(blocks)


def render_auth_files(
    layout: BrokerLayout, snapshot: AuthSnapshot, topics: Topics, internal: InternalUsers
) -> dict[str, str]:
    """File name -> text of every password and ACL file of ``layout``."""
    claims_on_site = layout.claims_listener == SITE
    files = {
        passwd_name(SITE): render_passwd(site_users(snapshot, internal, claims_here=claims_on_site)),
        acl_name(SITE): site_acl(snapshot, topics, internal, claims_here=claims_on_site),
    }
    if CLOUD in layout.listeners:
        files[passwd_name(CLOUD)] = render_passwd(cloud_users(snapshot, internal))
        files[acl_name(CLOUD)] = cloud_acl(snapshot, topics, internal)
    if X509 in layout.listeners:
        files[acl_name(X509)] = site_acl(snapshot, topics, InternalUsers(), with_claims=False)
    return files
