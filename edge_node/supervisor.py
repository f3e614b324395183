"""One edge on every core: a supervisor process and N worker processes under one edge identity.

``edgefleet edge run --processes N|auto`` with N > 1 runs this instead of a single ``EdgeNode``::

    supervisor (this module)                                   worker k = 0..N-1 (edge_node/worker.py)
    ─────────────────────────                                  ───────────────────────────────────────
    cloud MqttLink  -cloud: status birth/LWT (one), desired    EdgeNode(worker=k)
    FleetModels: download, signature, sha256 once; store,       site MqttLink -site-<k>: persistent session,
      state.json; Prepare -> all ready -> Commit -> all           $share/<group>/.../telemetry, acks,
    device MqttLink -site (clean): device status/health relay     manual PUBACK after the decision
    Prometheus + EdgeMetrics: sums over the workers             inference threads, rules, commands
    WorkerPool: start, watch, restart crashed workers           cloud MqttLink -cloud-<k>: decisions,
         │                                                        samples (uplink-<k>.sqlite), dead letters
         └──── one socket pair per worker (edge_node/control.py) ────┘  Stats every 0.5 s

Why this split: the hot path (socket -> decision -> PUBACK) stays inside one process with no hop,
each worker on its own core and its own GIL; everything that must exist once per edge (the retained
status, the model store and its state, deployment progress, metrics, the device table) is the
supervisor's. Decisions, samples and dead letters go straight from each worker to the cloud broker
over its own connection rather than through the supervisor: no extra hop, no second copy.

A worker that exits while the edge is not stopping is counted (``edge_worker_restarts_total``) and
started again with the same index after ``RESTART_BACKOFF_S`` (doubling up to
``RESTART_BACKOFF_MAX_S`` while it keeps failing): same client id, same persistent session, so the
broker redelivers every window it had not PUBACKed, and the ones routed to it meanwhile.
"""

from __future__ import annotations

import logging
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from edge_node.control import (
    Abort,
    Channel,
    Commit,
    Committed,
    Init,
    ModelSpec,
    Prepare,
    Prepared,
    Ready,
    Stats,
    StatsAggregator,
    Stop,
)
from edge_node.devices import DeviceTracker
from edge_node.errors import ModelError
from edge_node.inference import ActiveModel, ModelHolder
from edge_node.metrics import EdgeCollector, RateMeter, build_metrics_message, start_endpoint
from edge_node.model_check import check_in_child
from edge_node.models import ModelManager
from edge_node.presence import CloudPresence
from edge_node.runtime import Backend
from shared.errors import ConfigError
from shared.identity import MAX_EDGE_WORKERS
from shared.mqtt import MqttLink, Publication, Received
from shared.schemas import (
    ModelManifest,
    OnlineState,
    encode_message,
)
from shared.settings.edge import EdgeSettings
from shared.topics import DeviceTopic, EdgeTopic

logger = logging.getLogger(__name__)

POLL_S: Final = 0.1
RESTART_BACKOFF_S: Final = 0.5  # first restart of a crashed worker
RESTART_BACKOFF_MAX_S: Final = 10.0  # a worker that keeps crashing waits at most this long
STABLE_S: Final = 30.0  # a worker up this long is healthy again: its next restart is quick
START_WAIT_S: Final = 120.0  # for every worker to serve at start (model warm-up included)
PREPARE_WAIT_S: Final = 120.0  # for every worker to build and warm up a new model
COMMIT_WAIT_S: Final = 30.0  # for every worker to swap it in (one batch)
STOP_WAIT_S: Final = 40.0  # for a worker to finish its batches and leave (EdgeNode.stop: 10 + 5 + 2 s)
WORKER_MODULE: Final = "edge_node.worker"


@dataclass
class WorkerSlot:
    """Worker ``index``: its current process (``None`` between a crash and its restart)."""

    index: int
    proc: subprocess.Popen[bytes] | None = None
    channel: Channel | None = None
    started_at: float = 0.0
    ready: bool = False
    pid: int = 0
    restarts: int = 0
    backoff: float = RESTART_BACKOFF_S
    next_start: float = 0.0

    @property
    def alive(self) -> bool:
        """Its process runs."""
        return self.proc is not None and self.proc.poll() is None


