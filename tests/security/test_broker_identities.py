"""Broker identities (issue 11): every attack below fails against ``broker run``, and the legitimate
path next to it works. Real mosquitto processes on free loopback ports, a SQLite registry.

mosquitto 2.0 grants any SUBSCRIBE and filters each delivery with the ACL, and silently drops an
unauthorised MQTT 3.1.1 PUBLISH (it still PUBACKs it). So "not delivered" is shown with a sentinel:
the attacker publishes the forbidden messages, then an allowed one on the same connection; the
broker handles one client's packets in order, so once the sentinel has arrived anything forbidden
would have arrived before it.
"""

from __future__ import annotations

import itertools
import queue
import socket
import ssl
import time
import warnings
from pathlib import Path

import pytest

from cloud.broker.certs import make_pki
from cloud.broker.config import MESSAGE_SIZE_LIMIT
from cloud.registry import identities
from cloud.registry.db import session_scope
from shared.codec import DEFAULT_MAX_PAYLOAD
from shared.identity import MAX_EDGE_WORKERS, IdentityError, broker_hash, check_identity_id
from shared.mqtt import LinkEvent, MqttLink, Received
from shared.mqtt_packets import connect_packet
from shared.private_broker import mosquitto_binary
from shared.topics import DeviceTopic, EdgeTopic
from tests.support.secure_broker import FAST_ITERATIONS, SecureBroker

DEADLINE_S = 10.0  # upper bound of every wait below (never a duration asserted)
REVOKE_BOUND_S = 5.0  # the contract: a revoked identity is off the broker within 5 s


# -- helpers ------------------------------------------------------------------------------------------


def connected(link: MqttLink) -> MqttLink:
    assert link.wait_connected(DEADLINE_S), f"{link.client_id} did not connect"
    return link


def subscribed(link: MqttLink, *filters: str) -> MqttLink:
    for topic_filter in filters:
        link.subscribe(topic_filter, qos=1)
    connected(link)
    if filters:
        assert link.wait_subscribed(DEADLINE_S), f"{link.client_id}: subscription not granted"
    return link


def refused(link: MqttLink) -> str:
    """Wait for the broker to refuse ``link``'s CONNECT; return the reason."""
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        try:
            event: LinkEvent = link.events.get(timeout=0.1)
        except queue.Empty:
            continue
        assert not event.connected, f"{link.client_id} was let in"
        if event.reason.startswith("connect refused"):
            return event.reason
    raise AssertionError(f"{link.client_id}: no refusal within {DEADLINE_S} s")


def until_sentinel(link: MqttLink, topic: str, payload: bytes) -> list[Received]:
    """Everything ``link`` received up to and including the sentinel ``(topic, payload)``."""
    got: list[Received] = []
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        try:
            message = link.inbox.get(timeout=0.1)
        except queue.Empty:
            continue
        got.append(message)
        if message.topic == topic and message.payload == payload:
            return got
    raise AssertionError(
        f"sentinel on {topic} not received within {DEADLINE_S} s; got {[m.topic for m in got]}"
    )


def published(link: MqttLink, topic: str, payload: bytes, *, retain: bool = False) -> None:
    handle = link.publish(topic, payload, qos=1, retain=retain)
    assert handle.wait(DEADLINE_S), f"PUBACK for {topic} not received"


def mqtt_connect_packet(client_id: str, username: str, password: str) -> bytes:
    """A raw MQTT 3.1.1 CONNECT (clean session, username and password)."""
    return connect_packet(client_id, username=username, password=password)


