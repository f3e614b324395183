"""A fleet of simulated devices on real MQTT connections, many per process: ``python -m edge_node.loadgen``.

Each simulated device is one TCP connection with its own client id (``lg-<device id>``), spoken to
with a small MQTT 3.1.1 client on asyncio streams (no paho: a paho client costs a thread and a few
MB per connection, 10,000 of them do not fit one process):

- CONNECT with ``clean session = true``: the run is bounded and never reconnects a device, so a
  persistent session would carry nothing across; it would only leave 10,000 sessions (and commands
  queued for them) in the broker after the run;
- SUBSCRIBE (QoS 1) to its own command topic; every command is PUBACKed and answered with a
  ``CommandAck`` on the device's ack topic, as the device agent does (an edge whose commands are
  never acknowledged keeps each one pending until it expires);
- PUBLISH QoS 1 of one sensor window (``shared.codec``, 100 samples x 3 channels) every ``period``
  seconds, ``ts`` stamped at send time, PUBACKs tracked by packet id; PINGREQ when idle for half
  the keepalive; TCP_NODELAY.

A ``Command`` does not name the window it answers: a command is attributed to the device's latest
window sent before the command's ``issued_at`` (same machine, same clock). A device sends one window
per period, so this is unambiguous. Per window: ``acked`` (PUBACK came), ``decided`` (a command came
back), ``duplicated`` (more than one command for it). Latency: publish -> first command received.

``run_devices`` runs a slice of a fleet in one event loop: it connects every device with bounded
concurrency, then spreads each device's first window over the period by its index in the whole
fleet, so that the fleet's rate is smooth. As a worker process (``edgefleet bench fleet`` starts
several), it prints one JSON line once its devices are connected, waits for a ``go <epoch start>``
line on stdin, and prints one JSON line of results at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import socket
import struct
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final

import click
import numpy as np

from edge_node import synthetic
from shared.codec import encode_window, with_ts
from shared.errors import SchemaError
from shared.mqtt_packets import (
    CONNACK,
    DISCONNECT,
    PINGREQ,
    PINGRESP,
    PUBACK,
    PUBLISH,
    QOS1,
    SUBACK,
    SUBSCRIBE,
    connect_packet,
    packet,
    utf8,
)
from shared.schemas import AckStatus, Command, CommandAck, decode_message, encode_message
from shared.topics import Topics

logger = logging.getLogger(__name__)

SUBACK_FAILURE: Final = 0x80
MAX_PACKET_ID: Final = 65535

KEEPALIVE_S: Final = 30
CONNECT_TIMEOUT_S: Final = 30.0
CONNECT_ATTEMPTS: Final = 5
CONNECT_CONCURRENCY: Final = 200  # connects in flight per process
DRAIN_POLL_S: Final = 0.1
START_DELAY_S: Final = 0.5  # in-process runs: between "all connected" and the first window
CLIENT_ID_PREFIX: Final = "lg-"
DEVICE_PREFIX: Final = "dev"
PAYLOAD_POOL: Final = 64  # distinct synthetic windows, shifted per device and seq
LAG_PROBE_S: Final = 0.1
CLOCK_SLACK_S: Final = 0.001  # a command issued "before" its window by less than this still matches


class MqttProtocolError(Exception):
    """The broker sent something this client does not expect (a refused CONNECT, a bad packet)."""


def device_ids(count: int, prefix: str = DEVICE_PREFIX) -> list[str]:
    """The ids of a fleet of ``count`` devices: ``dev-00000`` ..."""
    width = max(5, len(str(count - 1)))
    return [f"{prefix}-{i:0{width}d}" for i in range(count)]


# -- packets ------------------------------------------------------------------------------------
def publish_packet(topic: str, payload: bytes, packet_id: int) -> bytes:
    """PUBLISH at QoS 1 (not retained)."""
    return packet(PUBLISH | QOS1 << 1, utf8(topic) + struct.pack("!H", packet_id) + payload)


def subscribe_packet(packet_id: int, topic_filter: str, qos: int = QOS1) -> bytes:
    """SUBSCRIBE to one filter."""
    return packet(SUBSCRIBE, struct.pack("!H", packet_id) + utf8(topic_filter) + bytes([qos]))


def puback_packet(packet_id: int) -> bytes:
    """PUBACK of a received QoS 1 PUBLISH."""
    return packet(PUBACK, struct.pack("!H", packet_id))


async def read_packet(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One packet: (first byte, the rest after the remaining length)."""
    first = (await reader.readexactly(1))[0]
    length, shift = 0, 0
    while True:
        byte = (await reader.readexactly(1))[0]
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
        shift += 7
        if shift > 21:
            raise MqttProtocolError("remaining length longer than 4 bytes")
    body = await reader.readexactly(length) if length else b""
    return first, body


