"""Where a telemetry message is decoded: codec, shape check (or, when the active model's manifest
has ``preprocessing``, conversion to its input: ``edge_node.preprocessing``), dedup by
(device, seq), dead letters.

Nothing here raises for bad input: every rejected payload becomes a ``DeadLetter`` (published on
the edge's ``dead`` topic, rate limited, and always counted by reason).
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np

from edge_node.preprocessing import InputSpec, WindowRejectedError, prepare_window
from shared.codec import DESCRIPTOR_CACHE_MAX_BYTES, WindowDecoder, WindowView
from shared.errors import CodecError, TopicError
from shared.mqtt import Received
from shared.schemas import DeadLetter, ModelManifest, encode_message
from shared.topics import DeviceTopic, Topics

logger = logging.getLogger(__name__)

DEAD_LETTER_PAYLOAD_MAX: Final = 4096
# A seq this far below a device's newest means the device restarted its count (wiped state): accept.
SEQ_RESET_GAP: Final = 1_000_000
DEAD_LETTERS_PUBLISHED_PER_S: Final = 50  # beyond this only counted (a flood must not flood the cloud)
_TOPIC_CACHE_MAX: Final = 100_000
DEVICE_TTL_S: Final = 3600.0  # default: a device silent this long is forgotten (EdgeSettings.device_ttl_s)
SWEEP_S: Final = 1.0  # at most this often, devices silent for the TTL are swept out


@dataclass(slots=True)
class WindowItem:
    """A decoded, validated, first-seen window on its way to inference."""

    window: WindowView
    values: np.ndarray
    payload: bytes
    received_at: float = field(default_factory=time.monotonic)
    message: Received | None = None  # to PUBACK it once decided (manual acks)


class _SeqWindow:
    """One device's dedup state: its newest seq and a bitmask of the seqs seen below it."""

    __slots__ = ("highest", "mask", "touched")

    def __init__(self, seq: int, now: float) -> None:
        self.highest = seq
        self.mask = 1  # bit i: seq ``highest - i`` was seen
        self.touched = now


class Deduplicator:
    """Remembers which of the last ``window`` seqs of each device were seen.

    A seq seen before is a duplicate; a seq ``window`` or more below the device's newest is
    ``stale`` (it cannot be told apart from a duplicate any more): both are dropped and counted. A
    seq more than ``SEQ_RESET_GAP`` below the newest means the device started counting again: its
    state is reset. Per device: one int of ``window`` bits (~310 bytes a device for 1,024), no set.

    Bounded in count too: at most ``max_devices`` devices (the least recently heard go first,
    counted in ``evicted_full``), and a device silent for ``ttl_s`` is forgotten (``evicted_idle``;
    swept at most every ``SWEEP_S`` from the least recently heard end, so never a scan per message).
    """

    def __init__(self, window: int, max_devices: int, *, ttl_s: float = DEVICE_TTL_S) -> None:
        self.window = window
        self.max_devices = max_devices
        self.ttl_s = ttl_s
        self._full = (1 << window) - 1
        # Least recently heard first: the TTL sweep and the LRU cap both pop from the front.
        self._devices: OrderedDict[str, _SeqWindow] = OrderedDict()
        self._lock = threading.Lock()
        self._next_sweep = float("-inf")
        self.resets = 0
        self.evicted_idle = 0
        self.evicted_full = 0

    def __len__(self) -> int:
        return len(self._devices)

    def check(self, device_id: str, seq: int, now: float | None = None) -> str | None:
        """``None`` for a new window (now remembered), else ``"duplicate"`` or ``"stale"``.

        ``now`` is a ``time.monotonic()`` reading (the message's receive time saves a clock call).
        """
        if now is None:
            now = time.monotonic()
        with self._lock:
            if now >= self._next_sweep:
                self._sweep(now)
            devices = self._devices
            state = devices.get(device_id)
            if state is None:
                devices[device_id] = _SeqWindow(seq, now)
                if len(devices) > self.max_devices:
                    devices.popitem(last=False)
                    self.evicted_full += 1
                return None
            back = state.highest - seq
            if back < 0:  # the newest yet: slide the window up
                state.mask = ((state.mask << -back) | 1) & self._full if -back < self.window else 1
                state.highest = seq
            elif back < self.window:
                bit = 1 << back
                if state.mask & bit:
                    return "duplicate"
                state.mask |= bit
            elif back > SEQ_RESET_GAP:  # the device lost its state and counts from 0 again
                self.resets += 1
                state.highest = seq
                state.mask = 1
            else:
                return "stale"
            # Only a new window counts as hearing from the device: a duplicate is the broker's redelivery.
            devices.move_to_end(device_id)
            state.touched = now
            return None

    def _sweep(self, now: float) -> None:
        """Forget the devices silent for ``ttl_s`` (the front of the LRU order); lock held."""
        self._next_sweep = now + SWEEP_S
        cutoff = now - self.ttl_s
        devices = self._devices
        # ``touched`` comes from several threads' receive times, so the order is only nearly sorted:
        # an entry stuck behind a slightly fresher one just waits for a later sweep.
        while devices and next(iter(devices.values())).touched < cutoff:
            devices.popitem(last=False)
            self.evicted_idle += 1


