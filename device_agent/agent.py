"""The device agent: sensor -> windows -> durable outbox -> MQTT (QoS1), commands, heartbeat.

Threads (each owns its state; they meet only under ``_lock`` for sensor/config changes):

- **pump**: samples on a monotonic clock, cuts windows, commits them to the outbox, publishes in
  sequence order with at most ``max_in_flight`` unacknowledged, removes PUBACKed windows,
  publishes the heartbeat. It sleeps on its completion queue until the next window is due: the
  link puts each acknowledged window's ``PublishHandle`` there (``publish(..., on_done=...)``), the
  command thread and ``stop`` put ``WAKE``, and either wakes it at once.
- **commands**: ``CommandProcessor`` on the link's inbox.
- paho's network thread (inside ``MqttLink``) only hands messages to those queues.

Delivery: each window is committed before it is published and deleted only on PUBACK. paho
resends unacknowledged QoS1 messages itself after a reconnect (persistent session, stable client
id); after a restart every window still in the outbox is published again, in ``seq`` order.
"""

from __future__ import annotations

import array
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Mapping
from typing import Any, Final

from pydantic import JsonValue, ValidationError

from device_agent.actuators import Actuator, create_actuator
from device_agent.commands import CommandProcessor
from device_agent.enrollment import resolve as resolve_enrollment
from device_agent.errors import AgentError, CommandError, SensorError
from device_agent.health import CpuMeter, rss_bytes
from device_agent.outbox import Outbox
from device_agent.sampling import SampleClock, Windower
from device_agent.sensors import Sensor, create_sensor
from device_agent.sensors.base import Row
from device_agent.state import DataDirLock, db_path
from shared import __version__
from shared.codec import encode_window
from shared.errors import CodecError, EdgefleetError, SchemaError
from shared.mqtt import MqttLink, Publication, PublishHandle, Received
from shared.redact import redact_url
from shared.schemas import (
    DeviceDesired,
    DeviceStatus,
    Heartbeat,
    OnlineState,
    SetConfigArgs,
    bound_errors,
    decode_message,
    encode_message,
)
from shared.settings import AgentSettings
from shared.settings.agent import RUNTIME_SETTINGS

logger = logging.getLogger(__name__)

WAKE: Final = None  # put on the completion queue to wake the pump
FLUSH_TIMEOUT_S: Final = 3.0  # on shutdown, wait this long for in-flight windows to be acked
CATCHUP_MAX_S: Final = 60.0  # after a longer stall, samples older than this are skipped (counted)
EXPIRE_INTERVAL_S: Final = 30.0
SELF_PACED_TICK_S: Final = 0.2
SELF_PACED_MAX_READ: Final = 10_000
SENSOR_RETRY_S: Final = 1.0
UNROUTED_RETRY_S: Final = 1.0  # after "no matching subscribers": wait this long, then send again
DROP_FELL_BEHIND: Final = "fell_behind"
DROP_ENCODE: Final = "encode_error"
DROP_STORAGE: Final = "storage_error"

# Settings a ``set_config`` command or a desired config may change while running; the rest need a restart.
RUNTIME_FIELDS: Final = RUNTIME_SETTINGS
# Reported in the birth (``DeviceStatus.config``): what a desired config may set, as the agent runs it.
REPORTED_FIELDS: Final = RUNTIME_FIELDS - {"sensor"}