def parse_publish(first: int, body: bytes) -> tuple[str, int | None, bytes]:
    """(topic, packet id or None at QoS 0, payload) of a PUBLISH."""
    (topic_len,) = struct.unpack_from("!H", body)
    topic = body[2 : 2 + topic_len].decode()
    pos = 2 + topic_len
    packet_id = None
    if (first >> 1) & 0x03:
        (packet_id,) = struct.unpack_from("!H", body, pos)
        pos += 2
    return topic, packet_id, body[pos:]


# -- one device ---------------------------------------------------------------------------------
@dataclass(slots=True)
class WindowRecord:
    """One window a device sent, and what came back for it."""

    seq: int
    sent_wall: float
    sent_mono: float
    acked: bool = False
    commands: int = 0


@dataclass
class FleetStats:
    """What the devices of one process saw (merged across processes by ``merge_results``)."""

    devices: int = 0
    connected: int = 0
    connect_failures: int = 0
    disconnects: int = 0
    sent: int = 0
    acked: int = 0
    decided: int = 0
    duplicated: int = 0
    unmatched_commands: int = 0
    bad_commands: int = 0
    pings: int = 0
    latencies_ms: list[float] = field(default_factory=list)

    @property
    def outstanding(self) -> int:
        """Windows still waiting for their PUBACK or their command."""
        return (self.sent - self.acked) + (self.sent - self.decided)


