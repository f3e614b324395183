"""MqttLink against a real mosquitto: TCP_NODELAY, birth/LWT, reconnects, persistent sessions, acks."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from shared.errors import MqttError
from shared.mqtt import MqttLink, Publication, Received
from shared.private_broker import free_port
from shared.schemas import DeviceStatus, OnlineState, decode_message, encode_message
from shared.settings import MqttSettings
from shared.topics import Topics

REPO = Path(__file__).resolve().parents[2]
TOPICS = Topics()
WAIT_S = 20.0


def link(url: str, client_id: str, **kwargs) -> MqttLink:
    return MqttLink(
        MqttSettings(url=url, reconnect_min_s=0.5, reconnect_max_s=1.0), client_id=client_id, **kwargs
    )


def wait_until(predicate, what: str) -> None:
    """A bounded wait for an outcome (not a speed assertion)."""
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.02)


def status(device_id: str, state: OnlineState, reason: str | None = None) -> bytes:
    return encode_message(DeviceStatus(device_id=device_id, state=state, reason=reason))


def get(received_from: MqttLink) -> Received:
    return received_from.inbox.get(timeout=WAIT_S)


def publish_acked(sender: MqttLink, topic: str, payload: bytes, retain: bool = False) -> None:
    assert sender.publish(topic, payload, qos=1, retain=retain).wait(WAIT_S)


@pytest.fixture
def links():
    made: list[MqttLink] = []
    yield made
    for each in made:
        each.stop()


def test_tcp_nodelay_is_set_on_the_client_socket(mosquitto, links):
    client = link(mosquitto.url, "nodelay")
    links.append(client)
    client.connect()
    sock = client.network_socket()
    assert isinstance(sock, socket.socket)
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_birth_is_retained_and_republished_after_a_broker_restart(mosquitto, links):
    topic = TOPICS.device_status("pump-1")
    birth = Publication(topic, status("pump-1", OnlineState.ONLINE), qos=1, retain=True)
    device = link(mosquitto.url, "device", birth=birth)
    links.append(device)
    device.connect()

    first = link(mosquitto.url, "observer-1")
    links.append(first)
    first.subscribe(topic)
    first.connect()
    got = get(first)
    assert got.retain
    assert decode_message(got.payload, DeviceStatus).state is OnlineState.ONLINE

    # Clear the retained birth, then restart the broker: only a re-published birth brings it back.
    admin = link(mosquitto.url, "admin")
    links.append(admin)
    admin.connect()
    publish_acked(admin, topic, b"", retain=True)
    assert get(first).payload == b""
    mosquitto.restart(down_for=0.3)
    wait_until(lambda: device.connects == 2 and device.connected, "the device to reconnect")

    second = link(mosquitto.url, "observer-2")
    links.append(second)
    second.subscribe(topic)
    second.connect()
    again = get(second)
    assert again.retain
    assert decode_message(again.payload, DeviceStatus).state is OnlineState.ONLINE


def test_reconnect_and_resubscribe_after_a_broker_restart(mosquitto, links):
    receiver = link(mosquitto.url, "receiver")
    links.append(receiver)
    receiver.subscribe(TOPICS.all_devices(), qos=1)
    receiver.connect()
    assert receiver.wait_subscribed()
    mosquitto.restart(down_for=0.5)
    events = [receiver.events.get(timeout=WAIT_S)]
    while not (events[-1].connected and any(not e.connected for e in events)):
        events.append(receiver.events.get(timeout=WAIT_S))
    assert events[0].connected
    assert receiver.connects == 2
    assert receiver.wait_connected(WAIT_S)
    assert receiver.wait_subscribed(WAIT_S)
    sender = link(mosquitto.url, "sender")
    links.append(sender)
    sender.connect()
    publish_acked(sender, TOPICS.health("pump-1"), b"after restart")
    assert get(receiver).payload == b"after restart"


def test_last_will_is_delivered_when_the_client_process_is_killed(mosquitto, links):
    topic = TOPICS.device_status("pump-9")
    observer = link(mosquitto.url, "observer")
    links.append(observer)
    observer.subscribe(topic)
    observer.connect()
    script = textwrap.dedent(
        f"""
        import sys, time
        from shared.mqtt import MqttLink, Publication
        from shared.schemas import DeviceStatus, OnlineState, encode_message
        from shared.settings import MqttSettings
        topic = {topic!r}
        offline = DeviceStatus(device_id="pump-9", state="offline", reason="lwt")
        online = DeviceStatus(device_id="pump-9", state="online")
        will = Publication(topic, encode_message(offline), qos=1, retain=True)
        birth = Publication(topic, encode_message(online), qos=1, retain=True)
        link = MqttLink(MqttSettings(url={mosquitto.url!r}), client_id="doomed", will=will, birth=birth)
        link.connect()
        print("ready", flush=True)
        time.sleep(600)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        assert decode_message(get(observer).payload, DeviceStatus).state is OnlineState.ONLINE
        proc.send_signal(signal.SIGKILL)
        proc.wait(WAIT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    will = decode_message(get(observer).payload, DeviceStatus)
    assert (will.state, will.reason) == (OnlineState.OFFLINE, "lwt")

    late = link(mosquitto.url, "late-observer")  # the will is retained for whoever looks later
    links.append(late)
    late.subscribe(topic)
    late.connect()
    assert decode_message(get(late).payload, DeviceStatus).state is OnlineState.OFFLINE


def test_clean_stop_publishes_the_final_message(mosquitto, links):
    topic = TOPICS.device_status("pump-2")
    observer = link(mosquitto.url, "observer")
    links.append(observer)
    observer.subscribe(topic)
    observer.connect()
    assert observer.wait_subscribed()
    device = link(mosquitto.url, "device-2")
    device.connect()
    device.stop(final=Publication(topic, status("pump-2", OnlineState.OFFLINE, "shutdown"), retain=True))
    final = decode_message(get(observer).payload, DeviceStatus)
    assert (final.state, final.reason) == (OnlineState.OFFLINE, "shutdown")
    assert not device.connected


def test_persistent_session_receives_qos1_published_while_offline(mosquitto, links):
    topic = TOPICS.telemetry("pump-1")
    sender = link(mosquitto.url, "sender")
    links.append(sender)
    sender.connect()

    edge = link(mosquitto.url, "edge-persistent", clean_session=False)
    edge.subscribe(TOPICS.all_devices(), qos=1)
    edge.connect()
    assert edge.wait_subscribed()
    edge.stop()

    for i in range(5):
        publish_acked(sender, topic, f"offline-{i}".encode())
    mosquitto.restart()  # the queued messages survive a broker restart too (persistence on)
    assert sender.wait_connected(WAIT_S)
    publish_acked(sender, topic, b"offline-5")

    back = link(mosquitto.url, "edge-persistent", clean_session=False)
    links.append(back)
    back.subscribe(TOPICS.all_devices(), qos=1)
    back.connect()
    assert [get(back).payload for _ in range(6)] == [f"offline-{i}".encode() for i in range(6)]


def test_manual_ack_gets_unacknowledged_messages_redelivered(mosquitto, links):
    topic = TOPICS.telemetry("pump-1")
    sender = link(mosquitto.url, "sender")
    links.append(sender)
    sender.connect()
    first = link(mosquitto.url, "worker", clean_session=False, manual_ack=True)
    first.subscribe(topic, qos=1)
    first.connect()
    assert first.wait_subscribed()
    for i in range(3):
        publish_acked(sender, topic, f"m{i}".encode())
    handled = get(first)
    first.ack(handled)
    got = [get(first), get(first)]  # received but never acknowledged: a crash before handling
    assert [m.payload for m in got] == [b"m1", b"m2"]
    first.stop()

    second = link(mosquitto.url, "worker", clean_session=False, manual_ack=True)
    links.append(second)
    second.subscribe(topic, qos=1)
    second.connect()
    redelivered = [get(second), get(second)]
    assert [m.payload for m in redelivered] == [b"m1", b"m2"]
    for m in redelivered:
        second.ack(m)


def test_publish_handles_complete_on_puback(mosquitto, links):
    sender = link(mosquitto.url, "sender")
    links.append(sender)
    sender.connect()
    handles = [sender.publish(TOPICS.health("d"), b"x", qos=1) for _ in range(10)]
    assert all(h.wait(WAIT_S) for h in handles)
    assert len({h.mid for h in handles}) == 10
    assert sender.pending == 0


def test_connect_to_nothing_raises_mqtt_error(links):
    nowhere = link(f"mqtt://127.0.0.1:{free_port()}", "lonely")
    links.append(nowhere)
    with pytest.raises(MqttError, match="could not connect"):
        nowhere.connect(timeout=1.0)
    # Nothing keeps retrying behind the caller's back (an API request, a Celery task).
    assert not nowhere._started
    assert not any(t.name.startswith("paho-mqtt-client-lonely") for t in threading.enumerate())