class WorkerPool:
    """The worker processes: start, watch, restart; deployment rounds (prepare all, then commit all)."""

    def __init__(
        self, settings: EdgeSettings, count: int, holder: ModelHolder, aggregator: StatsAggregator
    ) -> None:
        self.settings = settings
        # Workers serve no Prometheus endpoint of their own: the supervisor's sums are the edge's.
        self.worker_settings = settings.model_copy(
            update={"metrics": settings.metrics.model_copy(update={"port": 0})}
        )
        self.holder = holder
        self.aggregator = aggregator
        self.slots = [WorkerSlot(index) for index in range(count)]
        self.exits: queue.SimpleQueue[tuple[int, subprocess.Popen[bytes]]] = queue.SimpleQueue()
        self.replies: queue.SimpleQueue[Prepared | Committed] = queue.SimpleQueue()
        self.seen: queue.SimpleQueue[dict[str, float]] = queue.SimpleQueue()
        self.stopping = threading.Event()
        self.restarts_total = 0
        # Held from Prepare to the end of Commit: no worker is (re)started in between, so every worker
        # either takes part in the round or starts after it, on the model it left serving.
        self._round = threading.Lock()
        self._round_open = False
        self._round_token = 0
        self._round_targets: list[WorkerSlot] = []

    # -- processes ----------------------------------------------------------------------------------
    def _current_spec(self) -> ModelSpec | None:
        model = self.holder.current
        if model is None:
            return None
        return ModelSpec(path=model.path, stored_path=model.path, manifest=model.manifest)

    def spawn(self, slot: WorkerSlot) -> None:
        """Start worker ``slot.index`` on the model the edge serves now."""
        ours, theirs = socket.socketpair()
        fd = theirs.fileno()
        proc = subprocess.Popen(
            [sys.executable, "-m", WORKER_MODULE, "--control-fd", str(fd), "--index", str(slot.index)],
            pass_fds=(fd,),
        )
        theirs.close()
        channel = Channel(ours.detach())
        level = logging.getLogger().getEffectiveLevel()
        channel.send(Init(self.worker_settings, slot.index, self._current_spec(), level))
        slot.proc, slot.channel, slot.pid = proc, channel, proc.pid
        slot.started_at, slot.ready = time.monotonic(), False
        threading.Thread(
            target=self._read, args=(slot, proc, channel), name=f"edge-worker-{slot.index}", daemon=True
        ).start()
        logger.info("worker %d started (pid %d)", slot.index, proc.pid)

    def _read(self, slot: WorkerSlot, proc: subprocess.Popen[bytes], channel: Channel) -> None:
        """Everything worker ``slot`` says, until its channel closes (it exited)."""
        while True:
            try:
                message = channel.recv()
            except (EOFError, OSError):
                break
            if isinstance(message, Stats):
                self.aggregator.update(message)
                if message.seen:
                    self.seen.put(message.seen)
            elif isinstance(message, Prepared | Committed):
                self.replies.put(message)
            elif isinstance(message, Ready):
                slot.ready = True
                logger.info(
                    "worker %d (pid %d) serving model %s", message.index, message.pid, message.model_version
                )
        try:
            proc.wait(STOP_WAIT_S)
        except subprocess.TimeoutExpired:  # closed its end but hangs: it is no use any more
            logger.error(  # noqa: TRY400  (a timeout, not an error worth a traceback)
                "worker %d (pid %d) hangs after closing its channel: killing it", slot.index, proc.pid
            )
            proc.kill()
            proc.wait()
        channel.close()
        self.exits.put((slot.index, proc))

    def start_all(self) -> None:
        """Start every worker and wait (bounded) until each serves."""
        for slot in self.slots:
            self.spawn(slot)
        deadline = time.monotonic() + START_WAIT_S
        while time.monotonic() < deadline and not all(s.ready or not s.alive for s in self.slots):
            time.sleep(POLL_S)
        waiting = [s.index for s in self.slots if not s.ready]
        if waiting:
            logger.warning("workers %s not serving yet after %.0f s", waiting, START_WAIT_S)

    def on_exit(self, index: int, proc: subprocess.Popen[bytes]) -> None:
        """Worker ``index`` exited: unless the edge is stopping, restart it after its backoff."""
        slot = self.slots[index]
        if slot.proc is not proc:
            return
        self.aggregator.retire(index)
        slot.proc, slot.channel, slot.ready = None, None, False
        if self.stopping.is_set():
            return
        now = time.monotonic()
        if now - slot.started_at >= STABLE_S or not slot.restarts:
            slot.backoff = RESTART_BACKOFF_S
        else:  # it keeps crashing: wait longer each time
            slot.backoff = min(RESTART_BACKOFF_MAX_S, slot.backoff * 2)
        slot.next_start = now + slot.backoff
        slot.restarts += 1
        self.restarts_total += 1
        logger.warning(
            "worker %d (pid %d) exited with %s: restarting it in %.1f s",
            index,
            proc.pid,
            proc.returncode,
            slot.backoff,
        )

    def restart_due(self) -> None:
        """Start the crashed workers whose backoff is over (never inside a deployment round)."""
        now = time.monotonic()
        due = [s for s in self.slots if s.proc is None and s.next_start <= now]
        if not due or self.stopping.is_set() or not self._round.acquire(timeout=POLL_S):
            return
        try:
            for slot in due:
                if not self.stopping.is_set():
                    self.spawn(slot)
        finally:
            self._round.release()

    def stop_all(self) -> None:
        """Stop every worker (each finishes its batches in hand), killing any that does not leave."""
        self.stopping.set()
        slots = [s for s in self.slots if s.proc is not None]
        for slot in slots:
            if slot.channel is not None:
                slot.channel.send(Stop())
        deadline = time.monotonic() + STOP_WAIT_S
        for slot in slots:
            proc = slot.proc
            if proc is None:
                continue
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.error(  # noqa: TRY400  (a timeout, not an error worth a traceback)
                    "worker %d (pid %d) did not stop: killing it", slot.index, proc.pid
                )
                proc.kill()
                proc.wait()

    @property
    def running(self) -> int:
        """How many worker processes run."""
        return sum(1 for s in self.slots if s.alive)

    # -- deployment rounds --------------------------------------------------------------------------
    def prepare_all(self, spec: ModelSpec) -> None:
        """Every running worker builds and warms up ``spec``; ``ModelError`` (after aborting the round)
        if any cannot. On success the round stays open until ``commit_all`` and ``end_round``."""
        self._round.acquire()
        self._round_open = True
        try:
            self._round_token += 1
            token = self._round_token
            targets = [s for s in self.slots if s.alive and s.channel is not None]
            self._drain_replies()
            for slot in targets:
                assert slot.channel is not None
                slot.channel.send(Prepare(token, spec))
            answers = self._collect(token, Prepared, targets, PREPARE_WAIT_S)
            failures = []
            for slot in targets:
                answer = answers.get(slot.index)
                if answer is None:
                    failures.append(f"worker {slot.index}: no answer (exited or timed out)")
                elif isinstance(answer, Prepared) and not answer.ok:
                    failures.append(f"worker {slot.index}: {answer.reason}")
            if failures:
                for slot in targets:
                    if slot.channel is not None:
                        slot.channel.send(Abort(token))
                raise ModelError("; ".join(failures))  # noqa: TRY301  (the round ends below)
            self._round_targets = targets
        except BaseException:
            self.end_round()
            raise

    def commit_all(self) -> None:
        """Every worker of the open round swaps the prepared model in; waits (bounded) for all."""
        if not self._round_open:
            return
        token = self._round_token
        targets = self._round_targets
        for slot in targets:
            if slot.channel is not None:
                slot.channel.send(Commit(token))
        answers = self._collect(token, Committed, targets, COMMIT_WAIT_S)
        missing = [s.index for s in targets if s.index not in answers]
        if missing:  # exited: they restart on the new model (the round holds restarts until it ends)
            logger.warning("workers %s did not confirm the swap", missing)

    def end_round(self) -> None:
        """Close the round (committed, aborted or failed): restarts may go ahead."""
        if not self._round_open:
            return
        self._round_open = False
        self._round_targets = []
        self._round.release()

    def abort_round(self) -> None:
        """A round prepared but never committed (the deployment failed after preparing): drop it."""
        if not self._round_open:
            return
        for slot in self._round_targets:
            if slot.channel is not None:
                slot.channel.send(Abort(self._round_token))
        self.end_round()

    def _drain_replies(self) -> None:
        while True:
            try:
                self.replies.get_nowait()
            except queue.Empty:
                return

    def _collect(
        self, token: int, kind: type[Prepared] | type[Committed], targets: list[WorkerSlot], wait_s: float
    ) -> dict[int, Prepared | Committed]:
        answers: dict[int, Prepared | Committed] = {}
        procs = {s.index: s.proc for s in targets}
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            pending = [
                s
                for s in targets
                if s.index not in answers and s.proc is procs[s.index] and s.alive  # not exited meanwhile
            ]
            if not pending:
                break
            try:
                reply = self.replies.get(timeout=POLL_S)
            except queue.Empty:
                continue
            if isinstance(reply, kind) and reply.token == token:
                answers[reply.index] = reply
        return answers


