"""``edgefleet demo --scenario NAME``: fault injection on the demo's topology.

Each run reuses the demo's start-up (broker, Redis, cloud ingest, edges, devices; the first model is
trained once and kept in the data dir), then: a baseline streaming period, the fault, a fault period,
the heal, a wait for recovery, and the demo's final accounting (devices stopped, outboxes read, edges
drained). No drift and no retraining: once a production model exists the Celery worker and beat are
not started at all.

The summary's ``scenario`` block says what was done, when, how long service took to come back and
what the scenario checks (``ok`` / ``problems``); ``windows.lost`` is the demo's usual accounting
(sent - processed - pending on devices - dropped and counted on devices). The command exits 1 if
``lost`` is not 0 or the scenario's checks fail.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlparse

import click
import numpy as np

from cloud.demo import runtime as rt
from cloud.demo.monitor import Monitor
from cloud.demo.runner import SCENARIO_NAMES, Demo, _production
from cloud.demo.supervisor import Child
from cloud.errors import SupervisorError
from cloud.fleet.desired_state import publish_desired, publish_desired_state, sign, signed_order
from edge_node.models import fetch_artifact
from shared.codec import encode_window
from shared.mqtt import MqttLink
from shared.schemas import ModelManifest

logger = logging.getLogger(__name__)

BASELINE_S = 8.0  # streaming before the fault
RECOVERY_TIMEOUT_S = 90.0  # after the heal, service must be back within this
DEPLOY_REPORT_TIMEOUT_S = 30.0  # bad-model: every edge reports on an order within this
BAD_MODEL_HOLD_S = 8.0  # bad-model: the fault lasts at least this long (the edges keep serving)
FLOOD_COUNT = 2000
FLOOD_S = 5.0  # malformed-flood: the payloads are published over this long
UPLINK_SETTLED = 10  # cloud-partition: an edge's uplink queue depth once its backlog has gone up


# -- a cuttable TCP relay --------------------------------------------------------------------------


class LinkCutter:
    """A TCP relay on 127.0.0.1 in front of the broker for one kind of link.

    ``cut()`` closes every relayed connection and closes any new one right after accepting it (the
    client sees its connection reset and retries with its usual backoff): a partition of exactly the
    links configured to go through this relay, nothing else. ``heal()`` relays again."""

    def __init__(self, name: str, upstream_port: int) -> None:
        self.name = name
        self.upstream_port = upstream_port
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self._listener.settimeout(0.2)
        self.port = int(self._listener.getsockname()[1])
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._cut = threading.Event()
        self._stop = threading.Event()
        self.accepted = 0
        self.refused = 0
        self._thread = threading.Thread(target=self._accept_loop, name=f"relay-{name}", daemon=True)

    @property
    def url(self) -> str:
        """The relay's broker URL, for the clients whose link goes through it."""
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start accepting and relaying connections."""
        self._thread.start()

    def cut(self) -> None:
        """Partition: close every relayed connection, and refuse new ones until ``heal``."""
        self._cut.set()
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            self._close(pair)

    def heal(self) -> None:
        """Relay new connections again (the clients reconnect on their own backoff)."""
        self._cut.clear()

    def close(self) -> None:
        """Stop relaying for good: close every connection and the listener."""
        self._stop.set()
        self.cut()
        self._thread.join(timeout=2)
        self._listener.close()

    @staticmethod
    def _close(pair: tuple[socket.socket, socket.socket]) -> None:
        for sock in pair:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self._cut.is_set():
                self.refused += 1
                self._close((client, client))
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
            except OSError as exc:  # the broker is stopping (end of the run) or restarting
                logger.info("relay %s: upstream not reachable: %s", self.name, exc)
                self._close((client, client))
                continue
            upstream.settimeout(None)
            client.settimeout(None)
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pair = (client, upstream)
            with self._lock:
                self._pairs.append(pair)
            self.accepted += 1
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(
                    target=self._pump, args=(src, dst, pair), name=f"relay-{self.name}-pump", daemon=True
                ).start()

    def _pump(
        self, src: socket.socket, dst: socket.socket, pair: tuple[socket.socket, socket.socket]
    ) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        with self._lock:
            if pair in self._pairs:
                self._pairs.remove(pair)
        self._close(pair)


# -- scenarios ---------------------------------------------------------------------------------------


class Scenario:
    """One fault: ``prepare`` (before anything starts), ``inject``, ``heal``, ``recovered``."""

    name = ""
    fault_s = 12.0  # how long the fault lasts (some scenarios end it by themselves)
    what = ""

    def __init__(self, demo: ScenarioDemo) -> None:
        self.demo = demo
        self.details: dict[str, Any] = {}
        self.problems: list[str] = []

    def prepare(self, topo: rt.Topology) -> None:
        """Change the topology before it starts (e.g. route a link through a relay)."""

    def inject(self) -> None:
        """Cause the fault."""
        raise NotImplementedError

    def during(self) -> bool:
        """Called every tick of the fault period; return True to end the fault early."""
        return False

    def heal(self) -> None:
        """End the fault."""
        raise NotImplementedError

    def recovered(self) -> bool:
        """Scenario-specific part of "service is back" (the generic part is in ScenarioDemo)."""
        return True

    def check(self) -> None:
        """After the final accounting: append to ``problems`` what this scenario requires."""

    def close(self) -> None:
        """Release what ``prepare`` made (relays)."""

    @property
    def monitor(self) -> Monitor:
        """The demo's fleet monitor."""
        monitor: Monitor = self.demo.monitor
        return monitor

    @property
    def topo(self) -> rt.Topology:
        """The demo's running topology."""
        assert self.demo.topo is not None
        return self.demo.topo


