"""A small MQTT link on paho-mqtt 2.x, used by every tier.

- ``CallbackAPIVersion.VERSION2``; MQTT 3.1.1 (persistent sessions with ``clean_session=False``).
- TCP_NODELAY on the socket: without it QoS1 round trips sit at 44-88 ms on loopback.
- Retained birth on every (re)connect and a retained LWT; capped exponential reconnect (paho's).
- TLS and username/password from ``MqttSettings``.
- Callbacks only hand work to queues: received messages to ``inbox``, PUBACKed message ids to
  ``acked``, connection changes to ``events``. The owner's own thread does everything else.
"""

from __future__ import annotations

import logging
import queue
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Final

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from shared.errors import MqttError
from shared.settings.base import MqttSettings

logger = logging.getLogger(__name__)

# Module-level so tests can shorten them.
CONNECT_TIMEOUT_S: Final = 10.0
DISCONNECT_GRACE_S: Final = 2.0
# MQTT 5: how long the broker keeps a persistent session after a disconnect (one week).
SESSION_EXPIRY_S: Final = 7 * 24 * 3600
# MQTT 5 PUBACK reason code: the broker accepted a QoS1 message no subscription matched.
NO_MATCHING_SUBSCRIBERS: Final = 0x10


@dataclass(frozen=True, slots=True)
class Received:
    """One message as it came off the wire."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    received_at: float = field(default_factory=time.monotonic)
    mid: int = 0  # needed by ``MqttLink.ack`` when the link acks manually


@dataclass(frozen=True, slots=True)
class Publication:
    """A message to publish: used for birth and last will too."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False


@dataclass(frozen=True, slots=True)
class LinkEvent:
    connected: bool
    reason: str
    at: float = field(default_factory=time.monotonic)


