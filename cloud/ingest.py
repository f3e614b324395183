"""``edgefleet cloud ingest``: the edges' uplink (samples, metrics, status, deployment progress,
decisions, dead letters, the devices they hear) from the cloud broker into the registry.

At-least-once in, exactly-once stored: messages are PUBACKed only after the batch that stored them
commits (manual acks, persistent session), and each is deduplicated by its message id. Batches are
bounded; one bad message is counted, logged with its reason and dead-lettered without stopping the rest.
No TensorFlow: pseudo-labels come from the teacher's ``.tflite`` on LiteRT.

Trust (``ingest`` settings): a message larger than ``max_payload_bytes`` is refused undecoded
(``too_large``); with ``require_enrolled_edges`` (the default) a message on an edge's topic is stored
only when that edge id is an enrolled, active identity of kind ``edge`` (else ``unknown_edge``,
``revoked_edge``, ``not_an_edge``), checked against a cache of the active edges that is reloaded when
``identities.auth_revision`` changes (polled at most every ``IDENTITY_REFRESH_S``); then each edge
gets ``edge_rate_per_s`` messages per second with bursts of ``edge_burst`` (``rate_limited``). A device
report only touches the devices the edge serves (``Ingest.serving``; else ``not_served``). A refused
message is counted (``rejected_by_reason``) and acknowledged; at most ``rejected_dead_letters_per_minute``
per edge are also stored as dead letters (source ``ingest``, reason ``CODE: detail``), the rest only
counted (``dead_letters_not_stored``), so a flood cannot fill the dead-letter table.

A label a device sent is evaluation metadata: the sample records it (``label_source`` ``device``) with
``label_trusted`` only when the device is an active trusted labeller (``identities.set_label_trust``)
served by the sending edge, and only such labels, a teacher's and an operator's train models
(``crud.training_samples_clause``)."""

from __future__ import annotations

import base64
import contextlib
import copy
import hashlib
import logging
import queue
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import DisconnectionError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.orm import Session

from cloud.errors import MalformedMessageError
from cloud.registry import crud, fleet, identities
from cloud.registry.db import lock_for_write, savepoint, session_scope, upgrade
from cloud.registry.models import Device, EdgeNode, Identity
from shared.codec import decode_window
from shared.errors import EdgefleetError
from shared.identity import IdentityKind
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
from shared.settings.cloud import CloudSettings, IngestSettings
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
# How often, at most, the ingest asks the registry whether identities changed (``auth_revision``):
# a revoked edge's messages are refused within about this long. Module-level so tests can patch it.
IDENTITY_REFRESH_S = 1.0
# Edges (or edge ids on topics) the ingest keeps a token bucket, a dead-letter budget or a cached
# refusal for, at most: the least recently heard are forgotten first.
MAX_TRACKED_EDGES = 10_000
DEAD_LETTER_WINDOW_S = 60.0
DEVICE = str(IdentityKind.DEVICE)