class BrokerRestart(Scenario):
    """The broker is stopped and started again on its port and persistence: no window may be lost."""

    name = "broker-restart"
    fault_s = 5.0
    what = (
        "stops the MQTT broker (SIGTERM to edgefleet broker run, which stops mosquitto: it writes its "
        "persistence file), keeps it down, then starts it again on the same ports with the same data "
        "directory (persistence, users and ACLs regenerated from the registry)"
    )

    def __init__(self, demo: ScenarioDemo) -> None:
        super().__init__(demo)
        self.child: Child | None = None

    def inject(self) -> None:
        if self.topo.broker_kind != "mosquitto":
            raise SupervisorError("broker-restart needs mosquitto (the amqtt broker keeps no sessions)")
        assert self.demo.sup is not None
        self.child = self.demo.sup.kill(rt.BROKER_CHILD, signal.SIGTERM)
        self.details["broker_exit_code"] = self.child.proc.returncode
        # broker run stops its mosquitto on SIGTERM; had it been killed, mosquitto would hold the ports.
        self.details["mosquitto_left_behind"] = len(rt.reap_broker_leftovers(self.topo.data_dir))

    def heal(self) -> None:
        assert self.demo.sup is not None
        assert self.child is not None
        assert self.demo.broker_plan is not None
        child = self.demo.sup.restart(self.child)
        rt.wait_broker(self.topo, child, self.demo.broker_plan)