class SimDevice:
    """One device on its own MQTT connection: sends windows, receives and acknowledges commands."""

    def __init__(
        self,
        device_id: str,
        topics: Topics,
        stats: FleetStats,
        pool: list[np.ndarray],
        *,
        keepalive_s: int = KEEPALIVE_S,
    ) -> None:
        self.device_id = device_id
        self.client_id = CLIENT_ID_PREFIX + device_id
        self.telemetry_topic = topics.telemetry(device_id)
        self.command_topic = topics.command(device_id)
        self.ack_topic = topics.ack(device_id)
        self.stats = stats
        self.pool = pool
        self.keepalive_s = keepalive_s
        self.windows: list[WindowRecord] = []
        self.inflight: dict[int, WindowRecord | None] = {}  # packet id -> window (None: a command ack)
        self.command_ids: set[str] = set()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.last_sent = 0.0
        self.closing = False
        self._packet_id = 0
        self._suback: asyncio.Future[int] | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._shift = np.float32(sum(device_id.encode()) * 1e-4)

    def _next_packet_id(self) -> int:
        self._packet_id = self._packet_id % MAX_PACKET_ID + 1
        return self._packet_id

    def _write(self, data: bytes) -> None:
        if self.writer is not None and not self.writer.is_closing():
            self.writer.write(data)
            self.last_sent = time.monotonic()

    async def connect(self, host: str, port: int) -> None:
        """Open the connection, CONNECT, SUBSCRIBE to the command topic; start reading."""
        self.closing = False
        reader, writer = await asyncio.open_connection(host, port)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader, self.writer = reader, writer
        try:
            self._write(connect_packet(self.client_id, keepalive_s=self.keepalive_s, clean=True))
            self._check_connack(*await read_packet(reader))
            self._suback = asyncio.get_running_loop().create_future()
            self._write(subscribe_packet(self._next_packet_id(), self.command_topic))
            self._reader_task = asyncio.create_task(self._read_loop())
            self._check_suback(await self._suback)
        except BaseException:
            await self.close(graceful=False)
            raise

    def _check_connack(self, first: int, body: bytes) -> None:
        if first != CONNACK or len(body) != 2 or body[1] != 0:
            raise MqttProtocolError(f"{self.client_id}: CONNECT refused ({first:#x} {body.hex()})")

    def _check_suback(self, granted: int) -> None:
        if granted >= SUBACK_FAILURE:
            raise MqttProtocolError(f"{self.client_id}: SUBSCRIBE to {self.command_topic} refused")

    def _dispatch(self, first: int, body: bytes) -> None:
        kind = first & 0xF0
        if kind == PUBLISH:
            self._on_publish(first, body)
        elif kind == PUBACK:
            self._on_puback(struct.unpack("!H", body)[0])
        elif kind == SUBACK:
            if self._suback is not None and not self._suback.done():
                self._suback.set_result(body[2])
        elif kind != PINGRESP:
            raise MqttProtocolError(f"{self.client_id}: unexpected packet {first:#x}")

    async def _read_loop(self) -> None:
        assert self.reader is not None
        try:
            while True:
                self._dispatch(*await read_packet(self.reader))
        except (asyncio.IncompleteReadError, ConnectionError, MqttProtocolError) as exc:
            if not self.closing:
                self.stats.disconnects += 1
                logger.warning("%s: connection lost: %r", self.client_id, exc)
            if self._suback is not None and not self._suback.done():
                self._suback.set_exception(MqttProtocolError(f"{self.client_id}: closed before SUBACK"))

    def _on_puback(self, packet_id: int) -> None:
        record = self.inflight.pop(packet_id, None)
        if record is not None and not record.acked:
            record.acked = True
            self.stats.acked += 1

    def _on_publish(self, first: int, body: bytes) -> None:
        received = time.monotonic()
        topic, packet_id, payload = parse_publish(first, body)
        if packet_id is not None:
            self._write(puback_packet(packet_id))
        if topic != self.command_topic:
            return
        try:
            command = decode_message(payload, Command)
        except SchemaError:
            self.stats.bad_commands += 1
            return
        if command.command_id in self.command_ids:  # a redelivery of a command already counted
            self.stats.duplicated += 1
        else:
            self.command_ids.add(command.command_id)
            self._attribute(command, received)
        ack = CommandAck(
            command_id=command.command_id, device_id=self.device_id, status=AckStatus.OK, ok=True
        )
        pid = self._next_packet_id()
        self.inflight[pid] = None
        self._write(publish_packet(self.ack_topic, encode_message(ack), pid))

    def _attribute(self, command: Command, received: float) -> None:
        """Count the command against the latest window sent before the edge issued it."""
        for record in reversed(self.windows):
            if record.sent_wall <= command.issued_at + CLOCK_SLACK_S:
                record.commands += 1
                if record.commands == 1:
                    self.stats.decided += 1
                    self.stats.latencies_ms.append(round((received - record.sent_mono) * 1000.0, 3))
                else:
                    self.stats.duplicated += 1
                return
        self.stats.unmatched_commands += 1

    def encode(self, seq: int) -> bytes:
        """Window ``seq`` of this device (its ``ts`` is stamped when it is sent)."""
        values = self.pool[seq % len(self.pool)] + self._shift + np.float32(seq * 1e-3)
        return encode_window(
            device_id=self.device_id,
            seq=seq,
            ts=0.0,
            sample_rate_hz=synthetic.SAMPLE_RATE_HZ,
            channels=synthetic.CHANNELS,
            values=values,
        )

    def send(self, seq: int, payload: bytes) -> None:
        """Publish one window (QoS 1) stamped now."""
        wall, mono = time.time(), time.monotonic()
        record = WindowRecord(seq, wall, mono)
        pid = self._next_packet_id()
        self.inflight[pid] = record
        self.windows.append(record)
        self.stats.sent += 1
        self._write(publish_packet(self.telemetry_topic, with_ts(payload, wall), pid))

    async def run(self, first_at: float, period: float, end_at: float) -> None:
        """Send one window every ``period`` seconds from ``first_at`` until ``end_at`` (monotonic)."""
        seq = 0
        payload = self.encode(seq)
        due = first_at
        while due < end_at and not self.closing:
            ping_at = self.last_sent + self.keepalive_s / 2
            wake = min(due, ping_at)
            delay = wake - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if wake < due:  # idle for half the keepalive: the broker must hear from us
                self._write(packet(PINGREQ, b""))
                self.stats.pings += 1
                continue
            self.send(seq, payload)
            seq += 1
            due += period
            payload = self.encode(seq)  # ahead of time: off the next send's path

    async def close(self, *, graceful: bool = True) -> None:
        """DISCONNECT (when ``graceful``) and close the connection (a no-op when not connected)."""
        self.closing = True
        if self.writer is not None and not self.writer.is_closing():
            if graceful:
                self._write(packet(DISCONNECT, b""))
            with contextlib.suppress(OSError, RuntimeError):
                self.writer.close()
                await self.writer.wait_closed()
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task


