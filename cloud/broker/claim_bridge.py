"""The broker's claim handler: first-boot enrollment with a one-time claim token, over MQTT.

A device holding claim token T logs in to the site listener as ``claim-T`` (with the token's secret),
subscribes to ``{prefix}/claim/T/response`` and publishes its request on ``{prefix}/claim/T/request``:
the ACL allows it nothing else. ``broker run`` connects to its own cloud listener as the internal
user ``broker-claims`` (a secret generated at start), subscribed to ``{prefix}/claim/+/request``, and
hands each request to ``cloud.fleet.claims.handle_claim``, which checks the token, enrolls the
identity (marking the token used) and returns the response payload; it is published QoS1 on the
token's response topic. The sync loop then drops the used token's user (and closes its connection):
it waits for the answer to be out first (the shared lock).

paho's callbacks only put messages on a queue; one thread of this module handles them in order.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Final

from shared.errors import TopicError
from shared.mqtt import MqttLink, Received
from shared.settings.base import MqttSettings
from shared.settings.cloud import CloudSettings
from shared.topics import Topics

logger = logging.getLogger(__name__)

# token_id, request payload -> response payload
ClaimHandler = Callable[[str, bytes], bytes]

ANSWER_TIMEOUT_S: Final = 10.0  # how long the broker may take to PUBACK an answer
# After the broker acknowledged the answer (it has written it to the claimant's socket by then), the
# token's user may be removed: a little slack before the sync loop may do so.
ANSWER_GRACE_S: Final = 0.2
_GET_TIMEOUT_S: Final = 0.2


def registry_claim_handler(settings: CloudSettings) -> ClaimHandler:
    """``cloud.fleet.claims.handle_claim`` bound to ``settings``."""
    from cloud.fleet import claims  # noqa: PLC0415  (SQLAlchemy and the enrollment code: only when run)

    def handle(token_id: str, payload: bytes) -> bytes:
        return claims.handle_claim(settings=settings, token_id=token_id, payload=payload)

    return handle


class ClaimBridge:
    """Subscribes to every claim request and answers each with ``handler``."""

    def __init__(
        self, *, mqtt: MqttSettings, topics: Topics, handler: ClaimHandler, lock: threading.Lock
    ) -> None:
        self.topics = topics
        self.handler = handler
        self.lock = lock
        self.inbox: queue.SimpleQueue[Received] = queue.SimpleQueue()
        self.link = MqttLink(
            mqtt, client_id=mqtt.username or "broker-claims", clean_session=True, inbox=self.inbox
        )
        self.answered = 0
        self.failed = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Connect and subscribe in the background; answer requests on a thread of its own."""
        self.link.subscribe(self.topics.all_claim_requests(), qos=1)
        self.link.start()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="broker-claims", daemon=True)
        self._thread.start()

    def wait_ready(self, timeout: float) -> bool:
        """Whether the link connected and the broker granted the subscription within ``timeout``."""
        deadline = time.monotonic() + timeout
        return self.link.wait_connected(timeout) and self.link.wait_subscribed(
            max(0.0, deadline - time.monotonic())
        )

    def stop(self) -> None:
        """Stop answering and disconnect."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(ANSWER_TIMEOUT_S + 5)
            self._thread = None
        self.link.stop()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                message = self.inbox.get(timeout=_GET_TIMEOUT_S)
            except queue.Empty:
                continue
            try:
                self.answer(message)
            except Exception:  # one bad request must not end claim handling
                self.failed += 1
                logger.exception("claim request on %s not answered", message.topic)

    def answer(self, message: Received) -> None:
        """Hand one request to the handler and publish its answer on the token's response topic."""
        try:
            token_id = self.topics.claim_token_of(message.topic)
        except TopicError as exc:
            logger.warning("ignored a message on %s: %s", message.topic, exc)
            return
        with self.lock:  # the sync loop does not remove the token's user meanwhile
            response = self.handler(token_id, message.payload)
            handle = self.link.publish(self.topics.claim_response(token_id), response, qos=1)
            if not handle.wait(ANSWER_TIMEOUT_S):
                logger.warning("the answer to claim token %s was not acknowledged by the broker", token_id)
            time.sleep(ANSWER_GRACE_S)
        self.answered += 1
        logger.info("claim token %s answered", token_id)
