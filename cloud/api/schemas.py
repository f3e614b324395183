"""Request and response models of the admin API.

Requests forbid unknown fields. Responses mirror what the registry and fleet functions return
(``cloud.registry.fleet``, ``cloud.fleet.*``) key for key and in the same order, so that the OpenAPI
document describes every route; what is free-form there (reported state, metrics, manifests, gate
results) stays free-form here (``dict[str, Any]`` / ``JsonValue``)."""

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, JsonValue

# -- requests ----------------------------------------------------------------------------------------


class CommandRequest(BaseModel):
    """A command for one device, a group or tag, or every device behind an edge (exactly one)."""

    model_config = ConfigDict(extra="forbid")

    device: str | None = None
    group: str | None = None
    edge: str | None = None
    name: str
    args: dict[str, Any] = Field(default_factory=dict)
    ttl_s: float = Field(default=60.0, gt=0)
    wait_s: float = Field(default=5.0, ge=0, le=120)


class RolloutRequest(BaseModel):
    """A staged rollout of a model to some edges, a group, or all of them (exactly one)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="NAME@VERSION")
    edges: list[str] = Field(default_factory=list)
    group: str | None = None
    all: bool = False
    canary: float = Field(default=1, ge=0)
    waves: int = Field(default=2, ge=1)
    gates: dict[str, float] = Field(default_factory=dict)
    min_windows: int = Field(default=200, ge=1)
    soak_s: float = Field(default=30.0, ge=0)


class DeviceConfigRequest(BaseModel):
    """Settings to change and to drop in a device's desired config."""

    model_config = ConfigDict(extra="forbid")

    set: dict[str, JsonValue] = Field(default_factory=dict, description="settings to change")
    unset: list[str] = Field(default_factory=list, description="settings to drop from the desired config")


class RollbackRequest(BaseModel):
    """Edges to send back to a model version, or to their own last-good model."""

    model_config = ConfigDict(extra="forbid")

    edges: list[str]
    to: str | None = Field(default=None, description="NAME@VERSION, or none for each edge's last-good")


# -- responses ---------------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    """The body of every error answer."""

    detail: str


class Health(BaseModel):
    """The liveness answer."""

    status: str = Field(description="always 'ok' while the API answers")


class EdgeRow(BaseModel):
    """One edge of ``fleet.fleet_edges``: online state, desired vs reported model, in sync or not."""

    edge_id: str
    state: str
    last_seen: float | None
    group: str | None
    tags: list[str]
    desired_revision: int | None
    desired_action: str | None = Field(description="deploy or rollback; none before the first order")
    desired_version: str | None = Field(description="none for a rollback order (whatever last-good is)")
    reported_revision: int | None
    reported_version: str | None
    last_good_version: str | None
    in_sync: bool
    health: str


class EdgeDetail(EdgeRow):
    """One edge (``fleet.fleet_edge``): its row, its latest metrics and the devices behind it."""

    metrics: dict[str, Any] | None = Field(description="the edge's latest metrics report, if any")
    devices: list[str]


class DeviceRow(BaseModel):
    """One device of ``fleet.fleet_devices``: edge, online state, desired vs reported config revision."""

    device_id: str
    edge_id: str | None
    state: str = Field(description="online, offline, unreachable or unknown")
    reason: str | None
    last_seen: float | None
    group: str | None
    tags: list[str]
    desired_config_revision: int | None
    reported_config_revision: int | None
    config_in_sync: bool
    health: str


class ConfigDiff(BaseModel):
    """One desired setting: what is wanted and what the device reports running."""

    desired: JsonValue
    reported: JsonValue


class DeviceDetail(DeviceRow):
    """One device (``fleet.fleet_device``): its row, desired vs reported config, birth and health."""

    since: float | None
    reported_by: str | None
    agent_version: str | None
    sensor: str | None
    desired_config: dict[str, JsonValue]
    desired_config_updated_by: str | None
    desired_config_published_at: float | None
    reported_config: dict[str, JsonValue]
    config_error: str | None
    config_diff: dict[str, ConfigDiff]
    fault: str | None
    outbox_depth: int | None
    dropped_windows: int | None


class DeviceConfigResult(DeviceDetail):
    """The device (``fleet.fleet_device``) once its new desired-config revision is published."""


class CommandSummary(BaseModel):
    """How many targets acked, failed or did not answer in time."""

    targets: int
    acked: int
    failed: int
    timed_out: int


class CommandOutcome(BaseModel):
    """One target's answer (``cloud.fleet.commands.CommandOutcome``)."""

    device_id: str
    command_id: str
    status: str = Field(description="ok, error, expired, rejected or timeout")
    error: str | None
    result: dict[str, JsonValue]
    duplicate: bool
    latency_ms: float | None


class CommandResult(BaseModel):
    """A command fan-out: the summary and every target's outcome."""

    summary: CommandSummary
    outcomes: list[CommandOutcome]


class ModelRow(BaseModel):
    """One model version of the registry."""

    ref: str = Field(description="NAME@VERSION")
    variant: str
    status: str
    quantization: str | None
    sha256: str | None
    size: int | None
    signed: bool
    created_at: float


class ModelDetail(ModelRow):
    """One model version with its signed manifest (none until published) and its metrics."""

    manifest: dict[str, Any] | None
    metrics: dict[str, Any]


class RollbackOrder(BaseModel):
    """The desired-state revision sent to one edge."""

    edge_id: str
    revision: int
    action: str = Field(description="deploy (a named version) or rollback (the edge's last-good)")


class RollbackResult(BaseModel):
    """The orders a manual rollback sent."""

    orders: list[RollbackOrder]


class RolloutTargetStatus(BaseModel):
    """One edge of a rollout: its wave, state, the revision sent and the version it ran before."""

    edge_id: str
    wave: int
    state: str
    revision: int | None
    previous_version: str | None
    reason: str | None


class RolloutStatus(BaseModel):
    """A rollout as ``cloud.fleet.rollouts.describe`` shows it."""

    rollout_id: str
    model: str = Field(description="NAME@VERSION")
    state: str = Field(description="running, paused, halted, aborted or completed")
    current_wave: int
    waves: int
    reason: str | None
    created_by: str
    created_at: float
    gates: dict[str, Any] = Field(description="gate name -> threshold")
    params: dict[str, Any]
    gate_results: dict[str, Any] = Field(description="wave -> decision, gate values, time")
    targets: list[RolloutTargetStatus]


class AuditEntry(BaseModel):
    """One audit log entry (``fleet.audit_row``)."""

    ts: float
    actor: str
    action: str
    target: str
    detail: dict[str, Any]