def payload_pool(seed: int = 0) -> list[np.ndarray]:
    """Synthetic windows of every class (each device shifts them, so no two windows are equal)."""
    rng = np.random.default_rng(seed)
    return [synthetic.synthetic_window(i % len(synthetic.CLASS_NAMES), rng) for i in range(PAYLOAD_POOL)]


async def _connect_one(device: SimDevice, host: str, port: int, gate: asyncio.Semaphore) -> bool:
    for attempt in range(CONNECT_ATTEMPTS):
        async with gate:
            try:
                await asyncio.wait_for(device.connect(host, port), CONNECT_TIMEOUT_S)
                return True
            except (OSError, TimeoutError, asyncio.IncompleteReadError, MqttProtocolError) as exc:
                device.stats.connect_failures += 1
                logger.warning("%s: connect attempt %d failed: %r", device.client_id, attempt + 1, exc)
        await asyncio.sleep(0.2 * 2**attempt)
    return False


class GcPauses:
    """A ``gc.callbacks`` hook keeping the longest garbage collection (seconds)."""

    def __init__(self) -> None:
        self.longest = 0.0
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:  # noqa: ARG002  (gc's signature)
        """Called by the collector at the start and the stop of each collection."""
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.longest = max(self.longest, time.perf_counter() - self._started)


async def _loop_lag(lags: list[float]) -> None:
    """How late this event loop wakes a task up (ms), every ``LAG_PROBE_S``: the loadgen's own delay."""
    while True:
        before = time.monotonic()
        await asyncio.sleep(LAG_PROBE_S)
        lags.append(round((time.monotonic() - before - LAG_PROBE_S) * 1000.0, 3))


async def run_devices(
    ids: list[str],
    indexes: list[int],
    fleet_size: int,
    *,
    host: str,
    port: int,
    period: float,
    seconds: float,
    drain_s: float,
    connect_concurrency: int = CONNECT_CONCURRENCY,
    topics: Topics | None = None,
    on_connected: Callable[[dict[str, Any]], None] | None = None,
    wait_start: Callable[[], Awaitable[float]] | None = None,
    freeze_gc: bool = False,
) -> dict[str, Any]:
    """Run devices ``ids`` (at positions ``indexes`` of a fleet of ``fleet_size``) and return results.

    Connects them all (``connect_concurrency`` in flight), calls ``on_connected``, waits for
    ``wait_start()`` (the epoch time of the fleet's start; default: now + ``START_DELAY_S``), sends
    a window per device every ``period`` seconds for ``seconds`` (device ``i`` first at
    ``start + period * i / fleet_size``), then waits up to ``drain_s`` for what is outstanding.
    ``freeze_gc`` (a loadgen process of its own): ``gc.freeze()`` once connected, so that the
    collector never scans the thousands of long-lived connections again (pauses show as latency).
    """
    topics = topics or Topics()
    stats = FleetStats(devices=len(ids))
    pool = payload_pool()
    devices = [SimDevice(device_id, topics, stats, pool) for device_id in ids]
    gate = asyncio.Semaphore(connect_concurrency)
    started = time.monotonic()
    ok = await asyncio.gather(*(_connect_one(d, host, port, gate) for d in devices))
    connect_s = time.monotonic() - started
    stats.connected = sum(ok)
    live = [(d, i) for d, i, up in zip(devices, indexes, ok, strict=True) if up]
    if on_connected is not None:
        on_connected({"connected": stats.connected, "connect_s": round(connect_s, 3)})
    if freeze_gc:
        gc.freeze()
    pauses = GcPauses()
    gc.callbacks.append(pauses)
    lags: list[float] = []
    monitor: asyncio.Task[None] | None = None
    try:
        start_wall = await wait_start() if wait_start is not None else time.time() + START_DELAY_S
        start = time.monotonic() + (start_wall - time.time())
        end = start + seconds
        monitor = asyncio.create_task(_loop_lag(lags))
        await asyncio.gather(*(d.run(start + period * i / fleet_size, period, end) for d, i in live))
        deadline = time.monotonic() + drain_s
        while stats.outstanding and time.monotonic() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)
        drained_s = time.monotonic() - end
    finally:
        if monitor is not None:
            monitor.cancel()
        gc.callbacks.remove(pauses)
        await asyncio.gather(*(d.close() for d in devices))
    # Lost: no PUBACK, or no decision (command) came back for it.
    lost = sum(1 for d, _ in live for w in d.windows if not (w.acked and w.commands))
    return {
        "devices": stats.devices,
        "connected": stats.connected,
        "connect_failures": stats.connect_failures,
        "connect_s": round(connect_s, 3),
        "disconnects": stats.disconnects,
        "sent": stats.sent,
        "acked": stats.acked,
        "decided": stats.decided,
        "lost": lost,
        "duplicated": stats.duplicated,
        "unmatched_commands": stats.unmatched_commands,
        "bad_commands": stats.bad_commands,
        "pings": stats.pings,
        "drain_s": round(drained_s, 3),
        "latencies_ms": stats.latencies_ms,
        "loop_lags_ms": lags,
        "gc_max_ms": round(pauses.longest * 1000.0, 3),
    }


