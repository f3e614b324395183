"""Commands sent to devices by rules, and the matching of their acks."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from pydantic import JsonValue

from shared.errors import SchemaError
from shared.schemas import AckStatus, Command, CommandAck, CommandName, decode_message, encode_message
from shared.topics import Topics

logger = logging.getLogger(__name__)

MAX_PENDING: Final = 20_000  # ~1.6 KB each: <= ~32 MB; beyond, the oldest count as unacknowledged
RECORDS_KEPT: Final = 1_000
ACK_GRACE_S: Final = 5.0  # after a command's expiry, before it counts as never acknowledged


@dataclass(slots=True)
class CommandRecord:
    """A command sent by a rule, and its ack once it came."""

    command: Command
    rule: str
    sent_at: float
    ack: CommandAck | None = None
    acked_at: float | None = None

    @property
    def ack_latency_s(self) -> float | None:
        """Seconds from sending the command to its ack, once acked."""
        return None if self.acked_at is None else self.acked_at - self.sent_at


class CommandTracker:
    """Publishes commands and records each ack against its command (thread-safe)."""

    def __init__(self, topics: Topics, sender: str, publish: Callable[[str, bytes], None]) -> None:
        self.topics = topics
        self.sender = sender
        self._publish = publish
        self._pending: OrderedDict[str, CommandRecord] = OrderedDict()
        self.records: deque[CommandRecord] = deque(maxlen=RECORDS_KEPT)
        self.acks: Counter[str] = Counter()
        self.sent = 0
        self.unmatched_acks = 0
        self.bad_acks = 0
        self.unacknowledged = 0
        self._lock = threading.Lock()

    def send(
        self, device_id: str, name: CommandName, args: dict[str, JsonValue], ttl_s: float, rule: str
    ) -> Command:
        """Publish a new command to a device and track it until acked or expired."""
        command = Command.create(device_id=device_id, name=name, args=args, ttl_s=ttl_s, sender=self.sender)
        record = CommandRecord(command, rule, time.monotonic())
        with self._lock:
            self._pending[command.command_id] = record
            while len(self._pending) > MAX_PENDING:
                self._pending.popitem(last=False)
                self.unacknowledged += 1
            self.sent += 1
        self._publish(self.topics.command(device_id), encode_message(command))
        return command

    def on_ack(self, payload: bytes) -> CommandRecord | None:
        """Match a device's ack to its command; ``None`` for a malformed or unknown ack (counted)."""
        try:
            ack = decode_message(payload, CommandAck)
        except SchemaError as exc:
            self.bad_acks += 1
            logger.warning("malformed command ack: %s", exc)
            return None
        with self._lock:
            record = self._pending.pop(ack.command_id, None)
            if record is None:
                self.unmatched_acks += 1  # another sender's command, or one we already matched
                return None
            record.ack = ack
            record.acked_at = time.monotonic()
            self.acks[ack.status.value] += 1
            self.records.append(record)
        if ack.status is not AckStatus.OK:
            logger.warning(
                "command %s to %s: %s %s", ack.command_id, ack.device_id, ack.status.value, ack.error
            )
        return record

    def expire(self, now_wall: float | None = None) -> int:
        """Forget commands whose expiry (plus a grace) passed without an ack; return how many."""
        now_wall = time.time() if now_wall is None else now_wall
        expired: list[CommandRecord] = []
        with self._lock:
            for command_id, record in list(self._pending.items()):
                if record.command.expires_at + ACK_GRACE_S < now_wall:
                    expired.append(self._pending.pop(command_id))
            self.unacknowledged += len(expired)
            self.records.extend(expired)
        return len(expired)

    @property
    def pending(self) -> int:
        """Commands sent and neither acked nor expired yet."""
        return len(self._pending)