class DeadLetters:
    """Counts rejected payloads by reason and publishes them (rate limited) as ``DeadLetter``."""

    def __init__(self, edge_id: str, publish: Callable[[bytes], None]) -> None:
        self.edge_id = edge_id
        self._publish = publish
        self.by_reason: Counter[str] = Counter()
        self.total = 0
        self.suppressed = 0
        self._lock = threading.Lock()
        self._second = 0
        self._in_second = 0

    def reject(self, topic: str, payload: bytes, kind: str, reason: str) -> None:
        """Count a rejected payload under ``kind`` and publish it as a dead letter (rate limited)."""
        with self._lock:
            self.total += 1
            self.by_reason[kind] += 1
            second = int(time.monotonic())
            if second != self._second:
                self._second, self._in_second = second, 0
            self._in_second += 1
            publish = self._in_second <= DEAD_LETTERS_PUBLISHED_PER_S
            if not publish:
                self.suppressed += 1
        logger.debug("dead letter from %s: %s", topic, reason)
        if not publish:
            return
        letter = DeadLetter(
            edge_id=self.edge_id,
            topic=topic[:1024],
            reason=f"{kind}: {reason}"[:2048],
            payload_b64=base64.b64encode(payload[:DEAD_LETTER_PAYLOAD_MAX]).decode(),
            payload_size=len(payload),
        )
        try:
            self._publish(encode_message(letter))
        except Exception:  # a dead letter that cannot go out is still counted
            logger.exception("could not publish a dead letter")


class Ingest:
    """Turns a received telemetry message into a ``WindowItem`` or a dead letter."""

    def __init__(
        self,
        topics: Topics,
        dedup: Deduplicator,
        dead_letters: DeadLetters,
        expected_input: Callable[[], ModelManifest | None],
        *,
        decoder_cache_bytes: int = DESCRIPTOR_CACHE_MAX_BYTES,
    ) -> None:
        self.topics = topics
        self.dedup = dedup
        self.dead = dead_letters
        self._expected_input = expected_input
        # The input spec of the last manifest seen (rebuilt when the active model changes).
        self._spec: tuple[ModelManifest, InputSpec] | None = None
        self.duplicates = 0
        self.stale = 0
        self.accepted = 0
        # Bounded in bytes whatever devices send (labels are not part of its key): shared/codec.py.
        self.decoder = WindowDecoder(decoder_cache_bytes)
        # topic -> device id, in two generations: a topic not used since the last rotation (every
        # half TTL, or when the newer one is full) is dropped at the next, so silent devices go.
        self._topic_devices: dict[str, str] = {}
        self._topic_devices_old: dict[str, str] = {}
        self._topics_rotate_at = float("-inf")  # set on the first miss, from receive times

    def _device_of(self, topic: str, now: float) -> str:
        """The device a telemetry topic names (parsed once per topic); ``TopicError`` otherwise.

        Lock-free (worker threads): a race at worst parses a topic twice or drops a generation early.
        """
        device = self._topic_devices.get(topic)
        if device is None:
            if now >= self._topics_rotate_at or len(self._topic_devices) >= _TOPIC_CACHE_MAX // 2:
                self._topics_rotate_at = now + self.dedup.ttl_s / 2
                self._topic_devices_old, self._topic_devices = self._topic_devices, {}
            device = self._topic_devices_old.get(topic)
            if device is None:
                parsed = self.topics.parse(topic)
                if parsed.kind is not DeviceTopic.TELEMETRY or parsed.device_id is None:
                    raise TopicError(f"{topic!r} is not a telemetry topic")
                device = parsed.device_id
            self._topic_devices[topic] = device
        return device

    def handle(self, msg: Received) -> WindowItem | None:
        """A telemetry message as a first-seen window to classify, or ``None`` (dead-lettered or dropped)."""
        try:
            topic_device = self._device_of(msg.topic, msg.received_at)
        except TopicError as exc:
            self.dead.reject(msg.topic, msg.payload, "topic", str(exc))
            return None
        try:
            window = self.decoder.decode(msg.payload)
        except CodecError as exc:
            self.dead.reject(msg.topic, msg.payload, "codec", str(exc))
            return None
        if window.device_id != topic_device:
            self.dead.reject(
                msg.topic,
                msg.payload,
                "device_id",
                f"payload says {window.device_id!r}, topic says {topic_device!r}",
            )
            return None
        values: Any = window.values
        manifest = self._expected_input()
        if manifest is not None and manifest.preprocessing is not None:
            try:
                values = prepare_window(values, window.channels, self._spec_of(manifest))
            except WindowRejectedError as exc:
                self.dead.reject(msg.topic, msg.payload, exc.kind, str(exc))
                return None
        elif manifest is not None:
            shape, channels = manifest.input_shape, manifest.channels
            if list(values.shape) != shape:
                self.dead.reject(
                    msg.topic,
                    msg.payload,
                    "shape",
                    f"window of {values.shape[0]} samples x {values.shape[1]} channels does not match "
                    f"the model input {shape}",
                )
                return None
            if channels is not None and list(window.channels) != channels:
                self.dead.reject(
                    msg.topic,
                    msg.payload,
                    "channels",
                    f"channels {list(window.channels)} do not match the model's {channels}",
                )
                return None
        verdict = self.dedup.check(window.device_id, window.seq, msg.received_at)
        if verdict is not None:
            if verdict == "duplicate":
                self.duplicates += 1
            else:
                self.stale += 1
            return None
        self.accepted += 1
        return WindowItem(window, values, msg.payload, msg.received_at, msg)

    def _spec_of(self, manifest: ModelManifest) -> InputSpec:
        cached = self._spec  # read once: worker threads share it (a race only rebuilds it)
        if cached is not None and cached[0] is manifest:
            return cached[1]
        spec = InputSpec.of(manifest)
        self._spec = (manifest, spec)
        return spec