class Rejection(StrEnum):
    """Why the ingest refused an uplink message (the dead letter's reason starts with it)."""

    UNKNOWN_EDGE = "unknown_edge"  # no identity of that id
    REVOKED_EDGE = "revoked_edge"  # an edge identity, revoked
    NOT_AN_EDGE = "not_an_edge"  # an identity of another kind (a device, a service, an operator)
    TOO_LARGE = "too_large"  # over ``ingest.max_payload_bytes``: not decoded
    RATE_LIMITED = "rate_limited"  # over the edge's token bucket
    NOT_SERVED = "not_served"  # a device report about devices the edge does not serve


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up; starts full. Pure: the caller gives the
    (monotonic) time, which may repeat or, out of order, stand still."""

    __slots__ = ("_stamp", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError(f"a token bucket needs rate > 0 and burst >= 1, not {rate} and {burst}")
        self.rate = rate
        self.burst = float(burst)
        self._tokens = float(burst)
        self._stamp = now

    def tokens(self, now: float) -> float:
        """The tokens available at ``now`` (nothing taken)."""
        return min(self.burst, self._tokens + max(0.0, now - self._stamp) * self.rate)

    def take(self, now: float, tokens: float = 1.0) -> bool:
        """Take ``tokens`` at ``now`` if there are that many; False (and nothing taken) if not."""
        self._tokens = self.tokens(now)
        self._stamp = max(self._stamp, now)
        if self._tokens >= tokens:
            self._tokens -= tokens
            return True
        return False


class EdgeLimits:
    """A token bucket per edge id and a per-edge budget of stored dead letters per minute, for at most
    ``max_edges`` edge ids (least recently heard forgotten first: a forgotten edge starts full again;
    past ``max_edges`` edges in one minute, further edges get no dead letters stored). Pure."""

    def __init__(
        self,
        *,
        rate: float,
        burst: float,
        dead_letters_per_minute: int,
        max_edges: int = MAX_TRACKED_EDGES,
        window_s: float = DEAD_LETTER_WINDOW_S,
    ) -> None:
        self.rate = rate
        self.burst = burst
        self.dead_letters_per_minute = dead_letters_per_minute
        self.max_edges = max_edges
        self.window_s = window_s
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self._window = -1
        self._stored: Counter[str] = Counter()

    def allow(self, edge_id: str, now: float) -> bool:
        """Whether ``edge_id`` may send one more message at ``now``."""
        bucket = self._buckets.get(edge_id)
        if bucket is None:
            bucket = self._buckets[edge_id] = TokenBucket(self.rate, self.burst, now)
            while len(self._buckets) > self.max_edges:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(edge_id)
        return bucket.take(now)

    def store_dead_letter(self, edge_id: str, now: float) -> bool:
        """Whether one more refused message of ``edge_id`` may be stored as a dead letter at ``now``
        (else it is only counted)."""
        window = int(now // self.window_s)
        if window != self._window:
            self._window = window
            self._stored.clear()
        if edge_id not in self._stored and len(self._stored) >= self.max_edges:
            return False
        if self._stored[edge_id] >= self.dead_letters_per_minute:
            return False
        self._stored[edge_id] += 1
        return True


class EdgeTrust:
    """Which edge ids may send: the active ``edge`` identities, reloaded when ``auth_revision`` moves
    (asked at most every ``IDENTITY_REFRESH_S``); why any other id is refused is looked up once per
    revision (at most ``MAX_TRACKED_EDGES`` ids remembered)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.revision: int | None = None
        self.reloads = 0
        self._clock = clock
        self._polled = float("-inf")
        self._active: frozenset[str] = frozenset()
        self._refused: OrderedDict[str, Rejection] = OrderedDict()

    def refresh(self, session: Session) -> None:
        """Reload the active edges if identities changed since the last reload (polled at most every
        ``IDENTITY_REFRESH_S``)."""
        now = self._clock()
        if self.revision is not None and now - self._polled < IDENTITY_REFRESH_S:
            return
        self._polled = now
        revision = identities.auth_revision(session)
        if revision == self.revision:
            return
        active = identities.list_identities(session, kind=IdentityKind.EDGE, status=identities.ACTIVE)
        self._active = frozenset(identity.identity_id for identity in active)
        self._refused.clear()
        self.revision = revision
        self.reloads += 1
        logger.info("identities at revision %d: %d active edges", revision, len(self._active))

    def is_active(self, edge_id: str) -> bool:
        """Whether ``edge_id`` was an active edge identity at the last reload."""
        return edge_id in self._active

    def check(self, session: Session, edge_id: str) -> Rejection | None:
        """None if ``edge_id`` is an active edge identity, else why its messages are refused."""
        self.refresh(session)
        if edge_id in self._active:
            return None
        reason = self._refused.get(edge_id)
        if reason is None:
            identity = identities.get_identity(session, identity_id=edge_id)
            if identity is None:
                reason = Rejection.UNKNOWN_EDGE
            elif identity.kind != str(IdentityKind.EDGE):
                reason = Rejection.NOT_AN_EDGE
            else:
                reason = Rejection.REVOKED_EDGE  # an edge, not active (revoked since, or at reload)
            self._refused[edge_id] = reason
            while len(self._refused) > MAX_TRACKED_EDGES:
                self._refused.popitem(last=False)
        return reason