class EdgeKill(Scenario):
    """An edge is killed (-9) mid-stream and restarted: what the broker kept for it is still decided."""

    name = "edge-kill"
    fault_s = 10.0
    what = (
        "kill -9 of edge-1's process group while the devices stream, right after its metrics report "
        "arrives (windows it received but had not acknowledged stay with the broker), down for the "
        "fault period, then started again on the same data dir (persistent session: it gets what the "
        "broker kept for it)"
    )

    def __init__(self, demo: ScenarioDemo) -> None:
        super().__init__(demo)
        self.victim = ""
        self.child: Child | None = None
        self._reported = threading.Event()

    def prepare(self, topo: rt.Topology) -> None:
        self.victim = topo.edge_ids[0]

    def _on_metrics(self, message: Any) -> None:
        if message.edge_id == self.victim:
            self._reported.set()

    def inject(self) -> None:
        assert self.demo.sup is not None
        self._reported.clear()
        self.monitor.on_metrics = self._on_metrics
        if not self._reported.wait(timeout=30):
            raise SupervisorError(f"{self.victim} published no metrics for 30 s")
        # Killed at once: windows it decides after this report cannot be counted (no report survives
        # kill -9); they would show up as lost, not be hidden.
        self.child = self.demo.sup.kill(self.victim, signal.SIGKILL)
        self.monitor.on_metrics = None
        self.monitor.mark_restarted(self.victim)
        self.details["edge"] = self.victim
        self.details["exit_code"] = self.child.proc.returncode

    def heal(self) -> None:
        assert self.demo.sup is not None
        assert self.child is not None
        self.demo.sup.restart(self.child)

    def check(self) -> None:
        with self.monitor.lock:
            view = self.monitor.state.edges[self.victim]
            last = view.last_metrics
            self.details["victim_windows_reported_before_kill"] = view.carried[0]
            self.details["victim_windows_after_restart"] = None if last is None else last.windows_total
            self.details["victim_duplicates_after_restart"] = None if last is None else last.duplicates_total


class CloudPartition(Scenario):
    """Every edge's cloud link is cut, the site links stay up: decisions and samples reach the cloud later."""

    name = "cloud-partition"
    fault_s = 15.0
    what = (
        "cuts every edge's cloud link (a relay in front of the broker that only the edges' "
        "cloud_broker connections use: desired state, status, metrics, decisions, uplinked samples, "
        "deploy progress, dead letters) for the fault period; the site link (telemetry, commands, "
        "acks) and the cloud services' own connections stay up"
    )

    def __init__(self, demo: ScenarioDemo) -> None:
        super().__init__(demo)
        self.relay: LinkCutter | None = None
        self._heal_samples = 0
        self._heal_ts = 0.0

    def prepare(self, topo: rt.Topology) -> None:
        port = urlparse(topo.broker_url).port
        assert port is not None
        self.relay = LinkCutter("edge-cloud", port)
        self.relay.start()
        topo.edge_cloud_url = self.relay.url

    def inject(self) -> None:
        assert self.relay is not None
        self.details["samples_in_registry_at_cut"] = self.demo.samples()
        self.relay.cut()

    def heal(self) -> None:
        assert self.relay is not None
        self._heal_samples = self.demo.samples()
        self.details["samples_in_registry_at_heal"] = self._heal_samples
        self.details["connections_refused_while_cut"] = self.relay.refused
        self._heal_ts = time.time()
        self.relay.heal()

    def recovered(self) -> bool:
        with self.monitor.lock:
            views = list(self.monitor.state.edges.values())
        depths = [
            v.last_metrics.uplink_queue_depth
            for v in views
            if v.last_metrics is not None and v.last_metrics.ts > self._heal_ts
        ]
        if "uplink_depth_first_reports_after_heal" not in self.details and len(depths) == len(views):
            self.details["uplink_depth_first_reports_after_heal"] = depths
        # The samples the edges queued during the partition have gone up (the queue is back to its
        # usual few in flight).
        return len(depths) == len(views) and max(depths) <= UPLINK_SETTLED

    def check(self) -> None:
        m = self.monitor
        _, _, _, decisions = m.processed()
        with m.lock:
            received = m.state.decisions
            dropped = sum(
                v.last_metrics.uplink_dropped_total for v in m.state.edges.values() if v.last_metrics
            )
        self.details["decisions_made_by_edges"] = decisions
        self.details["decisions_received_by_cloud_side"] = received
        self.details["uplink_dropped_on_edges"] = dropped
        self.details["samples_in_registry_at_end"] = self.demo.samples()
        if received < decisions:
            self.problems.append(f"{decisions} decisions made, {received} reached the cloud side")
        if self.details["samples_in_registry_at_end"] <= self._heal_samples:
            self.problems.append("no uplinked sample reached the registry after the partition healed")

    def close(self) -> None:
        if self.relay is not None:
            self.relay.close()


