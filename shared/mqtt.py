"""A small MQTT link on paho-mqtt 2.x, used by every tier.

- ``CallbackAPIVersion.VERSION2``; MQTT 3.1.1 (persistent sessions with ``clean_session=False``).
- TCP_NODELAY on the socket: without it QoS1 round trips sit at 44-88 ms on loopback.
- Retained birth on every (re)connect and a retained LWT; capped exponential reconnect (paho's).
- TLS and username/password from ``MqttSettings``; with ``connection`` the username is
  ``username/connection`` (``shared.identity.connection_username``: an edge's several connections).
- Callbacks only hand work over: received messages to ``inbox``, connection changes to ``events``,
  acknowledgements to the ``PublishHandle`` each ``publish`` returns (and to that publish's
  ``on_done``, e.g. a queue's ``put``). The owner's own thread does everything else.
- Network thread: paho's own (``start`` runs ``loop_start``), or, with ``own_loop=True``, the
  owner's: it calls ``poll`` (select, read, write, keepalive, reconnect) and ``flush`` itself. The
  edge decides on that thread: a window goes from socket to PUBACK without a thread hand-off, and
  the acks of a whole batch go out in one ``flush`` instead of waking another thread per message.

Bounded inbox (``inbox_max``): paho's callback only compares the inbox's size with the bound. A
message that does not fit is not queued. With manual acks a QoS1 message is then simply not
PUBACKed: the broker keeps it in flight, and the link holds back everything after it on that
connection too (so messages are still taken in the order they came). Once the owner has drained the
inbox to half the bound, ``redeliver_held`` (the owner's call; an owned loop's ``poll`` makes it)
shuts the connection's socket down: paho reconnects on the persistent session and the broker
resends every message not PUBACKed (MQTT resends unacknowledged QoS1 messages only on a new
connection; mosquitto does not retry them on a live one). A QoS0 message, or any message without
manual acks (paho PUBACKs it when the callback returns), cannot come back: it is dropped. Both are
counted (``inbox_full``, ``inbox_dropped``). An owned loop also stops reading its socket while the
inbox is full: TCP back-pressure, nothing refused at all. Paho's network thread never waits.

Acknowledgements: the link keeps a handle per publish not yet acknowledged, keyed by message id,
and drops it once completed. paho resends unacknowledged QoS1 messages on every reconnect (clean
session or not: the client keeps them), so their handles simply complete later, published while
disconnected included. A QoS0 message paho had not written when the connection dropped is gone:
its handle ends ``lost`` at the next connection attempt.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from shared.errors import MqttError
from shared.identity import connection_username
from shared.redact import redact_url
from shared.settings.base import MqttSettings

logger = logging.getLogger(__name__)

# Module-level so tests can shorten them.
CONNECT_TIMEOUT_S: Final = 10.0
DISCONNECT_GRACE_S: Final = 2.0
# MQTT 5: how long the broker keeps a persistent session after a disconnect (one week).
SESSION_EXPIRY_S: Final = 7 * 24 * 3600
# MQTT 5 PUBACK reason code: the broker accepted a QoS1 message no subscription matched.
NO_MATCHING_SUBSCRIBERS: Final = 0x10
# Owned loop: packets read per ``poll`` at most, so the owner gets to decide on a burst early.
READ_BURST_MAX: Final = 512


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
    """A connection change, as put on ``MqttLink.events``."""

    connected: bool
    reason: str
    at: float = field(default_factory=time.monotonic)


_PENDING: Final = 0
_DONE: Final = 1
_LOST: Final = 2


class PublishHandle:
    """One publish (made by ``MqttLink.publish``): its message id and whether it is acknowledged.

    QoS1: done once the broker's PUBACK arrived (after any number of reconnects). QoS0: done once
    written to the socket, or ``lost`` if the connection dropped first. Completed by the link on
    paho's network thread; ``wait`` blocks any other thread until then.
    """

    __slots__ = ("_event", "_lock", "_on_done", "_state", "mid", "qos", "reason_code", "topic")

    def __init__(
        self,
        topic: str,
        mid: int,
        qos: int,
        lock: threading.Lock,
        on_done: Callable[[PublishHandle], object] | None = None,
    ) -> None:
        self.topic = topic
        self.mid = mid
        self.qos = qos
        self.reason_code = 0  # MQTT 5 PUBACK reason (0 success, 0x10 no matching subscribers)
        self._state = _PENDING
        self._lock = lock  # the link's: completion and waiter registration never race
        self._event: threading.Event | None = None  # made only when someone waits
        self._on_done = on_done

    @property
    def done(self) -> bool:
        """Acknowledged by the broker (QoS1) or written to the socket (QoS0)."""
        return self._state == _DONE

    @property
    def lost(self) -> bool:
        """A QoS0 message dropped with the connection before it was written: it never will be."""
        return self._state == _LOST

    @property
    def not_routed(self) -> bool:
        """MQTT 5 only: the broker accepted it but no subscription matched, so nobody has it."""
        return self.reason_code == NO_MATCHING_SUBSCRIBERS

    def wait(self, timeout: float | None = None) -> bool:
        """Block until done (``True``), lost or ``timeout`` seconds passed (``False``)."""
        if self._state == _PENDING:
            with self._lock:
                if self._state == _PENDING and self._event is None:
                    self._event = threading.Event()
                event = self._event
            if event is not None:
                event.wait(timeout)
        return self._state == _DONE

    def _settle(self, state: int, reason_code: int = 0) -> None:
        """Record the outcome and wake waiters; called with the link's lock held."""
        self.reason_code = reason_code
        self._state = state
        if self._event is not None:
            self._event.set()

    def __repr__(self) -> str:
        state = {_PENDING: "pending", _DONE: "done", _LOST: "lost"}[self._state]
        return f"PublishHandle(mid={self.mid}, topic={self.topic!r}, qos={self.qos}, {state})"