def raw_connect_reply(port: int, packet: bytes) -> bytes:
    """What a plain TCP client gets back for ``packet`` (b"" when the broker just closes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S) as sock:
        sock.sendall(packet)
        try:
            return sock.recv(4)
        except (ConnectionResetError, TimeoutError):
            return b""


# -- impersonation ------------------------------------------------------------------------------------


def test_a_device_cannot_log_in_as_another_and_gets_only_its_own_commands(
    secure_broker: SecureBroker,
) -> None:
    broker, topics = secure_broker, secure_broker.topics
    secret_a = broker.enroll("dev-a")
    broker.enroll("dev-b")
    cloud = subscribed(broker.link("cloud", broker.enroll("cloud", kind="service"), listener="cloud"))

    impostor = broker.link("dev-b", secret_a)  # dev-a's own password, dev-b's name
    assert "not authori" in refused(impostor).lower()
    impostor.stop()

    device = subscribed(broker.link("dev-a", secret_a), topics.everything(), topics.command("dev-a"))
    published(cloud, topics.command("dev-b"), b"for-b")
    published(cloud, topics.command("dev-a"), b"for-a")
    got = until_sentinel(device, topics.command("dev-a"), b"for-a")
    assert {m.topic for m in got} == {topics.command("dev-a")}
    assert all(m.payload == b"for-a" for m in got)


def test_reserved_names_cannot_be_enrolled(secure_broker: SecureBroker) -> None:
    for name in ("cloud", "health", "broker-claims", "claim-x", "ops", "edgefleet-edge-1", "a:b"):
        with pytest.raises(IdentityError):
            check_identity_id(name, kind="device")
        with session_scope(secure_broker.database_url) as session, pytest.raises(ValueError, match=name):
            identities.enroll(
                session,
                identity_id=name,
                kind="device",
                secret_hash=broker_hash("x", iterations=FAST_ITERATIONS),
            )
    # The broker's users come from the registry and the broker's own data dir, nothing else.
    conf = (secure_broker.layout.data_dir / "mosquitto.conf").read_text()
    data_dir = str(secure_broker.layout.data_dir.resolve())
    for line in conf.splitlines():
        if line.startswith(("password_file", "acl_file")):
            assert line.split(" ", 1)[1].startswith(data_dir + "/"), line
    assert "include_dir" not in conf
    assert "allow_anonymous true" not in conf
    for name in ("acl-site", "acl-cloud"):
        assert "\npattern" not in (secure_broker.layout.data_dir / name).read_text()


def test_anonymous_and_unknown_clients_are_refused(secure_broker: SecureBroker) -> None:
    assert "not authori" in refused(secure_broker.link(None, None)).lower()
    assert "not authori" in refused(secure_broker.link("nobody", "guess")).lower()
    assert "not authori" in refused(secure_broker.link(None, None, listener="cloud")).lower()


def test_a_device_cannot_publish_as_an_edge_named_after_itself(secure_broker: SecureBroker) -> None:
    broker, topics = secure_broker, secure_broker.topics
    cloud = subscribed(
        broker.link("cloud", broker.enroll("cloud", kind="service"), listener="cloud"), topics.everything()
    )
    victim = subscribed(broker.link("dev-b", broker.enroll("dev-b")), topics.command("dev-b"))
    device = connected(broker.link("dev-a", broker.enroll("dev-a")))
    for kind in (
        EdgeTopic.SAMPLES,
        EdgeTopic.STATUS,
        EdgeTopic.DEVICES,
        EdgeTopic.DECISION,
        EdgeTopic.METRICS,
    ):
        published(device, topics.edge("dev-a", kind), b"forged")
    published(device, topics.telemetry("dev-b"), b"forged")  # another device's telemetry
    published(device, topics.command("dev-b"), b"forged")  # another device's commands
    published(device, topics.device_status("dev-b"), b"forged", retain=True)
    published(device, topics.keys(), b"forged", retain=True)
    published(device, topics.device_desired("dev-a"), b"forged", retain=True)  # its own orders
    published(device, topics.telemetry("dev-a"), b"sentinel")
    got = until_sentinel(cloud, topics.telemetry("dev-a"), b"sentinel")
    assert [m.topic for m in got] == [topics.telemetry("dev-a")]
    published(cloud, topics.command("dev-b"), b"real")
    assert [m.payload for m in until_sentinel(victim, topics.command("dev-b"), b"real")] == [b"real"]


def test_a_device_using_an_edges_client_id_neither_kicks_it_off_nor_takes_its_session(
    secure_broker: SecureBroker,
) -> None:
    broker, topics = secure_broker, secure_broker.topics
    edge_secret = broker.enroll("edge-1", kind="edge")
    edge = subscribed(
        broker.link("edge-1", edge_secret, connection="site", clean_session=False),
        topics.all_devices(DeviceTopic.TELEMETRY),
    )
    while not edge.events.empty():
        edge.events.get()
    device_secret = broker.enroll("dev-a")
    for client_id in ("edge-1/site", "edgefleet-edge-edge-1-site"):
        thief = connected(broker.link("dev-a", device_secret, client_id=client_id, clean_session=False))
        published(thief, topics.telemetry("dev-a"), client_id.encode())
        got = until_sentinel(edge, topics.telemetry("dev-a"), client_id.encode())
        assert [m.payload for m in got] == [client_id.encode()]
        thief.stop()
    assert edge.connected
    assert edge.connects == 1
    assert all(event.connected for event in iter_events(edge))


def iter_events(link: MqttLink) -> list[LinkEvent]:
    events = []
    while not link.events.empty():
        events.append(link.events.get())
    return events


def test_an_edge_cannot_write_another_edges_topics_nor_its_own_desired_state(
    secure_broker: SecureBroker,
) -> None:
    broker, topics = secure_broker, secure_broker.topics
    cloud = subscribed(
        broker.link("cloud", broker.enroll("cloud", kind="service"), listener="cloud"), topics.everything()
    )
    edge_secret = broker.enroll("edge-1", kind="edge")
    broker.enroll("edge-2", kind="edge")
    edge = connected(broker.link("edge-1", edge_secret, connection="cloud"))
    published(edge, topics.edge("edge-2", EdgeTopic.SAMPLES), b"forged")
    published(edge, topics.edge("edge-2", EdgeTopic.STATUS), b"forged", retain=True)
    published(edge, topics.edge("edge-1", EdgeTopic.DESIRED), b"forged", retain=True)
    published(edge, topics.keys(), b"forged", retain=True)  # the cloud's key ring
    published(edge, topics.edge("edge-1", EdgeTopic.SAMPLES), b"sentinel")
    got = until_sentinel(cloud, topics.edge("edge-1", EdgeTopic.SAMPLES), b"sentinel")
    assert [m.topic for m in got] == [topics.edge("edge-1", EdgeTopic.SAMPLES)]

    # The legitimate direction: the cloud orders, the edge reads it (and its devices' telemetry).
    worker = subscribed(
        broker.link("edge-1", edge_secret, connection="site-3"),
        topics.edge("edge-1", EdgeTopic.DESIRED),
        topics.shared("g", topics.all_devices(DeviceTopic.TELEMETRY)),
    )
    published(cloud, topics.edge("edge-1", EdgeTopic.DESIRED), b"order")
    assert until_sentinel(worker, topics.edge("edge-1", EdgeTopic.DESIRED), b"order")[-1].payload == b"order"
    device = connected(broker.link("dev-a", broker.enroll("dev-a")))
    published(device, topics.telemetry("dev-a"), b"window")
    until_sentinel(worker, topics.telemetry("dev-a"), b"window")


def test_an_edge_logs_in_only_with_its_known_connection_names(secure_broker: SecureBroker) -> None:
    secret = secure_broker.enroll("edge-1", kind="edge")
    connected(secure_broker.link("edge-1", secret, connection=f"site-{MAX_EDGE_WORKERS - 1}"))
    assert (
        "not authori"
        in refused(secure_broker.link("edge-1", secret, connection=f"site-{MAX_EDGE_WORKERS}")).lower()
    )
    assert "not authori" in refused(secure_broker.link("edge-1", secret)).lower()  # no bare name


def test_oversized_messages_are_dropped_and_codec_sized_ones_pass(secure_broker: SecureBroker) -> None:
    broker, topics = secure_broker, secure_broker.topics
    assert DEFAULT_MAX_PAYLOAD < MESSAGE_SIZE_LIMIT < 2 * 1024 * 1024
    edge = subscribed(
        broker.link("edge-1", broker.enroll("edge-1", kind="edge"), connection="site"),
        topics.all_devices(DeviceTopic.TELEMETRY),
    )
    device = connected(broker.link("dev-a", broker.enroll("dev-a")))
    published(device, topics.telemetry("dev-a"), b"\x01" * (2 * 1024 * 1024))
    codec_max = b"\x02" * DEFAULT_MAX_PAYLOAD
    published(device, topics.telemetry("dev-a"), codec_max)
    got = until_sentinel(edge, topics.telemetry("dev-a"), codec_max)
    assert [len(m.payload) for m in got] == [DEFAULT_MAX_PAYLOAD]


# -- revocation ---------------------------------------------------------------------------------------


def test_revoking_a_connected_device_disconnects_it_and_refuses_it_after(secure_broker: SecureBroker) -> None:
    broker = secure_broker
    secret = broker.enroll("dev-a")
    other = connected(broker.link("dev-b", broker.enroll("dev-b")))
    device = connected(broker.link("dev-a", secret))
    broker.revoke("dev-a")  # what `edgefleet fleet revoke dev-a` does to the registry
    deadline = time.monotonic() + REVOKE_BOUND_S
    while device.connected and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not device.connected, f"dev-a still connected {REVOKE_BOUND_S} s after its revocation"
    device.stop()
    assert "not authori" in refused(broker.link("dev-a", secret)).lower()
    assert other.connected  # nobody else was dropped
    # Re-enrolled with a new secret: the new one works, the old one does not.
    new_secret = broker.enroll("dev-a")
    connected(broker.link("dev-a", new_secret))
    assert "not authori" in refused(broker.link("dev-a", secret)).lower()


# -- claim tokens -------------------------------------------------------------------------------------


def test_a_claim_token_reaches_only_its_own_request_and_response(tmp_path: Path) -> None:
    seen: queue.SimpleQueue[tuple[str, bytes]] = queue.SimpleQueue()

    def handler(token_id: str, payload: bytes) -> bytes:
        seen.put((token_id, payload))
        return b"answer:" + payload

    with SecureBroker(tmp_path / "b", claim_handler=handler) as broker:
        topics = broker.topics
        viewer = subscribed(
            broker.link("ops-1", broker.enroll("ops-1", kind="operator")), topics.everything()
        )
        token_a, secret_a = broker.add_claim_token()
        token_b, _ = broker.add_claim_token()
        claimant = subscribed(
            broker.link(f"claim-{token_a}", secret_a),
            topics.claim_response(token_a),
            topics.claim_response(token_b),
        )
        published(claimant, topics.claim_request(token_b), b"not mine")  # dropped by the ACL
        published(claimant, topics.telemetry("dev-x"), b"not mine")
        published(claimant, topics.claim_request(token_a), b"hello")
        got = until_sentinel(claimant, topics.claim_response(token_a), b"answer:hello")
        assert [m.topic for m in got] == [topics.claim_response(token_a)]
        assert seen.get(timeout=DEADLINE_S) == (token_a, b"hello")
        assert seen.empty()
        # An operator sees device and edge topics, never a claim answer (it carries a new secret).
        device = connected(broker.link("dev-a", broker.enroll("dev-a")))
        published(device, topics.telemetry("dev-a"), b"sentinel")
        assert all(
            "/claim/" not in m.topic for m in until_sentinel(viewer, topics.telemetry("dev-a"), b"sentinel")
        )


def test_used_and_expired_claim_tokens_are_dropped(secure_broker: SecureBroker) -> None:
    broker = secure_broker
    token, secret = broker.add_claim_token(ttl_s=2.0)
    link = connected(broker.link(f"claim-{token}", secret))
    deadline = time.monotonic() + 2.0 + REVOKE_BOUND_S
    while link.connected and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not link.connected, "an expired claim token stayed connected"
    link.stop()
    assert "not authori" in refused(broker.link(f"claim-{token}", secret)).lower()

    used, used_secret = broker.add_claim_token()
    link = connected(broker.link(f"claim-{used}", used_secret))
    with session_scope(broker.database_url) as session:
        identities.use_claim_token(session, token_id=used, identity_id="dev-new")
    deadline = time.monotonic() + REVOKE_BOUND_S
    while link.connected and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not link.connected, "a used claim token stayed connected"


def test_claims_reach_the_registrys_claim_handler(tmp_path: Path) -> None:
    with SecureBroker(tmp_path / "b") as broker:
        assert broker.runner.claims is not None, "broker run did not start the claim handler"
        token, secret = broker.add_claim_token()
        claimant = subscribed(broker.link(f"claim-{token}", secret), broker.topics.claim_response(token))
        published(claimant, broker.topics.claim_request(token), b"{}")
        deadline = time.monotonic() + DEADLINE_S
        answer = None
        while answer is None and time.monotonic() < deadline:
            try:
                answer = claimant.inbox.get(timeout=0.1)
            except queue.Empty:
                continue
        assert answer is not None, "no answer to a claim request"
        assert answer.topic == broker.topics.claim_response(token)


# -- health -------------------------------------------------------------------------------------------


def test_the_health_user_reads_sys_topics_only(secure_broker: SecureBroker) -> None:
    health = MqttLink(secure_broker.runner.health_mqtt(), client_id="health")
    health.subscribe("$SYS/broker/version", qos=0)
    health.start()
    try:
        connected(health)
        message = health.inbox.get(timeout=DEADLINE_S)
        assert message.topic == "$SYS/broker/version"
    finally:
        health.stop()


# -- TLS ----------------------------------------------------------------------------------------------


@pytest.fixture
def tls_broker(tmp_path: Path) -> SecureBroker:
    if mosquitto_binary() is None:
        pytest.fail("mosquitto is not installed: scripts/setup installs it with apt-get")
    broker = SecureBroker(tmp_path / "tls", tls=True)
    broker.start()
    yield broker  # type: ignore[misc]
    broker.stop()


def test_raw_connect_helper_gets_a_connack_from_a_plaintext_broker(secure_broker: SecureBroker) -> None:
    secret = secure_broker.enroll("dev-a")
    reply = raw_connect_reply(secure_broker.port, mqtt_connect_packet("x", "dev-a", secret))
    assert reply[:1] == b"\x20"  # CONNACK
    assert reply[3:4] == b"\x00"  # accepted


def test_tls_listeners_refuse_plaintext_and_serve_tls(tls_broker: SecureBroker) -> None:
    secret = tls_broker.enroll("dev-a")
    cloud_secret = tls_broker.enroll("cloud", kind="service")
    for port, user, password in (
        (tls_broker.port, "dev-a", secret),
        (tls_broker.cloud_port, "cloud", cloud_secret),
    ):
        reply = raw_connect_reply(port, mqtt_connect_packet("x", user, password))
        assert reply[:1] != b"\x20", f"port {port} answered a plaintext CONNECT"
    cloud = subscribed(
        tls_broker.link("cloud", cloud_secret, listener="cloud"), tls_broker.topics.everything()
    )
    device = connected(tls_broker.link("dev-a", secret))
    assert device.network_socket().version() in ("TLSv1.2", "TLSv1.3")
    published(device, tls_broker.topics.telemetry("dev-a"), b"over tls")
    until_sentinel(cloud, tls_broker.topics.telemetry("dev-a"), b"over tls")


def test_tls_clients_refuse_a_server_their_ca_did_not_sign(tls_broker: SecureBroker, tmp_path: Path) -> None:
    wrong = make_pki(tmp_path / "wrong", ca_name="someone else's CA")
    context = ssl.create_default_context(cafile=str(wrong["ca"]))
    with (
        socket.create_connection(("127.0.0.1", tls_broker.port), timeout=DEADLINE_S) as sock,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        context.wrap_socket(sock, server_hostname="localhost")
    right = ssl.create_default_context(cafile=str(tls_broker.pki["ca"]))
    with (
        socket.create_connection(("127.0.0.1", tls_broker.port), timeout=DEADLINE_S) as sock,
        right.wrap_socket(sock, server_hostname="localhost") as tls,
    ):
        assert tls.version() in ("TLSv1.2", "TLSv1.3")


def test_tls_clients_refuse_an_expired_server_certificate(tmp_path: Path) -> None:
    if mosquitto_binary() is None:
        pytest.fail("mosquitto is not installed: scripts/setup installs it with apt-get")
    # No claim handler: it would refuse the expired certificate too, and broker run would not start.
    with SecureBroker(
        tmp_path / "expired", tls=True, server_cert="server_expired", claim_handler=None
    ) as broker:
        context = ssl.create_default_context(cafile=str(broker.pki["ca"]))
        with (
            socket.create_connection(("127.0.0.1", broker.port), timeout=DEADLINE_S) as sock,
            pytest.raises(ssl.SSLCertVerificationError, match="expired"),
        ):
            context.wrap_socket(sock, server_hostname="localhost")


def test_tls_listeners_refuse_tls_below_1_2(tls_broker: SecureBroker) -> None:
    context = ssl.create_default_context(cafile=str(tls_broker.pki["ca"]))
    with warnings.catch_warnings():  # TLS 1.0/1.1 are deprecated: that is the point
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    context.set_ciphers("DEFAULT:@SECLEVEL=0")  # this client would speak TLS 1.1: the server must not
    with (
        socket.create_connection(("127.0.0.1", tls_broker.port), timeout=DEADLINE_S) as sock,
        pytest.raises(ssl.SSLError, match="PROTOCOL_VERSION"),  # the server's alert, not ours
    ):
        context.wrap_socket(sock, server_hostname="localhost")


# -- X.509 client certificates ------------------------------------------------------------------------


def tls_connect_reply(port: int, context: ssl.SSLContext, packet: bytes) -> bytes | Exception:
    """A raw CONNECT over TLS with ``context``: the broker's first bytes, or the error that ended it."""
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S) as sock:
        try:
            with context.wrap_socket(sock, server_hostname="localhost") as tls:
                tls.sendall(packet)
                return tls.recv(4)
        except (ssl.SSLError, ConnectionResetError, BrokenPipeError) as exc:
            return exc