class DeviceOffline(Scenario):
    """One device loses its broker: it keeps sampling into its outbox and resends it all on reconnect."""

    name = "device-offline"
    fault_s = 15.0
    what = (
        "cuts one device's broker connection (dev-001 connects through a relay) for the fault period; "
        "the device keeps sampling into its durable outbox and must resend everything on reconnect"
    )

    def __init__(self, demo: ScenarioDemo) -> None:
        super().__init__(demo)
        self.relay: LinkCutter | None = None
        self.device = ""
        self._heal_ts = 0.0

    def prepare(self, topo: rt.Topology) -> None:
        port = urlparse(topo.broker_url).port
        assert port is not None
        self.device = topo.device_ids[1 % len(topo.device_ids)]
        self.relay = LinkCutter(self.device, port)
        self.relay.start()
        topo.device_broker_urls[self.device] = self.relay.url

    def _heartbeat(self) -> Any:
        with self.monitor.lock:
            return self.monitor.state.heartbeats.get(self.device)

    def inject(self) -> None:
        assert self.relay is not None
        beat = self._heartbeat()
        self.details["device"] = self.device
        self.details["next_seq_before"] = None if beat is None else beat.next_seq
        self.relay.cut()

    def heal(self) -> None:
        assert self.relay is not None
        self._heal_ts = time.time()
        self.relay.heal()

    def recovered(self) -> bool:
        beat = self._heartbeat()
        if beat is None or beat.ts <= self._heal_ts:
            return False
        if "outbox_depth_first_heartbeat_after_heal" not in self.details:
            self.details["outbox_depth_first_heartbeat_after_heal"] = beat.outbox_depth
            before = self.details["next_seq_before"]
            if before is not None:
                self.details["windows_made_while_offline_approx"] = beat.next_seq - before
        self.details["outbox_depth_at_recovery"] = beat.outbox_depth
        self.details["dropped_on_device"] = beat.dropped_windows
        return bool(beat.outbox_depth == 0)

    def close(self) -> None:
        if self.relay is not None:
            self.relay.close()