class Agent:
    """One device. ``start()`` runs it in background threads; ``run()`` blocks until ``stop()``."""

    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        self.device_id = settings.device_id
        self.topics = settings.broker.topics
        self.telemetry_topic = self.topics.telemetry(self.device_id)
        self.db_path = db_path(settings.data_dir, self.device_id)
        self._dir_lock = DataDirLock(self.db_path.with_suffix(".lock"))
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._started_at = time.monotonic()
        self.error: BaseException | None = None

        self.sensor: Sensor | None = None
        self.outbox: Outbox | None = None
        self.link: MqttLink | None = None
        self.commands: CommandProcessor | None = None
        self.actuator: Actuator = create_actuator(settings.actuator)
        self.clock = SampleClock(settings.rate_hz)
        self.windower = Windower(settings.window, settings.effective_hop)

        self._in_flight: dict[PublishHandle, int] = {}  # -> seq
        # Acknowledged window publishes (from the link) and WAKE (from other threads), for the pump.
        self._completions: queue.SimpleQueue[PublishHandle | None] = queue.SimpleQueue()
        self._sent_upto = -1  # highest seq handed to paho in this process
        self._acked_seqs: list[int] = []
        self._retry_seqs: set[int] = set()  # accepted by the broker, routed to nobody: send again
        self._retry_at = 0.0
        self.unrouted_windows = 0
        self._bounds_changed = False
        self.published_windows = 0
        self.acked_windows = 0
        self.sensor_errors = 0
        self._cpu = CpuMeter()
        self._rate_mark = (time.monotonic(), 0)
        self._next_heartbeat = 0.0
        self._next_expire = 0.0
        # The last desired config (``DeviceDesired``) handled since start, and why it was refused.
        self.config_revision: int | None = None
        self.config_error: str | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        """Open state, sensor and broker link; start the threads. Errors leave nothing running."""
        self._dir_lock.acquire()
        try:
            # Broker credentials from the enrollment bundle, claimed first on a first start with a token.
            self.settings = s = resolve_enrollment(self.settings, stop=self._stop)
            self.outbox = Outbox(self.db_path, max_windows=s.outbox_max_windows, max_age_s=s.outbox_max_age_s)
            self.sensor = create_sensor(s.sensor.kind, s.sensor.options, rate_hz=s.rate_hz)
            status = self.topics.device_status(self.device_id)
            will = DeviceStatus(device_id=self.device_id, state=OnlineState.OFFLINE, reason="lwt")
            self.link = MqttLink(
                s.broker,
                client_id=s.client_id or f"ef-dev-{self.device_id}",
                clean_session=False,
                will=Publication(status, encode_message(will), qos=1, retain=True),
                birth=self._birth(),
                mqtt5=s.hold_unrouted,
                # Commands and desired configs waiting for the command thread, at most: beyond it
                # they are dropped and counted (ping's commands.inbox_full), never held in memory.
                inbox_max=s.command_inbox_max,
            )
            self.commands = CommandProcessor(
                device_id=self.device_id,
                topics=self.topics,
                link=self.link,
                control=self,
                actuator=self.actuator,
                db_path=self.db_path,
                ttl_cap_s=s.command_ttl_cap_s,
                desired_topic=self.topics.device_desired(self.device_id),
                on_desired=self.apply_desired,
            )
            self.link.subscribe(self.topics.command(self.device_id), qos=1)
            # Retained: delivered on every (re)subscription, so a device that was offline converges.
            self.link.subscribe(self.topics.device_desired(self.device_id), qos=1)
            self.link.start()
        except BaseException:
            if self.link is not None:
                self.link.stop()
            self._release()
            raise
        self._started_at = time.monotonic()
        self.clock = SampleClock(s.rate_hz)
        self._check_rows(s)
        self._threads = [
            threading.Thread(target=self._pump, name="agent-pump", daemon=True),
            threading.Thread(
                target=self.commands.run,
                args=(self.link.inbox, self._stop),
                name="agent-commands",
                daemon=True,
            ),
        ]
        for thread in self._threads:
            thread.start()
        logger.info(
            "agent %s: sensor %s at %g Hz, window %d hop %d, broker %s, state %s",
            self.device_id,
            s.sensor.kind,
            s.rate_hz,
            s.window,
            s.effective_hop,
            redact_url(s.broker.url),
            self.db_path,
        )

    def run(self) -> None:
        """Start, block until ``stop()`` (or a fatal error), then shut down cleanly."""
        self.start()
        try:
            self._stop.wait()
        finally:
            self.shutdown()
        if self.error is not None:
            raise AgentError(f"agent stopped on an error: {self.error}") from self.error

    def stop(self) -> None:
        """Ask the agent to stop (safe from signal handlers and other threads)."""
        self._stop.set()
        self._completions.put(WAKE)
        if self.link is not None:
            self.link.inbox.put(Received("", b"", 0, False))

    def shutdown(self) -> None:
        """Stop threads, flush, publish the retained offline status, close everything."""
        self.stop()
        for thread in self._threads:
            thread.join()
        self._threads = []
        if self.link is not None:
            offline = DeviceStatus(device_id=self.device_id, state=OnlineState.OFFLINE, reason="shutdown")
            self.link.stop(
                final=Publication(
                    self.topics.device_status(self.device_id), encode_message(offline), qos=1, retain=True
                )
            )
        self._release()
        logger.info("agent %s stopped", self.device_id)

    def _release(self) -> None:
        if self.sensor is not None:
            self.sensor.close()
            self.sensor = None
        if self.outbox is not None:  # normally closed by the pump thread on its way out
            self.outbox.close()
            self.outbox = None
        self._dir_lock.release()

    # -- pump thread ----------------------------------------------------------------------------
    def _pump(self) -> None:
        try:
            while not self._stop.is_set():
                self._tick(time.monotonic())
                self._wait()
        except Exception as exc:
            logger.exception("agent pump failed; stopping")
            self.error = exc
            self._stop.set()
        finally:
            try:
                self._flush()
            except Exception:
                logger.exception("agent: flush on shutdown failed")
            if self.outbox is not None:
                self.outbox.close()
                self.outbox = None

    def _tick(self, now: float) -> None:
        assert self.outbox is not None
        acked = self._collect_acks()
        with self._lock:
            windows = self._sample(now)
        if self._bounds_changed:
            self._bounds_changed = False
            self.outbox.enforce_size(self._in_flight.values())
        try:
            self.outbox.commit(acked=acked, windows=windows, in_flight=self._in_flight.values())
        except sqlite3.Error:
            # Disk full or broken storage: these windows cannot be kept. Count them (in memory,
            # since the database is what failed) and keep running.
            logger.exception("outbox commit failed, %d windows lost", len(windows))
            self.outbox.drops[DROP_STORAGE] = self.outbox.drops.get(DROP_STORAGE, 0) + len(windows)
        self._send()
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + self.settings.heartbeat_interval_s
            self._heartbeat()
        if now >= self._next_expire:
            self._next_expire = now + EXPIRE_INTERVAL_S
            self.outbox.expire(self._in_flight.values())
        self.outbox.sync()

    def _wait(self) -> None:
        """Sleep until the next window is due, the heartbeat is due, or an ack / wake arrives."""
        now = time.monotonic()
        with self._lock:
            if self.sensor is not None and self.sensor.self_paced:
                due = now + SELF_PACED_TICK_S
            else:
                due = self.clock.time_of(self.clock.taken + self.windower.needed() - 1)
        deadline = min(due, self._next_heartbeat, self._next_expire)
        timeout = max(0.0, deadline - now)
        try:
            handle = self._completions.get(timeout=timeout)
        except queue.Empty:
            return
        if handle is not WAKE:
            self._on_ack(handle)

    def _collect_acks(self) -> list[int]:
        acked: list[int] = []
        while True:
            try:
                handle = self._completions.get_nowait()
            except queue.Empty:
                break
            if handle is not WAKE:
                self._on_ack(handle)
        acked.extend(self._acked_seqs)
        self._acked_seqs.clear()
        return acked

    def _on_ack(self, handle: PublishHandle) -> None:
        seq = self._in_flight.pop(handle, None)
        if seq is None:
            return
        if handle.not_routed:
            # The broker took it but no subscription matched: nobody has it. It stays in the outbox.
            self._retry_seqs.add(seq)
            self._retry_at = time.monotonic() + UNROUTED_RETRY_S
            self.unrouted_windows += 1
            return
        self._acked_seqs.append(seq)
        self.acked_windows += 1

    def _send(self) -> None:
        assert self.outbox is not None
        assert self.link is not None
        free = self.settings.max_in_flight - len(self._in_flight)
        if self._retry_seqs:
            if time.monotonic() < self._retry_at:
                return  # no subscriber a moment ago: newer windows would not find one either
            for seq in sorted(self._retry_seqs)[: max(0, free)]:
                self._retry_seqs.discard(seq)
                payload = self.outbox.payload(seq)
                if payload is None:
                    continue  # expired or evicted meanwhile (the outbox counted it)
                try:
                    handle = self._publish_window(payload)
                except EdgefleetError as exc:
                    logger.warning("publish of window %d failed, will retry: %s", seq, exc)
                    self._retry_seqs.add(seq)
                    return
                self._in_flight[handle] = seq
                free -= 1
        for seq, payload in self.outbox.pending_after(self._sent_upto, free):
            try:
                handle = self._publish_window(payload)
            except EdgefleetError as exc:
                logger.warning("publish of window %d failed, will retry: %s", seq, exc)
                return
            self._in_flight[handle] = seq
            self._sent_upto = seq
            self.published_windows += 1

    def _publish_window(self, payload: bytes) -> PublishHandle:
        assert self.link is not None
        return self.link.publish(self.telemetry_topic, payload, qos=1, on_done=self._completions.put)

    def _flush(self) -> None:
        """On shutdown: give in-flight windows a moment to be acked so they leave the outbox."""
        if self.outbox is None or self.link is None:
            return
        deadline = time.monotonic() + FLUSH_TIMEOUT_S
        while self._in_flight and self.link.connected and time.monotonic() < deadline:
            try:
                handle = self._completions.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if handle is not WAKE:
                self._on_ack(handle)
        self.outbox.commit(acked=self._collect_acks())
        if self._in_flight:
            logger.info(
                "agent: %d windows unacknowledged at shutdown stay in the outbox", len(self._in_flight)
            )

    # -- sampling (under _lock) -----------------------------------------------------------------
    def _sample(self, now: float) -> list[tuple[int, bytes]]:
        sensor = self.sensor
        assert sensor is not None
        assert self.outbox is not None
        out: list[tuple[int, bytes]] = []
        if sensor.self_paced:
            rows = self._read(sensor, SELF_PACED_MAX_READ)
            for window in self.windower.feed(rows):
                # self-paced: the window's samples just arrived; date its first one back
                first = time.time() - (len(window) - 1) / self.clock.rate_hz
                self._encode(window, sensor.label, first, out)
            return out
        clock = self.clock
        due = clock.due(now)
        limit = max(1, int(CATCHUP_MAX_S * clock.rate_hz))
        if due > limit:
            skipped = due - limit
            lost = max(1, skipped // self.windower.hop)
            logger.warning(
                "agent fell %.1f s behind: skipping %d samples (%d windows)",
                skipped / clock.rate_hz,
                skipped,
                lost,
            )
            clock.skip(skipped)
            self._reset_window()
            self.outbox.count_drop(DROP_FELL_BEHIND, lost)
            due = limit
        while due > 0:
            count = min(due, self.windower.needed())
            rows = self._read(sensor, count)
            if len(rows) != count:  # sensor failed: keep the clock moving, lose the partial window
                clock.skip(count)
                self._reset_window()
                break
            clock.taken += count
            due -= count
            for window in self.windower.feed(rows):
                # ts = wall-clock time of the window's first sample (docs/telemetry-codec.md)
                self._encode(window, sensor.label, clock.epoch_of(clock.taken - len(window)), out)
        return out

    def _reset_window(self) -> None:
        """Drop the partial window (a gap); a row-replaying sensor skips to its next row boundary."""
        self.windower.reset()
        if self.sensor is not None:
            self.sensor.realign()

    def _check_rows(self, s: AgentSettings) -> None:
        """Warn when a row-replaying sensor's rows will not map one-to-one onto windows."""
        row = self.sensor.row_length if self.sensor is not None else None
        if row is not None and (s.window != row or s.effective_hop != s.window):
            logger.warning(
                "sensor %s replays rows of %d samples but window is %d, hop %d: windows will not be "
                "one row each (set window: %d and no hop)",
                s.sensor.kind,
                row,
                s.window,
                s.effective_hop,
                row,
            )

    def _read(self, sensor: Sensor, count: int) -> list[Row]:
        try:
            return sensor.read(count)
        except (SensorError, OSError, ValueError) as exc:
            self.sensor_errors += 1
            if self.sensor_errors <= 10 or self.sensor_errors % 100 == 0:
                logger.warning("sensor %s read failed (%d so far): %s", sensor.name, self.sensor_errors, exc)
            return []

    def _encode(self, window: list[Row], label: str | None, ts: float, out: list[tuple[int, bytes]]) -> None:
        assert self.outbox is not None
        assert self.sensor is not None
        s = self.settings
        seq = self.outbox.next_seq
        flat = array.array("d", [v for row in window for v in row])
        try:
            payload = encode_window(
                device_id=self.device_id,
                seq=seq,
                ts=ts,
                sample_rate_hz=self.clock.rate_hz,
                channels=self.sensor.channels,
                values=flat,
                label=label if s.send_labels else None,
                dtype=s.encoding,
                scale=s.int16_scale,
            )
        except CodecError as exc:
            logger.warning("window not encodable, dropped: %s", exc)
            self.outbox.count_drop(DROP_ENCODE, 1)
            return
        self.outbox.allocate_seq()
        out.append((seq, payload))

    # -- status ---------------------------------------------------------------------------------
    def _birth(self) -> Publication:
        s = self.settings
        birth = DeviceStatus(
            device_id=self.device_id,
            state=OnlineState.ONLINE,
            agent_version=__version__,
            sensor=s.sensor.kind,
            rate_hz=s.rate_hz,
            window=s.window,
            hop=s.effective_hop,
            channels=self.sensor.channels if self.sensor is not None else None,
            config=self._reported_config(s),
            config_revision=self.config_revision,
            config_error=self.config_error,
        )
        return Publication(
            self.topics.device_status(self.device_id), encode_message(birth), qos=1, retain=True
        )

    @staticmethod
    def _reported_config(settings: AgentSettings) -> dict[str, JsonValue]:
        return settings.model_dump(mode="json", include=set(REPORTED_FIELDS))

    def apply_desired(self, payload: bytes) -> None:
        """On the command thread: apply a ``DeviceDesired`` newer than the last one handled since
        start (like a ``set_config`` command), then announce the outcome in the retained birth."""
        if not payload:  # the retained desired config was cleared: nothing to apply
            return
        try:
            desired = decode_message(payload, DeviceDesired)
        except SchemaError as exc:
            logger.warning("desired config ignored: %s", exc)
            return
        if desired.device_id != self.device_id:
            logger.warning("desired config for %r ignored by %r", desired.device_id, self.device_id)
            return
        if self.config_revision is not None and desired.revision <= self.config_revision:
            return
        error = None
        if desired.config:
            try:
                self.set_config(desired.config)
            except CommandError as exc:
                error = str(exc)
                logger.warning("desired config r%d refused: %s", desired.revision, error)
        self.config_revision, self.config_error = desired.revision, error
        logger.info("desired config r%d %s", desired.revision, "refused" if error else "applied")
        self._announce()

    def heartbeat(self) -> Heartbeat:
        """The heartbeat as of now (publish rate measured since the previous one)."""
        assert self.outbox is not None
        s = self.settings
        now = time.monotonic()
        mark_at, mark_count = self._rate_mark
        rate = (self.published_windows - mark_count) / (now - mark_at) if now > mark_at else 0.0
        self._rate_mark = (now, self.published_windows)
        return Heartbeat(
            device_id=self.device_id,
            uptime_s=now - self._started_at,
            sensor=s.sensor.kind,
            rate_hz=s.rate_hz,
            window=s.window,
            hop=s.effective_hop,
            next_seq=self.outbox.next_seq,
            outbox_depth=self.outbox.depth,
            published_windows=self.published_windows,
            acked_windows=self.acked_windows,
            unrouted_windows=self.unrouted_windows,
            dropped_windows=self.outbox.dropped,
            dropped_by_reason=dict(self.outbox.drops),
            publish_rate_hz=max(0.0, rate),
            cpu_core_fraction=self._cpu.sample(),
            rss_mb=rss_bytes() / 1e6,
            fault=self.sensor.fault if self.sensor is not None else None,
            actuators=dict(self.actuator.states),
        )

    def _heartbeat(self) -> None:
        assert self.link is not None
        if self.link.connected:
            self.link.publish(self.topics.health(self.device_id), encode_message(self.heartbeat()), qos=0)

    # -- AgentControl (called from the command thread) -------------------------------------------
    def _wake(self) -> None:
        self._completions.put(WAKE)

    def ping(self) -> dict[str, JsonValue]:
        """Answer a ``ping`` command: uptime, outbox and sensor state."""
        s = self.settings
        outbox = self.outbox
        return {
            "pong": True,
            "uptime_s": round(time.monotonic() - self._started_at, 3),
            "next_seq": outbox.next_seq if outbox else None,
            "outbox_depth": outbox.depth if outbox else None,
            "sensor": s.sensor.kind,
            "rate_hz": s.rate_hz,
            "window": s.window,
            "hop": s.effective_hop,
            "fault": self.sensor.fault if self.sensor else None,
            "sensor_errors": self.sensor_errors,
        }

    def set_config(self, changes: Mapping[str, Any]) -> dict[str, JsonValue]:
        """Apply runtime settings from a command or a desired config; ``CommandError`` if refused."""
        fields = AgentSettings.model_fields
        unknown = sorted(k for k in changes if k not in fields)
        if unknown:
            raise CommandError(f"unknown setting(s) {', '.join(unknown)}")
        fixed = sorted(k for k in changes if k not in RUNTIME_FIELDS)
        if fixed:
            raise CommandError(
                f"setting(s) {', '.join(fixed)} cannot change at runtime (edit the config and restart); "
                f"runtime settings: {', '.join(sorted(RUNTIME_FIELDS))}"
            )
        # Upper bounds first (shared/schemas.py SetConfigArgs): a desired config is not a Command,
        # so nothing has bounded it on the way here.
        beyond = bound_errors(SetConfigArgs, dict(changes), where="config")
        if beyond:
            raise CommandError(f"setting(s) beyond their limits: {'; '.join(beyond)}")
        top = {k: v for k, v in changes.items() if k != "sensor"}
        sensor_changes = self._sensor_changes(changes.get("sensor"))
        with self._lock:
            old = self.settings
            try:
                new = AgentSettings.model_validate({**old.model_dump(), **top})
            except ValidationError as exc:
                problems = "; ".join(
                    f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5]
                )
                raise CommandError(f"invalid setting: {problems}") from exc
            if sensor_changes:
                assert self.sensor is not None
                options = self.sensor.update_options(sensor_changes)
                new = new.model_copy(
                    update={
                        "sensor": new.sensor.model_copy(update={"options": options.model_dump(mode="json")})
                    }
                )
            self._apply(old, new)
        self._wake()
        changed: dict[str, JsonValue] = {k: getattr(new, k) for k in top}
        if sensor_changes:
            changed["sensor"] = {"options": new.sensor.options}
        return {"changed": changed}

    def _sensor_changes(self, value: Any) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict) or set(value) - {"options"}:
            raise CommandError(
                "sensor: only sensor.options can change at runtime, e.g. {'sensor': {'options': ...}}"
            )
        options = value.get("options", {})
        if not isinstance(options, dict):
            raise CommandError("sensor.options must be a mapping")
        return options

    def _apply(self, old: AgentSettings, new: AgentSettings) -> None:
        self.settings = new
        if new.rate_hz != old.rate_hz:
            # Samples at two rates never share a window: start a fresh clock and window.
            self.clock = SampleClock(new.rate_hz)
            self._reset_window()
            if self.sensor is not None:
                self.sensor.set_rate(new.rate_hz)
        if (new.window, new.effective_hop) != (old.window, old.effective_hop):
            self.windower = Windower(new.window, new.effective_hop)
            if self.sensor is not None:
                self.sensor.realign()
            self._check_rows(new)
        if (new.outbox_max_windows, new.outbox_max_age_s) != (old.outbox_max_windows, old.outbox_max_age_s):
            if self.outbox is not None:
                self.outbox.max_windows = new.outbox_max_windows
                self.outbox.max_age_s = new.outbox_max_age_s
            self._bounds_changed = True
            self._next_expire = 0.0
        if new.heartbeat_interval_s != old.heartbeat_interval_s:
            self._next_heartbeat = 0.0
        if new.log_level != old.log_level:
            logging.getLogger().setLevel(new.log_level)
        if self._reported_config(new) != self._reported_config(old):
            self._announce()

    def _announce(self) -> None:
        """Publish the new birth (retained) so everyone sees the new rate / window."""
        if self.link is None:
            return
        birth = self._birth()
        self.link.set_birth(birth)
        if self.link.connected:
            self.link.publish(birth.topic, birth.payload, qos=birth.qos, retain=birth.retain)

    def inject_fault(self, fault: str, severity: float) -> dict[str, JsonValue]:
        """Make the sensor simulate ``fault`` at ``severity`` (simulated sensors only)."""
        with self._lock:
            assert self.sensor is not None
            self.sensor.inject_fault(fault, severity)
        return {"fault": fault, "severity": severity}

    def clear_fault(self) -> dict[str, JsonValue]:
        """Make the sensor normal again."""
        with self._lock:
            assert self.sensor is not None
            self.sensor.clear_fault()
        return {"fault": None}

    def restart_sensor(self) -> dict[str, JsonValue]:
        """Restart the sensor from a fresh state, with a new sample clock and window."""
        with self._lock:
            assert self.sensor is not None
            try:
                self.sensor.restart()
            except (SensorError, OSError) as exc:
                raise CommandError(f"sensor restart failed: {exc}") from exc
            self.windower.reset()
            self.clock = SampleClock(self.settings.rate_hz)
        self._wake()
        return {"restarted": self.settings.sensor.kind}
