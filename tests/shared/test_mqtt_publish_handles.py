"""MqttLink.publish handles against a real mosquitto: completion, streams, reconnects, MQTT 5 routing."""

from __future__ import annotations

import queue
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.mqtt import MqttLink, PublishHandle
from shared.private_broker import DURABLE, PrivateMosquitto, free_port, mosquitto_binary
from shared.settings import MqttSettings
from shared.topics import Topics

WAIT_S = 20.0
TOPICS = Topics()
pytestmark = pytest.mark.skipif(
    mosquitto_binary() is None,
    reason="the mosquitto binary is not installed (apt-get install mosquitto): these tests run a real one",
)


def make_link(url: str, client_id: str, **kwargs: bool) -> MqttLink:
    """A link that reconnects quickly."""
    settings = MqttSettings(url=url, reconnect_min_s=0.5, reconnect_max_s=1.0)
    return MqttLink(settings, client_id=client_id, **kwargs)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[PrivateMosquitto]:
    """A private mosquitto with persistence on, for one test."""
    with PrivateMosquitto(tmp_path / "broker", DURABLE) as running:
        yield running


@pytest.fixture
def links() -> Iterator[list[MqttLink]]:
    """Links to stop after the test."""
    made: list[MqttLink] = []
    yield made
    for each in made:
        each.stop()


def test_handles_complete_and_leave_nothing_pending(broker: PrivateMosquitto, links: list[MqttLink]) -> None:
    """Every handle completes, ``on_done`` streams each once, nothing stays pending."""
    sender = make_link(broker.url, "sender")
    links.append(sender)
    sender.connect()
    done: queue.SimpleQueue[PublishHandle] = queue.SimpleQueue()
    handles = [sender.publish(TOPICS.health("d"), b"x", qos=1, on_done=done.put) for _ in range(200)]
    assert all(handle.wait(WAIT_S) for handle in handles)
    assert all(handle.done and not handle.lost and not handle.not_routed for handle in handles)
    streamed = [done.get(timeout=WAIT_S) for _ in handles]  # each exactly once, as it completed
    assert sorted(id(h) for h in streamed) == sorted(id(h) for h in handles)
    assert done.empty()
    assert sender.pending == 0
    heartbeat = sender.publish(TOPICS.health("d"), b"qos0", qos=0)
    assert heartbeat.wait(WAIT_S)  # QoS0: done once written


def test_qos0_while_disconnected_is_lost_at_once() -> None:
    """paho keeps no QoS0 message for later: its handle is lost, not pending."""
    nowhere = make_link(f"mqtt://127.0.0.1:{free_port()}", "offline")
    handle = nowhere.publish(TOPICS.health("d"), b"x", qos=0)
    assert handle.lost
    assert not handle.wait(0.01)
    assert nowhere.pending == 0


def test_qos1_published_while_the_broker_is_down_completes_after_reconnect(
    broker: PrivateMosquitto, links: list[MqttLink]
) -> None:
    """paho resends it on the next (clean) connection and the handle completes then."""
    sender = make_link(broker.url, "sender", clean_session=True)
    links.append(sender)
    sender.connect()
    broker.stop()
    handle = sender.publish(TOPICS.health("d"), b"held by paho", qos=1)
    assert not handle.done
    assert sender.pending == 1
    broker.start()
    assert handle.wait(WAIT_S)  # resent by paho on the new (clean) session
    assert sender.pending == 0


def test_mqtt5_reports_a_publish_nobody_subscribed_to(
    broker: PrivateMosquitto, links: list[MqttLink]
) -> None:
    """MQTT 5: "no matching subscribers" shows as ``not_routed``; a routed one does not."""
    sender = make_link(broker.url, "sender-5", mqtt5=True)
    links.append(sender)
    sender.connect()
    topic = TOPICS.telemetry("pump-1")
    unrouted = sender.publish(topic, b"to nobody", qos=1)
    assert unrouted.wait(WAIT_S)
    assert unrouted.not_routed

    receiver = make_link(broker.url, "receiver")
    links.append(receiver)
    receiver.subscribe(topic, qos=1)
    receiver.connect()
    assert receiver.wait_subscribed(WAIT_S)
    routed = sender.publish(topic, b"to someone", qos=1)
    assert routed.wait(WAIT_S)
    assert not routed.not_routed
    assert receiver.inbox.get(timeout=WAIT_S).payload == b"to someone"


def test_network_socket_has_tcp_nodelay(broker: PrivateMosquitto, links: list[MqttLink]) -> None:
    """The link's socket has TCP_NODELAY set."""
    client = make_link(broker.url, "nodelay")
    links.append(client)
    client.connect()
    sock = client.network_socket()
    assert isinstance(sock, socket.socket)
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
