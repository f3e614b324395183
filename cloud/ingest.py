"""``edgefleet cloud ingest``: the edges' uplink (samples, metrics, status, deployment progress,
decisions, dead letters, the devices they hear) from the cloud broker into the registry.

At-least-once in, exactly-once stored: messages are PUBACKed only after the batch that stored them
commits (manual acks, persistent session), and each is deduplicated by its message id. Batches are
bounded; one bad message is counted, logged with its reason and dead-lettered without stopping the rest.
No TensorFlow: pseudo-labels come from the teacher's ``.tflite`` on LiteRT."""

from __future__ import annotations

import base64
import contextlib
import copy
import hashlib
import logging
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.exc import DisconnectionError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.orm import Session

from cloud.errors import MalformedMessageError
from cloud.registry import crud, fleet
from cloud.registry.db import lock_for_write, savepoint, session_scope, upgrade
from shared.codec import decode_window
from shared.errors import EdgefleetError
from shared.mqtt import MqttLink
from shared.schemas import (
    CommandAck,
    DeadLetter,
    Decision,
    DeploymentProgress,
    DeviceReport,
    DeviceStatus,
    EdgeMetrics,
    EdgeStatus,
    HardExample,
    OnlineState,
    decode_message,
)
from shared.settings.cloud import CloudSettings
from shared.topics import DeviceTopic, EdgeTopic

logger = logging.getLogger(__name__)

UPLINK_KINDS = (
    EdgeTopic.SAMPLES,
    EdgeTopic.METRICS,
    EdgeTopic.STATUS,
    EdgeTopic.DEPLOY,
    EdgeTopic.DECISION,
    EdgeTopic.DEAD,
    EdgeTopic.DEVICES,
)
TEACHER_REFRESH_S = 60.0
STORE_RETRY_MIN_S = 0.5
STORE_RETRY_MAX_S = 30.0
CLIENT_ID = "edgefleet-cloud-ingest"


@dataclass
class IngestStats:
    """Counters of one ingest process (``edgefleet cloud ingest`` prints them as JSON when it stops)."""

    received: int = 0
    stored: int = 0
    duplicates: int = 0
    malformed: int = 0
    batches: int = 0
    store_retries: int = 0
    by_kind: Counter[str] = field(default_factory=Counter)
    malformed_by_reason: Counter[str] = field(default_factory=Counter)
    labels_by_source: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        """The counters as a JSON-able dict."""
        return {
            "received": self.received,
            "stored": self.stored,
            "duplicates": self.duplicates,
            "malformed": self.malformed,
            "batches": self.batches,
            "store_retries": self.store_retries,
            "by_kind": dict(self.by_kind),
            "malformed_by_reason": dict(self.malformed_by_reason),
            "labels_by_source": dict(self.labels_by_source),
        }


class Teacher:
    """Pseudo-labels for uplinked windows: the production run's float32 model on LiteRT, per model name."""

    def __init__(self, database_url: str) -> None:
        self._url = database_url
        self._models: dict[str, tuple[float, Any]] = {}

    def _load(self, model_name: str) -> Any:
        loaded = self._models.get(model_name)
        if loaded is not None and time.monotonic() - loaded[0] < TEACHER_REFRESH_S:
            return loaded[1]
        teacher = None
        with session_scope(self._url) as session:
            production = crud.production_model(session, name=model_name)
            if production is not None:
                candidates = [production]
                if production.run_id is not None:
                    with contextlib.suppress(EdgefleetError):
                        candidates.insert(
                            0,
                            crud.get_model_version(session, ref=f"{model_name}@r{production.run_id}-float32"),
                        )
                for model in candidates:
                    cfg = model.training_config or {}
                    if model.artifact_path and Path(model.artifact_path).exists() and "normalization" in cfg:
                        teacher = (
                            model.artifact_path,
                            cfg["normalization"],
                            list(cfg.get("class_names", [])),
                        )
                        break
        runtime = None
        if teacher is not None:
            from cloud.learning.evaluation import LiteRTModel  # noqa: PLC0415  (numpy, LiteRT: only with a teacher)

            path, norm, names = teacher
            runtime = (LiteRTModel(Path(path).read_bytes(), num_threads=1), norm, names)
        self._models[model_name] = (time.monotonic(), runtime)
        return runtime

    def label(self, model_name: str | None, window: bytes) -> tuple[str, float] | None:
        """(class, confidence) from the teacher, or None when there is no teacher or window."""
        if model_name is None:
            return None
        runtime = self._load(model_name)
        if runtime is None:
            return None
        import numpy as np  # noqa: PLC0415  (numpy: only to pseudo-label a window)

        from cloud.learning.datasets import normalize  # noqa: PLC0415  (numpy: only to pseudo-label a window)

        model, norm, names = runtime
        values = np.asarray(decode_window(window).values, dtype=np.float32)
        if list(values.shape) != model.input_shape:
            return None
        probabilities = model.predict(normalize(values[np.newaxis], norm["mean"], norm["std"]))[0]
        best = int(probabilities.argmax())
        return names[best], float(probabilities[best])


