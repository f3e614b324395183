"""Pydantic v2 models of every control message that crosses a process boundary.

Each model carries ``schema_version`` and a ``type`` tag and forbids unknown fields. Control
messages travel as JSON (``encode_message`` / ``decode_message``); sensor windows travel in the
binary codec of ``shared.codec`` and are described here by ``TelemetryWindow``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import time
import uuid
from enum import StrEnum
from typing import Annotated, Any, Final, Literal, Self, TypeVar, cast, overload

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    SerializerFunctionWrapHandler,
    TypeAdapter,
    ValidationError,
    model_serializer,
    model_validator,
)

from shared.errors import SchemaError
from shared.topics import ID_PATTERN as ID_PATTERN  # noqa: PLC0414  (explicit re-export for settings)

SCHEMA_VERSION: Final = 1

Id = Annotated[str, Field(pattern=ID_PATTERN, description="1-64 of [A-Za-z0-9_.:-], usable as a topic level")]
Timestamp = Annotated[float, Field(ge=0, description="seconds since the Unix epoch (UTC)")]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]


def now() -> float:
    """Wall-clock time (epoch seconds) for message timestamps."""
    return time.time()


def new_id() -> str:
    """A new random id (32 hex digits) for commands, samples and other messages."""
    return uuid.uuid4().hex


class Message(BaseModel):
    """Base of every message: strict, versioned, tagged."""

    # allow_inf_nan=False: JSON has no NaN/infinity (pydantic would write null and the receiver reject it).
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False)

    schema_version: Literal[1] = SCHEMA_VERSION


# ---------------------------------------------------------------------------------------------
# Device -> edge / cloud
# ---------------------------------------------------------------------------------------------


# Bounds of a telemetry window, enforced here and by the binary codec (shared.codec).
MAX_SAMPLE_RATE_HZ: Final = 1_000_000.0
SEQ_LIMIT: Final = 2**63  # window sequence numbers are in [0, SEQ_LIMIT): a u64 field, signed-safe


class TelemetryWindow(Message):
    """One sensor window. On the wire it is binary (``shared.codec``); this is its decoded form.

    ``label`` is evaluation metadata only (the simulator's ground truth), never used for inference.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    type: Literal["telemetry"] = "telemetry"
    device_id: Id
    seq: Annotated[int, Field(ge=0, lt=SEQ_LIMIT)]
    ts: Timestamp
    sample_rate_hz: Annotated[float, Field(gt=0, le=MAX_SAMPLE_RATE_HZ)]
    channels: tuple[str, ...]
    values: Any = Field(description="numpy float32 array of shape (samples, channels)")
    label: str | None = None


class Heartbeat(Message):
    """A device's periodic health report (``health`` topic): rates, outbox, drops, CPU, memory."""

    type: Literal["heartbeat"] = "heartbeat"
    device_id: Id
    ts: Timestamp = Field(default_factory=now)
    uptime_s: Annotated[float, Field(ge=0)]
    sensor: str
    rate_hz: Annotated[float, Field(gt=0)]
    window: Annotated[int, Field(gt=0)]
    hop: Annotated[int, Field(gt=0)]
    next_seq: Annotated[int, Field(ge=0)]
    outbox_depth: Annotated[int, Field(ge=0)]
    published_windows: Annotated[int, Field(ge=0)]
    acked_windows: Annotated[int, Field(ge=0)]
    # Accepted by the broker but routed to no subscriber (MQTT 5): kept and sent again, not lost.
    unrouted_windows: Annotated[int, Field(ge=0)] = 0
    dropped_windows: Annotated[int, Field(ge=0)]
    dropped_by_reason: dict[str, int] = Field(default_factory=dict)
    publish_rate_hz: Annotated[float, Field(ge=0)]
    cpu_core_fraction: Annotated[float, Field(ge=0)]
    rss_mb: Annotated[float, Field(ge=0)]
    fault: str | None = None
    actuators: dict[str, str] = Field(default_factory=dict)


class OnlineState(StrEnum):
    """Whether a device or an edge is online (birth) or offline (shutdown or last will)."""

    ONLINE = "online"
    OFFLINE = "offline"


class DeviceStatus(Message):
    """Retained on the device's status topic: the birth message, and the LWT when it vanishes."""

    type: Literal["device_status"] = "device_status"
    device_id: Id
    state: OnlineState
    ts: Timestamp = Field(default_factory=now)
    reason: str | None = Field(default=None, description="why offline: 'lwt' (connection lost) or 'shutdown'")
    agent_version: str | None = None
    sensor: str | None = None
    rate_hz: float | None = None
    window: int | None = None
    hop: int | None = None
    channels: tuple[str, ...] | None = None
    config: dict[str, JsonValue] | None = Field(
        default=None, description="the settings a desired config may change, as the device runs them"
    )
    config_revision: Annotated[int, Field(ge=0)] | None = Field(
        default=None, description="revision of the last DeviceDesired applied since the agent started"
    )
    config_error: str | None = Field(default=None, description="why that revision was refused, if it was")


class DeviceDesired(Message):
    """Retained on the device's desired topic: the config the cloud wants the device to run.

    ``config`` holds only the settings the operator set (overrides of the device's own file); the
    device applies it like a ``set_config`` command whenever it receives a revision newer than the
    one it applied since it started (so also after a restart), then reports ``config_revision``."""

    type: Literal["device_desired"] = "device_desired"
    device_id: Id
    revision: Annotated[int, Field(ge=1, description="monotonic per device")]
    config: dict[str, JsonValue] = Field(default_factory=dict)
    issued_at: Timestamp = Field(default_factory=now)


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------


class CommandName(StrEnum):
    """The commands a device agent understands."""

    PING = "ping"
    SET_RATE = "set_rate"
    SET_WINDOW = "set_window"
    SET_CONFIG = "set_config"
    INJECT_FAULT = "inject_fault"
    CLEAR_FAULT = "clear_fault"
    ACTUATE = "actuate"
    RESTART_SENSOR = "restart_sensor"


# Upper bounds of command arguments, and of the settings a running device may change (``set_config``
# and the desired config ``DeviceDesired.config``). Every receiver must be able to hold what a command
# asks for: ``Command`` refuses arguments beyond them wherever it is built or decoded (the cloud's API
# and CLI, the edge's rules, the device on receipt), naming the argument and its limit. What an
# argument means (its type, lower bounds, unknown names) is the device's to check and to refuse
# in its ack: the contract only bounds sizes.
MAX_RATE_HZ: Final = 100_000.0  # samples per second per channel
MAX_WINDOW_SAMPLES: Final = 65_536  # samples per window (the codec's own limit)
MAX_HOP_SAMPLES: Final = 64 * MAX_WINDOW_SAMPLES
MAX_INT16_SCALE: Final = 1_000_000.0
MAX_HEARTBEAT_INTERVAL_S: Final = 86_400.0
MAX_OUTBOX_WINDOWS: Final = 10_000_000
MAX_OUTBOX_AGE_S: Final = 90 * 86_400.0
MAX_IN_FLIGHT: Final = 1_000
MAX_ARG_NAME: Final = 64  # characters of a name-like argument: action, target, state, fault
MAX_ARG_STRING: Final = 1_024  # characters of any string in the arguments, keys included
MAX_ARG_ITEMS: Final = 64  # keys of a mapping or items of a list in the arguments
MAX_ARG_DEPTH: Final = 4  # nesting of mappings and lists in the arguments
MAX_ARGS_BYTES: Final = 16_384  # the arguments as compact JSON


class CommandArgs(BaseModel):
    """Base of each command's arguments: unknown names refused, no NaN or infinity."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class NoArgs(CommandArgs):
    """Arguments of a command that takes none (``ping``, ``clear_fault``, ``restart_sensor``)."""


class SetRateArgs(CommandArgs):
    """Arguments of ``set_rate``."""

    rate_hz: float = Field(gt=0, le=MAX_RATE_HZ)


class SetWindowArgs(CommandArgs):
    """Arguments of ``set_window``."""

    window: int = Field(ge=1, le=MAX_WINDOW_SAMPLES)
    hop: int | None = Field(default=None, ge=1, le=MAX_HOP_SAMPLES)


class SensorConfigArgs(CommandArgs):
    """``set_config``'s ``sensor``: only its options change at runtime (each sensor checks them)."""

    options: dict[str, JsonValue] = Field(default_factory=dict, max_length=MAX_ARG_ITEMS)


class SetConfigArgs(CommandArgs):
    """Arguments of ``set_config`` and the keys of a desired device config: the settings a running
    agent may change (``shared.settings.agent.RUNTIME_SETTINGS``), each optional and bounded."""

    rate_hz: float | None = Field(default=None, gt=0, le=MAX_RATE_HZ)
    window: int | None = Field(default=None, ge=1, le=MAX_WINDOW_SAMPLES)
    hop: int | None = Field(default=None, ge=1, le=MAX_HOP_SAMPLES)
    encoding: Literal["float32", "int16"] | None = None
    int16_scale: float | None = Field(default=None, gt=0, le=MAX_INT16_SCALE)
    send_labels: bool | None = None
    heartbeat_interval_s: float | None = Field(default=None, gt=0, le=MAX_HEARTBEAT_INTERVAL_S)
    outbox_max_windows: int | None = Field(default=None, ge=10, le=MAX_OUTBOX_WINDOWS)
    outbox_max_age_s: float | None = Field(default=None, gt=0, le=MAX_OUTBOX_AGE_S)
    max_in_flight: int | None = Field(default=None, ge=1, le=MAX_IN_FLIGHT)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] | None = None
    sensor: SensorConfigArgs | None = None


