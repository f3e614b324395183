"""The edge node: wiring and lifecycle of every part.

Threads (each fed by a queue, all stopped by one stop event)::

    site MqttLink --inbox--> ingest --work--> N inference workers --results--> decisions
                                                                   (rules, commands, mining, stats)
    cloud MqttLink --inbox--> control --orders--> model manager (verify, warm up, swap)
    uplink sender (SQLite -> cloud, QoS1), metrics publisher, Prometheus endpoint

Two broker roles: the *site* broker carries telemetry, commands and acks (persistent session,
QoS1, optionally a shared subscription); the *cloud* broker carries desired state, status,
decisions, samples, metrics, deploy progress and dead letters. When no cloud broker is configured
both roles use the site broker's URL, still over two connections, so the code path is the same.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
from prometheus_client import CollectorRegistry

from edge_node.cache import ResultCache
from edge_node.commands import CommandTracker
from edge_node.control import SeenDevices
from edge_node.devices import DeviceTracker
from edge_node.inference import ActiveModel, BatchResult, InferenceWorkers, ModelHolder
from edge_node.ingest import DeadLetters, Deduplicator, Ingest, WindowItem
from edge_node.metrics import EdgeCollector, EdgeStats, RateMeter, build_metrics_message, start_endpoint
from edge_node.models import ModelManager, WorkerModels
from edge_node.presence import CloudPresence
from edge_node.rules import Firing, RuleEngine, RuleSpec, load_rules
from edge_node.runtime import load_backend
from edge_node.uplink import HardExampleMiner, UplinkQueue, UplinkSender
from shared.errors import MqttError
from shared.mqtt import MqttLink, Publication, PublishHandle, Received
from shared.redact import redact_url
from shared.schemas import (
    Decision,
    ModelManifest,
    OnlineState,
    encode_message,
)
from shared.settings.edge import EdgeSettings
from shared.topics import DeviceTopic, EdgeTopic, Topics

logger = logging.getLogger(__name__)

WARMUP_KEPT: Final = 32
SITE_CONNECT_WAIT_S: Final = 10.0
STOP_DRAIN_S: Final = 10.0
# A decided window is PUBACKed once the cloud broker has its decisions, waiting at most this long.
DECISION_CONFIRM_S: Final = 2.0
FLUSH_S: Final = 5.0


@dataclass(slots=True)
class _HeldBatch:
    """Decided windows waiting for their decisions' PUBACK before their own."""

    items: list[WindowItem]
    decisions: list[PublishHandle]
    deadline: float


