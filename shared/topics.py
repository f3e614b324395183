"""Topic builders and parsers: the only place a topic string is assembled.

Layout (prefix default ``ef/v1``)::

    {prefix}/dev/{device}/{telemetry|status|health|cmd|ack|desired}
    {prefix}/edge/{edge}/{status|decision|samples|metrics|desired|deploy|dead|devices}
    {prefix}/cloud/keys        (the cloud's signing key ring, retained: ``KeyRing``)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from shared.errors import TopicError

DEFAULT_PREFIX = "ef/v1"
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$"
_ID_RE = re.compile(ID_PATTERN)
_PREFIX_RE = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")
_SHARE_GROUP_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class DeviceTopic(StrEnum):
    """The last level of a device topic: what the message is."""

    TELEMETRY = "telemetry"
    STATUS = "status"
    HEALTH = "health"
    CMD = "cmd"
    ACK = "ack"
    DESIRED = "desired"


class EdgeTopic(StrEnum):
    """The last level of an edge topic: what the message is."""

    STATUS = "status"
    DECISION = "decision"
    SAMPLES = "samples"
    METRICS = "metrics"
    DESIRED = "desired"
    DEPLOY = "deploy"
    DEAD = "dead"
    DEVICES = "devices"


def validate_id(value: str, *, what: str = "id") -> str:
    """Return ``value`` if it is usable as one topic level, else raise ``TopicError`` naming it."""
    if not isinstance(value, str) or not _ID_RE.match(value):
        raise TopicError(
            f"{what} {value!r} is invalid: use 1-64 characters of letters, digits, '_', '.', ':' or '-', "
            "starting with a letter or digit"
        )
    return value


@dataclass(frozen=True, slots=True)
class ParsedTopic:
    """What a received topic names: the tier (``dev`` or ``edge``), the entity id and the kind."""

    tier: str
    entity_id: str
    kind: DeviceTopic | EdgeTopic

    @property
    def device_id(self) -> str | None:
        """The device id, for a device topic."""
        return self.entity_id if self.tier == "dev" else None

    @property
    def edge_id(self) -> str | None:
        """The edge id, for an edge topic."""
        return self.entity_id if self.tier == "edge" else None


@dataclass(frozen=True, slots=True)
class Topics:
    """Builds and parses every topic of the contract under one prefix."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        if not _PREFIX_RE.match(self.prefix):
            raise TopicError(
                f"topic prefix {self.prefix!r} is invalid: levels of [A-Za-z0-9_.-] joined by '/'"
            )

    # -- builders -----------------------------------------------------------------------------
    def device(self, device_id: str, kind: DeviceTopic) -> str:
        """The topic of one kind of message of one device."""
        return f"{self.prefix}/dev/{validate_id(device_id, what='device id')}/{DeviceTopic(kind).value}"

    def edge(self, edge_id: str, kind: EdgeTopic) -> str:
        """The topic of one kind of message of one edge."""
        return f"{self.prefix}/edge/{validate_id(edge_id, what='edge id')}/{EdgeTopic(kind).value}"

    def telemetry(self, device_id: str) -> str:
        """Where a device publishes its sensor windows."""
        return self.device(device_id, DeviceTopic.TELEMETRY)

    def device_status(self, device_id: str) -> str:
        """Where a device's birth and last will are retained."""
        return self.device(device_id, DeviceTopic.STATUS)

    def health(self, device_id: str) -> str:
        """Where a device publishes its heartbeats."""
        return self.device(device_id, DeviceTopic.HEALTH)

    def command(self, device_id: str) -> str:
        """Where a device receives commands."""
        return self.device(device_id, DeviceTopic.CMD)

    def ack(self, device_id: str) -> str:
        """Where a device acknowledges commands."""
        return self.device(device_id, DeviceTopic.ACK)

    def device_desired(self, device_id: str) -> str:
        """Where a device's desired configuration is retained."""
        return self.device(device_id, DeviceTopic.DESIRED)

    def keys(self) -> str:
        """Where the cloud retains its signing key ring (``KeyRing``: key rotations and revocations)."""
        return f"{self.prefix}/cloud/keys"

    # -- subscriptions ------------------------------------------------------------------------
    def all_devices(self, kind: DeviceTopic | None = None) -> str:
        """Wildcard over every device, for one kind or (``None``) all kinds."""
        return f"{self.prefix}/dev/+/{DeviceTopic(kind).value}" if kind else f"{self.prefix}/dev/+/+"

    def all_edges(self, kind: EdgeTopic | None = None) -> str:
        """Wildcard over every edge, for one kind or (``None``) all kinds."""
        return f"{self.prefix}/edge/+/{EdgeTopic(kind).value}" if kind else f"{self.prefix}/edge/+/+"

    def device_filter(self, device_id: str | None, kind: DeviceTopic | None) -> str:
        """A subscription filter for one device or all devices (``None``), one kind or all."""
        if device_id is None:
            return self.all_devices(kind)
        dev = validate_id(device_id, what="device id")
        return f"{self.prefix}/dev/{dev}/{DeviceTopic(kind).value if kind else '+'}"

    def edge_filter(self, edge_id: str | None, kind: EdgeTopic | None) -> str:
        """A subscription filter for one edge or all edges (``None``), one kind or all."""
        if edge_id is None:
            return self.all_edges(kind)
        edge = validate_id(edge_id, what="edge id")
        return f"{self.prefix}/edge/{edge}/{EdgeTopic(kind).value if kind else '+'}"

    @staticmethod
    def shared(group: str, topic_filter: str) -> str:
        """An MQTT shared subscription: brokers hand each message to one member of ``group``."""
        if not _SHARE_GROUP_RE.match(group):
            raise TopicError(f"shared subscription group {group!r} is invalid: 1-64 of [A-Za-z0-9_.-]")
        return f"$share/{group}/{topic_filter}"

    # -- claim tokens (first-boot enrollment) ---------------------------------------------------
    def claim_request(self, token_id: str) -> str:
        """Where a device holding claim token ``token_id`` asks for its identity."""
        return f"{self.prefix}/claim/{validate_id(token_id, what='claim token id')}/request"

    def claim_response(self, token_id: str) -> str:
        """Where the broker's claim handler answers the holder of ``token_id``."""
        return f"{self.prefix}/claim/{validate_id(token_id, what='claim token id')}/response"

    def all_claim_requests(self) -> str:
        """Wildcard over every claim request (the broker's claim handler subscribes to it)."""
        return f"{self.prefix}/claim/+/request"

    def all_claim_responses(self) -> str:
        """Wildcard over every claim response (what the claim handler may write)."""
        return f"{self.prefix}/claim/+/response"

    def claim_token_of(self, topic: str) -> str:
        """The token id of a claim request or response topic; ``TopicError`` if it is not one."""
        head = f"{self.prefix}/claim/"
        parts = topic[len(head) :].split("/") if topic.startswith(head) else []
        if len(parts) != 2 or parts[1] not in ("request", "response"):
            raise TopicError(f"topic {topic!r} is not a claim request or response under {self.prefix!r}")
        return validate_id(parts[0], what="claim token id")

    # -- access-control filters (the broker's ACL files) ---------------------------------------
    def all_device_topics(self) -> str:
        """Every device topic at any depth: ``{prefix}/dev/#``."""
        return f"{self.prefix}/dev/#"

    def all_edge_topics(self) -> str:
        """Every edge topic at any depth: ``{prefix}/edge/#``."""
        return f"{self.prefix}/edge/#"

    def everything(self) -> str:
        """Every topic under the prefix: ``{prefix}/#`` (claim topics included)."""
        return f"{self.prefix}/#"

    @staticmethod
    def any_shared(topic_filter: str) -> str:
        """``topic_filter`` as a shared subscription of any group: ``$share/+/{filter}`` (ACL rules)."""
        return f"$share/+/{topic_filter}"

    # -- parser -------------------------------------------------------------------------------
    def parse(self, topic: str) -> ParsedTopic:
        """Parse a concrete topic of this prefix; raise ``TopicError`` saying what did not match."""
        head = self.prefix + "/"
        if not topic.startswith(head):
            raise TopicError(f"topic {topic!r} is not under prefix {self.prefix!r}")
        parts = topic[len(head) :].split("/")
        if len(parts) != 3:
            raise TopicError(f"topic {topic!r} must have 3 levels after the prefix, has {len(parts)}")
        tier, entity, kind = parts
        try:
            if tier == "dev":
                return ParsedTopic("dev", validate_id(entity, what="device id"), DeviceTopic(kind))
            if tier == "edge":
                return ParsedTopic("edge", validate_id(entity, what="edge id"), EdgeTopic(kind))
        except ValueError as exc:
            raise TopicError(f"topic {topic!r}: {exc}") from exc
        raise TopicError(f"topic {topic!r}: unknown tier {tier!r} (expected 'dev' or 'edge')")