class InjectFaultArgs(CommandArgs):
    """Arguments of ``inject_fault``."""

    fault: str = Field(min_length=1, max_length=MAX_ARG_NAME)
    severity: float = Field(default=1.0, gt=0, le=1)


class ActuateArgs(CommandArgs):
    """Arguments of ``actuate``: an action, and for ``set`` a target and its state. Actuator plugins
    may take more arguments (``extra`` allowed), bounded like any argument."""

    model_config = ConfigDict(extra="allow", frozen=True, allow_inf_nan=False)

    action: str = Field(min_length=1, max_length=MAX_ARG_NAME)
    target: str | None = Field(default=None, min_length=1, max_length=MAX_ARG_NAME)
    state: str | None = Field(default=None, min_length=1, max_length=MAX_ARG_NAME)


COMMAND_ARGS: Final[dict[CommandName, type[CommandArgs]]] = {
    CommandName.PING: NoArgs,
    CommandName.SET_RATE: SetRateArgs,
    CommandName.SET_WINDOW: SetWindowArgs,
    CommandName.SET_CONFIG: SetConfigArgs,
    CommandName.INJECT_FAULT: InjectFaultArgs,
    CommandName.CLEAR_FAULT: NoArgs,
    CommandName.ACTUATE: ActuateArgs,
    CommandName.RESTART_SENSOR: NoArgs,
}
# Pydantic error types that mean "beyond an upper bound" (the rest are the device's to judge).
_UPPER_BOUND_ERRORS: Final = frozenset({"less_than_equal", "less_than", "too_long", "string_too_long"})