class BadModel(Scenario):
    """A corrupt and an unsigned model are ordered to every edge: each refuses them and keeps serving."""

    name = "bad-model"
    fault_s = 2 * DEPLOY_REPORT_TIMEOUT_S  # ends as soon as every edge has rejected both orders
    what = (
        "publishes to every edge, as retained desired state, (1) a manifest signed by the cloud key "
        "whose artifact is corrupt (bytes flipped, same size: the sha256 check must catch it), then "
        "(2) an unsigned manifest for the good artifact; every edge must reject both, keep serving "
        "its model and report the failure; healed by publishing the production model again"
    )

    def __init__(self, demo: ScenarioDemo) -> None:
        super().__init__(demo)
        self.orders: list[tuple[str, dict[str, int]]] = []  # (kind, edge -> revision)
        self._step = 0
        self._step_ts = 0.0
        self._inject_ts = 0.0
        self._manifests: list[tuple[str, Any]] = []
        self._heal_revisions: dict[str, int] = {}

    def _bad_manifests(self) -> list[tuple[str, Any]]:
        from cloud.registry import crud  # noqa: PLC0415  (SQLAlchemy: loaded when used, as in the runner)
        from cloud.registry.db import session_scope  # noqa: PLC0415  (SQLAlchemy: loaded when used, as in the runner)

        settings = self.demo.settings
        ref, _, _ = _production(settings, self.demo.options.model_name)
        assert ref is not None
        with session_scope(settings.resolved_database_url) as session:
            good = ModelManifest.model_validate(crud.get_model_version(session, ref=ref).manifest)
        # What an edge would download (file:// in the demo; http(s):// works too).
        content = bytearray(fetch_artifact(good.url, good.size_bytes, 60.0))
        for i in range(64, len(content), 97):
            content[i] ^= 0x5A
        bad_dir = (self.topo.data_dir / "scenario").resolve()
        bad_dir.mkdir(parents=True, exist_ok=True)
        corrupt_path = bad_dir / f"{good.version}-corrupt.tflite"
        corrupt_path.write_bytes(bytes(content))
        corrupt = sign(
            good.model_copy(
                update={"version": f"{good.version}-corrupt", "url": corrupt_path.as_uri(), "signature": None}
            ),
            settings,
        )
        unsigned = good.model_copy(
            update={"version": f"{good.version}-unsigned", "signature": None, "key_id": None}
        )
        return [("corrupt_artifact", corrupt), ("unsigned", unsigned)]

    def _publish(self, kind: str, manifest: Any) -> None:
        from cloud.registry import crud  # noqa: PLC0415  (SQLAlchemy: loaded when used, as in the runner)
        from cloud.registry.db import session_scope  # noqa: PLC0415  (SQLAlchemy: loaded when used, as in the runner)

        settings = self.demo.settings
        revisions: dict[str, int] = {}
        messages = []
        with session_scope(settings.resolved_database_url) as session:
            for edge_id in self.topo.edge_ids:
                revision = crud.next_desired_revision(session, edge_id=edge_id)
                desired = signed_order(settings, edge_id=edge_id, revision=revision, model=manifest)
                # Recorded like any desired state (no model version: it is not a registry model), so
                # the next real deployment gets a higher revision.
                crud.record_desired(
                    session,
                    edge_id=edge_id,
                    revision=revision,
                    model_version_id=None,
                    payload=desired.model_dump(mode="json"),
                )
                crud.audit(session, actor="demo-scenario", action="publish_desired", target=kind, detail={})
                revisions[edge_id] = revision
                messages.append(desired)
        link = MqttLink(settings.broker, client_id=f"edgefleet-scenario-{os.getpid()}")
        link.connect()
        try:
            for desired in messages:
                publish_desired(link=link, topics=settings.broker.topics, desired=desired)
        finally:
            link.stop()
        self.orders.append((kind, revisions))
        self.demo.say(f"scenario: {kind} model published to {', '.join(revisions)} (revisions {revisions})")

    def _failures(self, revisions: dict[str, int]) -> dict[str, str]:
        with self.monitor.lock:
            failed = list(self.monitor.state.deploy_failures)
        return {f.edge_id: f.reason or "" for f in failed if revisions.get(f.edge_id) == f.revision}

    def inject(self) -> None:
        self._inject_ts = time.monotonic()
        self._manifests = self._bad_manifests()
        self._publish(*self._manifests[0])
        self._step = 1
        self._step_ts = time.monotonic()

    def during(self) -> bool:
        kind, revisions = self.orders[-1]
        failures = self._failures(revisions)
        if len(failures) < len(revisions):
            if time.monotonic() - self._step_ts > DEPLOY_REPORT_TIMEOUT_S:
                self.problems.append(
                    f"{kind}: no failure reported by {sorted(set(revisions) - set(failures))}"
                )
                return True
            return False
        self.details[kind] = {"rejected_by": failures}
        if self._step < len(self._manifests):
            self._publish(*self._manifests[self._step])
            self._step += 1
            self._step_ts = time.monotonic()
            return False
        # Both rejected: the bad (unsigned) order stays the retained desired state for a while, and
        # the edges must keep deciding windows with their model meanwhile.
        return time.monotonic() - self._inject_ts >= BAD_MODEL_HOLD_S

    def heal(self) -> None:
        ref, _, _ = _production(self.demo.settings, self.demo.options.model_name)
        assert ref is not None
        sent = publish_desired_state(
            settings=self.demo.settings, edge_ids=self.topo.edge_ids, model_ref=ref, actor="demo-scenario"
        )
        self._heal_revisions = {d.edge_id: d.revision for d in sent}
        self.details["healed_with"] = ref

    def recovered(self) -> bool:
        with self.monitor.lock:
            reported = {e: (v.deploy_stage, v.model_version) for e, v in self.monitor.state.edges.items()}
        return all(
            stage == "swapped" and version == self.demo.first_version for stage, version in reported.values()
        )

    def check(self) -> None:
        for kind, _ in self.orders:
            if kind not in self.details:
                self.problems.append(f"{kind} model not rejected by every edge")
        bad_versions = {manifest.version for _, manifest in self._manifests}
        swapped_bad = [
            (e, v)
            for _, e, stage, v in self.monitor.state.deploy_events
            if stage == "swapped" and v in bad_versions
        ]
        if swapped_bad:
            self.problems.append(f"a bad model was swapped in: {swapped_bad}")


