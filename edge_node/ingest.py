"""Where a telemetry message is decoded: codec, shape check, dedup by (device, seq), dead letters.

Nothing here raises for bad input: every rejected payload becomes a ``DeadLetter`` (published on
the edge's ``dead`` topic, rate limited, and always counted by reason).
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np

from shared.codec import WindowDecoder, WindowView
from shared.errors import CodecError, TopicError
from shared.mqtt import Received
from shared.schemas import DeadLetter, encode_message
from shared.topics import DeviceTopic, Topics

logger = logging.getLogger(__name__)

DEAD_LETTER_PAYLOAD_MAX: Final = 4096
# A seq this far below a device's newest means the device restarted its count (wiped state): accept.
SEQ_RESET_GAP: Final = 1_000_000
DEAD_LETTERS_PUBLISHED_PER_S: Final = 50  # beyond this only counted (a flood must not flood the cloud)
_TOPIC_CACHE_MAX: Final = 100_000


@dataclass(slots=True)
class WindowItem:
    """A decoded, validated, first-seen window on its way to inference."""

    window: WindowView
    values: np.ndarray
    payload: bytes
    received_at: float = field(default_factory=time.monotonic)
    message: Received | None = None  # to PUBACK it once decided (manual acks)


class Deduplicator:
    """Remembers the last ``window`` seqs of each device (at most ``max_devices`` devices, LRU).

    A seq seen before is a duplicate; a seq older than the device's window is ``stale`` (it cannot be
    told apart from a duplicate any more): both are dropped and counted. A seq more than
    ``SEQ_RESET_GAP`` below the newest means the device started counting again: its state is reset.
    """

    def __init__(self, window: int, max_devices: int) -> None:
        self.window = window
        self.max_devices = max_devices
        self._devices: OrderedDict[str, tuple[set[int], deque[int], list[int]]] = OrderedDict()
        self._lock = threading.Lock()
        self.resets = 0

    def check(self, device_id: str, seq: int) -> str | None:
        """``None`` for a new window (now remembered), else ``"duplicate"`` or ``"stale"``."""
        with self._lock:
            state = self._devices.get(device_id)
            if state is None:
                state = (set(), deque(), [seq])
                self._devices[device_id] = state
                if len(self._devices) > self.max_devices:
                    self._devices.popitem(last=False)
            else:
                self._devices.move_to_end(device_id)
            seen, order, highest = state
            if seq in seen:
                return "duplicate"
            if seq < highest[0] - SEQ_RESET_GAP:  # the device lost its state and counts from 0 again
                self.resets += 1
                seen.clear()
                order.clear()
                highest[0] = seq
            elif seq <= highest[0] - self.window:
                return "stale"
            seen.add(seq)
            order.append(seq)
            highest[0] = max(highest[0], seq)
            while len(order) > self.window:
                seen.discard(order.popleft())
            return None


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
        expected_input: Callable[[], tuple[list[int], list[str] | None] | None],
    ) -> None:
        self.topics = topics
        self.dedup = dedup
        self.dead = dead_letters
        self._expected_input = expected_input
        self.duplicates = 0
        self.stale = 0
        self.accepted = 0
        self.decoder = WindowDecoder()
        self._topic_devices: dict[str, str] = {}

    def _device_of(self, topic: str) -> str:
        """The device a telemetry topic names (parsed once per topic); ``TopicError`` otherwise."""
        device = self._topic_devices.get(topic)
        if device is None:
            parsed = self.topics.parse(topic)
            if parsed.kind is not DeviceTopic.TELEMETRY or parsed.device_id is None:
                raise TopicError(f"{topic!r} is not a telemetry topic")
            device = parsed.device_id
            if len(self._topic_devices) >= _TOPIC_CACHE_MAX:
                self._topic_devices.clear()
            self._topic_devices[topic] = device
        return device

    def handle(self, msg: Received) -> WindowItem | None:
        """A telemetry message as a first-seen window to classify, or ``None`` (dead-lettered or dropped)."""
        try:
            topic_device = self._device_of(msg.topic)
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
        expected = self._expected_input()
        if expected is not None:
            shape, channels = expected
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
        verdict = self.dedup.check(window.device_id, window.seq)
        if verdict is not None:
            if verdict == "duplicate":
                self.duplicates += 1
            else:
                self.stale += 1
            return None
        self.accepted += 1
        return WindowItem(window, values, msg.payload, msg.received_at, msg)