@dataclass(frozen=True, slots=True)
class Verdict:
    """A refused message: why, the detail for the dead letter, whose budget, and whether it is stored."""

    reason: Rejection
    detail: str
    edge_id: str
    store: bool


@dataclass
class IngestStats:
    """Counters of one ingest process (``edgefleet cloud ingest`` prints them as JSON when it stops)."""

    received: int = 0
    stored: int = 0
    acknowledged: int = 0  # messages PUBACKed: their batch is committed
    duplicates: int = 0
    malformed: int = 0
    batches: int = 0
    store_retries: int = 0
    by_kind: Counter[str] = field(default_factory=Counter)
    malformed_by_reason: Counter[str] = field(default_factory=Counter)
    labels_by_source: Counter[str] = field(default_factory=Counter)
    rejected: int = 0  # refused by trust or limits (not malformed): counted, acknowledged, not stored
    rejected_by_reason: Counter[str] = field(default_factory=Counter)
    dead_letters_not_stored: int = 0  # refused messages over the per-edge dead-letter budget
    labels_untrusted: int = 0  # device labels stored for evaluation only (not a trusted labeller)

    def as_dict(self) -> dict[str, Any]:
        """The counters as a JSON-able dict."""
        return {
            "received": self.received,
            "stored": self.stored,
            "acknowledged": self.acknowledged,
            "duplicates": self.duplicates,
            "malformed": self.malformed,
            "batches": self.batches,
            "store_retries": self.store_retries,
            "by_kind": dict(self.by_kind),
            "malformed_by_reason": dict(self.malformed_by_reason),
            "labels_by_source": dict(self.labels_by_source),
            "rejected": self.rejected,
            "rejected_by_reason": dict(self.rejected_by_reason),
            "dead_letters_not_stored": self.dead_letters_not_stored,
            "labels_untrusted": self.labels_untrusted,
        }