class _DropNotConnected(logging.Filter):
    """paho 2.2 logs "Client is not connected" at ERROR when its network thread runs one more
    loop after a clean disconnect (and while it reconnects): noise on every clean stop."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Client is not connected")


logging.getLogger(f"{__name__}.paho").addFilter(_DropNotConnected())


def _drain(wake: socket.socket) -> None:
    """Empty a wake-up socket (each byte only meant "look again")."""
    try:
        while wake.recv(4096):
            pass
    except OSError:  # BlockingIOError included: empty
        pass


def enable_nodelay(sock: Any) -> None:
    """Set TCP_NODELAY on a socket (a no-op for transports without it)."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError) as exc:  # e.g. a unix or websocket transport
        logger.debug("TCP_NODELAY not set: %s", exc)


class MqttLink:
    """One paho client with its network thread: subscriptions re-made on every connect, births
    re-published, and a ``PublishHandle`` per publish until the broker acknowledged it."""

    def __init__(
        self,
        settings: MqttSettings,
        *,
        client_id: str,
        clean_session: bool = True,
        will: Publication | None = None,
        birth: Publication | None = None,
        inbox: queue.SimpleQueue[Received] | None = None,
        log: logging.Logger | None = None,
        manual_ack: bool = False,
        mqtt5: bool = False,
        own_loop: bool = False,
        inbox_max: int | None = None,
        connection: str | None = None,
    ) -> None:
        if inbox_max is not None and inbox_max < 1:
            raise ValueError(f"inbox_max must be >= 1 (or None: unbounded), not {inbox_max}")
        self.settings = settings
        self.client_id = client_id
        self.log = log or logger
        self.inbox: queue.SimpleQueue[Received] = inbox if inbox is not None else queue.SimpleQueue()
        # Bounded inbox (see the module docstring). Counters written by the network thread only.
        self.inbox_max = inbox_max
        self.inbox_full = 0  # messages not queued because the inbox was full (held back or dropped)
        self.inbox_dropped = 0  # of those, gone for good: QoS0, or acked by paho (no manual acks)
        self.inbox_resyncs = 0  # reconnections made to have held-back messages redelivered
        self._manual_ack = manual_ack
        self._holding = False  # a QoS1 message was held back on this connection
        self._resyncing = False  # the socket was shut down for that; cleared by the next connect
        self._resync_lock = threading.Lock()  # several owner threads may call redeliver_held
        self._mqtt5 = mqtt5
        self._clean_session = clean_session
        self.events: queue.SimpleQueue[LinkEvent] = queue.SimpleQueue()
        self._birth = birth
        self._subscriptions: dict[str, int] = {}
        self._sub_lock = threading.Lock()
        self._connected = threading.Event()
        self._ever_connected = threading.Event()
        self._subscribed = threading.Event()
        self._started = False
        self.connects = 0
        # Publishes not completed yet, by message id. A PUBACK may arrive before ``publish`` has
        # registered its handle (paho returns the mid only after sending): it waits in ``_early``
        # for that publisher, which claims it before leaving. ``_early`` is emptied whenever no
        # publish is in progress, so no stale entry survives to match a reused message id.
        self._pending: dict[int, PublishHandle] = {}
        self._early: dict[int, int] = {}  # mid -> PUBACK reason code
        self._publishing = 0
        self._pending_lock = threading.Lock()

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
            # One identity, several connections (an edge's site and cloud links, per worker): each logs
            # in as ``identity/connection`` (the secured broker forces client id = username).
            client.username_pw_set(connection_username(user, connection), password)
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
        client.on_pre_connect = self._on_pre_connect
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        self._client = client
        self.own_loop = own_loop
        if own_loop:
            # paho's external-loop API: with a register-write callback it never writes on the
            # publishing thread; the owner's ``poll``/``flush`` do. Another thread that queues a
            # packet wakes the owner's select through a socket pair (made by ``start``).
            self._wake_r: socket.socket | None = None
            self._wake_w: socket.socket | None = None
            client.on_socket_register_write = self._on_register_write
            self._owner: threading.Thread | None = None
            self._next_attempt = 0.0
            self._backoff = float(max(1, round(settings.reconnect_min_s)))
            self._stopping = False

    # -- paho callbacks: hand off only --------------------------------------------------------
    @staticmethod
    def _on_socket_open(_client: paho.Client, _userdata: Any, sock: Any) -> None:
        enable_nodelay(sock)

    def _on_pre_connect(self, _client: paho.Client, _userdata: Any) -> None:
        # paho has just discarded the QoS0 packets it had not written: their handles never complete.
        with self._pending_lock:
            lost = [handle for handle in self._pending.values() if handle.qos == 0]
            for handle in lost:
                del self._pending[handle.mid]
                handle._settle(_LOST)

    def _on_register_write(self, _client: paho.Client, _userdata: Any, _sock: Any) -> None:
        if threading.current_thread() is not self._owner and self._wake_w is not None:
            with contextlib.suppress(OSError):  # full: the owner is being woken already
                self._wake_w.send(b"\0")

    def _on_connect(
        self, client: paho.Client, _userdata: Any, _flags: Any, reason: ReasonCode, _props: Any
    ) -> None:
        if reason.is_failure:
            self.events.put(LinkEvent(connected=False, reason=f"connect refused: {reason}"))
            return
        if self.own_loop:
            self._backoff = float(max(1, round(self.settings.reconnect_min_s)))
        # A new connection: the broker resends what was held back on the last one, in order.
        self._holding = self._resyncing = False
        with self._sub_lock:
            subs = list(self._subscriptions.items())
        if subs:
            client.subscribe(subs)
        if self._birth is not None:
            birth = self._birth
            try:
                self.publish(birth.topic, birth.payload, qos=birth.qos, retain=birth.retain)
            except MqttError as exc:  # the connection is new: only a local paho failure lands here
                self.log.warning("birth message not published: %s", exc)
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
        limit = self.inbox_max
        if limit is not None and (self._holding or self.inbox.qsize() >= limit):
            self.inbox_full += 1
            if self._manual_ack and msg.qos > 0:
                self._holding = True  # not PUBACKed: the broker keeps it; redelivered after a resync
            else:
                self.inbox_dropped += 1
            return
        self.inbox.put(Received(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain), mid=msg.mid))

    def _on_subscribe(
        self, _client: paho.Client, _userdata: Any, _mid: int, reasons: Any, _props: Any
    ) -> None:
        if not any(getattr(code, "is_failure", False) for code in reasons):
            self._subscribed.set()

    def _on_publish(self, _client: paho.Client, _userdata: Any, mid: int, reason: Any, _props: Any) -> None:
        code = int(getattr(reason, "value", 0))
        with self._pending_lock:
            handle = self._pending.pop(mid, None)
            if handle is None:
                if self._publishing:  # its publisher is between paho's return and registering it
                    self._early[mid] = code
                return
            handle._settle(_DONE, code)
        self._completed(handle)

    def _completed(self, handle: PublishHandle) -> None:
        """Hand a completed publish to whoever asked (never under the lock: callbacks may block)."""
        on_done = handle._on_done
        if on_done is not None:
            on_done(handle)

    # -- owner API ----------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        """Whether the link is connected right now."""
        return self._connected.is_set()

    @property
    def pending(self) -> int:
        """How many publishes are not acknowledged (QoS1) or written (QoS0) yet."""
        return len(self._pending)

    @property
    def holding(self) -> bool:
        """Messages were held back on this connection (inbox full): they come back after a resync."""
        return self._holding

    def redeliver_held(self) -> bool:
        """Owner: if messages were held back and the inbox has drained to half its bound, shut the
        connection down so that the broker resends them on the next one (paho, or an owned loop's
        ``poll``, reconnects). ``True`` when it did. O(1) otherwise: call it every turn."""
        if not self._holding or self._resyncing:
            return False
        if self.inbox.qsize() > (self.inbox_max or 0) // 2 or not self._resync_lock.acquire(blocking=False):
            return False
        try:
            sock: Any = self._client.socket()
            if self._resyncing or sock is None:  # done by another thread, or disconnected already
                return False
            self._resyncing = True
            self.inbox_resyncs += 1
        finally:
            self._resync_lock.release()
        self.log.info(
            "inbox of %s caught up after holding messages back (%d so far): reconnecting for them",
            self.client_id,
            self.inbox_full,
        )
        with contextlib.suppress(OSError, AttributeError):  # AttributeError: a transport without it
            sock.shutdown(socket.SHUT_RDWR)
        if self.own_loop:
            self.wake()
        return True

    def _inbox_full_now(self) -> bool:
        limit = self.inbox_max
        return limit is not None and self.inbox.qsize() >= limit

    def network_socket(self) -> Any:
        """The current socket (``None`` while disconnected), for diagnostics such as TCP_NODELAY."""
        return self._client.socket()

    def set_birth(self, birth: Publication | None) -> None:
        """Replace the birth message published on every connect (e.g. new reported state)."""
        self._birth = birth

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        """Subscribe now if connected, and again after every reconnect."""
        with self._sub_lock:
            self._subscriptions[topic_filter] = qos
        if self.connected:
            self._client.subscribe(topic_filter, qos)

    def unsubscribe(self, topic_filter: str) -> None:
        """Unsubscribe now if connected, and stop re-subscribing on reconnects."""
        with self._sub_lock:
            self._subscriptions.pop(topic_filter, None)
        if self.connected:
            self._client.unsubscribe(topic_filter)

    def start(self) -> None:
        """Connect in the background; paho keeps reconnecting with capped backoff."""
        if self._started:
            return
        addr = self.settings.address
        if self._mqtt5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = 0 if self._clean_session else SESSION_EXPIRY_S
            self._client.connect_async(
                addr.host,
                addr.port,
                keepalive=self.settings.keepalive_s,
                clean_start=self._clean_session,
                properties=props,
            )
        else:
            self._client.connect_async(addr.host, addr.port, keepalive=self.settings.keepalive_s)
        if self.own_loop:
            self._wake_r, self._wake_w = socket.socketpair()
            self._wake_r.setblocking(False)
            self._wake_w.setblocking(False)
            self._stopping = False
            self._next_attempt = 0.0
        else:
            self._client.loop_start()
        self._started = True

    # -- owned loop (``own_loop=True``): the owner's thread is the network thread ----------------
    def poll(self, timeout: float) -> None:
        """One turn of the network loop: wait up to ``timeout`` s for traffic, read what arrived
        (received messages land in ``inbox``), write what is queued, keep alive, reconnect.

        Only for ``own_loop=True``, and only ever from one thread at a time (the owner's; once the
        owner has stopped, whoever stops the link).
        """
        wake = self._wake_r
        if wake is None:
            raise MqttError(f"poll() on link {self.client_id!r}: not started, or not an owned loop")
        self._owner = threading.current_thread()
        if self._holding:
            self.redeliver_held()
        client = self._client
        sock = client.socket()
        if sock is None:
            self._poll_disconnected(wake, timeout)
            return
        # Inbox full: the socket is not read until the owner has taken some (TCP back-pressure).
        full = self._inbox_full_now()
        rlist = [wake] if full else [sock, wake]
        wlist = [sock] if client.want_write() else []
        buffered = sock.pending() if hasattr(sock, "pending") and not full else 0  # TLS: decrypted
        try:
            readable, writable, _ = select.select(rlist, wlist, [], 0.0 if buffered else timeout)
        except (OSError, ValueError):  # the socket was closed under us: paho notices below
            readable, writable = [], []
        if wake in readable:
            _drain(wake)
        if sock in readable or buffered:
            self._read_burst(sock)
        if client.socket() is not None and (writable or client.want_write()):
            client.loop_write()
        if client.socket() is not None:
            client.loop_misc()

    def wake(self) -> None:
        """Make the owner's ``poll`` return now (e.g. another thread has work for it); a no-op for
        links on paho's thread. Safe from any thread, paho callbacks included."""
        if self.own_loop and self._wake_w is not None:
            with contextlib.suppress(OSError):  # full: the owner is being woken already
                self._wake_w.send(b"\0")

    def flush(self) -> None:
        """Write what is queued now (owned loop: the owner calls it after handling a batch)."""
        if self._client.socket() is not None and self._client.want_write():
            self._client.loop_write()

    def settle(self, handle: PublishHandle, timeout: float) -> bool:
        """Wait for ``handle`` like ``handle.wait``, running the loop meanwhile when it is owned
        (for the owner, or for whoever stops the link after the owner has stopped)."""
        if not self.own_loop:
            return handle.wait(timeout)
        deadline = time.monotonic() + timeout
        while not handle.done and not handle.lost and time.monotonic() < deadline:
            self.poll(min(0.02, max(0.0, deadline - time.monotonic())))
        return handle.done

    def _read_burst(self, sock: Any) -> None:
        """Read every packet already arrived (up to READ_BURST_MAX): they are decided as one batch."""
        client = self._client
        for _ in range(READ_BURST_MAX):
            if self._inbox_full_now():
                return  # the rest waits in the socket (and on the broker) until the owner takes some
            if client.loop_read() != MQTTErrorCode.MQTT_ERR_SUCCESS or client.socket() is None:
                return  # connection lost: paho closed the socket and called on_disconnect
            if not (hasattr(sock, "pending") and sock.pending()):
                try:
                    more, _, _ = select.select([sock], [], [], 0.0)
                except (OSError, ValueError):
                    return
                if not more:
                    return

    def _poll_disconnected(self, wake: socket.socket, timeout: float) -> None:
        """Not connected: (re)connect when the backoff allows, else sleep on the wake-up socket."""
        now = time.monotonic()
        if self._stopping or now < self._next_attempt:
            wait = timeout if self._stopping else min(timeout, self._next_attempt - now)
            try:
                readable, _, _ = select.select([wake], [], [], max(0.0, wait))
            except (OSError, ValueError):
                return
            if readable:
                _drain(wake)
            return
        try:
            self._client.reconnect()
        except OSError as exc:
            self._next_attempt = now + self._backoff
            self.log.debug(
                "connect to %s failed (%s); next try in %g s",
                redact_url(self.settings.url),
                exc,
                self._backoff,
            )
            self._backoff = min(self._backoff * 2, float(max(1, round(self.settings.reconnect_max_s))))
            self.events.put(LinkEvent(connected=False, reason=f"connect failed: {exc}"))
            return
        # A refused or dropped attempt also waits out the backoff (reset once connected).
        self._next_attempt = now + self._backoff

    def wait_connected(self, timeout: float = CONNECT_TIMEOUT_S) -> bool:
        """Wait for the link to be connected; ``False`` after ``timeout`` seconds."""
        return self._connected.wait(timeout)

    def wait_subscribed(self, timeout: float = CONNECT_TIMEOUT_S) -> bool:
        """Wait for the broker to grant a subscription on the current connection."""
        return self._subscribed.wait(timeout)

    def ack(self, message: Received) -> None:
        """PUBACK a QoS1 message once handled (only with ``manual_ack=True``; a no-op otherwise)."""
        if message.qos > 0:
            self._client.ack(message.mid, message.qos)

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

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        retain: bool = False,
        *,
        on_done: Callable[[PublishHandle], object] | None = None,
    ) -> PublishHandle:
        """Queue a publish (paho resends QoS>0 after reconnects) and return its handle.

        ``on_done(handle)`` is called once it is done (never for a lost QoS0 message), on paho's
        network thread, or on this thread when the PUBACK beat ``publish`` back: it must only hand
        the handle over (e.g. ``queue.put``). It is how an owner consumes a stream of completions.
        """
        with self._pending_lock:
            self._publishing += 1
        try:
            info = self._client.publish(topic, payload, qos=qos, retain=retain)
        except BaseException:
            with self._pending_lock:
                self._end_publish(None)
            raise
        rc = info.rc
        if rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            with self._pending_lock:
                self._end_publish(None)
            raise MqttError(f"publish to {topic} failed: {paho.error_string(rc)}")
        handle = PublishHandle(topic, int(info.mid), qos, self._pending_lock, on_done)
        # One critical section from here to registration: a PUBACK is either in ``_early`` already
        # or finds the handle in ``_pending``.
        with self._pending_lock:
            code = self._end_publish(handle.mid)
            if rc == MQTTErrorCode.MQTT_ERR_NO_CONN and qos == 0:
                handle._settle(_LOST)  # paho keeps no QoS0 message for later
                return handle
            if code is None:
                self._pending[handle.mid] = handle
                return handle
            handle._settle(_DONE, code)  # acknowledged before it was registered
        self._completed(handle)
        return handle

    def _end_publish(self, mid: int | None) -> int | None:
        """One publisher fewer (``_pending_lock`` held); the PUBACK reason that came early for ``mid``."""
        self._publishing -= 1
        code = self._early.pop(mid, None) if mid is not None and self._early else None
        if not self._publishing:
            self._early.clear()
        return code

    def stop(self, final: Publication | None = None) -> None:
        """Publish ``final`` (e.g. a retained offline status) if connected, then disconnect."""
        if not self._started:
            return
        if final is not None and self.connected:
            try:
                handle = self.publish(final.topic, final.payload, qos=final.qos, retain=final.retain)
                confirmed = self.settle(handle, DISCONNECT_GRACE_S)
            except MqttError as exc:
                self.log.warning("final message to %s not published: %s", final.topic, exc)
            else:
                if not confirmed:
                    self.log.warning(
                        "final message to %s not confirmed within %g s", final.topic, DISCONNECT_GRACE_S
                    )
        if self.own_loop:
            self._stopping = True  # no reconnect from here on
        self._client.disconnect()
        # Let the network thread write what is queued (manual PUBACKs, then DISCONNECT) before it is
        # stopped: a DISCONNECT never sent makes the broker publish the last will, an unsent PUBACK
        # gets the message redelivered. on_disconnect clears ``_connected`` once it is written.
        deadline = time.monotonic() + DISCONNECT_GRACE_S
        while self._connected.is_set() and time.monotonic() < deadline:
            if self.own_loop:  # the owner has stopped polling: this thread writes
                self.poll(0.005)
            else:
                time.sleep(0.005)
        if self.own_loop:
            self.flush()
            for wake in (self._wake_r, self._wake_w):
                if wake is not None:
                    wake.close()
            self._wake_r = self._wake_w = None
        else:
            self._client.loop_stop()
        self._connected.clear()
        self._started = False