class Ingest:
    """Subscribes to every edge's uplink and stores it in bounded, idempotent batches."""

    def __init__(
        self,
        settings: CloudSettings,
        *,
        client_id: str = CLIENT_ID,
        share_group: str | None = None,
        migrate: bool = True,
    ) -> None:
        """``share_group``: several ingest processes split the uplink with an MQTT shared subscription
        (each needs its own ``client_id``)."""
        self.settings = settings
        self.topics = settings.broker.topics
        self.url = settings.resolved_database_url
        if migrate:
            upgrade(self.url)
        self.stats = IngestStats()
        self.teacher = Teacher(self.url)
        self.stop_event = threading.Event()
        self.link = MqttLink(settings.broker, client_id=client_id, clean_session=False, manual_ack=True)
        for kind in UPLINK_KINDS:
            topic_filter = self.topics.all_edges(kind)
            if share_group is not None:
                topic_filter = self.topics.shared(share_group, topic_filter)
            self.link.subscribe(topic_filter, qos=1)
        # Devices' command acks (fleet operations): late acks of cloud commands land in the registry.
        # ... and their retained birth / LWT: online, offline and last seen in ``fleet ls``.
        for device_kind in (DeviceTopic.ACK, DeviceTopic.STATUS):
            device_filter = self.topics.all_devices(device_kind)
            self.link.subscribe(
                device_filter if share_group is None else self.topics.shared(share_group, device_filter),
                qos=1,
            )

    def close(self) -> None:
        """Disconnect from the broker; messages not yet acknowledged come again in the next session."""
        self.link.stop()

    def run(self, *, max_messages: int | None = None, idle_exit_s: float | None = None) -> IngestStats:
        """Consume until ``stop_event``, ``max_messages`` received, or ``idle_exit_s`` with nothing."""
        self.link.connect()
        batch: list[Any] = []
        deadline: float | None = None
        last_message = time.monotonic()
        while not self.stop_event.is_set():
            timeout = (
                self.settings.ingest_flush_s if deadline is None else max(0.0, deadline - time.monotonic())
            )
            try:
                message = self.link.inbox.get(timeout=timeout)
            except queue.Empty:
                message = None
            if message is not None:
                batch.append(message)
                last_message = time.monotonic()
                if deadline is None:
                    deadline = time.monotonic() + self.settings.ingest_flush_s
            full = len(batch) >= self.settings.ingest_batch
            if batch and (full or message is None or time.monotonic() >= (deadline or 0)):
                self.store_batch(batch)
                batch, deadline = [], None
            if max_messages is not None and self.stats.received >= max_messages and not batch:
                break
            if idle_exit_s is not None and not batch and time.monotonic() - last_message >= idle_exit_s:
                break
        if batch:
            self.store_batch(batch)
        return self.stats

    def store_batch(self, batch: list[Any]) -> None:
        """Store ``batch``, then PUBACK every message. While the registry is unreachable the batch is
        kept and retried with backoff (nothing is acknowledged, so nothing is lost)."""
        delay = STORE_RETRY_MIN_S
        while True:
            saved = copy.deepcopy(self.stats)
            try:
                self._store_batch_once(batch)
                break
            except (OperationalError, InterfaceError, DisconnectionError) as exc:
                self.stats = saved  # the transaction rolled back: so do its counts
                self.stats.store_retries += 1
                if self.stop_event.is_set():
                    raise
                logger.warning(
                    "registry unavailable (%s): batch of %d kept, retry in %.1f s", exc, len(batch), delay
                )
                self.stop_event.wait(delay)
                delay = min(delay * 2, STORE_RETRY_MAX_S)
        for message in batch:
            self.link.ack(message)

    def _store_batch_once(self, batch: list[Any]) -> None:
        """One transaction for the batch, a savepoint per message."""
        seen: set[str] = set()
        with session_scope(self.url) as session:
            # The first savepoint would otherwise open a deferred transaction that reads (dedup
            # lookups) before it writes, and a refused upgrade sent the batch into the retry backoff.
            lock_for_write(session)
            for message in batch:
                self.stats.received += 1
                try:
                    with savepoint(session):
                        self._store(session, message.topic, message.payload, seen)
                except IntegrityError:
                    # Stored meanwhile by another ingest process (shared subscription redelivery).
                    self.stats.duplicates += 1
                except (MalformedMessageError, EdgefleetError, ValueError, KeyError, TypeError) as exc:
                    self._malformed(session, message.topic, message.payload, exc)
        self.stats.batches += 1

    def _malformed(self, session: Session, topic: str, payload: bytes, exc: Exception) -> None:
        reason = f"{type(exc).__name__}: {exc}"
        kind = type(exc).__name__
        self.stats.malformed += 1
        self.stats.malformed_by_reason[kind] += 1
        logger.warning("malformed uplink message on %s dead-lettered: %s", topic, reason)
        with savepoint(session):
            crud.add_dead_letter(
                session, source="ingest", topic=topic[:512], reason=reason[:2000], payload=payload
            )

    def _store(self, session: Session, topic: str, payload: bytes, seen: set[str]) -> None:
        parsed = self.topics.parse(topic)
        if parsed.tier == "dev" and parsed.kind == DeviceTopic.ACK:
            ack = decode_message(payload, CommandAck)
            if ack.device_id != parsed.entity_id:
                raise MalformedMessageError(f"ack of {ack.device_id!r} on {parsed.entity_id!r}'s topic")
            if crud.record_ack(session, ack=ack) is not None:  # acks of edge-local commands are not ours
                self.stats.stored += 1
                self.stats.by_kind["ack"] += 1
            return
        if parsed.tier == "dev" and parsed.kind == DeviceTopic.STATUS:
            if not payload:
                return  # a cleared retained status: nothing to record
            status = decode_message(payload, DeviceStatus)
            if status.device_id != parsed.entity_id:
                raise MalformedMessageError(f"status of {status.device_id!r} on {parsed.entity_id!r}'s topic")
            if crud.record_device_status(session, status=status):
                self.stats.stored += 1
                self.stats.by_kind["device_status"] += 1
            return
        if parsed.tier != "edge" or parsed.kind not in UPLINK_KINDS:
            raise MalformedMessageError(f"topic {topic!r} is not an edge uplink topic")
        kind = EdgeTopic(parsed.kind)
        edge_id = parsed.entity_id
        message: Any = decode_message(payload)
        expected = {
            EdgeTopic.SAMPLES: HardExample,
            EdgeTopic.METRICS: EdgeMetrics,
            EdgeTopic.STATUS: EdgeStatus,
            EdgeTopic.DEPLOY: DeploymentProgress,
            EdgeTopic.DECISION: Decision,
            EdgeTopic.DEAD: DeadLetter,
            EdgeTopic.DEVICES: DeviceReport,
        }[kind]
        if not isinstance(message, expected):
            raise MalformedMessageError(f"{kind.value} topic carried a {type(message).__name__}")
        if message.edge_id != edge_id:
            raise MalformedMessageError(
                f"edge_id {message.edge_id!r} in the payload differs from the topic's {edge_id!r}"
            )
        key = self._key(kind, message, payload)
        if key is not None:
            if key in seen or crud.already_processed(session, message_key=key):
                self.stats.duplicates += 1
                return
            seen.add(key)
            crud.mark_processed(session, message_key=key)
        getattr(self, f"_on_{kind.value}")(session, message)
        self.stats.stored += 1
        self.stats.by_kind[kind.value] += 1

    @staticmethod
    def _key(kind: EdgeTopic, message: Any, payload: bytes) -> str | None:
        if kind is EdgeTopic.SAMPLES:
            return f"sample:{message.sample_id}"
        if kind is EdgeTopic.DECISION:
            return f"decision:{message.decision_id}"
        if kind in (EdgeTopic.STATUS, EdgeTopic.DEVICES):
            return None  # state: the newest wins, storing it again is harmless
        # No id field: the edge's id and the payload's hash name the message.
        return f"{kind.value}:{message.edge_id}:{hashlib.sha256(payload).hexdigest()[:40]}"

    # -- one handler per uplink kind ------------------------------------------------------------
    def _on_samples(self, session: Session, msg: HardExample) -> None:
        window = msg.window_bytes()
        confidence = max(msg.probabilities) if msg.probabilities else 0.0
        label, source, label_conf = msg.label, "device", None
        if label is None:
            source = "none"
            if window is not None:
                guess = self.teacher.label(msg.model_name, window)
                if guess is not None and guess[1] >= self.settings.thresholds.pseudo_label_confidence:
                    label, source, label_conf = guess[0], "teacher", guess[1]
        self.stats.labels_by_source[source] += 1
        crud.add_sample(
            session,
            sample_id=msg.sample_id,
            edge_id=msg.edge_id,
            device_id=msg.device_id,
            seq=msg.seq,
            ts=msg.ts,
            model_version=msg.model_version,
            predicted=msg.predicted,
            confidence=confidence,
            reason=msg.reason.value,
            privacy=msg.privacy.value,
            window=window,
            features=msg.features,
            label=label,
            label_source=source,
            label_confidence=label_conf,
        )

    def _on_metrics(self, session: Session, msg: EdgeMetrics) -> None:
        crud.add_metrics(
            session,
            edge_id=msg.edge_id,
            ts=msg.ts,
            model_version=msg.model_version,
            windows_total=msg.windows_total,
            confidence_mean=msg.confidence_mean,
            labelled_windows=msg.labelled_windows,
            labelled_correct=msg.labelled_correct,
            data=msg.model_dump(mode="json"),
        )
        crud.upsert_edge(session, edge_id=msg.edge_id, model_version=msg.model_version)

    def _on_status(self, session: Session, msg: EdgeStatus) -> None:
        crud.upsert_edge(
            session,
            edge_id=msg.edge_id,
            state=msg.state.value,
            version=msg.version,
            reported=msg.reported.model_dump(mode="json"),
            model_version=msg.reported.model_version,
        )
        if msg.state is not OnlineState.ONLINE:
            # Nobody relays its devices' births and wills any more: "unreachable", not stale "online".
            fleet.mark_edge_devices_unreachable(session, edge_id=msg.edge_id)

    def _on_devices(self, session: Session, msg: DeviceReport) -> None:
        for seen in msg.devices:
            fleet.record_device_seen(session, edge_id=msg.edge_id, seen=seen.model_dump(mode="json"))

    def _on_deploy(self, session: Session, msg: DeploymentProgress) -> None:
        target = crud.update_deployment_target(
            session,
            edge_id=msg.edge_id,
            revision=msg.revision,
            stage=msg.stage.value,
            ok=msg.ok,
            reason=msg.reason,
        )
        if target is None:
            logger.info("deploy progress from %s for unknown revision %d", msg.edge_id, msg.revision)
        crud.audit(
            session,
            actor=msg.edge_id,
            action=f"deploy_{msg.stage.value}",
            target=msg.model_version or "",
            detail={"revision": msg.revision, "ok": msg.ok, "reason": msg.reason},
        )

    def _on_decision(self, session: Session, msg: Decision) -> None:
        crud.add_decision(
            session,
            decision_id=msg.decision_id,
            edge_id=msg.edge_id,
            device_id=msg.device_id,
            rule=msg.rule,
            class_name=msg.class_name,
            probability=msg.probability,
            severity=msg.severity.value,
            model_version=msg.model_version,
            ts=msg.ts,
        )

    def _on_dead(self, session: Session, msg: DeadLetter) -> None:
        crud.add_dead_letter(
            session,
            source=msg.edge_id,
            topic=msg.topic,
            reason=msg.reason,
            payload=base64.b64decode(msg.payload_b64),
            payload_size=msg.payload_size,
        )