def _json_bound_errors(value: Any, where: str, depth: int, out: list[str]) -> None:
    """Size problems of a JSON value (nesting, items, string lengths), each naming where and the limit."""
    if isinstance(value, str):
        if len(value) > MAX_ARG_STRING:
            out.append(f"{where}: string of {len(value)} characters; at most {MAX_ARG_STRING}")
        return
    if not isinstance(value, dict | list):
        return
    if depth >= MAX_ARG_DEPTH:
        out.append(f"{where}: nested deeper than {MAX_ARG_DEPTH} levels")
        return
    if len(value) > MAX_ARG_ITEMS:
        what = "keys" if isinstance(value, dict) else "items"
        out.append(f"{where}: {len(value)} {what}; at most {MAX_ARG_ITEMS}")
        return
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for key, item in items:
        if isinstance(key, str) and len(key) > MAX_ARG_STRING:
            out.append(f"{where}: a key of {len(key)} characters; at most {MAX_ARG_STRING}")
            continue
        path = f"{where}.{key}" if isinstance(key, str) else f"{where}[{key}]"
        _json_bound_errors(item, path, depth + 1, out)


def bound_errors(model: type[BaseModel], data: Any, *, where: str) -> list[str]:
    """The upper bounds ``data`` breaks, one message each naming the field and the limit (e.g.
    ``args.rate_hz: Input should be less than or equal to 100000``): sizes of the JSON as a whole,
    then ``model``'s ``le``/``lt``/``max_length`` constraints. Other problems (types, lower bounds,
    unknown names) are not reported here: the receiver judges those."""
    out: list[str] = []
    _json_bound_errors(data, where, 0, out)
    if out:
        return out
    try:
        size = len(json.dumps(data, separators=(",", ":"), allow_nan=False))
    except (TypeError, ValueError):  # not JSON: the field's own validation says so
        return out
    if size > MAX_ARGS_BYTES:
        return [f"{where}: {size} bytes of JSON; at most {MAX_ARGS_BYTES}"]
    try:
        model.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors():
            if err["type"] in _UPPER_BOUND_ERRORS:
                loc = ".".join(str(p) for p in (where, *err["loc"]))
                out.append(f"{loc}: {err['msg']}")
    return out