def _no_backend(*_args: Any, **_kwargs: Any) -> Any:
    raise ModelError("the supervisor runs no interpreter: its workers do")


# The supervisor's model manager never builds an interpreter (prepare and _load_local go to the
# workers or to a child process): LiteRT is not even imported in the supervisor.
NO_BACKEND: Final = Backend(
    name="none (supervisor)", interpreter_cls=_no_backend, load_delegate=_no_backend, op_resolver_type=None
)


class FleetModels(ModelManager):
    """The supervisor's model manager: orders, download, signature, size and sha256 checks, the store
    and its state file exactly as in one process; building interpreters and swapping them is the
    workers' (``WorkerPool.prepare_all`` / ``commit_all``). No window is lost or run twice: each
    worker swaps between two of its batches, and "swapped" is reported once every worker serves it."""

    def __init__(self, pool: WorkerPool, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pool = pool

    def prepare(self, content: bytes, manifest: ModelManifest, path: Path) -> ActiveModel:
        """Have every worker build and warm up the model; with none running yet (start-up), check it
        in a child process so that a broken model fails the start as it does in one process (the
        supervisor itself never loads LiteRT: edge_node/model_check.py)."""
        if not self.pool.running:
            check_in_child(self.settings, content, manifest, path)
            return ActiveModel(manifest, (), manifest.sha256, str(path))
        staged: Path | None = None
        source = path
        if not path.exists():  # a new artifact: stored only once every worker could load it
            staged = path.with_suffix(".staged")
            staged.write_bytes(content)
            source = staged
        try:
            self.pool.prepare_all(ModelSpec(path=str(source), stored_path=str(path), manifest=manifest))
        finally:
            if staged is not None:
                staged.unlink(missing_ok=True)
        return ActiveModel(manifest, (), manifest.sha256, str(path))

    def _load_local(self, path: Path, manifest_path: Path | None) -> ActiveModel:
        if manifest_path is not None:
            return super()._load_local(path, manifest_path)
        try:
            content = path.read_bytes()
        except OSError as exc:
            raise ModelError(f"cannot read model {path}: {exc}") from exc
        manifest = check_in_child(self.settings, content, None, path)  # derived there, and checked
        return ActiveModel(manifest, (), manifest.sha256, str(path))

    def _swap(self, model: ActiveModel) -> None:
        try:
            self.pool.commit_all()
            super()._swap(model)
        finally:
            self.pool.end_round()

    def handle(self, payload: bytes) -> None:
        """One desired-state order; a round left open by a failure after preparing is aborted."""
        try:
            super().handle(payload)
        finally:
            self.pool.abort_round()


class SupervisorCollector:
    """Prometheus families of the supervisor itself: worker processes, restarts, windows per worker."""

    def __init__(self, supervisor: EdgeSupervisor) -> None:
        self.supervisor = supervisor

    def describe(self) -> list[Any]:
        """Nothing to describe up front (``auto_describe`` is off)."""
        return []

    def collect(self) -> Iterator[Any]:
        """Restarts, running workers and each worker's windows (all its incarnations)."""
        pool = self.supervisor.pool
        yield CounterMetricFamily(
            "edge_worker_restarts", "worker processes restarted after exiting", value=pool.restarts_total
        )
        yield GaugeMetricFamily("edge_worker_processes", "worker processes running", value=pool.running)
        per_worker = CounterMetricFamily(
            "edge_worker_windows", "windows classified per worker", labels=["worker"]
        )
        for index, count in sorted(self.supervisor.aggregator.windows_by_worker().items()):
            per_worker.add_metric([str(index)], count)
        yield per_worker


def check_worker_count(settings: EdgeSettings, processes: int) -> None:
    """``ConfigError`` when the edge logs in with credentials and has more worker processes than the
    broker has connection names for (``MAX_EDGE_WORKERS``: ``site-K`` / ``cloud-K``, K below it)."""
    with_credentials = any(
        broker.credentials()[0] is not None for broker in (settings.site_broker, settings.cloud)
    )
    if with_credentials and processes > MAX_EDGE_WORKERS:
        raise ConfigError(
            f"edge {settings.edge_id}: {processes} worker processes, but an edge that logs in to the broker "
            f"has at most {MAX_EDGE_WORKERS} (one pair of connection names each): set processes "
            f"(--processes) to {MAX_EDGE_WORKERS} or fewer"
        )


class EdgeSupervisor(CloudPresence):
    """A multi-process edge: ``run_forever()`` until ``stop_event`` is set (by a signal)."""

    def __init__(self, settings: EdgeSettings, processes: int) -> None:
        check_worker_count(settings, processes)
        self.settings = settings
        self.edge_id = settings.edge_id
        self.topics = settings.site_broker.topics
        self.cloud_topics = settings.cloud.topics
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.stop_event = threading.Event()
        self.holder = ModelHolder()
        self.aggregator = StatsAggregator()
        self.pool = WorkerPool(settings, processes, self.holder, self.aggregator)
        self.manager = FleetModels(
            self.pool,
            settings,
            NO_BACKEND,
            self.holder,
            warmup_windows=list,
            on_swap=self._on_swap,
            publish_progress=self._publish_progress,
            publish_reported=self._publish_reported,
        )
        self.cloud_link = MqttLink(
            settings.cloud,
            client_id=f"edgefleet-edge-{self.edge_id}-cloud",
            connection="cloud",  # with credentials: logs in as <edge>/cloud
            clean_session=True,
            will=Publication(self._status_topic, self._status_payload(OnlineState.OFFLINE, "lwt"), 1, True),
            birth=Publication(self._status_topic, self._status_payload(OnlineState.ONLINE), 1, True),
        )
        # Device status (retained) and health: a plain, clean subscription of the supervisor's own.
        # Its client id is the one-process edge's site session: connecting clean ends that session, so
        # an edge switched from one process to several leaves no session collecting telemetry behind.
        # Bounded inbox: a flood of statuses/heartbeats beyond it is dropped and counted (inbox_full).
        self.device_link = MqttLink(
            settings.site_broker,
            client_id=f"edgefleet-edge-{self.edge_id}-site",
            connection="site",  # with credentials: <edge>/site, the one-process edge's session too
            clean_session=True,
            inbox_max=settings.batching.inbox_max,
        )
        self.devices = DeviceTracker(
            self.edge_id,
            self.topics,
            self._publish_devices,
            lambda: self.cloud_link.connects,
            ttl_s=settings.device_ttl_s,
        )
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(EdgeCollector(self.aggregator.stats, self.snapshot))
        self.registry.register(SupervisorCollector(self))
        self.rate_meter = RateMeter()
        self._metrics_server: Any = None
        self._threads: list[threading.Thread] = []
        self.started = False

    # -- status and publishing ----------------------------------------------------------------------

    def _on_swap(self, model: ActiveModel) -> None:
        logger.info("model %s active on every worker", model.manifest.ref)

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the workers on the current model, then the edge's own parts; "online" last."""
        if self.settings.metrics.port:
            self._metrics_server = start_endpoint(
                self.registry, self.settings.metrics.port, self.settings.metrics.bind
            )
        model = self.manager.start_up()
        if model is None:
            logger.warning("no model yet: telemetry stays queued on the broker until one is deployed")
        self.pool.start_all()
        self.started = True
        self.device_link.subscribe(self.topics.all_devices(DeviceTopic.STATUS), qos=1)
        self.device_link.subscribe(self.topics.all_devices(DeviceTopic.HEALTH), qos=1)
        self._spawn(self._device_loop, "edge-device-relay")
        self._spawn(
            lambda: self.devices.report_loop(
                self.stop_event, lambda: self.cloud_link.connected and self.device_link.connected
            ),
            "edge-devices",
        )
        self._spawn(self._control_loop, "edge-control")
        self._spawn(self._metrics_loop, "edge-metrics")
        self.manager.start()
        self.device_link.start()
        self.cloud_link.set_birth(
            Publication(self._status_topic, self._status_payload(OnlineState.ONLINE), 1, True)
        )
        self._subscribe_orders()
        self.cloud_link.start()
        logger.info("edge %s serving with %d worker processes", self.edge_id, len(self.pool.slots))

    def _spawn(self, target: Any, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def run_forever(self) -> None:
        """Start, then watch the workers until the stop event is set, then stop."""
        try:
            self.start()
            while not self.stop_event.is_set():
                try:
                    index, proc = self.pool.exits.get(timeout=POLL_S)
                except queue.Empty:
                    pass
                else:
                    if self.stop_event.is_set():  # e.g. SIGTERM to the whole process group: no restart
                        self.pool.stopping.set()
                    self.pool.on_exit(index, proc)
                self.pool.restart_due()
        finally:
            self.stop()

    def stop(self) -> None:
        """Stop the workers (each finishes its batches in hand), then the rest; "offline" last."""
        self.stop_event.set()
        self.pool.stopping.set()
        self.manager.stop()  # a deployment in progress finishes first
        self.pool.stop_all()
        for thread in self._threads:
            thread.join(10)
        self.device_link.stop()
        self.cloud_link.stop(
            final=Publication(
                self._status_topic, self._status_payload(OnlineState.OFFLINE, "shutdown"), 1, True
            )
        )
        if self._metrics_server is not None:
            server, thread = self._metrics_server
            server.shutdown()
            server.server_close()
            thread.join(5)
            self._metrics_server = None
        self.started = False

    # -- threads ------------------------------------------------------------------------------------
    def _device_loop(self) -> None:
        while not self.stop_event.is_set():
            while True:  # devices the workers classified since their last reports
                try:
                    seen = self.pool.seen.get_nowait()
                except queue.Empty:
                    break
                self.devices.saw(list(seen), max(seen.values()))
                self.aggregator.stats.devices.update(seen)  # "devices seen" over every worker
            try:
                msg: Received = self.device_link.inbox.get(timeout=POLL_S)
            except queue.Empty:
                continue
            try:
                self.devices.on_message(msg.topic, msg.payload)
            except Exception:  # one bad message must not stop the relay
                logger.exception("error handling a message on %s", msg.topic)

    def _metrics_loop(self) -> None:
        interval = self.settings.metrics.publish_interval_s
        topic = self.cloud_topics.edge(self.edge_id, EdgeTopic.METRICS)
        while not self.stop_event.wait(interval):
            try:
                snap = self.snapshot()
                message = build_metrics_message(
                    self.edge_id, self.aggregator.stats, snap, interval, snap["rate"]
                )
                self.cloud_link.publish(topic, encode_message(message), qos=0)
            except Exception:  # metrics must never take the edge down
                logger.exception("metrics publish failed")

    # -- introspection ------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """The edge's snapshot: the workers' summed, plus what only the supervisor knows."""
        model = self.holder.current
        base: dict[str, Any] = {
            "dead_by_reason": {},
            "dead_total": 0,
            "dropped": {},
            "duplicates": 0,
            "cache_hit_rate": 0.0,
            "uplink_depth": 0,
            "uplink_dropped": 0,
            "uplink_delivered": 0,
            "work_depth": 0,
            "inbox_full": 0,
            "commands_sent": 0,
            "acks": {},
            "errors": 0,
        }
        snap = base | self.aggregator.snapshot()
        snap.update(
            rate=self.rate_meter.update(self.aggregator.stats.windows_total),
            devices_known=len(self.devices),
            swaps=self.holder.swaps,
            model_name=model.manifest.name if model else None,
            model_version=model.version if model else None,
            workers=self.pool.running,
            worker_restarts=self.pool.restarts_total,
            desired_refused=dict(self.manager.refused),
        )
        snap["inbox_full"] = snap.get("inbox_full", 0) + self.device_link.inbox_full  # the relay's own
        return snap
