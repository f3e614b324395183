"""The devices of the edge's site as the edge sees them, relayed to the cloud.

The edge listens (plain, not shared, subscriptions: retained statuses are not delivered to shared
ones) to every device's retained ``status`` (birth / LWT / shutdown) and ``health`` (heartbeat) on
the site broker, and notes when each device's telemetry was last classified. Changes of state or
reported config go to the cloud as a ``DeviceReport`` on the edge's ``devices`` topic (QoS1) within
``FLUSH_S``; every device the edge knows goes out (``full``) on each connection to the cloud broker
and every ``FULL_REPORT_S``, which refreshes ``last_seen`` and repairs anything lost. A device silent
for ``ttl_s`` is dropped from the table (the cloud keeps its last report of it).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any, Final

from shared.errors import SchemaError
from shared.schemas import DeviceReport, DeviceSeen, DeviceStatus, Heartbeat, decode_message, encode_message
from shared.topics import DeviceTopic, Topics

logger = logging.getLogger(__name__)

FLUSH_S: Final = 0.5  # changes are batched this long before a report goes out
FULL_REPORT_S: Final = 30.0
DEVICE_TTL_S: Final = 3600.0  # default: a device silent this long (no status, heartbeat, window) is dropped
REPORT_CHUNK: Final = 500  # devices per DeviceReport (well under the 1 MiB payload limit)
LAST_SEEN_RESOLUTION_S: Final = 1.0  # a device's last_seen moves in steps of at least this
# Fields whose change is worth a report at once (last_seen alone waits for the next full report).
_CHANGE_FIELDS: Final = ("state", "reason", "config", "config_revision", "config_error", "fault")


class DeviceTracker:
    """Thread-safe table of ``DeviceSeen`` by device id; ``report_loop`` publishes it.

    Bounded: at most ``max_devices`` (beyond, new devices are not tracked: ``refused`` counts their
    messages), and a device silent for ``ttl_s`` is dropped by ``expire`` (``evicted_idle``), which
    the report loop calls every ``FLUSH_S``; it pops from the least recently heard end, no scan.
    """

    def __init__(
        self,
        edge_id: str,
        topics: Topics,
        publish: Callable[[bytes], None],
        connects: Callable[[], int],
        *,
        max_devices: int = 100_000,
        ttl_s: float = DEVICE_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.edge_id = edge_id
        self.topics = topics
        self._publish = publish
        self._connects = connects
        self.max_devices = max_devices
        self.ttl_s = ttl_s
        self._clock = clock  # monotonic; tests pass a fake one
        self._devices: dict[str, DeviceSeen] = {}
        # device id -> time.monotonic() it was last heard, least recently heard first
        self._touched: OrderedDict[str, float] = OrderedDict()
        self._changed: set[str] = set()
        self._lock = threading.Lock()
        self.reports_sent = 0
        self.rejected = 0
        self.refused = 0
        self.evicted_idle = 0

    # -- input (worker threads) ----------------------------------------------------------------------
    def handles(self, topic: str) -> DeviceTopic | None:
        """``STATUS`` or ``HEALTH`` when ``topic`` is a device's status or health topic, else None."""
        if topic.endswith(("/status", "/health")):
            try:
                parsed = self.topics.parse(topic)
            except ValueError:
                return None
            if parsed.tier == "dev" and parsed.kind in (DeviceTopic.STATUS, DeviceTopic.HEALTH):
                return DeviceTopic(parsed.kind)
        return None

    def on_message(self, topic: str, payload: bytes) -> None:
        """Note a device's status or heartbeat from the site broker."""
        kind = self.handles(topic)
        if kind is None or not payload:  # an empty payload clears a retained status: nothing to note
            return
        device_id = self.topics.parse(topic).entity_id
        try:
            message: DeviceStatus | Heartbeat = (
                decode_message(payload, DeviceStatus)
                if kind is DeviceTopic.STATUS
                else decode_message(payload, Heartbeat)
            )
        except SchemaError as exc:
            self.rejected += 1
            logger.warning("device message on %s ignored: %s", topic, exc)
            return
        if message.device_id != device_id:
            self.rejected += 1
            logger.warning("%s of %r on %r's topic ignored", message.type, message.device_id, device_id)
        elif isinstance(message, DeviceStatus):
            self._on_status(message)
        else:
            self._on_heartbeat(message)

    def _touch(self, device_id: str, now: float) -> None:
        """Note ``device_id`` as heard at ``now`` (monotonic); lock held."""
        self._touched[device_id] = now
        self._touched.move_to_end(device_id)

    def _update(self, device_id: str, **fields: Any) -> None:
        with self._lock:
            old = self._devices.get(device_id)
            if old is None:
                if len(self._devices) >= self.max_devices:
                    self.refused += 1
                    return
                new = DeviceSeen(device_id=device_id, **fields)
            else:
                new = old.model_copy(update=fields)
            self._devices[device_id] = new
            self._touch(device_id, self._clock())
            if old is None or any(getattr(old, f) != getattr(new, f) for f in _CHANGE_FIELDS):
                self._changed.add(device_id)

    def _on_status(self, status: DeviceStatus) -> None:
        now = time.time()
        fields: dict[str, Any] = {
            "state": status.state,
            "reason": status.reason,
            "since": now,
            "last_seen": now,
        }
        if status.state.value == "online":  # a birth carries what the device runs
            fields.update(
                agent_version=status.agent_version,
                sensor=status.sensor,
                rate_hz=status.rate_hz,
                window=status.window,
                hop=status.hop,
                config=status.config,
                config_revision=status.config_revision,
                config_error=status.config_error,
            )
        self._update(status.device_id, **fields)

    def _on_heartbeat(self, beat: Heartbeat) -> None:
        self._update(
            beat.device_id,
            last_seen=time.time(),
            fault=beat.fault,
            outbox_depth=beat.outbox_depth,
            dropped_windows=beat.dropped_windows,
        )

    def saw(self, device_ids: Iterable[str], ts: float) -> None:
        """Telemetry of these devices was classified at ``ts`` (once per batch, on the decision thread)."""
        with self._lock:
            devices = self._devices
            now = self._clock()
            for device_id in set(device_ids):
                seen = devices.get(device_id)
                if seen is None:
                    if len(devices) >= self.max_devices:
                        self.refused += 1
                        continue
                    devices[device_id] = DeviceSeen(device_id=device_id, last_seen=ts)
                    self._changed.add(device_id)
                elif seen.last_seen is None or seen.last_seen + LAST_SEEN_RESOLUTION_S <= ts:
                    # "Last seen" to the second: a model copy per window would cost the hot path ~5 %.
                    devices[device_id] = seen.model_copy(update={"last_seen": ts})
                self._touch(device_id, now)

    def expire(self, now: float | None = None) -> int:
        """Drop the devices silent for ``ttl_s``; returns how many."""
        now = self._clock() if now is None else now
        cutoff = now - self.ttl_s
        dropped = 0
        with self._lock:
            touched = self._touched
            while touched:
                device_id, heard = next(iter(touched.items()))
                if heard >= cutoff:
                    break
                del touched[device_id]
                del self._devices[device_id]
                self._changed.discard(device_id)
                dropped += 1
            self.evicted_idle += dropped
        if dropped:
            logger.info("%d devices silent for %.0f s dropped from the device table", dropped, self.ttl_s)
        return dropped

    # -- output --------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._devices)

    def snapshot(self) -> list[DeviceSeen]:
        """Every device known, sorted by id."""
        with self._lock:
            return [self._devices[d] for d in sorted(self._devices)]

    def _send(self, devices: list[DeviceSeen], *, full: bool) -> None:
        for start in range(0, len(devices), REPORT_CHUNK):
            chunk = devices[start : start + REPORT_CHUNK]
            self._publish(encode_message(DeviceReport(edge_id=self.edge_id, full=full, devices=chunk)))
            self.reports_sent += 1

    def report(self, *, full: bool) -> int:
        """Publish the changed devices (or all of them); returns how many devices went out."""
        with self._lock:
            names = sorted(self._devices) if full else sorted(self._changed)
            devices = [self._devices[d] for d in names]
            self._changed.clear()
        if devices or full:
            try:
                self._send(devices, full=full)
            except Exception:
                with self._lock:  # not sent: they go in the next report (unless dropped since)
                    self._changed.update(d.device_id for d in devices if d.device_id in self._devices)
                raise
        return len(devices)

    def report_loop(self, stop: threading.Event, connected: Callable[[], bool]) -> None:
        """Until ``stop``: a full report on each new cloud connection and every ``FULL_REPORT_S``,
        changes every ``FLUSH_S``."""
        connects = -1
        next_full = 0.0
        while not stop.wait(FLUSH_S):
            try:
                self.expire()
                if not connected():
                    continue
                now = time.monotonic()
                if self._connects() != connects or now >= next_full:
                    connects = self._connects()
                    next_full = now + FULL_REPORT_S
                    self.report(full=True)
                else:
                    self.report(full=False)
            except Exception:  # reports must never take the node down
                logger.exception("device report failed")