def command_bound_errors(name: CommandName, args: dict[str, Any]) -> list[str]:
    """The upper bounds a command's arguments break (``bound_errors`` with the command's args model)."""
    return bound_errors(COMMAND_ARGS[name], args, where="args")


class Command(Message):
    """A command to one device. ``command_id`` dedups; ``expires_at`` bounds when it may run."""

    type: Literal["command"] = "command"
    command_id: Id = Field(default_factory=new_id)
    device_id: Id
    name: CommandName
    args: dict[str, JsonValue] = Field(default_factory=dict)
    issued_at: Timestamp = Field(default_factory=now)
    expires_at: Timestamp
    sender: str = Field(default="unknown", max_length=128)

    @model_validator(mode="after")
    def _expiry_after_issue(self) -> Self:
        if self.expires_at < self.issued_at:
            raise ValueError("expires_at must not be before issued_at")
        return self

    @model_validator(mode="after")
    def _args_within_bounds(self) -> Self:
        problems = command_bound_errors(self.name, self.args)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @classmethod
    def create(
        cls,
        *,
        device_id: str,
        name: CommandName | str,
        args: dict[str, JsonValue] | None = None,
        ttl_s: float = 60.0,
        sender: str = "unknown",
    ) -> Command:
        """A command for ``device_id`` with a new id, expiring ``ttl_s`` seconds from now;
        ``SchemaError`` (naming the field and the limit) when something is invalid or beyond a bound."""
        issued = now()
        try:
            return cls(
                device_id=device_id,
                name=CommandName(name),
                args=args or {},
                issued_at=issued,
                expires_at=issued + ttl_s,
                sender=sender,
            )
        except ValidationError as exc:
            raise SchemaError(f"invalid Command: {_describe(exc)}") from exc


class AckStatus(StrEnum):
    """How a device answered a command."""

    OK = "ok"
    ERROR = "error"
    EXPIRED = "expired"
    REJECTED = "rejected"


class CommandAck(Message):
    """A device's answer to a command (``ack`` topic), matched to it by ``command_id``."""

    type: Literal["command_ack"] = "command_ack"
    command_id: Id
    device_id: Id
    status: AckStatus
    ok: bool
    error: str | None = None
    result: dict[str, JsonValue] = Field(default_factory=dict)
    duplicate: bool = Field(default=False, description="true when this id was executed before; not re-run")
    ts: Timestamp = Field(default_factory=now)


# ---------------------------------------------------------------------------------------------
# Edge -> cloud
# ---------------------------------------------------------------------------------------------


class Severity(StrEnum):
    """How urgent a decision is."""

    INFO = "info"
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    CRITICAL = "critical"


class Decision(Message):
    """A local decision or alert taken by an edge node from a rule."""

    type: Literal["decision"] = "decision"
    decision_id: Id = Field(default_factory=new_id)
    edge_id: Id
    device_id: Id
    rule: str
    class_name: str
    probability: Probability
    severity: Severity
    window_seq: Annotated[int, Field(ge=0)]
    model_version: str | None = None
    command_id: Id | None = None
    command_name: CommandName | None = None
    command_args: dict[str, JsonValue] = Field(default_factory=dict)
    ts: Timestamp = Field(default_factory=now)
    window_ts: Timestamp | None = None


class SampleReason(StrEnum):
    """Why a window was picked as a hard example for retraining."""

    LOW_CONFIDENCE = "low_confidence"
    SMALL_MARGIN = "small_margin"
    RANDOM = "random"


class Privacy(StrEnum):
    """How much of a window a hard example carries: all of it, summary features, or nothing."""

    FULL = "full"
    SUMMARY = "summary"
    NONE = "none"


class HardExample(Message):
    """A window the edge thinks the cloud should learn from, with what retraining needs."""

    type: Literal["sample"] = "sample"
    sample_id: Id
    edge_id: Id
    device_id: Id
    seq: Annotated[int, Field(ge=0)]
    ts: Timestamp
    model_name: str | None = None
    model_version: str | None = None
    predicted: str
    probabilities: list[Probability]
    class_names: list[str]
    reason: SampleReason
    label: str | None = Field(default=None, description="the device's ground truth, when it sent one")
    privacy: Privacy
    window_b64: str | None = Field(default=None, description="the window in the binary codec, base64")
    features: dict[str, float] | None = Field(default=None, description="summary features (privacy=summary)")

    @model_validator(mode="after")
    def _payload_matches_privacy(self) -> Self:
        if self.privacy is Privacy.FULL and self.window_b64 is None:
            raise ValueError("privacy 'full' needs window_b64")
        if self.privacy is not Privacy.FULL and self.window_b64 is not None:
            raise ValueError(f"privacy {self.privacy.value!r} forbids window_b64")
        if len(self.probabilities) != len(self.class_names):
            raise ValueError("probabilities and class_names differ in length")
        return self

    def window_bytes(self) -> bytes | None:
        """The raw encoded window this sample carries, if any."""
        return base64.b64decode(self.window_b64) if self.window_b64 is not None else None


