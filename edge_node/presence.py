"""What the cloud sees of one edge: its retained status (birth / LWT), deployment progress and device
reports on the cloud link, and the desired-state orders it sends, handed to the model manager.

An edge has exactly one presence: the one-process edge (``node.EdgeNode``) or, for a multi-process
edge, its supervisor (``supervisor.EdgeSupervisor``); both take it from here.
"""

from __future__ import annotations

import queue
import threading
from typing import Final

from edge_node.models import ModelManager
from shared import __version__
from shared.mqtt import MqttLink, Publication
from shared.schemas import DeploymentProgress, EdgeStatus, OnlineState, ReportedState, encode_message
from shared.topics import EdgeTopic, Topics

ORDERS_POLL_S: Final = 0.1  # how often the order loop looks at the stop event


class CloudPresence:
    """Mixin: the edge's status, progress, device reports and orders over ``cloud_link``."""

    edge_id: str
    cloud_topics: Topics
    cloud_link: MqttLink
    manager: ModelManager
    stop_event: threading.Event

    @property
    def _status_topic(self) -> str:
        return self.cloud_topics.edge(self.edge_id, EdgeTopic.STATUS)

    def _status_payload(self, state: OnlineState, reason: str | None = None) -> bytes:
        # The cloud link's will and birth are made before the model manager exists.
        reported = self.manager.reported() if hasattr(self, "manager") else ReportedState()
        return encode_message(
            EdgeStatus(
                edge_id=self.edge_id, state=state, reason=reason, version=__version__, reported=reported
            )
        )

    def _publish_devices(self, payload: bytes) -> None:
        self.cloud_link.publish(self.cloud_topics.edge(self.edge_id, EdgeTopic.DEVICES), payload, qos=1)

    def _publish_progress(self, progress: DeploymentProgress) -> None:
        self.cloud_link.publish(
            self.cloud_topics.edge(self.edge_id, EdgeTopic.DEPLOY), encode_message(progress), qos=1
        )

    def _publish_reported(self, _reported: ReportedState) -> None:
        payload = self._status_payload(OnlineState.ONLINE)
        self.cloud_link.set_birth(Publication(self._status_topic, payload, 1, True))
        self.cloud_link.publish(self._status_topic, payload, qos=1, retain=True)

    def _subscribe_orders(self) -> None:
        """Subscribe the cloud link to the key ring, then to this edge's desired state: one SUBSCRIBE
        on connect, so the retained key ring arrives (and is applied) before the retained order."""
        self.cloud_link.subscribe(self.cloud_topics.keys(), qos=1)
        self.cloud_link.subscribe(self.cloud_topics.edge(self.edge_id, EdgeTopic.DESIRED), qos=1)

    def _control_loop(self) -> None:
        """Desired-state orders and key ring updates from the cloud link to the model manager (in
        arrival order), until stopped."""
        desired_topic = self.cloud_topics.edge(self.edge_id, EdgeTopic.DESIRED)
        keys_topic = self.cloud_topics.keys()
        while not self.stop_event.is_set():
            try:
                msg = self.cloud_link.inbox.get(timeout=ORDERS_POLL_S)
            except queue.Empty:
                continue
            if msg.topic == desired_topic:
                self.manager.orders.put(msg.payload)
            elif msg.topic == keys_topic:
                self.manager.submit_keys(msg.payload)
