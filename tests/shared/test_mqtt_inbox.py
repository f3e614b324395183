"""A bounded MqttLink inbox over a real mosquitto: QoS1 messages that do not fit are left un-PUBACKed
on the broker and come back after the owner caught up; nothing is lost, nothing taken twice for good."""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from shared.mqtt import MqttLink, PublishHandle
from shared.settings import MqttSettings
from tests.support.brokers import Mosquitto

WAIT_S = 60.0


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = WAIT_S) -> None:
    """A bounded wait for an outcome (not a speed assertion)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.01)
    raise AssertionError(f"gave up waiting for {what}")


def settings(url: str) -> MqttSettings:
    return MqttSettings(url=url, reconnect_min_s=0.5, reconnect_max_s=1.0)


def flood(url: str, topic: str, count: int) -> None:
    """Publish ``count`` QoS1 messages ``0`` .. ``count-1`` and wait until the broker has them all."""
    sender = MqttLink(settings(url), client_id="flood-sender")
    sender.connect()
    handles: list[PublishHandle] = [sender.publish(topic, str(i).encode(), qos=1) for i in range(count)]
    for handle in handles:
        assert handle.wait(WAIT_S)
    sender.stop()


def subscribed_link(url: str, client_id: str, **kwargs: Any) -> MqttLink:
    link = MqttLink(settings(url), client_id=client_id, clean_session=False, **kwargs)
    link.subscribe("flood/#", qos=1)
    return link


def test_a_full_inbox_holds_messages_back_on_the_broker_until_the_owner_caught_up(mosquitto: Mosquitto):
    total, bound = 300, 40
    link = subscribed_link(mosquitto.url, "bounded-threaded", manual_ack=True, inbox_max=bound)
    link.connect()
    assert link.wait_subscribed()
    flood(mosquitto.url, "flood/a", total)  # nobody takes anything meanwhile: the inbox fills up
    wait_for(lambda: link.inbox_full > 0, "messages held back")
    assert link.inbox.qsize() <= bound
    assert link.inbox_dropped == 0  # QoS1 with manual acks: held back, never dropped

    processed: Counter[int] = Counter()
    deepest = 0
    while len(processed) < total:
        link.redeliver_held()  # the owner's call, every turn: O(1) unless it is time to resync
        deepest = max(deepest, link.inbox.qsize())
        try:
            msg = link.inbox.get(timeout=0.05)
        except queue.Empty:
            continue
        processed[int(msg.payload)] += 1
        link.ack(msg)
        assert len(processed) <= total
    assert set(processed) == set(range(total))
    assert deepest <= bound
    assert link.inbox_resyncs > 0
    # A message taken and PUBACKed just as the link resynced may come back once more (its PUBACK was
    # lost with the connection): an owner that must not act twice dedups, as the edge does by seq
    # (tests/edge_node/test_inbox_bound.py: every window classified exactly once).
    link.stop()


def test_an_owned_loop_stops_reading_while_its_inbox_is_full(mosquitto: Mosquitto):
    total, bound = 500, 16
    link = subscribed_link(mosquitto.url, "bounded-owned", manual_ack=True, own_loop=True, inbox_max=bound)
    link.start()
    wait_for(lambda: (link.poll(0.01), link.connected and link._subscribed.is_set())[1], "connected")
    sender = threading.Thread(target=flood, args=(mosquitto.url, "flood/b", total))
    sender.start()
    processed: Counter[int] = Counter()
    deepest = 0
    deadline = time.monotonic() + WAIT_S
    while len(processed) < total and time.monotonic() < deadline:
        link.poll(0.01)
        deepest = max(deepest, link.inbox.qsize())
        for _ in range(3):  # a slow owner: takes a few per turn, the socket waits meanwhile
            try:
                msg = link.inbox.get_nowait()
            except queue.Empty:
                break
            processed[int(msg.payload)] += 1
            link.ack(msg)
        link.flush()
    sender.join(WAIT_S)
    assert set(processed) == set(range(total))
    assert max(processed.values()) == 1
    assert deepest <= bound
    assert link.inbox_full == 0  # TCP back-pressure: nothing had to be refused
    link.stop()


def test_without_manual_acks_what_does_not_fit_is_dropped_and_counted(mosquitto: Mosquitto):
    total, bound = 200, 10
    link = subscribed_link(mosquitto.url, "bounded-auto", inbox_max=bound)
    link.connect()
    assert link.wait_subscribed()
    flood(mosquitto.url, "flood/c", total)
    wait_for(lambda: link.inbox_full == total - bound, "every message past the bound counted")
    assert link.inbox_dropped == total - bound  # paho PUBACKed them: nothing can bring them back
    assert link.inbox.qsize() == bound
    assert not link.holding
    link.stop()