class EdgeNode(CloudPresence):
    """One edge process. ``start()`` returns once it is serving (or waiting for a first model)."""

    def __init__(
        self, settings: EdgeSettings, *, rules: list[RuleSpec] | None = None, worker: int | None = None
    ) -> None:
        self.settings = settings
        # ``worker``: this node is worker process ``worker`` of a multi-process edge (supervisor.py):
        # its own site session (-site-<k>) in the edge's shared-subscription group, its own cloud
        # connection (-cloud-<k>) without status or LWT; status, desired state, model store, device relay
        # and metrics publication are the supervisor's.
        self.worker_index = worker
        suffix = "" if worker is None else f"-{worker}"
        self.edge_id = settings.edge_id
        self.topics = settings.site_broker.topics
        self.cloud_topics: Topics = settings.cloud.topics
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        if rules is None:
            rules = load_rules(settings.rules_file) if settings.rules_file is not None else []
        self.stop_event = threading.Event()
        self.stats = EdgeStats(devices_window_s=settings.device_ttl_s)
        self.holder = ModelHolder()
        self.cache = ResultCache(settings.cache.max_entries, enabled=settings.cache.enabled)
        self.backend = load_backend(settings.runtime.backend)

        self.cloud_link = MqttLink(
            settings.cloud,
            client_id=f"edgefleet-edge-{self.edge_id}-cloud{suffix}",
            connection=f"cloud{suffix}",  # with credentials: logs in as <edge>/cloud[-K]
            clean_session=True,
            will=None
            if worker is not None
            else Publication(self._status_topic, self._status_payload(OnlineState.OFFLINE, "lwt"), 1, True),
            birth=None
            if worker is not None
            else Publication(self._status_topic, self._status_payload(OnlineState.ONLINE), 1, True),
        )
        self._manual_ack = settings.batching.ack_after_decision
        # One worker acking after decision: it runs the site link's network loop itself (no hand-off
        # between paho's thread and the worker; edge_node/inference.py).
        owned = settings.batching.workers == 1 and self._manual_ack
        self.site_link = MqttLink(
            settings.site_broker,
            client_id=f"edgefleet-edge-{self.edge_id}-site{suffix}",
            connection=f"site{suffix}",  # with credentials: logs in as <edge>/site[-K]
            clean_session=False,
            manual_ack=self._manual_ack,
            own_loop=owned,
            # Bounded: beyond it telemetry stays un-PUBACKed on the broker (shared/mqtt.py, "Bounded inbox").
            inbox_max=settings.batching.inbox_max,
        )
        self.dead = DeadLetters(self.edge_id, self._publish_dead)
        self.dedup = Deduplicator(
            settings.dedup_window, settings.dedup_max_devices, ttl_s=settings.device_ttl_s
        )
        self.ingest = Ingest(
            self.topics,
            self.dedup,
            self.dead,
            self._expected_input,
            decoder_cache_bytes=settings.decoder_cache_max_bytes,
        )
        self.commands = CommandTracker(self.topics, self.edge_id, self._publish_site)
        self.devices = (
            SeenDevices(self.edge_id, self.topics)
            if worker is not None
            else DeviceTracker(
                self.edge_id,
                self.topics,
                self._publish_devices,
                lambda: self.cloud_link.connects,
                ttl_s=settings.device_ttl_s,
            )
        )
        self.rules = RuleEngine(rules, device_ttl_s=settings.device_ttl_s)
        self.miner = HardExampleMiner(self.edge_id, settings.uplink)
        self.uplink = UplinkQueue(settings.data_dir / f"uplink{suffix}.sqlite", settings.uplink.queue_max)
        self.uplink_sender = UplinkSender(
            self.uplink,
            self.cloud_link,
            self.cloud_topics.edge(self.edge_id, EdgeTopic.SAMPLES),
            settings.uplink.inflight_max,
        )
        self._decide_lock = threading.Lock()
        self._batch_decisions: list[PublishHandle] = []  # the batch being decided (under the lock)
        self._held: deque[_HeldBatch] = deque()
        self._held_lock = threading.Lock()
        self.decisions_unconfirmed = 0
        self.workers = InferenceWorkers(
            self.holder,
            self.site_link.inbox,
            prepare=self._prepare,
            deliver=self._deliver,
            discard=self._release,
            settings=settings.batching,
            cache=self.cache,
            link=self.site_link if owned else None,
            housekeeping=self._housekeeping,
        )
        self.recent_windows: deque[np.ndarray] = deque(maxlen=WARMUP_KEPT)
        self.manager = (WorkerModels if worker is not None else ModelManager)(
            settings,
            self.backend,
            self.holder,
            warmup_windows=lambda: list(self.recent_windows),
            on_swap=self._on_swap,
            publish_progress=self._publish_progress,
            publish_reported=self._publish_reported,
        )
        self.overload_dropped = 0
        self.decision_errors = 0
        self._rules_version: str | None = None
        self._telemetry_subscribed = False
        self._threads: list[threading.Thread] = []
        self._ack_suffix = "/" + DeviceTopic.ACK.value
        self._queue_max = settings.batching.queue_max
        self._metrics_server: Any = None
        self.rate_meter = RateMeter()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(EdgeCollector(self.stats, self.snapshot))
        self.started = False
        # Optional hook, called on the decision thread with each batch's windows and model version
        # (tests use it to prove no window is lost or classified twice across a swap).
        self.observer: Callable[[list[WindowItem], str], None] | None = None

    # -- topics and publishing (status, progress, orders: presence.py) -------------------------------
    def _publish_site(self, topic: str, payload: bytes) -> None:
        self.site_link.publish(topic, payload, qos=1)

    def _publish_dead(self, payload: bytes) -> None:
        self.cloud_link.publish(
            self.cloud_topics.edge(self.edge_id, EdgeTopic.DEAD), payload, qos=self.settings.dead_letter_qos
        )

    def _expected_input(self) -> ModelManifest | None:
        """The active model's manifest: ingest checks windows against it, or converts them to its
        input when it has ``preprocessing``."""
        model = self.holder.current
        if model is None:
            return None
        return model.manifest

    def _on_swap(self, model: ActiveModel) -> None:
        self.cache.clear()
        if self.started and not self._telemetry_subscribed:  # the first model came from the cloud
            self._subscribe_telemetry()
        logger.info("model %s active", model.manifest.ref)

    def _subscribe_telemetry(self) -> None:
        topic = self.topics.all_devices(DeviceTopic.TELEMETRY)
        if self.worker_index is not None:  # the edge's worker processes split the telemetry
            topic = Topics.shared(self.settings.worker_share_group, topic)
        elif self.settings.share_group:
            topic = Topics.shared(self.settings.share_group, topic)
        self.site_link.subscribe(topic, qos=1)
        self._telemetry_subscribed = True
        logger.info("subscribed to %s", topic)

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> None:
        """Start every part; return once serving (or waiting for a first model)."""
        if self.settings.metrics.port:  # first: a scraper sees the very first window counted
            self._metrics_server = start_endpoint(
                self.registry, self.settings.metrics.port, self.settings.metrics.bind
            )
        model = self.manager.start_up()
        # Subscriptions made before connecting go out in one SUBSCRIBE: one SUBACK covers them all.
        self.site_link.subscribe(self.topics.all_devices(DeviceTopic.ACK), qos=1)
        # Device birth / LWT (retained) and heartbeats, relayed to the cloud (edge_node/devices.py).
        # Not shared: every edge of a site hears every device, retained statuses included.
        if self.worker_index is None:  # a multi-process edge's supervisor relays them, once
            self.site_link.subscribe(self.topics.all_devices(DeviceTopic.STATUS), qos=1)
            self.site_link.subscribe(self.topics.all_devices(DeviceTopic.HEALTH), qos=1)
        if model is not None:
            self._subscribe_telemetry()
        else:
            logger.warning("no model yet: telemetry stays queued on the broker until one is deployed")
        if self.site_link.own_loop:
            self.site_link.start()  # connects from the worker's first poll
        self.workers.start()
        self._spawn(self._control_loop, "edge-control")
        self._spawn(self._metrics_loop, "edge-metrics")
        self._spawn(
            # Only while both links are up: a table the site broker no longer feeds is stale.
            lambda: self.devices.report_loop(
                self.stop_event, lambda: self.cloud_link.connected and self.site_link.connected
            ),
            "edge-devices",
        )
        self.uplink_sender.start()
        self.manager.start()
        self.started = True
        self.site_link.start()
        if not (
            self.site_link.wait_connected(SITE_CONNECT_WAIT_S)
            and self.site_link.wait_subscribed(SITE_CONNECT_WAIT_S)
        ):
            logger.warning(
                "site broker %s not reachable yet; retrying in the background",
                redact_url(self.settings.site_broker.url),
            )
        # Last: "online" on the status topic means serving. Never waited for: decisions need no cloud.
        if self.worker_index is None:  # a worker process: the supervisor owns status and desired state
            self.cloud_link.set_birth(
                Publication(self._status_topic, self._status_payload(OnlineState.ONLINE), 1, True)
            )
            self._subscribe_orders()
        self.cloud_link.start()
        # What exists now (modules, settings, the model) lives as long as the process: out of the
        # collector's reach, a full collection no longer stalls decisions for tens of ms.
        gc.collect()
        gc.freeze()

    def _spawn(self, target: Any, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self) -> None:
        """Stop taking input, finish every window already received, then disconnect."""
        if not self.started:
            return
        self.stop_event.set()
        if self._manual_ack:
            # Finish the batches in hand; whatever is not PUBACKed yet the broker redelivers next time.
            self.workers.stop(STOP_DRAIN_S, drain=False)
            deadline = time.monotonic() + DECISION_CONFIRM_S
            while self._held and time.monotonic() < deadline:
                self._release_confirmed()
                time.sleep(0.01)
            self._release_confirmed(final=True)
            self._flush_site_link()
            self.site_link.stop()
        else:
            # Everything received is already PUBACKed: classify it all before leaving.
            self.site_link.stop()
            self.workers.stop(STOP_DRAIN_S, drain=True)
        self.manager.stop()
        for thread in self._threads:
            thread.join(STOP_DRAIN_S)
        self.uplink_sender.stop()
        self.cloud_link.stop(
            final=None
            if self.worker_index is not None
            else Publication(
                self._status_topic, self._status_payload(OnlineState.OFFLINE, "shutdown"), 1, True
            )
        )
        self.uplink.close()
        if self._metrics_server is not None:
            server, thread = self._metrics_server
            server.shutdown()
            server.server_close()
            thread.join(5)
        self.started = False

    def _flush_site_link(self) -> None:
        """Make sure the broker has processed our PUBACKs before we disconnect.

        Closing a socket with unread incoming data sends a TCP RST, and the broker may then drop what
        it had not read yet: PUBACKs included, so decided windows would come back. A QoS1 round trip
        on the same connection proves every earlier packet was processed (MQTT keeps order). The
        probe is this edge's (non-retained) shutdown status, harmless wherever it lands.
        """
        if not self.site_link.connected:
            return
        probe = self.topics.edge(self.edge_id, EdgeTopic.STATUS)
        payload = self._status_payload(OnlineState.OFFLINE, "shutdown")
        try:
            confirmed = self.site_link.settle(self.site_link.publish(probe, payload, qos=1), FLUSH_S)
        except MqttError as exc:
            confirmed = False
            logger.warning("shutdown probe not published: %s", exc)
        if not confirmed:
            logger.warning("PUBACKs not confirmed before disconnecting: some windows may be redelivered")

    def run_forever(self) -> None:
        """Start, then serve until the stop event is set (by a signal), then stop."""
        self.start()
        try:
            while not self.stop_event.wait(1.0):
                pass
        finally:
            self.stop()

    # -- threads ------------------------------------------------------------------------------------
    def _prepare(self, msg: Received) -> WindowItem | None:
        """On a worker thread: a telemetry message -> a window to classify; acks are matched here."""
        item = None
        try:
            if msg.topic.endswith(self._ack_suffix):
                self.commands.on_ack(msg.payload)
            elif self.devices.handles(msg.topic) is not None:
                self.devices.on_message(msg.topic, msg.payload)
            elif self.site_link.inbox.qsize() > self._queue_max:
                self.overload_dropped += 1  # counted, visible in metrics
            else:
                item = self.ingest.handle(msg)
        except Exception:  # one bad message must not stop dispatch
            self.dead.reject(msg.topic, msg.payload, "internal", "handler error (see the edge log)")
            logger.exception("error handling a message on %s", msg.topic)
        if item is None:
            if self._manual_ack:
                self.site_link.ack(msg)  # handled: dead-lettered, duplicate, ack or dropped (all counted)
            return None
        if self.ingest.accepted % 16 == 1:
            self.recent_windows.append(item.values)
        return item

    def _deliver(self, result: BatchResult) -> None:
        """On a worker thread: rules, commands, mining and stats, one batch at a time."""
        with self._decide_lock:
            self._batch_decisions = []
            try:
                self._decide(result)
            except Exception:  # one bad batch must not stop decisions
                self.decision_errors += 1
                logger.exception("error deciding on a batch of %d windows", len(result.items))
            decisions = self._batch_decisions
        if decisions and self._manual_ack and self.cloud_link.connected:
            # A decision is the cloud's record of its window: PUBACK the window once the cloud broker
            # has the decision, so a crash in between gets the window redelivered instead of lost.
            # (Disconnected from the cloud, decisions wait in memory and windows are not held up:
            # deciding must not depend on the cloud.)
            held = _HeldBatch(result.items, decisions, time.monotonic() + DECISION_CONFIRM_S)
            with self._held_lock:
                self._held.append(held)
            return
        self._release(result.items)

    def _housekeeping(self) -> None:
        """On a worker thread, every turn: PUBACKs now due, and held-back telemetry asked back."""
        self._release_confirmed()
        if self.site_link.holding:
            self.site_link.redeliver_held()

    def _release_confirmed(self, *, final: bool = False) -> None:
        """On a worker thread, every turn: PUBACK held windows whose decisions are confirmed, or that
        waited DECISION_CONFIRM_S / lost the cloud link (counted in ``decisions_unconfirmed``).
        ``final`` (stopping): unconfirmed windows stay un-PUBACKed, to be redelivered next time."""
        if not self._held:
            return
        now = time.monotonic()
        connected = self.cloud_link.connected
        ready: list[list[WindowItem]] = []
        with self._held_lock:
            while self._held:
                held = self._held[0]
                if not all(handle.done for handle in held.decisions):
                    if final:
                        self._held.clear()  # the broker redelivers them: decided twice, never lost
                        break
                    if connected and now < held.deadline:
                        break
                    self.decisions_unconfirmed += sum(not handle.done for handle in held.decisions)
                self._held.popleft()
                ready.append(held.items)
        for items in ready:
            self._release(items)

    def _release(self, items: list[WindowItem]) -> None:
        """PUBACK windows once decided (or counted as failed): until then the broker keeps them."""
        if self._manual_ack:
            ack = self.site_link.ack
            for item in items:
                if item.message is not None:
                    ack(item.message)

    def _decide(self, res: BatchResult) -> None:
        model = res.model
        manifest = model.manifest
        if model.version != self._rules_version:
            self.rules.set_classes(list(manifest.class_names))
            self._rules_version = model.version
        stats = self.stats
        items = res.items
        probs = res.probs
        now_wall = time.time()
        if res.batch_size:
            stats.batch_size.observe(float(res.batch_size))
            stats.inference_s.observe(res.infer_s)
            stats.recent_inference_s.append(res.infer_s)
        finite = np.isfinite(probs).all(axis=1)
        if not finite.all():
            bad = int((~finite).sum())
            stats.nonfinite_total += bad
            logger.error("model %s gave NaN/inf for %d windows", manifest.ref, bad)
            keep = np.flatnonzero(finite)
            items = [items[i] for i in keep]
            probs = probs[keep]
            if not items:
                return
        top = probs.argmax(axis=1)
        conf = probs.max(axis=1)
        names = manifest.class_names
        stats.windows_total += len(items)
        stats.confidence.observe(conf)
        stats.confidence_sum += float(conf.sum())
        for cls, count in enumerate(np.bincount(top, minlength=len(names)).tolist()):
            if count:
                stats.class_counts[names[cls]] += count
        ts = np.fromiter((it.window.ts for it in items), dtype=np.float64, count=len(items))
        e2e = np.maximum(now_wall - ts, 0.0)
        stats.e2e_s.observe(e2e)
        stats.recent_e2e_s.extend(e2e.tolist())
        if self.observer is not None:
            self.observer(items, model.version)
        rows = probs.tolist()
        devices = stats.devices
        evaluate = self.rules.evaluate if self.rules.rules else None
        for i, item in enumerate(items):
            window = item.window
            devices.add(window.device_id)
            if window.label is not None:
                stats.labelled_windows += 1
                if names[int(top[i])] == window.label:
                    stats.labelled_correct += 1
            if evaluate is not None:
                for firing in evaluate(window.device_id, rows[i], window.seq, window.ts):
                    self._fire(firing, model)
        self.devices.saw([item.window.device_id for item in items], now_wall)
        for i, reason in self.miner.select(probs):
            sample = self.miner.build(items[i], probs[i], manifest, reason)
            self.uplink.put(encode_message(sample))

    def _fire(self, firing: Firing, model: ActiveModel) -> None:
        rule = firing.rule
        command_id = None
        if rule.command is not None:
            ttl = rule.command.ttl_s or self.settings.command_ttl_s
            command = self.commands.send(
                firing.device_id, rule.command.name, rule.command.args, ttl, rule.name
            )
            command_id = command.command_id
            if self.site_link.own_loop:  # on the site loop: the command leaves now, ahead of the rest
                self.site_link.flush()
        decision = Decision(
            edge_id=self.edge_id,
            device_id=firing.device_id,
            rule=rule.name,
            class_name=rule.class_name,
            probability=min(1.0, max(0.0, firing.probability)),
            severity=rule.severity,
            window_seq=firing.window_seq,
            model_version=model.version,
            command_id=command_id,
            command_name=rule.command.name if rule.command else None,
            command_args=rule.command.args if rule.command else {},
            window_ts=firing.window_ts,
        )
        self.stats.decisions_total += 1
        try:
            handle = self.cloud_link.publish(
                self.cloud_topics.edge(self.edge_id, EdgeTopic.DECISION),
                encode_message(decision),
                on_done=self._decision_confirmed,
            )
            self._batch_decisions.append(handle)
        except MqttError as exc:  # the command already went out: the decision stands
            logger.warning("decision not published: %s", exc)

    def _decision_confirmed(self, _handle: PublishHandle) -> None:
        """On the cloud link's network thread: wake the site loop to PUBACK what this confirmed."""
        self.site_link.wake()

    def _metrics_loop(self) -> None:
        interval = self.settings.metrics.publish_interval_s
        topic = self.cloud_topics.edge(self.edge_id, EdgeTopic.METRICS)
        while not self.stop_event.wait(interval):
            try:
                self.commands.expire()
                if self.worker_index is not None:  # the supervisor publishes the edge's (summed) metrics
                    continue
                snap = self.snapshot()
                message = build_metrics_message(self.edge_id, self.stats, snap, interval, snap["rate"])
                self.cloud_link.publish(topic, encode_message(message), qos=0)
            except Exception:  # metrics must never take the node down
                logger.exception("metrics publish failed")

    # -- introspection ------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """The counters the metrics endpoint and message report, as of now."""
        model = self.holder.current
        return {
            "dead_by_reason": dict(self.dead.by_reason),
            "dead_total": self.dead.total,
            "dropped": {
                "overload": self.overload_dropped,
                "inbox_full": self.site_link.inbox_dropped,  # QoS0 / auto-acked: not redelivered
                "stale": self.ingest.stale,
                "inference_error": self.workers.failed_windows,
                "nonfinite_output": self.stats.nonfinite_total,
            },
            "duplicates": self.ingest.duplicates,
            "cache_hit_rate": self.cache.hit_rate,
            "uplink_depth": self.uplink.depth,
            "uplink_dropped": self.uplink.dropped,
            "uplink_delivered": self.uplink_sender.delivered,
            "work_depth": self.site_link.inbox.qsize(),
            # Site messages not queued because the inbox was full (held back for redelivery, or
            # dropped: dropped["inbox_full"]), and the reconnections that had them redelivered.
            "inbox_full": self.site_link.inbox_full,
            "inbox_resyncs": self.site_link.inbox_resyncs,
            # The telemetry decoder's descriptor cache (bounded in bytes: shared/codec.py).
            "decoder_cache_bytes": self.ingest.decoder.cache_bytes,
            "decoder_cache_entries": self.ingest.decoder.cache_entries,
            "decoder_cache_evictions": self.ingest.decoder.evictions,
            "rate": self.rate_meter.update(self.stats.windows_total),
            "commands_sent": self.commands.sent,
            "devices_known": len(self.devices),
            # Per-device tables: bounded in count, silent devices evicted (edge_node/ingest.py, rules.py,
            # devices.py); sizes and evictions are exported as edge_device_table_*.
            "device_tables": {
                "dedup": {
                    "tracked": len(self.dedup),
                    "evicted_idle": self.dedup.evicted_idle,
                    "evicted_full": self.dedup.evicted_full,
                },
                "rules": {
                    "tracked": len(self.rules),
                    "evicted_idle": self.rules.evicted_idle,
                    "evicted_full": self.rules.evicted_full,
                },
                "devices": {
                    "tracked": len(self.devices),
                    "evicted_idle": getattr(self.devices, "evicted_idle", 0),
                    "evicted_full": getattr(self.devices, "refused", 0),
                },
            },
            "acks": dict(self.commands.acks),
            "desired_refused": dict(self.manager.refused),  # edge_desired_refused_total{reason}
            "swaps": self.holder.swaps,
            "errors": self.workers.errors + self.decision_errors,
            "decisions_unconfirmed": self.decisions_unconfirmed,
            "model_name": model.manifest.name if model else None,
            "model_version": model.version if model else None,
        }
