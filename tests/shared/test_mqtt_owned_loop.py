"""``MqttLink(own_loop=True)``: the owner's thread runs the network loop (the edge's hot path)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from shared.errors import MqttError
from shared.mqtt import MqttLink, Publication, Received
from shared.schemas import DeviceStatus, OnlineState, decode_message, encode_message
from shared.settings import MqttSettings
from shared.topics import Topics

TOPICS = Topics()
WAIT_S = 20.0


def settings(url: str) -> MqttSettings:
    return MqttSettings(url=url, reconnect_min_s=0.5, reconnect_max_s=1.0)


class Owner:
    """A thread that polls an owned link and PUBACKs each message after 'handling' it."""

    def __init__(self, link: MqttLink, *, ack: bool = True) -> None:
        self.link = link
        self.ack = ack
        self.got: list[Received] = []
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop_event.is_set():
            self.link.poll(0.05)
            while not self.link.inbox.empty():
                msg = self.link.inbox.get_nowait()
                self.got.append(msg)
                if self.ack:
                    self.link.ack(msg)
            self.link.flush()

    def __enter__(self) -> Owner:
        self.link.start()
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop_event.set()
        self.thread.join(WAIT_S)


def wait_until(predicate, what: str) -> None:
    """A bounded wait for an outcome (not a speed assertion)."""
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.02)


@pytest.fixture
def sender(mosquitto) -> Iterator[MqttLink]:
    link = MqttLink(settings(mosquitto.url), client_id="sender")
    link.connect()
    yield link
    link.stop()


def test_owned_link_receives_acks_and_publishes_on_its_owners_thread(mosquitto, sender):
    topic = TOPICS.telemetry("pump-1")
    owned = MqttLink(settings(mosquitto.url), client_id="owned", manual_ack=True, own_loop=True)
    owned.subscribe(topic, qos=1)
    sender.subscribe(TOPICS.command("pump-1"), qos=1)
    assert sender.wait_subscribed(WAIT_S)
    with Owner(owned) as owner:
        assert owned.wait_subscribed(WAIT_S)
        for i in range(200):
            sender.publish(topic, f"w{i}".encode(), qos=1)
        wait_until(lambda: len(owner.got) == 200, "200 messages on the owned link")
        # A publish from another thread wakes the owner's select and is written by it.
        handle = owned.publish(TOPICS.command("pump-1"), b"reply", qos=1)
        assert sender.inbox.get(timeout=WAIT_S).payload == b"reply"
        assert handle.wait(WAIT_S)  # its PUBACK was read by the owner's poll
    assert [m.payload for m in owner.got] == [f"w{i}".encode() for i in range(200)]
    owned.stop()
    assert not owned.connected


def test_unacknowledged_messages_of_an_owned_link_are_redelivered(mosquitto, sender):
    topic = TOPICS.telemetry("pump-2")
    first = MqttLink(
        settings(mosquitto.url), client_id="owned-w", clean_session=False, manual_ack=True, own_loop=True
    )
    first.subscribe(topic, qos=1)
    with Owner(first, ack=False) as owner:
        assert first.wait_subscribed(WAIT_S)
        for i in range(3):
            assert sender.publish(topic, f"m{i}".encode(), qos=1).wait(WAIT_S)
        wait_until(lambda: len(owner.got) == 3, "3 messages")
    first.stop()  # never acknowledged: a crash before they were decided

    second = MqttLink(
        settings(mosquitto.url), client_id="owned-w", clean_session=False, manual_ack=True, own_loop=True
    )
    second.subscribe(topic, qos=1)
    with Owner(second) as owner:
        wait_until(lambda: len(owner.got) == 3, "3 redelivered messages")
    second.stop()
    assert [m.payload for m in owner.got] == [b"m0", b"m1", b"m2"]


def test_owned_link_reconnects_and_resubscribes_after_a_broker_restart(mosquitto, sender):
    topic = TOPICS.health("pump-3")
    owned = MqttLink(settings(mosquitto.url), client_id="owned-r", own_loop=True)
    owned.subscribe(topic, qos=1)
    with Owner(owned) as owner:
        assert owned.wait_subscribed(WAIT_S)
        mosquitto.restart(down_for=0.5)
        wait_until(lambda: owned.connects == 2 and owned.connected, "the owned link to reconnect")
        assert owned.wait_subscribed(WAIT_S)
        assert sender.wait_connected(WAIT_S)
        assert sender.publish(topic, b"after restart", qos=1).wait(WAIT_S)
        wait_until(lambda: [m.payload for m in owner.got] == [b"after restart"], "the message after restart")
    owned.stop()


def test_owned_link_stop_publishes_the_final_message_without_its_owner(mosquitto, sender):
    topic = TOPICS.device_status("pump-4")
    sender.subscribe(topic, qos=1)
    assert sender.wait_subscribed(WAIT_S)
    owned = MqttLink(
        settings(mosquitto.url),
        client_id="owned-s",
        own_loop=True,
        will=Publication(topic, b"lwt", 1, False),
    )
    with Owner(owned):
        assert owned.wait_connected(WAIT_S)
    # The owner has stopped polling: stop() runs the loop itself to write the final message.
    final = encode_message(DeviceStatus(device_id="pump-4", state=OnlineState.OFFLINE, reason="shutdown"))
    owned.stop(final=Publication(topic, final, 1, False))
    got = decode_message(sender.inbox.get(timeout=WAIT_S).payload, DeviceStatus)
    assert got.reason == "shutdown"
    time.sleep(0.5)
    assert sender.inbox.empty()  # a clean DISCONNECT: no last will


def test_polling_a_link_that_is_not_started_is_a_clear_error(mosquitto):
    owned = MqttLink(settings(mosquitto.url), client_id="owned-x", own_loop=True)
    with pytest.raises(MqttError, match="not started"):
        owned.poll(0.0)