class MalformedFlood(Scenario):
    """Malformed telemetry floods the edges: every payload is a counted dead letter, nothing stops."""

    name = "malformed-flood"
    fault_s = 60.0  # ends once the flood is published
    what = (
        f"publishes {FLOOD_COUNT} malformed payloads (QoS1, over {FLOOD_S:g} s) on the devices' "
        "telemetry topics: random bytes, JSON, windows whose device id differs from the topic's, "
        "windows of the wrong shape; every one must be counted as a dead letter while real windows "
        "keep being decided"
    )

    def __init__(self, demo: ScenarioDemo) -> None:
        super().__init__(demo)
        self._dead_before = 0
        self._thread: threading.Thread | None = None
        self.by_kind: dict[str, int] = {}

    def _payloads(self) -> list[tuple[str, str, bytes]]:
        rng = random.Random(7)
        topics = self.monitor.topics
        out = []
        for i in range(FLOOD_COUNT):
            device = self.topo.device_ids[i % len(self.topo.device_ids)]
            kind = ("random_bytes", "json", "device_id_mismatch", "wrong_shape")[i % 4]
            if kind == "random_bytes":
                payload = rng.randbytes(rng.randint(1, 600))
            elif kind == "json":
                payload = json.dumps({"device_id": device, "seq": i, "values": "garbage"}).encode()
            else:
                samples = 100 if kind == "device_id_mismatch" else 7
                payload = encode_window(
                    device_id="intruder-1" if kind == "device_id_mismatch" else device,
                    seq=10**12 + i,
                    ts=time.time(),
                    sample_rate_hz=100.0,
                    channels=["x", "y", "z"],
                    values=np.zeros((samples, 3), dtype=np.float32),
                )
            self.by_kind[kind] = self.by_kind.get(kind, 0) + 1
            out.append((kind, topics.telemetry(device), payload))
        return out

    def inject(self) -> None:
        _, _, self._dead_before, _ = self.monitor.processed()
        payloads = self._payloads()

        def flood() -> None:
            started = time.monotonic()
            # Paced over FLOOD_S, so that real windows are decided in the middle of it.
            per_step = max(1, len(payloads) // int(FLOOD_S / 0.1))
            for i in range(0, len(payloads), per_step):
                for _, topic, payload in payloads[i : i + per_step]:
                    self.monitor.link.publish(topic, payload, qos=1)
                time.sleep(0.1)
            self.details["publish_s"] = round(time.monotonic() - started, 2)

        self._thread = threading.Thread(target=flood, name="flood", daemon=True)
        self._thread.start()
        self.details["published"] = FLOOD_COUNT
        self.details["by_kind"] = self.by_kind

    def during(self) -> bool:
        return self._thread is not None and not self._thread.is_alive()

    def heal(self) -> None:
        """Nothing to undo: the flood is over."""

    def recovered(self) -> bool:
        _, _, dead, _ = self.monitor.processed()
        self.details["dead_letters_counted"] = dead - self._dead_before
        return dead - self._dead_before >= FLOOD_COUNT

    def check(self) -> None:
        counted = self.details.get("dead_letters_counted")
        if counted != FLOOD_COUNT:
            self.problems.append(f"{FLOOD_COUNT} malformed payloads sent, {counted} dead letters counted")


SCENARIOS: dict[str, Callable[[ScenarioDemo], Scenario]] = {
    cls.name: cls
    for cls in (BrokerRestart, EdgeKill, CloudPartition, DeviceOffline, BadModel, MalformedFlood)
}
assert tuple(SCENARIOS) == SCENARIO_NAMES


# -- the run -----------------------------------------------------------------------------------------


class ScenarioDemo(Demo):
    """The demo's start-up and accounting around one scenario instead of drift."""

    def __init__(self, options: rt.DemoOptions, *, headless: bool, as_json: bool) -> None:
        if options.scenario not in SCENARIOS:
            raise click.BadParameter(f"unknown scenario {options.scenario!r}")
        options.drift = 0.0
        # Devices as processes: device-offline routes one of them through its own relay.
        options.devices_in_one_process = False
        super().__init__(options, headless=headless, as_json=as_json)
        self.scenario = SCENARIOS[options.scenario](self)
        self.timeline: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.recovered_s: float | None = None
        self.recovery_steps: dict[str, float] = {}  # seconds after the heal each part came back

    def samples(self) -> int:
        """How many uplinked samples the registry holds."""
        from cloud.registry import crud  # noqa: PLC0415  (SQLAlchemy: loaded when used, as in the runner)
        from cloud.registry.db import session_scope  # noqa: PLC0415  (SQLAlchemy: loaded when used, as in the runner)

        with session_scope(self.settings.resolved_database_url) as session:
            return int(crud.count_samples(session))

    def _prepare_topology(self, topo: rt.Topology) -> None:
        self.scenario.prepare(topo)

    def _start_cloud(self, topo: rt.Topology) -> None:
        ref, _, edges = _production(self.settings, self.options.model_name)
        if ref is not None and sorted(edges) == sorted(topo.edge_ids):
            rt.start_cloud(topo, ("cloud-ingest",))  # no retraining in a scenario
        else:
            rt.start_cloud(topo, ("cloud-worker", "cloud-ingest"))  # to train the first model

    def _shutdown(self) -> None:
        try:
            super()._shutdown()
        finally:
            self.scenario.close()

    def _wait(self, seconds: float, until: Callable[[], bool] | None = None) -> bool:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if until is not None and until():
                return True
            self._tick_fast()
        return until() if until is not None else True

    def _tick_fast(self) -> None:
        """A 0.25 s tick without the registry query: recovery times are measured to this resolution."""
        assert self.sup is not None
        rt.check_alive(self.sup)
        if self.headless and time.monotonic() - self._last_line >= 5.0:
            self._last_line = time.monotonic()
            self.say(self._line())
        elif self._live is not None:
            self._live.update(self._render())
        time.sleep(0.25)

    def _stream(self) -> None:
        sc = self.scenario
        self.stream_start = time.monotonic()
        t0 = time.time()
        self.phase = "baseline"
        self._wait(BASELINE_S)
        self.counts["processed_at_fault"] = self.monitor.processed()[0]
        self.phase = f"fault: {sc.name}"
        self.timeline["fault"] = time.time()
        sc.inject()
        self.say(f"scenario {sc.name}: {sc.what}")
        self._wait(sc.fault_s, sc.during)
        self.timeline["heal"] = heal_ts = time.time()
        self.counts["processed_at_heal"] = self.monitor.processed()[0]
        self.phase = f"healing: {sc.name}"
        sc.heal()
        self.say(
            f"scenario {sc.name}: healed after {heal_ts - self.timeline['fault']:.1f} s; waiting for recovery"
        )
        self.phase = "recovering"
        if self._wait(RECOVERY_TIMEOUT_S, lambda: self._service_back(heal_ts)):
            self.recovered_s = time.time() - heal_ts
            self.say(f"scenario {sc.name}: service back {self.recovered_s:.1f} s after the heal")
        else:
            self.say(f"scenario {sc.name}: service NOT back {RECOVERY_TIMEOUT_S:.0f} s after the heal")
        # A little more streaming after recovery: the recovered path carries new windows too.
        self.phase = "after recovery"
        self._wait(4.0)
        self.counts["processed_at_end_of_stream"] = self.monitor.processed()[0]
        self.timeline["baseline_start"] = t0

    def _service_back(self, heal_ts: float) -> bool:
        """Every device and edge online, every edge serving the first model and reporting again, and
        windows decided since the heal. Records when each part first held (``recovery_steps``)."""
        m = self.monitor
        with m.lock:
            devices = len(m.state.devices_online)
            edges = list(m.state.edges.values())
        processed: int = m.processed()[0]
        parts = {
            "devices_online": devices >= self.options.devices,
            "edges_online_serving": all(v.online and v.model_version == self.first_version for v in edges),
            "edges_reporting": all(v.last_metrics is not None and v.last_metrics.ts > heal_ts for v in edges),
            "windows_decided": processed >= self.counts["processed_at_heal"] + self.options.devices,
            "scenario_specific": self.scenario.recovered(),
        }
        for name, ok in parts.items():
            if ok and name not in self.recovery_steps:
                self.recovery_steps[name] = round(time.time() - heal_ts, 1)
        return all(parts.values())

    def _summary(  # noqa: PLR0917 - the final counts
        self, tally: rt.DeviceTally, missing: list[str], windows: int, dups: int, dead: int, decisions: int
    ) -> dict[str, Any]:
        summary = super()._summary(tally, missing, windows, dups, dead, decisions)
        sc = self.scenario
        try:
            sc.check()
        except Exception as exc:  # noqa: BLE001 - a failing check is a problem to report
            sc.problems.append(f"check failed: {exc!r}")
        problems = list(sc.problems)
        if self.recovered_s is None:
            problems.append(f"service not back within {RECOVERY_TIMEOUT_S:.0f} s of the heal")
        if summary["windows"]["lost"] != 0:
            problems.append(
                f"{summary['windows']['lost']} windows lost (sent, neither processed nor counted)"
            )
        if missing:
            problems.append(f"no outbox for {missing}")
        t = self.timeline
        c = self.counts
        summary.pop("duration_s", None)
        summary.pop("drift", None)
        summary.pop("accuracy", None)
        summary.pop("seconds_to_recover", None)
        summary.pop("recovered_with", None)
        summary["scenario"] = {
            "name": sc.name,
            "what": sc.what,
            "baseline_s": round(t.get("fault", 0.0) - t.get("baseline_start", 0.0), 1),
            "fault_s": round(t.get("heal", 0.0) - t.get("fault", 0.0), 1),
            "seconds_to_recover": None if self.recovered_s is None else round(self.recovered_s, 1),
            "recovery_steps_s": self.recovery_steps,
            "processed": {
                "baseline": c.get("processed_at_fault"),
                "during_fault_as_reported": None
                if "processed_at_heal" not in c
                else c["processed_at_heal"] - c["processed_at_fault"],
                "after_heal": None if "processed_at_heal" not in c else windows - c["processed_at_heal"],
            },
            "details": sc.details,
            "problems": problems,
            "ok": not problems,
        }
        return summary


def print_outcome(summary: dict[str, Any]) -> None:
    """Print a scenario run's summary for a person: what was done, recovery time, window counts, outcome."""
    s, w = summary["scenario"], summary["windows"]
    click.echo(f"scenario {s['name']}: {s['what']}")
    click.echo(
        f"baseline {s['baseline_s']} s, fault {s['fault_s']} s, service back "
        f"{s['seconds_to_recover']} s after the heal"
    )
    click.echo(
        f"windows sent {w['sent']}, processed {w['processed']}, lost {w['lost']}, duplicated "
        f"{w['duplicated']}, pending on devices {w['pending_on_devices']}, dropped (counted) "
        f"{w['dropped_counted_on_devices']}, dead letters {w['dead_letters']}; "
        f"decisions {summary['decisions']}"
    )
    click.echo(f"details: {json.dumps(s['details'])}")
    click.echo("outcome: ok" if s["ok"] else f"outcome: FAILED: {'; '.join(s['problems'])}")


__all__ = ["SCENARIOS", "LinkCutter", "ScenarioDemo", "print_outcome"]