class Teacher:
    """Pseudo-labels for uplinked windows: the production run's float32 model on LiteRT, per model name.

    A window reaches the teacher as the device sent it; it becomes the teacher's input exactly as an
    edge serving that model would make it (``cloud.learning.steps.model_input``: the model's signed
    manifest, else its training config; reordered channels, per-series normalisation, pad/resample,
    fitted statistics, through ``edge_node.preprocessing``). A window the model cannot take gets no
    pseudo-label. Models trained before preprocessing was recorded keep their old contract: windows of
    exactly the input shape, standardized with the recorded ``normalization``."""

    def __init__(self, database_url: str) -> None:
        self._url = database_url
        self._models: dict[str, tuple[float, Any]] = {}

    def _load(self, model_name: str) -> Any:
        loaded = self._models.get(model_name)
        if loaded is not None and time.monotonic() - loaded[0] < TEACHER_REFRESH_S:
            return loaded[1]
        found: list[tuple[str, str, dict[str, Any] | None, dict[str, Any]]] = []
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
                    cfg = dict(model.training_config or {})
                    described = model.manifest or cfg.get("preprocessing") or "normalization" in cfg
                    if model.artifact_path and Path(model.artifact_path).exists() and described:
                        found.append((model.ref, model.artifact_path, model.manifest, cfg))
        runtime = None
        for ref, path, manifest, cfg in found:
            runtime = self._runtime(ref, path, manifest, cfg)
            if runtime is not None:
                break
        self._models[model_name] = (time.monotonic(), runtime)
        return runtime

    @staticmethod
    def _runtime(ref: str, path: str, manifest: dict[str, Any] | None, cfg: dict[str, Any]) -> Any:
        """(LiteRT model, its ``ModelInput``, class names) of a model version; None if it cannot teach."""
        from cloud.learning.evaluation import LiteRTModel  # noqa: PLC0415  (numpy, LiteRT: only with a teacher)
        from cloud.learning.steps import model_input  # noqa: PLC0415  (numpy: only with a teacher)

        model = LiteRTModel(Path(path).read_bytes(), num_threads=1)
        try:
            feed = model_input(manifest, cfg, input_shape=model.input_shape)
        except EdgefleetError as exc:
            logger.warning("%s cannot teach: %s", ref, exc)
            return None
        if feed is None:
            return None
        if list(feed.spec.input_shape) != model.input_shape:
            logger.warning(
                "%s cannot teach: recorded input %s, the artifact takes %s",
                ref,
                list(feed.spec.input_shape),
                model.input_shape,
            )
            return None
        names = list(cfg.get("class_names") or (manifest or {}).get("class_names") or [])
        return model, feed, names

    def label(self, model_name: str | None, window: bytes) -> tuple[str, float] | None:
        """(class, confidence) from the teacher, or None when there is no teacher or window, or the
        teacher's model cannot take the window (its shape or channels)."""
        if model_name is None:
            return None
        runtime = self._load(model_name)
        if runtime is None:
            return None
        import numpy as np  # noqa: PLC0415  (numpy: only to pseudo-label a window)

        from edge_node.preprocessing import WindowRejectedError  # noqa: PLC0415  (numpy: only here)

        model, feed, names = runtime
        decoded = decode_window(window)
        try:
            x = feed.window(np.asarray(decoded.values, dtype=np.float32), decoded.channels)
        except WindowRejectedError as exc:
            logger.debug("no pseudo-label for %s's window %d: %s", decoded.device_id, decoded.seq, exc)
            return None
        probabilities = model.predict(x[np.newaxis])[0]
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
        self.limits: IngestSettings = settings.ingest
        self.trust = EdgeTrust()
        self.edge_limits = EdgeLimits(
            rate=self.limits.edge_rate_per_s,
            burst=self.limits.edge_burst,
            dead_letters_per_minute=self.limits.rejected_dead_letters_per_minute,
        )
        # Per batch: whether a device's label may train, by (edge, device).
        self._label_trust: dict[tuple[str, str], bool] = {}
        if not self.limits.require_enrolled_edges:
            logger.warning(
                "ingest.require_enrolled_edges is off: uplink from ANY edge id is stored, and device "
                "reports may touch any device; turn it on once every edge is enrolled (fleet enroll)"
            )
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
        # Each message is screened (token bucket, dead-letter budget) once, not again on a retry.
        verdicts: dict[int, Verdict | None] = {}
        while True:
            saved = copy.deepcopy(self.stats)
            try:
                self._store_batch_once(batch, verdicts)
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
        self.stats.acknowledged += len(batch)

    def _store_batch_once(self, batch: list[Any], verdicts: dict[int, Verdict | None] | None = None) -> None:
        """One transaction for the batch, a savepoint per message."""
        seen: set[str] = set()
        verdicts = {} if verdicts is None else verdicts
        self._label_trust = {}
        with session_scope(self.url) as session:
            # The first savepoint would otherwise open a deferred transaction that reads (dedup
            # lookups) before it writes, and a refused upgrade sent the batch into the retry backoff.
            lock_for_write(session)
            for index, message in enumerate(batch):
                self.stats.received += 1
                try:
                    with savepoint(session):
                        if index not in verdicts:
                            verdicts[index] = self._screen(session, message)
                        verdict = verdicts[index]
                        if verdict is not None:
                            self._reject(session, message.topic, message.payload, verdict)
                            continue
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

    # -- trust and limits -------------------------------------------------------------------------
    def _screen(self, session: Session, message: Any) -> Verdict | None:
        """Why ``message`` is refused before decoding (size, edge identity, edge rate), or None."""
        parsed = self.topics.parse(message.topic)  # a bad topic is malformed (raised, dead-lettered)
        size = len(message.payload)
        if size > self.limits.max_payload_bytes:
            return self._verdict(
                Rejection.TOO_LARGE,
                f"{size} bytes, over the {self.limits.max_payload_bytes}-byte limit (not decoded)",
                parsed.entity_id,
            )
        if parsed.tier != "edge":
            return None  # a device's ack or status: the broker keeps each device to its own topics
        edge_id = parsed.entity_id
        if self.limits.require_enrolled_edges:
            reason = self.trust.check(session, edge_id)
            if reason is not None:
                return self._verdict(reason, f"{edge_id!r} is not an enrolled, active edge", edge_id)
        if not self.edge_limits.allow(edge_id, getattr(message, "received_at", None) or time.monotonic()):
            return self._verdict(
                Rejection.RATE_LIMITED,
                f"{edge_id!r} is over {self.limits.edge_rate_per_s:g} messages/s "
                f"(burst {self.limits.edge_burst})",
                edge_id,
            )
        return None

    def _verdict(self, reason: Rejection, detail: str, edge_id: str) -> Verdict:
        return Verdict(reason, detail, edge_id, self.edge_limits.store_dead_letter(edge_id, time.monotonic()))

    def _reject(self, session: Session, topic: str, payload: bytes, verdict: Verdict) -> None:
        """Count a refused message and, within its edge's budget, dead-letter it (payload kept raw)."""
        self.stats.rejected += 1
        self.stats.rejected_by_reason[verdict.reason.value] += 1
        if not verdict.store:
            self.stats.dead_letters_not_stored += 1
            logger.debug(
                "uplink message on %s refused (%s), over the dead-letter budget", topic, verdict.reason
            )
            return
        logger.warning("uplink message on %s refused: %s: %s", topic, verdict.reason, verdict.detail)
        crud.add_dead_letter(
            session,
            source="ingest",
            topic=topic[:512],
            reason=f"{verdict.reason.value}: {verdict.detail}"[:2000],
            payload=payload,
        )

    def serving(self, session: Session, *, edge_id: str, device_ids: Iterable[str]) -> dict[str, str | None]:
        """Which of ``device_ids`` edge ``edge_id`` serves: device id -> None if it does, else why not.

        An edge serves a device when the device is an enrolled, active device identity and
          - the registry has the device behind no edge, or behind this one; or
          - the device's edge is no longer an active edge identity, or not online, or has not seen
            the device for ``ingest.device_ttl_s`` (the device moved, or its edge went away): this
            edge takes it over; or
          - this edge and the device's edge are in the same registry group (``fleet assign --group``:
            edges of one site, which hear the same devices): the report updates the device, the
            device stays behind its edge.
        Otherwise the device belongs to another live edge of another site (or of an unknown one):
        the report about it is refused (``not_served``) and touches nothing. With
        ``require_enrolled_edges`` off every device is served (the ownership rules of
        ``fleet.record_device_seen`` alone apply)."""
        wanted = list(dict.fromkeys(device_ids))
        if not self.limits.require_enrolled_edges:
            return dict.fromkeys(wanted)
        enrolled = set(
            session.scalars(
                select(Identity.identity_id).where(
                    Identity.identity_id.in_(wanted),
                    Identity.kind == DEVICE,
                    Identity.status == identities.ACTIVE,
                )
            )
        )
        devices = {
            d.device_id: d for d in session.scalars(select(Device).where(Device.device_id.in_(wanted)))
        }
        owners = {d.edge_id for d in devices.values() if d.edge_id is not None} | {edge_id}
        edges = {e.edge_id: e for e in session.scalars(select(EdgeNode).where(EdgeNode.edge_id.in_(owners)))}
        mine = edges.get(edge_id)
        my_group = None if mine is None else mine.group_id
        now = time.time()
        verdicts: dict[str, str | None] = {}
        for device_id in wanted:
            device = devices.get(device_id)
            owner = None if device is None else device.edge_id
            owner_edge = None if owner is None else edges.get(owner)
            if device_id not in enrolled:
                verdicts[device_id] = "not an enrolled, active device"
                continue
            free = (
                owner is None
                or owner == edge_id
                or owner_edge is None
                or owner_edge.state != "online"
                or not self.trust.is_active(owner)
                or device is None
                or device.last_seen is None
                or now - device.last_seen > self.limits.device_ttl_s
            )
            same_site = owner_edge is not None and my_group is not None and my_group == owner_edge.group_id
            verdicts[device_id] = None if free or same_site else f"behind {owner!r} (online, another group)"
        return verdicts

    def _takes_over(self, session: Session, *, edge_id: str, device_id: str) -> bool:
        """Whether ``edge_id`` should become the device's edge although ``record_device_seen`` would
        keep the current one (it is online but revoked, or has not seen the device within the TTL)."""
        device = session.scalar(select(Device).where(Device.device_id == device_id))
        if device is None or device.edge_id in (None, edge_id):
            return False
        if not self.trust.is_active(device.edge_id):
            return True
        return device.last_seen is None or time.time() - device.last_seen > self.limits.device_ttl_s

    def _device_label_trusted(self, session: Session, *, edge_id: str, device_id: str) -> bool:
        """Whether a label ``device_id`` sent (through ``edge_id``) may train: the device is an active,
        trusted labeller, and (with ``require_enrolled_edges``) the edge serves it."""
        key = (edge_id, device_id)
        trusted = self._label_trust.get(key)
        if trusted is None:
            identity = identities.active_identity(session, identity_id=device_id, kind=IdentityKind.DEVICE)
            trusted = identity is not None and bool(identity.label_trusted)
            if trusted and self.limits.require_enrolled_edges:
                trusted = self.serving(session, edge_id=edge_id, device_ids=[device_id])[device_id] is None
            self._label_trust[key] = trusted
        return trusted

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
        if kind is EdgeTopic.DEVICES:
            self._on_devices(session, message, topic=topic, payload=payload)
        else:
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
        label, source, label_conf, trusted = msg.label, "device", None, False
        if label is None:
            source = "none"
            if window is not None:
                guess = self.teacher.label(msg.model_name, window)
                if guess is not None and guess[1] >= self.settings.thresholds.pseudo_label_confidence:
                    label, source, label_conf, trusted = guess[0], "teacher", guess[1], True
        else:
            # A device's label evaluates models; it trains them only from a trusted labeller.
            trusted = self._device_label_trusted(session, edge_id=msg.edge_id, device_id=msg.device_id)
            if not trusted:
                self.stats.labels_untrusted += 1
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
            label_trusted=trusted,
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

    def _on_devices(self, session: Session, msg: DeviceReport, *, topic: str, payload: bytes) -> None:
        """Record what the edge reports of the devices it serves (``serving``); the rest of the report
        is refused as one ``not_served`` dead letter (within the edge's budget) and touches nothing."""
        verdicts = self.serving(session, edge_id=msg.edge_id, device_ids=[s.device_id for s in msg.devices])
        for seen in msg.devices:
            if verdicts[seen.device_id] is not None:
                continue
            if self.limits.require_enrolled_edges and self._takes_over(
                session, edge_id=msg.edge_id, device_id=seen.device_id
            ):
                crud.upsert_device(session, device_id=seen.device_id, edge_id=msg.edge_id)
            fleet.record_device_seen(session, edge_id=msg.edge_id, seen=seen.model_dump(mode="json"))
        refused = {device_id: why for device_id, why in verdicts.items() if why is not None}
        if refused:
            listed = "; ".join(f"{device_id}: {why}" for device_id, why in list(refused.items())[:20])
            more = f"; and {len(refused) - 20} more" if len(refused) > 20 else ""
            detail = f"{msg.edge_id!r} does not serve {len(refused)} reported device(s): {listed}{more}"
            self._reject(session, topic, payload, self._verdict(Rejection.NOT_SERVED, detail, msg.edge_id))

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