class LatencySummary(BaseModel):
    """Latency percentiles in milliseconds."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    p50_ms: Annotated[float, Field(ge=0)] = 0.0
    p95_ms: Annotated[float, Field(ge=0)] = 0.0
    p99_ms: Annotated[float, Field(ge=0)] = 0.0


class EdgeMetrics(Message):
    """An edge's periodic metrics (``metrics`` topic): throughput, confidence, latency, drops."""

    type: Literal["edge_metrics"] = "edge_metrics"
    edge_id: Id
    ts: Timestamp = Field(default_factory=now)
    interval_s: Annotated[float, Field(ge=0)]
    model_version: str | None = None
    windows_total: Annotated[int, Field(ge=0)]
    windows_per_s: Annotated[float, Field(ge=0)]
    duplicates_total: Annotated[int, Field(ge=0)] = 0
    dead_letters_total: Annotated[int, Field(ge=0)] = 0
    decisions_total: Annotated[int, Field(ge=0)] = 0
    errors_total: Annotated[int, Field(ge=0)] = 0
    cache_hit_rate: Annotated[float, Field(ge=0, le=1)] = 0.0
    inference_latency: LatencySummary = Field(default_factory=LatencySummary)
    e2e_latency: LatencySummary = Field(default_factory=LatencySummary)
    uplink_queue_depth: Annotated[int, Field(ge=0)] = 0
    uplink_dropped_total: Annotated[int, Field(ge=0)] = 0
    confidence_mean: Annotated[float, Field(ge=0, le=1)] | None = None
    confidence_histogram: list[int] = Field(default_factory=list, description="10 bins over [0, 1]")
    class_counts: dict[str, int] = Field(default_factory=dict)
    labelled_windows: Annotated[int, Field(ge=0)] = 0
    labelled_correct: Annotated[int, Field(ge=0)] = 0
    devices_seen: Annotated[int, Field(ge=0)] = 0


class DeadLetter(Message):
    """A payload the edge rejected, and why (``dead`` topic)."""

    type: Literal["dead_letter"] = "dead_letter"
    edge_id: Id
    topic: str
    reason: str
    payload_b64: str = Field(description="the rejected payload, base64, truncated to 4 KiB")
    payload_size: Annotated[int, Field(ge=0)]
    ts: Timestamp = Field(default_factory=now)


# ---------------------------------------------------------------------------------------------
# Models and deployment
# ---------------------------------------------------------------------------------------------


class Quantization(StrEnum):
    """How a model's weights and activations are quantized."""

    FLOAT32 = "float32"
    DYNAMIC = "dynamic"
    FLOAT16 = "float16"
    INT8 = "int8"


class Normalization(BaseModel):
    """Applied by the edge to each window before inference: ``(x - mean) / std`` per channel."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mean: list[float]
    std: list[float]

    @model_validator(mode="after")
    def _finite_positive(self) -> Self:
        if len(self.mean) != len(self.std):
            raise ValueError("mean and std differ in length")
        if not all(math.isfinite(v) for v in self.mean):
            raise ValueError("mean has a non-finite value")
        if not all(math.isfinite(v) and v > 0 for v in self.std):
            raise ValueError("std values must be finite and > 0")
        return self


PER_SERIES_STD_FLOOR: Final = 1e-8  # a flat channel normalises to zeros, not to inf/NaN


class Preprocessing(BaseModel):
    """How a raw window becomes the model's input, applied identically by the cloud (training,
    evaluation, int8 calibration) and the edge (``edge_node.preprocessing.prepare_window``).

    In order: channels are reordered by name to ``ModelManifest.channels`` (other names are
    rejected); ``per_series`` z-normalises each channel over the window's own samples (std floored
    at ``PER_SERIES_STD_FLOOR``); the length policy brings the window to ``input_shape[0]`` samples:
    ``exact`` accepts only that length, ``pad`` appends ``pad_value`` to a shorter window (a longer
    one up to ``max_input_length`` is cut to the input length, anything longer is rejected),
    ``resample`` interpolates linearly to the input length. ``fitted`` normalisation is the
    manifest's ``normalization`` (mean/std per channel of the training inputs), applied last, by
    the model runner, after the length policy."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    normalize: Literal["none", "fitted", "per_series"]
    length: Literal["exact", "pad", "resample"] = "exact"
    pad_value: float = 0.0
    max_input_length: Annotated[int, Field(gt=0)] | None = Field(
        default=None,
        description="the longest window accepted (pad: longer than the input length is cut to it; "
        "None: the input length for pad, any length for resample)",
    )