def merge_results(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum the counters of several ``run_devices`` results; concatenate their latencies."""
    merged: dict[str, Any] = {"latencies_ms": [], "loop_lags_ms": []}
    for result in results:
        for key, value in result.items():
            if key in ("latencies_ms", "loop_lags_ms"):
                merged[key].extend(value)
            elif key in ("connect_s", "drain_s", "gc_max_ms"):
                merged[key] = max(merged.get(key, 0.0), value)
            else:
                merged[key] = merged.get(key, 0) + value
    return merged


def latency_summary(latencies_ms: list[float]) -> dict[str, float | None]:
    """p50, p90, p99 and max of the latencies (``None`` each when there are none)."""
    if not latencies_ms:
        return {"p50": None, "p90": None, "p99": None, "max": None}
    arr = np.asarray(latencies_ms, dtype=np.float64)
    p50, p90, p99 = (round(float(v), 3) for v in np.percentile(arr, [50, 90, 99]))
    return {"p50": p50, "p90": p90, "p99": p99, "max": round(float(arr.max()), 3)}


async def _worker(
    *,
    host: str,
    port: int,
    fleet_size: int,
    worker: int,
    workers: int,
    period: float,
    seconds: float,
    drain: float,
) -> dict[str, Any]:
    indexes = list(range(worker, fleet_size, workers))  # interleaved: every worker spans the period
    all_ids = device_ids(fleet_size)
    loop = asyncio.get_running_loop()

    def announce(info: dict[str, Any]) -> None:
        print(json.dumps({"event": "connected", **info}), flush=True)

    async def wait_go() -> float:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        word, _, value = line.strip().partition(" ")
        if word != "go":
            raise click.ClickException(f"expected 'go <epoch>' on stdin, got {line!r}")
        return float(value)

    return await run_devices(
        [all_ids[i] for i in indexes],
        indexes,
        fleet_size,
        host=host,
        port=port,
        period=period,
        seconds=seconds,
        drain_s=drain,
        on_connected=announce,
        wait_start=wait_go,
        freeze_gc=True,
    )


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, required=True)
@click.option("--devices", "fleet_size", type=int, required=True, help="devices in the whole fleet")
@click.option("--worker", type=int, default=0, show_default=True, help="this worker's number")
@click.option("--workers", type=int, default=1, show_default=True, help="worker processes in all")
@click.option("--period", type=float, default=10.0, show_default=True, help="seconds between windows")
@click.option("--seconds", type=float, default=60.0, show_default=True, help="how long devices send")
@click.option("--drain", type=float, default=15.0, show_default=True, help="wait for what is outstanding")
def main(
    *,
    host: str,
    port: int,
    fleet_size: int,
    worker: int,
    workers: int,
    period: float,
    seconds: float,
    drain: float,
) -> None:
    """One loadgen worker: devices ``worker``, ``worker + workers``, ... of the fleet; JSON lines out."""
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    result = asyncio.run(
        _worker(
            host=host,
            port=port,
            fleet_size=fleet_size,
            worker=worker,
            workers=workers,
            period=period,
            seconds=seconds,
            drain=drain,
        )
    )
    click.echo(json.dumps({"event": "result", **result}))


if __name__ == "__main__":
    main()
