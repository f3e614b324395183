"""What the demo watches: one MQTT subscriber on the fleet's topics (device status and heartbeats,
edge status, metrics, decisions, deployments), an accuracy timeline from the edges' labelled
windows, and the summary computed from it."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from shared.errors import EdgefleetError
from shared.mqtt import MqttLink
from shared.schemas import (
    Command,
    CommandAck,
    CommandName,
    Decision,
    DeploymentProgress,
    DeviceStatus,
    EdgeMetrics,
    EdgeStatus,
    Heartbeat,
    OnlineState,
    decode_message,
    encode_message,
)
from shared.settings.base import MqttSettings
from shared.topics import DeviceTopic, EdgeTopic, Topics

logger = logging.getLogger(__name__)

RECOVERY_TOLERANCE = 0.01  # "recovered": within 1 point of pre-drift accuracy
RECOVERY_MIN_WINDOWS = 100  # labelled windows a recovery measurement needs
PHASE_WINDOW_S = 30.0  # pre-drift accuracy: the last this many seconds before drift


@dataclass
class Point:
    """Labelled windows one edge decided in one metrics interval."""

    ts: float
    edge_id: str
    model_version: str | None
    labelled: int
    correct: int
    windows: int


@dataclass
class EdgeView:
    """What the monitor knows of one edge: online, the model it serves, its last metrics and deploy
    stage, and the totals of its earlier (killed) processes."""

    online: bool = False
    model_version: str | None = None
    last_metrics: EdgeMetrics | None = None
    deploy_stage: str | None = None
    deploy_version: str | None = None
    # Totals of earlier processes of this edge (it was killed and restarted): windows, duplicates,
    # dead letters, decisions. Its metrics restart from 0; the fleet's counts must not.
    carried: tuple[int, int, int, int] = (0, 0, 0, 0)
    restarted_at: float | None = None  # metrics made before this (by the old process) are ignored


@dataclass
class FleetState:
    """Everything the monitor has seen of the fleet, read under ``Monitor.lock``."""

    devices_online: set[str] = field(default_factory=set)
    heartbeats: dict[str, Heartbeat] = field(default_factory=dict)
    edges: dict[str, EdgeView] = field(default_factory=dict)
    points: list[Point] = field(default_factory=list)
    decisions: int = 0
    acks: dict[str, str] = field(default_factory=dict)
    bad_messages: int = 0
    deploy_events: list[tuple[float, str, str, str]] = field(default_factory=list)
    deploy_failures: list[DeploymentProgress] = field(default_factory=list)


class Monitor:
    """Consumes the fleet's topics in its own thread; the state is read under ``lock``."""

    def __init__(
        self,
        broker_url: str,
        *,
        edge_ids: list[str],
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        # Reconnect fast: the broker-restart scenario stops the broker for a few seconds. With a
        # per-identity broker the demo passes the cloud listener and the cloud identity's login.
        self.settings = MqttSettings.model_validate(
            {"url": broker_url, "reconnect_max_s": 2.0, "username": username, "password": password}
        )
        self.topics: Topics = self.settings.topics
        self.link = MqttLink(self.settings, client_id=f"edgefleet-demo-monitor-{int(time.time())}")
        self.lock = threading.Lock()
        self.state = FleetState(edges={e: EdgeView() for e in edge_ids})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-monitor", daemon=True)
        # Called on the monitor's thread (not paho's) with each EdgeMetrics, after it is counted.
        self.on_metrics: Callable[[EdgeMetrics], None] | None = None

    def start(self) -> None:
        """Subscribe to the fleet's topics, connect, and start consuming in the monitor's thread."""
        t = self.topics
        for topic in (
            t.all_devices(DeviceTopic.STATUS),
            t.all_devices(DeviceTopic.HEALTH),
            t.all_devices(DeviceTopic.ACK),
            t.all_edges(EdgeTopic.STATUS),
            t.all_edges(EdgeTopic.METRICS),
            t.all_edges(EdgeTopic.DECISION),
            t.all_edges(EdgeTopic.DEPLOY),
        ):
            self.link.subscribe(topic, qos=1)
        self.link.start()
        self.link.connect()
        self._thread.start()

    def stop(self) -> None:
        """Stop the monitor's thread and its MQTT link."""
        self._stop.set()
        self._thread.join(timeout=5)
        self.link.stop()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self.link.inbox.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                self._handle(msg.topic, msg.payload)
            except (EdgefleetError, ValueError) as exc:
                # One bad message never stops the dashboard; it is counted.
                with self.lock:
                    self.state.bad_messages += 1
                logger.debug("monitor: bad message on %s: %s", msg.topic, exc)

    def _handle(self, topic: str, payload: bytes) -> None:
        if not payload:
            return  # a cleared retained message
        parsed = self.topics.parse(topic)
        kind = parsed.kind
        message = decode_message(payload)
        s = self.state
        hook: Callable[[EdgeMetrics], None] | None = None
        with self.lock:
            if isinstance(message, DeviceStatus):
                if message.state is OnlineState.ONLINE:
                    s.devices_online.add(message.device_id)
                else:
                    s.devices_online.discard(message.device_id)
            elif isinstance(message, Heartbeat):
                s.heartbeats[message.device_id] = message
            elif isinstance(message, CommandAck):
                s.acks[message.command_id] = str(message.status)
            elif isinstance(message, EdgeStatus):
                view = s.edges.setdefault(message.edge_id, EdgeView())
                view.online = message.state is OnlineState.ONLINE
                if message.reported.model_version:
                    view.model_version = message.reported.model_version
            elif isinstance(message, EdgeMetrics):
                self._on_metrics(message)
                hook = self.on_metrics
            elif isinstance(message, Decision):
                s.decisions += 1
            elif isinstance(message, DeploymentProgress):
                view = s.edges.setdefault(message.edge_id, EdgeView())
                view.deploy_stage, view.deploy_version = str(message.stage), message.model_version
                if str(message.stage) == "swapped" and message.ok:
                    view.model_version = message.model_version
                if not message.ok:
                    s.deploy_failures.append(message)
                s.deploy_events.append(
                    (time.time(), message.edge_id, str(message.stage), message.model_version or "")
                )
            else:
                logger.debug("monitor: ignored %s on %s (%s)", type(message).__name__, topic, kind)
        if isinstance(message, EdgeMetrics) and hook is not None:
            hook(message)

    def _on_metrics(self, m: EdgeMetrics) -> None:
        view = self.state.edges.setdefault(m.edge_id, EdgeView())
        if view.restarted_at is not None and m.ts < view.restarted_at:
            return  # made by the process that was killed, before mark_restarted (already carried)
        prev = view.last_metrics
        view.last_metrics = m
        if m.model_version:
            view.model_version = m.model_version
        if prev is None or m.windows_total < prev.windows_total:
            base_l, base_c, base_w = 0, 0, 0  # first report, or the edge restarted
        else:
            base_l, base_c, base_w = prev.labelled_windows, prev.labelled_correct, prev.windows_total
        self.state.points.append(
            Point(
                ts=m.ts,
                edge_id=m.edge_id,
                model_version=m.model_version,
                labelled=m.labelled_windows - base_l,
                correct=m.labelled_correct - base_c,
                windows=m.windows_total - base_w,
            )
        )

    # -- actions ------------------------------------------------------------------------------------
    def send_command(self, device_id: str, name: CommandName, args: dict[str, Any]) -> str:
        """Send a command to one device straight through the broker (as ``demo``); returns its id."""
        command = Command.create(device_id=device_id, name=name, args=args, ttl_s=30.0, sender="demo")
        self.link.publish(self.topics.command(device_id), encode_message(command), qos=1)
        return command.command_id

    def mark_restarted(self, edge_id: str) -> None:
        """``edge_id``'s process was killed: carry its last reported totals over to the next one.

        Windows it decided after its last report are not in them (no report survives ``kill -9``);
        if any, they show up as ``lost`` in the summary: this accounting does not guess them."""
        with self.lock:
            view = self.state.edges.setdefault(edge_id, EdgeView())
            m = view.last_metrics
            if m is not None:
                w, d, dl, dc = view.carried
                view.carried = (
                    w + m.windows_total,
                    d + m.duplicates_total,
                    dl + m.dead_letters_total,
                    dc + m.decisions_total,
                )
            view.last_metrics = None
            view.online = False
            view.restarted_at = time.time()

    # -- views --------------------------------------------------------------------------------------
    def edge_models(self) -> dict[str, str | None]:
        """The model version each edge serves, as far as the monitor has heard."""
        with self.lock:
            return {e: v.model_version for e, v in self.state.edges.items()}

    def processed(self) -> tuple[int, int, int, int]:
        """Windows decided, duplicates, dead letters and decisions, from the edges' last metrics."""
        with self.lock:
            windows = dups = dead = decisions = 0
            for view in self.state.edges.values():
                w, d, dl, dc = view.carried
                windows, dups, dead, decisions = windows + w, dups + d, dead + dl, decisions + dc
                m = view.last_metrics
                if m is not None:
                    windows += m.windows_total
                    dups += m.duplicates_total
                    dead += m.dead_letters_total
                    decisions += m.decisions_total
            return windows, dups, dead, decisions

    def rate(self) -> float:
        """Windows per second over every edge, from their last metrics."""
        with self.lock:
            return sum(v.last_metrics.windows_per_s for v in self.state.edges.values() if v.last_metrics)

    def accuracy(self, start: float, end: float, *, version: str | None = None) -> tuple[float | None, int]:
        """Accuracy over the labelled windows decided in ``[start, end)`` (of one model ``version`` if
        given), and how many there were."""
        with self.lock:
            chosen = [
                p
                for p in self.state.points
                if start <= p.ts < end and (version is None or p.model_version == version)
            ]
        labelled = sum(p.labelled for p in chosen)
        if labelled == 0:
            return None, 0
        return sum(p.correct for p in chosen) / labelled, labelled

    def points(self) -> list[Point]:
        """A copy of the accuracy timeline."""
        with self.lock:
            return list(self.state.points)


def recovery_time(
    points: list[Point], *, drift_ts: float, baseline: float, first_model: str | None, window_s: float = 10.0
) -> tuple[float | None, str | None]:
    """Seconds from drift until the fleet's accuracy over a ``window_s`` window, on a model newer than
    ``first_model``, is back within RECOVERY_TOLERANCE of ``baseline``; and that model version."""
    after = sorted((p for p in points if p.ts >= drift_ts), key=lambda p: p.ts)
    for i, end_point in enumerate(after):
        if end_point.model_version in (None, first_model):
            continue
        window = [
            p
            for p in after[: i + 1]
            if p.ts > end_point.ts - window_s and p.model_version not in (None, first_model)
        ]
        labelled = sum(p.labelled for p in window)
        if labelled < RECOVERY_MIN_WINDOWS:
            continue
        accuracy = sum(p.correct for p in window) / labelled
        if accuracy >= baseline - RECOVERY_TOLERANCE:
            return end_point.ts - drift_ts, end_point.model_version
    return None, None