class ModelManifest(Message):
    """Describes one model artifact; signed by the cloud (ed25519 over ``signing_bytes``).

    ``preprocessing`` is left out of the JSON when ``None``, so manifests signed before the field
    existed keep the same canonical bytes and their signatures still verify."""

    type: Literal["model_manifest"] = "model_manifest"
    name: Annotated[str, Field(min_length=1, max_length=64)]
    version: Annotated[str, Field(min_length=1, max_length=64)]
    created_at: Timestamp = Field(default_factory=now)
    format: Literal["tflite"] = "tflite"
    quantization: Quantization
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    size_bytes: Annotated[int, Field(gt=0)]
    url: str = Field(description="http(s):// or file:// location of the artifact")
    input_shape: list[int] = Field(description="without the batch dimension, e.g. [128, 3]")
    input_dtype: Literal["float32", "int8", "uint8"]
    output_shape: list[int] = Field(description="without the batch dimension, e.g. [4]")
    output_dtype: Literal["float32", "int8", "uint8"]
    class_names: list[str]
    normalization: Normalization | None = None
    sample_rate_hz: float | None = None
    channels: list[str] | None = None
    preprocessing: Preprocessing | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    parent_version: str | None = None
    dataset_id: str | None = None
    signature: str | None = Field(default=None, description="base64 ed25519 signature over signing_bytes()")
    key_id: str | None = None

    @model_validator(mode="after")
    def _shapes(self) -> Self:
        if not self.input_shape or any(d <= 0 for d in self.input_shape):
            raise ValueError("input_shape must be non-empty positive dimensions (no batch dimension)")
        if not self.output_shape or any(d <= 0 for d in self.output_shape):
            raise ValueError("output_shape must be non-empty positive dimensions (no batch dimension)")
        if self.output_shape[-1] != len(self.class_names):
            raise ValueError("output_shape[-1] must equal the number of class_names")
        # Older manifests (no preprocessing) were never checked for this: they stay valid.
        channels_differ = self.channels is not None and len(self.channels) != self.input_shape[-1]
        if channels_differ and self.preprocessing is not None:
            raise ValueError(
                f"channels {self.channels} do not match input_shape[-1] = {self.input_shape[-1]}"
            )
        if self.preprocessing is not None:
            self._check_preprocessing(self.preprocessing)
        return self

    def _check_preprocessing(self, pre: Preprocessing) -> None:
        # Fitted statistics and the policy must agree, or the runner would normalise twice or never.
        if pre.normalize == "fitted" and self.normalization is None:
            raise ValueError("preprocessing.normalize 'fitted' needs the manifest's normalization")
        if pre.normalize != "fitted" and self.normalization is not None:
            raise ValueError(f"preprocessing.normalize {pre.normalize!r} excludes a fitted normalization")
        if pre.length != "exact" and len(self.input_shape) != 2:
            raise ValueError(f"preprocessing.length {pre.length!r} needs (time, channels) inputs")
        if pre.normalize == "per_series" and len(self.input_shape) != 2:
            raise ValueError("preprocessing.normalize 'per_series' needs (time, channels) inputs")
        if pre.max_input_length is not None:
            if pre.length == "exact":
                raise ValueError("preprocessing.max_input_length needs length 'pad' or 'resample'")
            if pre.length == "pad" and pre.max_input_length < self.input_shape[0]:
                raise ValueError(
                    f"preprocessing.max_input_length {pre.max_input_length} is below the input "
                    f"length {self.input_shape[0]}"
                )

    @model_serializer(mode="wrap")
    def _omit_absent_preprocessing(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        if self.preprocessing is None:
            data.pop("preprocessing", None)
        return data

    @property
    def ref(self) -> str:
        """``name@version``: how logs and messages name this model."""
        return f"{self.name}@{self.version}"

    def signing_bytes(self) -> bytes:
        """Canonical JSON of every field but the signature: what the cloud signs."""
        data = self.model_dump(mode="json", exclude={"signature"})
        return json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


class DesiredAction(StrEnum):
    """What a desired state asks an edge to do with the model it names."""

    DEPLOY = "deploy"
    ROLLBACK = "rollback"


def manifest_digest(manifest: ModelManifest) -> str:
    """SHA-256 (hex) of a manifest's canonical JSON *including* its signature: what a signed
    ``DesiredState`` names in ``model_digest``, binding the order to exactly that signed manifest."""
    data = manifest.model_dump(mode="json")
    return hashlib.sha256(
        json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    ).hexdigest()


class DesiredState(Message):
    """Retained on the edge's desired topic: what the cloud wants the edge to run.

    Signed as a whole (ed25519 over ``signing_bytes``, ``shared.signing.sign_desired``): the edge
    refuses an order that is unsigned, for another edge, expired, signed by a key outside its ring
    (or revoked), or whose revision is not above the last one it applied. ``model_digest`` names the
    exact signed manifest; a ``rollback`` names the version it goes back to (``rollback_to``). The
    signature fields are optional so that orders recorded before signing still decode (edges refuse
    them)."""

    type: Literal["desired_state"] = "desired_state"
    edge_id: Id
    revision: Annotated[int, Field(ge=0, description="monotonic; an edge ignores older revisions")]
    action: DesiredAction = DesiredAction.DEPLOY
    model: ModelManifest | None = None
    rollout_id: str | None = None
    config: dict[str, JsonValue] = Field(default_factory=dict)
    issued_at: Timestamp = Field(default_factory=now)
    expires_at: Timestamp | None = Field(default=None, description="an edge refuses the order after this")
    model_digest: str | None = Field(
        default=None,
        pattern=r"^[0-9a-f]{64}$",
        description="sha256 of the model manifest's canonical JSON, signature included",
    )
    rollback_to: Annotated[str, Field(min_length=1, max_length=64)] | None = Field(
        default=None, description="rollback: the model version the edge goes back to"
    )
    key_id: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    signature: str | None = Field(default=None, description="base64 ed25519 signature over signing_bytes()")

    @model_validator(mode="after")
    def _deploy_needs_model(self) -> Self:
        if self.action is DesiredAction.DEPLOY and self.model is None:
            raise ValueError("action 'deploy' needs a model")
        if self.expires_at is not None and self.expires_at < self.issued_at:
            raise ValueError("expires_at is before issued_at")
        return self

    def signing_bytes(self) -> bytes:
        """Canonical JSON of every field but the signature: what the cloud signs."""
        data = self.model_dump(mode="json", exclude={"signature"})
        return json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


class DeployStage(StrEnum):
    """Where an edge is in carrying out a deployment order."""

    RECEIVED = "received"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    WARMING_UP = "warming_up"
    SWAPPED = "swapped"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"
    REFUSED = "refused"  # the order itself was not accepted (signature, edge, expiry, revision, downgrade)


class DeploymentProgress(Message):
    """An edge's progress report on a deployment order (``deploy`` topic)."""

    type: Literal["deploy_progress"] = "deploy_progress"
    edge_id: Id
    revision: Annotated[int, Field(ge=0)]
    rollout_id: str | None = None
    model_version: str | None = None
    stage: DeployStage
    ok: bool
    reason: str | None = None
    ts: Timestamp = Field(default_factory=now)


class KeyAction(StrEnum):
    """What a key announcement does to the edges' key ring."""

    ADD = "add"
    REVOKE = "revoke"


class KeyAnnouncement(Message):
    """One change of the cloud's signing key ring, signed by a key the ring already trusts (never by
    the key it revokes). ``seq`` numbers the changes from 1; an edge applies each one once."""

    type: Literal["key_announcement"] = "key_announcement"
    seq: Annotated[int, Field(ge=1)]
    action: KeyAction
    key_id: Annotated[str, Field(min_length=1, max_length=64)]
    public_key: str | None = Field(default=None, description="add: the new key's public PEM")
    issued_at: Timestamp = Field(default_factory=now)
    signer_key_id: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    signature: str | None = Field(default=None, description="base64 ed25519 signature over signing_bytes()")

    @model_validator(mode="after")
    def _add_needs_key(self) -> Self:
        if self.action is KeyAction.ADD and not self.public_key:
            raise ValueError("action 'add' needs public_key")
        return self

    def signing_bytes(self) -> bytes:
        """Canonical JSON of every field but the signature: what the signer signs."""
        data = self.model_dump(mode="json", exclude={"signature"})
        return json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


class KeyRing(Message):
    """Retained on the fleet's keys topic: every key announcement so far, oldest first, so that an
    edge that missed some (offline, new) replays the whole chain from the key it was configured with."""

    type: Literal["key_ring"] = "key_ring"
    announcements: list[KeyAnnouncement] = Field(default_factory=list)
    issued_at: Timestamp = Field(default_factory=now)


class ReportedState(BaseModel):
    """What an edge reports it runs: active and last good model, last order handled."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_name: str | None = None
    model_version: str | None = None
    model_sha256: str | None = None
    last_good_version: str | None = None
    desired_revision: int | None = None
    last_deploy_ok: bool | None = None
    last_deploy_reason: str | None = None


class DeviceSeen(BaseModel):
    """What one edge knows of one device of its site (from its status, heartbeat and telemetry)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    device_id: Id
    state: OnlineState | None = Field(default=None, description="from the retained status; None: none seen")
    reason: str | None = None
    since: Timestamp | None = Field(default=None, description="edge clock when that status arrived")
    last_seen: Timestamp | None = Field(default=None, description="edge clock of the device's last message")
    agent_version: str | None = None
    sensor: str | None = None
    rate_hz: float | None = None
    window: int | None = None
    hop: int | None = None
    config: dict[str, JsonValue] | None = None
    config_revision: int | None = None
    config_error: str | None = None
    fault: str | None = Field(default=None, description="from the last heartbeat")
    outbox_depth: Annotated[int, Field(ge=0)] | None = None
    dropped_windows: Annotated[int, Field(ge=0)] | None = None


class DeviceReport(Message):
    """Edge -> cloud on the edge's ``devices`` topic: devices whose state changed, or (``full``) every
    device the edge knows, sent on each connection to the cloud broker and periodically."""

    type: Literal["device_report"] = "device_report"
    edge_id: Id
    ts: Timestamp = Field(default_factory=now)
    full: bool = False
    devices: list[DeviceSeen] = Field(default_factory=list, max_length=1000)


class EdgeStatus(Message):
    """Retained on the edge's status topic: birth with reported state, or the LWT."""

    type: Literal["edge_status"] = "edge_status"
    edge_id: Id
    state: OnlineState
    ts: Timestamp = Field(default_factory=now)
    reason: str | None = None
    version: str | None = None
    reported: ReportedState = Field(default_factory=ReportedState)


# ---------------------------------------------------------------------------------------------
# JSON encoding of control messages
# ---------------------------------------------------------------------------------------------

ControlMessage = Annotated[
    Heartbeat
    | DeviceStatus
    | Command
    | CommandAck
    | Decision
    | HardExample
    | EdgeMetrics
    | DeadLetter
    | ModelManifest
    | DesiredState
    | DeploymentProgress
    | EdgeStatus
    | DeviceDesired
    | DeviceReport
    | KeyRing,
    Field(discriminator="type"),
]
CONTROL_TYPES: tuple[type[Message], ...] = (
    Heartbeat,
    DeviceStatus,
    Command,
    CommandAck,
    Decision,
    HardExample,
    EdgeMetrics,
    DeadLetter,
    ModelManifest,
    DesiredState,
    DeploymentProgress,
    EdgeStatus,
    DeviceDesired,
    DeviceReport,
    KeyRing,
)
_CONTROL_ADAPTER: TypeAdapter[ControlMessage] = TypeAdapter(ControlMessage)
MAX_CONTROL_BYTES = 1_048_576
M = TypeVar("M", bound=Message)


def encode_message(message: Message) -> bytes:
    """JSON bytes of a control message (NaN and infinities refused)."""
    if isinstance(message, TelemetryWindow):
        raise SchemaError("telemetry windows use shared.codec.encode_window, not JSON")
    return message.model_dump_json().encode()


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err["loc"]) or "<message>"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


@overload
def decode_message(payload: bytes | str, expected: type[M]) -> M: ...
@overload
def decode_message(payload: bytes | str, expected: None = None) -> Message: ...
def decode_message(payload: bytes | str, expected: type[M] | None = None) -> Message:
    """Parse and validate a JSON control message; raise ``SchemaError`` naming the bad field.

    With ``expected`` the message must be of that type; without it, the ``type`` tag decides.
    """
    if len(payload) > MAX_CONTROL_BYTES:
        raise SchemaError(f"payload: {len(payload)} bytes exceeds the {MAX_CONTROL_BYTES}-byte limit")
    try:
        if expected is not None:
            return expected.model_validate_json(payload)
        return cast(Message, _CONTROL_ADAPTER.validate_json(payload))
    except ValidationError as exc:
        what = expected.__name__ if expected is not None else "control message"
        raise SchemaError(f"invalid {what}: {_describe(exc)}") from exc