class _DropNotConnected(logging.Filter):
    """paho 2.2 logs "Client is not connected" at ERROR when its network thread runs one more
    loop after a clean disconnect (and while it reconnects): noise on every clean stop."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Client is not connected")


logging.getLogger(f"{__name__}.paho").addFilter(_DropNotConnected())


def enable_nodelay(sock: Any) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError) as exc:  # e.g. a unix or websocket transport
        logger.debug("TCP_NODELAY not set: %s", exc)


class MqttLink:
    """One paho client with its network thread, subscriptions re-made on every connect."""

    def __init__(
        self,
        settings: MqttSettings,
        *,
        client_id: str,
        clean_session: bool = True,
        will: Publication | None = None,
        birth: Publication | None = None,
        inbox: queue.SimpleQueue[Received] | None = None,
        track_acks: bool = False,
        log: logging.Logger | None = None,
        manual_ack: bool = False,
        mqtt5: bool = False,
    ) -> None:
        self.settings = settings
        self.client_id = client_id
        self.log = log or logger
        self.inbox: queue.SimpleQueue[Received] = inbox if inbox is not None else queue.SimpleQueue()
        self.acked: queue.SimpleQueue[int] = queue.SimpleQueue()
        # MQTT 5 only: message ids the broker PUBACKed with "no matching subscribers" (each is put
        # here before it is put on ``acked``): accepted by the broker, delivered to nobody.
        self.not_routed: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._mqtt5 = mqtt5
        self._clean_session = clean_session
        self.events: queue.SimpleQueue[LinkEvent] = queue.SimpleQueue()
        self._track_acks = track_acks
        self._birth = birth
        self._subscriptions: dict[str, int] = {}
        self._sub_lock = threading.Lock()
        self._connected = threading.Event()
        self._ever_connected = threading.Event()
        self._subscribed = threading.Event()
        self._started = False
        self.connects = 0

        if mqtt5:  # the session is kept by clean_start=False + a session expiry (see ``start``)
            client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
        else:
            client = paho.Client(
                CallbackAPIVersion.VERSION2,
                client_id=client_id,
                clean_session=clean_session,
                protocol=paho.MQTTv311,
            )
        client.enable_logger(logging.getLogger(f"{__name__}.paho"))
        user, password = settings.credentials()
        if user is not None:
            client.username_pw_set(user, password)
        if settings.use_tls:
            context = ssl.create_default_context(
                cafile=str(settings.tls_ca) if settings.tls_ca else None,
            )
            if settings.tls_cert is not None and settings.tls_key is not None:
                context.load_cert_chain(str(settings.tls_cert), str(settings.tls_key))
            if settings.tls_insecure:
                context.check_hostname = False
            client.tls_set_context(context)
        if will is not None:
            client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        client.reconnect_delay_set(
            min_delay=max(1, round(settings.reconnect_min_s)),
            max_delay=max(1, round(settings.reconnect_max_s)),
        )
        client.max_inflight_messages_set(settings.max_inflight)
        client.max_queued_messages_set(0)
        # Manual acks: a QoS1 message is PUBACKed only once its owner has handled it (``ack``), so a
        # crash before that gets it redelivered on a persistent session instead of losing it.
        client.manual_ack_set(manual_ack)
        client.on_socket_open = self._on_socket_open
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        self.client = client

    # -- paho callbacks: hand off only --------------------------------------------------------
    @staticmethod
    def _on_socket_open(_client: paho.Client, _userdata: Any, sock: Any) -> None:
        enable_nodelay(sock)

    def _on_connect(
        self, client: paho.Client, _userdata: Any, _flags: Any, reason: ReasonCode, _props: Any
    ) -> None:
        if reason.is_failure:
            self.events.put(LinkEvent(connected=False, reason=f"connect refused: {reason}"))
            return
        with self._sub_lock:
            subs = list(self._subscriptions.items())
        if subs:
            client.subscribe(subs)
        if self._birth is not None:
            client.publish(
                self._birth.topic, self._birth.payload, qos=self._birth.qos, retain=self._birth.retain
            )
        self.connects += 1
        self._connected.set()
        self._ever_connected.set()
        self.events.put(LinkEvent(connected=True, reason="connected"))

    def _on_disconnect(
        self, _client: paho.Client, _userdata: Any, _flags: Any, reason: ReasonCode, _props: Any
    ) -> None:
        self._connected.clear()
        self._subscribed.clear()
        self.events.put(LinkEvent(connected=False, reason=str(reason)))

    def _on_message(self, _client: paho.Client, _userdata: Any, msg: paho.MQTTMessage) -> None:
        self.inbox.put(Received(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain), mid=msg.mid))

    def _on_subscribe(
        self, _client: paho.Client, _userdata: Any, _mid: int, reasons: Any, _props: Any
    ) -> None:
        if not any(getattr(code, "is_failure", False) for code in reasons):
            self._subscribed.set()

    def _on_publish(self, _client: paho.Client, _userdata: Any, mid: int, reason: Any, _props: Any) -> None:
        if self._track_acks:
            if getattr(reason, "value", 0) == NO_MATCHING_SUBSCRIBERS:
                self.not_routed.put(mid)
            self.acked.put(mid)

    # -- owner API ----------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def set_birth(self, birth: Publication | None) -> None:
        """Replace the birth message published on every connect (e.g. new reported state)."""
        self._birth = birth

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        """Subscribe now if connected, and again after every reconnect."""
        with self._sub_lock:
            self._subscriptions[topic_filter] = qos
        if self.connected:
            self.client.subscribe(topic_filter, qos)

    def unsubscribe(self, topic_filter: str) -> None:
        with self._sub_lock:
            self._subscriptions.pop(topic_filter, None)
        if self.connected:
            self.client.unsubscribe(topic_filter)

    def start(self) -> None:
        """Connect in the background; paho keeps reconnecting with capped backoff."""
        if self._started:
            return
        addr = self.settings.address
        if self._mqtt5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = 0 if self._clean_session else SESSION_EXPIRY_S
            self.client.connect_async(
                addr.host,
                addr.port,
                keepalive=self.settings.keepalive_s,
                clean_start=self._clean_session,
                properties=props,
            )
        else:
            self.client.connect_async(addr.host, addr.port, keepalive=self.settings.keepalive_s)
        self.client.loop_start()
        self._started = True

    def wait_connected(self, timeout: float = CONNECT_TIMEOUT_S) -> bool:
        return self._connected.wait(timeout)

    def wait_subscribed(self, timeout: float = CONNECT_TIMEOUT_S) -> bool:
        """Wait for the broker to grant a subscription on the current connection."""
        return self._subscribed.wait(timeout)

    def ack(self, message: Received) -> None:
        """PUBACK a QoS1 message once handled (only with ``manual_ack=True``; a no-op otherwise)."""
        if message.qos > 0:
            self.client.ack(message.mid, message.qos)

    def connect(self, timeout: float = CONNECT_TIMEOUT_S) -> None:
        """Start and wait for the first connection; if it does not come, stop (no network thread left
        retrying in the background of a long-lived caller) and raise ``MqttError``."""
        self.start()
        if not self.wait_connected(timeout):
            self.stop()
            addr = self.settings.address
            raise MqttError(
                f"could not connect to MQTT broker {addr.host}:{addr.port} within {timeout:.0f} s"
            )

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int:
        """Queue a publish (paho resends QoS>0 after reconnects); returns the message id."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            raise MqttError(f"publish to {topic} failed: {paho.error_string(info.rc)}")
        return int(info.mid)

    def stop(self, final: Publication | None = None) -> None:
        """Publish ``final`` (e.g. a retained offline status) if connected, then disconnect."""
        if not self._started:
            return
        if final is not None and self.connected:
            info = self.client.publish(final.topic, final.payload, qos=final.qos, retain=final.retain)
            try:
                info.wait_for_publish(DISCONNECT_GRACE_S)
            except (RuntimeError, ValueError) as exc:
                self.log.warning("final message to %s not confirmed: %s", final.topic, exc)
        self.client.disconnect()
        # Let the network thread write what is queued (manual PUBACKs, then DISCONNECT) before it is
        # stopped: a DISCONNECT never sent makes the broker publish the last will, an unsent PUBACK
        # gets the message redelivered. on_disconnect clears ``_connected`` once it is written.
        deadline = time.monotonic() + DISCONNECT_GRACE_S
        while self._connected.is_set() and time.monotonic() < deadline:
            time.sleep(0.005)
        self.client.loop_stop()
        self._connected.clear()
        self._started = False