def client_context(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    if cert is not None and key is not None:
        context.load_cert_chain(str(cert), str(key))
    return context


@pytest.fixture
def x509_broker(tmp_path: Path) -> SecureBroker:
    if mosquitto_binary() is None:
        pytest.fail("mosquitto is not installed: scripts/setup installs it with apt-get")
    broker = SecureBroker(tmp_path / "x509", tls=True, x509=True)
    broker.start()
    yield broker  # type: ignore[misc]
    broker.stop()


def test_client_certificates_of_the_ca_log_in_as_their_cn(x509_broker: SecureBroker, tmp_path: Path) -> None:
    broker, pki, topics = x509_broker, x509_broker.pki, x509_broker.topics
    broker.enroll("dev-tls")
    broker.enroll("dev-b")
    packet = mqtt_connect_packet("anything", "ignored", "ignored")
    port = broker.layout.x509_port
    good = client_context(pki["ca"], pki["client-dev-tls"], pki["client-dev-tls_key"])
    reply = tls_connect_reply(port, good, packet)
    assert isinstance(reply, bytes)
    assert reply[:1] == b"\x20"  # CONNACK
    assert reply[3:4] == b"\x00"  # accepted

    no_cert = tls_connect_reply(port, client_context(pki["ca"]), packet)
    assert isinstance(no_cert, Exception), f"connected without a client certificate: {no_cert!r}"
    expired = tls_connect_reply(
        port, client_context(pki["ca"], pki["client-expired"], pki["client-expired_key"]), packet
    )
    assert isinstance(expired, (ssl.SSLError, ConnectionResetError)), (
        f"an expired client certificate got {expired!r}"
    )
    deadline = time.monotonic() + DEADLINE_S  # the broker's reason, not the client's (its log lags a little)
    while "certificate verify failed" not in broker.runner.log_tail() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "certificate verify failed" in broker.runner.log_tail()
    other = make_pki(tmp_path / "other", ca_name="someone else's CA", clients=("dev-tls",))
    foreign = tls_connect_reply(
        port, client_context(pki["ca"], other["client-dev-tls"], other["client-dev-tls_key"]), packet
    )
    assert isinstance(foreign, (ssl.SSLError, ConnectionResetError)), (
        f"a certificate of another CA got {foreign!r}"
    )

    # The certificate's identity gets the device's ACL: its own topics, nothing else.
    cloud = subscribed(
        broker.link("cloud", broker.enroll("cloud", kind="service"), listener="cloud"), topics.everything()
    )
    settings = broker.mqtt(
        None, None, listener="x509", tls_cert=pki["client-dev-tls"], tls_key=pki["client-dev-tls_key"]
    )
    device = MqttLink(settings, client_id="dev-tls")
    device.start()
    connected(device)
    published(device, topics.telemetry("dev-b"), b"forged")
    published(device, topics.edge("dev-tls", EdgeTopic.SAMPLES), b"forged")
    published(device, topics.telemetry("dev-tls"), b"sentinel")
    assert [m.topic for m in until_sentinel(cloud, topics.telemetry("dev-tls"), b"sentinel")] == [
        topics.telemetry("dev-tls")
    ]

    # Revoked: within the bound its live connection may neither publish nor receive (mosquitto applies
    # the new ACL once it has handled the SIGHUP); the certificate itself still completes TLS (a CRL,
    # --tls-crl, refuses it).
    broker.revoke("dev-tls")
    deadline = time.monotonic() + REVOKE_BOUND_S
    for attempt in itertools.count():
        published(device, topics.telemetry("dev-tls"), f"after revocation {attempt}".encode())
        published(cloud, topics.telemetry("dev-b"), f"sentinel {attempt}".encode())
        got = until_sentinel(cloud, topics.telemetry("dev-b"), f"sentinel {attempt}".encode())
        if topics.telemetry("dev-tls") not in {m.topic for m in got}:
            break
        assert time.monotonic() < deadline, f"a revoked certificate still published {REVOKE_BOUND_S} s later"
    published(cloud, topics.command("dev-tls"), b"not for a revoked identity")
    fresh = MqttLink(settings, client_id="dev-tls-again")
    fresh.subscribe(topics.command("dev-tls"))
    fresh.start()
    try:
        connected(fresh)
        published(fresh, topics.telemetry("dev-tls"), b"new connection")
        published(cloud, topics.command("dev-tls"), b"still not")
        published(cloud, topics.telemetry("dev-b"), b"last")
        got = until_sentinel(cloud, topics.telemetry("dev-b"), b"last")
        assert topics.telemetry("dev-tls") not in {m.topic for m in got}
        assert fresh.inbox.empty()
    finally:
        fresh.stop()
    device.stop()
