"""SQLAlchemy 2.x models of the registry. Lineage: dataset -> model version (parent, config, metrics,
artifact, signature) -> deployments -> per-edge status; triggers and pipeline runs say why and how."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Stable constraint names so Alembic migrations work the same on SQLite and PostgreSQL.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def _now() -> float:
    return time.time()


class Base(DeclarativeBase):
    """Declarative base of every registry table: stable constraint names, JSON for dicts and lists."""

    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Group(Base):
    """A named group of edges and devices; ``--group`` targets its members."""

    __tablename__ = "groups"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[float] = mapped_column(Float, default=_now)


class EdgeNode(Base):
    """An edge node as last heard from: online state, the model it runs and the state it reported."""

    __tablename__ = "edge_nodes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    edge_id: Mapped[str] = mapped_column(String(64), unique=True)
    group_id: Mapped[int | None] = mapped_column(ForeignKey("groups.id", ondelete="SET NULL"))
    tags: Mapped[list[Any]] = mapped_column(JSON, default=list)
    state: Mapped[str] = mapped_column(String(16), default="unknown")
    version: Mapped[str | None] = mapped_column(String(64))
    model_version: Mapped[str | None] = mapped_column(String(64))
    reported: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    last_seen: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[float] = mapped_column(Float, default=_now)


class Device(Base):
    """A device as its edges report it: the edge it is behind, online state and what its birth said."""

    __tablename__ = "devices"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    device_id: Mapped[str] = mapped_column(String(64), unique=True)
    edge_id: Mapped[str | None] = mapped_column(String(64))
    group_id: Mapped[int | None] = mapped_column(ForeignKey("groups.id", ondelete="SET NULL"))
    tags: Mapped[list[Any]] = mapped_column(JSON, default=list)
    state: Mapped[str] = mapped_column(String(16), default="unknown")
    info: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    last_seen: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[float] = mapped_column(Float, default=_now)

    __table_args__ = (
        Index("ix_devices_state", "state"),
        Index("ix_devices_edge_id", "edge_id"),
        Index("ix_devices_last_seen", "last_seen"),
    )


class DeviceDesiredConfig(Base):
    """The config overrides the operator wants a device to run (migration 0003); published retained
    on the device's ``desired`` topic as a ``DeviceDesired``. Revisions are monotonic per device."""

    __tablename__ = "device_desired_configs"

    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    revision: Mapped[int] = mapped_column(Integer)
    config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    updated_by: Mapped[str] = mapped_column(String(128), default="unknown")
    updated_at: Mapped[float] = mapped_column(Float, default=_now)
    published_at: Mapped[float | None] = mapped_column(Float)


class Dataset(Base):
    """A dataset snapshot: a built-in, a user's .npz, or labelled uplinked samples frozen at a time."""

    __tablename__ = "datasets"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    source: Mapped[str] = mapped_column(String(512), doc="builtin:digits, file path, or samples:<name>")
    sha256: Mapped[str] = mapped_column(String(64))
    n_samples: Mapped[int] = mapped_column(Integer)
    input_shape: Mapped[list[Any]] = mapped_column(JSON)
    class_names: Mapped[list[Any]] = mapped_column(JSON)
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    path: Mapped[str | None] = mapped_column(String(1024), doc="frozen .npz snapshot")
    created_at: Mapped[float] = mapped_column(Float, default=_now)

    __table_args__ = (UniqueConstraint("name", "sha256", name="uq_datasets_name_sha256"),)


class Sample(Base):
    """One uplinked hard example. ``label_source``: device, teacher, human, or none (unlabelled);
    ``label_trusted``: whether the label may train (a device's trains only if the device is a trusted
    labeller, then and now)."""

    __tablename__ = "samples"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sample_id: Mapped[str] = mapped_column(String(64), unique=True)
    edge_id: Mapped[str] = mapped_column(String(64))
    device_id: Mapped[str] = mapped_column(String(64))
    seq: Mapped[int] = mapped_column(BigInteger)
    ts: Mapped[float] = mapped_column(Float)
    model_version: Mapped[str | None] = mapped_column(String(64))
    predicted: Mapped[str] = mapped_column(String(64))
    confidence: Mapped[float] = mapped_column(Float)
    reason: Mapped[str] = mapped_column(String(32))
    privacy: Mapped[str] = mapped_column(String(16))
    window: Mapped[bytes | None] = mapped_column(LargeBinary, doc="binary codec bytes")
    features: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    label: Mapped[str | None] = mapped_column(String(64))
    label_source: Mapped[str] = mapped_column(String(16), default="none")
    label_confidence: Mapped[float | None] = mapped_column(Float)
    received_at: Mapped[float] = mapped_column(Float, default=_now)
    label_trusted: Mapped[bool] = mapped_column(
        Boolean,
        default=False,
        doc="the label may train models (migration 0007): a teacher's or an operator's, or a device's "
        "that was a trusted labeller when the sample arrived; other device labels only evaluate",
    )

    __table_args__ = (
        Index("ix_samples_label_source", "label_source"),
        Index("ix_samples_received_at", "received_at"),
        Index("ix_samples_device_id_ts", "device_id", "ts"),
    )


class ModelVersion(Base):
    """One built model (``name@version``, one variant): lineage, metrics, artifact, signature, gate
    verdict and status."""

    __tablename__ = "model_versions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    version: Mapped[str] = mapped_column(String(64))
    variant: Mapped[str] = mapped_column(String(32), doc="float32, dynamic, float16, int8, pruned_int8, ...")
    status: Mapped[str] = mapped_column(
        String(16), default="candidate", doc="candidate/rejected/production/retired/withdrawn"
    )
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id", ondelete="SET NULL"))
    dataset_id: Mapped[int | None] = mapped_column(ForeignKey("datasets.id", ondelete="SET NULL"))
    run_id: Mapped[int | None] = mapped_column(ForeignKey("pipeline_runs.id", ondelete="SET NULL"))
    training_config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    keras_path: Mapped[str | None] = mapped_column(String(1024))
    artifact_path: Mapped[str | None] = mapped_column(String(1024))
    artifact_url: Mapped[str | None] = mapped_column(String(1024))
    artifact_sha256: Mapped[str | None] = mapped_column(String(64))
    artifact_size: Mapped[int | None] = mapped_column(Integer)
    artifact_format: Mapped[str] = mapped_column(String(16), default="tflite")
    quantization: Mapped[str | None] = mapped_column(String(16))
    manifest: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    signature: Mapped[str | None] = mapped_column(String(128))
    key_id: Mapped[str | None] = mapped_column(String(32))
    gate_passed: Mapped[bool | None] = mapped_column(Boolean)
    gate_reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float, default=_now)

    parent: Mapped[ModelVersion | None] = relationship(remote_side=[id])
    dataset: Mapped[Dataset | None] = relationship()

    __table_args__ = (UniqueConstraint("name", "version", name="uq_model_versions_name_version"),)

    @property
    def ref(self) -> str:
        """``name@version``: how the CLI, the API and manifests name a model."""
        return f"{self.name}@{self.version}"


class Deployment(Base):
    """One model sent to a set of edges, by hand, by the pipeline or by a rollout wave."""

    __tablename__ = "deployments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id", ondelete="CASCADE"))
    rollout_id: Mapped[str | None] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default="pending")
    created_at: Mapped[float] = mapped_column(Float, default=_now)
    targets: Mapped[list[DeploymentTarget]] = relationship(back_populates="deployment", cascade="all")


class DeploymentTarget(Base):
    """One edge of a deployment: the desired revision it was sent and how far the edge got with it."""

    __tablename__ = "deployment_targets"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    deployment_id: Mapped[int] = mapped_column(ForeignKey("deployments.id", ondelete="CASCADE"))
    edge_id: Mapped[str] = mapped_column(String(64))
    revision: Mapped[int] = mapped_column(Integer)
    stage: Mapped[str] = mapped_column(String(16), default="published")
    ok: Mapped[bool | None] = mapped_column(Boolean)
    reason: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[float] = mapped_column(Float, default=_now)
    deployment: Mapped[Deployment] = relationship(back_populates="targets")

    __table_args__ = (UniqueConstraint("edge_id", "revision", name="uq_deployment_targets_edge_revision"),)


class DesiredRevision(Base):
    """The last desired-state revision published to each edge (revisions are monotonic per edge)."""

    __tablename__ = "desired_revisions"

    edge_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    revision: Mapped[int] = mapped_column(Integer)
    model_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id", ondelete="SET NULL"))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    updated_at: Mapped[float] = mapped_column(Float, default=_now)


class CommandRecord(Base):
    """A command sent to a device: sender, expiry and, once it came, the device's ack."""

    __tablename__ = "commands"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    command_id: Mapped[str] = mapped_column(String(64), unique=True)
    device_id: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(32))
    args: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    sender: Mapped[str] = mapped_column(String(128), default="unknown")
    issued_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float] = mapped_column(Float)
    ack_status: Mapped[str | None] = mapped_column(String(16))
    ack_error: Mapped[str | None] = mapped_column(Text)
    ack_result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    acked_at: Mapped[float | None] = mapped_column(Float)

    __table_args__ = (Index("ix_commands_device_id_issued_at", "device_id", "issued_at"),)


class Decision(Base):
    """A local decision an edge took on a device's window: the rule, the class and its probability."""

    __tablename__ = "decisions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    decision_id: Mapped[str] = mapped_column(String(64), unique=True)
    edge_id: Mapped[str] = mapped_column(String(64))
    device_id: Mapped[str] = mapped_column(String(64))
    rule: Mapped[str] = mapped_column(String(128))
    class_name: Mapped[str] = mapped_column(String(64))
    probability: Mapped[float] = mapped_column(Float)
    severity: Mapped[str] = mapped_column(String(16))
    model_version: Mapped[str | None] = mapped_column(String(64))
    ts: Mapped[float] = mapped_column(Float)

    __table_args__ = (
        Index("ix_decisions_device_id_ts", "device_id", "ts"),
        Index("ix_decisions_ts", "ts"),
    )


class EdgeMetricsRecord(Base):
    """One edge metrics report: what the gates and triggers query as columns, the whole report in
    ``data``."""

    __tablename__ = "edge_metrics"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    edge_id: Mapped[str] = mapped_column(String(64))
    ts: Mapped[float] = mapped_column(Float)
    model_version: Mapped[str | None] = mapped_column(String(64))
    windows_total: Mapped[int] = mapped_column(BigInteger)
    confidence_mean: Mapped[float | None] = mapped_column(Float)
    labelled_windows: Mapped[int] = mapped_column(BigInteger, default=0)
    labelled_correct: Mapped[int] = mapped_column(BigInteger, default=0)
    data: Mapped[dict[str, Any]] = mapped_column(JSON)

    __table_args__ = (
        UniqueConstraint("edge_id", "ts", name="uq_edge_metrics_edge_ts"),
        Index("ix_edge_metrics_ts", "ts"),
    )


class DeadLetterRecord(Base):
    """A message that could not be processed, kept (truncated) with its reason for inspection."""

    __tablename__ = "dead_letters"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source: Mapped[str] = mapped_column(String(64), doc="edge id, or 'ingest' for what the cloud rejected")
    topic: Mapped[str] = mapped_column(String(512))
    reason: Mapped[str] = mapped_column(Text)
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    payload_size: Mapped[int] = mapped_column(Integer)
    ts: Mapped[float] = mapped_column(Float, default=_now)

    __table_args__ = (
        Index("ix_dead_letters_source_ts", "source", "ts"),
        Index("ix_dead_letters_ts", "ts"),
    )


class ProcessedMessage(Base):
    """Ids of uplink messages already stored: the ingest's dedup set."""

    __tablename__ = "processed_messages"

    message_key: Mapped[str] = mapped_column(String(160), primary_key=True)
    ts: Mapped[float] = mapped_column(Float, default=_now)


class PipelineRun(Base):
    """One run of the learning pipeline for a model name: its config, state, error and recorded steps."""

    __tablename__ = "pipeline_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_name: Mapped[str] = mapped_column(String(64))
    dataset_id: Mapped[int | None] = mapped_column(ForeignKey("datasets.id", ondelete="SET NULL"))
    trigger_id: Mapped[int | None] = mapped_column(ForeignKey("triggers.id", ondelete="SET NULL"))
    config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    state: Mapped[str] = mapped_column(String(16), default="pending")
    error: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[float] = mapped_column(Float, default=_now)
    finished_at: Mapped[float | None] = mapped_column(Float)
    steps: Mapped[list[LineageEvent]] = relationship(order_by="LineageEvent.id", cascade="all")


class LineageEvent(Base):
    """One pipeline step's record: what went in, what came out."""

    __tablename__ = "lineage_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("pipeline_runs.id", ondelete="CASCADE"))
    step: Mapped[str] = mapped_column(String(32))
    model_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id", ondelete="SET NULL"))
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    ts: Mapped[float] = mapped_column(Float, default=_now)

    __table_args__ = (UniqueConstraint("run_id", "step", name="uq_lineage_events_run_step"),)


class Trigger(Base):
    """A retraining trigger that fired: its kind, the reason, and the run it started."""

    __tablename__ = "triggers"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(
        String(32), doc="periodic, drift_accuracy, drift_confidence, new_samples"
    )
    reason: Mapped[str] = mapped_column(Text)
    model_name: Mapped[str] = mapped_column(String(64))
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    run_id: Mapped[int | None] = mapped_column(Integer)
    ts: Mapped[float] = mapped_column(Float, default=_now)

    __table_args__ = (Index("ix_triggers_ts", "ts"),)


class AuditLog(Base):
    """One audited action of an operator or the engine: who did what to what, with details."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(256))
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    ts: Mapped[float] = mapped_column(Float, default=_now)


# -- fleet operations (migration 0002) -----------------------------------------------------------


class Rollout(Base):
    """A staged deployment of one model: canary cohort then waves, each gated on health and quality.

    The engine (``cloud.fleet.rollouts``) keeps all of its state here so a restarted cloud resumes it."""

    __tablename__ = "rollouts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    rollout_id: Mapped[str] = mapped_column(String(64), unique=True)
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id", ondelete="CASCADE"))
    state: Mapped[str] = mapped_column(
        String(16), default="running", doc="running/paused/halted/aborted/completed"
    )
    current_wave: Mapped[int] = mapped_column(Integer, default=0)
    waves: Mapped[int] = mapped_column(Integer, doc="number of waves including the canary (wave 0)")
    gates: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    wave_started_at: Mapped[float | None] = mapped_column(Float)
    gate_results: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict, doc="wave -> gate -> result")
    reason: Mapped[str | None] = mapped_column(Text)
    created_by: Mapped[str] = mapped_column(String(128), default="unknown")
    created_at: Mapped[float] = mapped_column(Float, default=_now)
    updated_at: Mapped[float] = mapped_column(Float, default=_now)
    lease_until: Mapped[float | None] = mapped_column(Float, doc="one tick at a time works on a rollout")

    model: Mapped[ModelVersion] = relationship()
    targets: Mapped[list[RolloutTarget]] = relationship(
        back_populates="rollout", cascade="all", order_by="RolloutTarget.id"
    )


class RolloutTarget(Base):
    """One edge of a rollout: its wave, the revision sent, the model it ran before (rollback target)."""

    __tablename__ = "rollout_targets"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    rollout_pk: Mapped[int] = mapped_column(ForeignKey("rollouts.id", ondelete="CASCADE"))
    edge_id: Mapped[str] = mapped_column(String(64))
    wave: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(
        String(16),
        default="pending",
        doc="pending/deploying/serving/failed/rolling_back/rolled_back/deferred",
    )
    revision: Mapped[int | None] = mapped_column(Integer)
    previous_model_id: Mapped[int | None] = mapped_column(
        ForeignKey("model_versions.id", ondelete="SET NULL")
    )
    previous_version: Mapped[str | None] = mapped_column(String(64))
    published_at: Mapped[float | None] = mapped_column(Float)
    serving_at: Mapped[float | None] = mapped_column(Float)
    reason: Mapped[str | None] = mapped_column(Text)

    rollout: Mapped[Rollout] = relationship(back_populates="targets")

    __table_args__ = (UniqueConstraint("rollout_pk", "edge_id", name="uq_rollout_targets_rollout_edge"),)


class ApiToken(Base):
    """A bearer token of the admin API, stored as its sha256 only (the secret is shown once)."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(
        String(16), default="admin", doc="viewer, operator, admin (each may what the one before may) or edge"
    )
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16), doc="first characters, to recognise a token in a list")
    created_at: Mapped[float] = mapped_column(Float, default=_now)
    last_used_at: Mapped[float | None] = mapped_column(Float)
    revoked_at: Mapped[float | None] = mapped_column(Float)


class ConsoleUser(Base):
    """A person who signs in to the web console with a password (stored as a scrypt hash)."""

    __tablename__ = "console_users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16), doc="viewer, operator or admin")
    password_hash: Mapped[str] = mapped_column(String(256))
    created_at: Mapped[float] = mapped_column(Float, default=_now)
    last_login_at: Mapped[float | None] = mapped_column(Float)
    disabled_at: Mapped[float | None] = mapped_column(Float)


class ConsoleSession(Base):
    """A signed-in browser: the cookie's sha256 (never the cookie), who it is, its role and CSRF token.

    ``principal`` is ``user:NAME``, ``token:NAME`` or ``link:NAME``: each request re-checks that the
    user or token behind it still exists and is not disabled or revoked."""

    __tablename__ = "console_sessions"

    session_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    principal: Mapped[str] = mapped_column(String(160))
    role: Mapped[str] = mapped_column(String(16))
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Float, default=_now)
    expires_at: Mapped[float] = mapped_column(Float)
    last_seen_at: Mapped[float] = mapped_column(Float, default=_now)


class ConsoleSigninLink(Base):
    """A one-time sign-in link (the demo prints one): its secret's sha256, the role it grants, when it
    expires and when it was used (a used link signs nobody in again)."""

    __tablename__ = "console_signin_links"

    link_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[float] = mapped_column(Float, default=_now)
    expires_at: Mapped[float] = mapped_column(Float)
    used_at: Mapped[float | None] = mapped_column(Float)


class Identity(Base):
    """Who may connect to the broker (migration 0006): a device, an edge, a cloud service or an
    operator, enrolled by ``fleet enroll`` or a claim token and ended by ``fleet revoke``.

    Only the secret's hash is kept, in mosquitto's ``$7$`` format (shared/identity.py), which the broker's
    password file takes as is. ``label_trusted``: a device whose labels may train models."""

    __tablename__ = "identities"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    identity_id: Mapped[str] = mapped_column(String(64), unique=True)
    kind: Mapped[str] = mapped_column(String(16), doc="device, edge, service or operator")
    role: Mapped[str | None] = mapped_column(String(16), doc="operators: viewer or admin")
    secret_hash: Mapped[str | None] = mapped_column(String(256))
    status: Mapped[str] = mapped_column(String(16), default="active", doc="active or revoked")
    label_trusted: Mapped[bool] = mapped_column(Boolean, default=False)
    enrolled_via: Mapped[str] = mapped_column(String(64), default="cli", doc="cli or claim:TOKEN_ID")
    created_at: Mapped[float] = mapped_column(Float, default=_now)
    updated_at: Mapped[float] = mapped_column(Float, default=_now)
    revoked_at: Mapped[float | None] = mapped_column(Float)

    __table_args__ = (Index("ix_identities_kind_status", "kind", "status"),)


class ClaimToken(Base):
    """A one-time claim token (``fleet enroll-token create``): a device exchanges it on first start for
    its own identity. ``secret_hash`` is a ``$7$`` hash: the broker lets the token log in (as
    ``claim-TOKEN_ID``) only to ask for its identity, until it is used or expires."""

    __tablename__ = "claim_tokens"

    token_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), default="device")
    secret_hash: Mapped[str] = mapped_column(String(256))
    created_at: Mapped[float] = mapped_column(Float, default=_now)
    expires_at: Mapped[float] = mapped_column(Float)
    used_at: Mapped[float | None] = mapped_column(Float)
    used_by: Mapped[str | None] = mapped_column(String(64))
    created_by: Mapped[str] = mapped_column(String(128), default="cli")


class RegistryCounter(Base):
    """Monotonic counters others poll to see that something changed, e.g. ``auth``: bumped by every
    change to identities or claim tokens, so ``broker run`` re-reads them only then."""

    __tablename__ = "registry_counters"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger, default=0)


class SelectionSearch(Base):
    """A model-selection search (migration 0008): candidates (``TrainingConfig`` dicts) scored by
    k-fold cross-validation on the train part of ``dataset`` (a spec the workers load: ``aeon:NAME``,
    an ``.npz`` path, a built-in). ``deadline_at``: trials not started by then are skipped."""

    __tablename__ = "selection_searches"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    dataset: Mapped[str] = mapped_column(String(1024), doc="dataset spec the trial tasks load")
    seed: Mapped[int] = mapped_column(Integer, default=0)
    folds: Mapped[int] = mapped_column(Integer)
    candidates: Mapped[list[Any]] = mapped_column(JSON, doc="[{name, config}] in dispatch order")
    options: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    budget_s: Mapped[float | None] = mapped_column(Float)
    deadline_at: Mapped[float | None] = mapped_column(Float)
    state: Mapped[str] = mapped_column(String(16), default="pending", doc="pending/running/done/failed")
    best_candidate: Mapped[int | None] = mapped_column(Integer)
    best_score: Mapped[float | None] = mapped_column(Float)
    result: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float, default=_now)
    finished_at: Mapped[float | None] = mapped_column(Float)


class SelectionTrial(Base):
    """One candidate trained on one fold of a search (a Celery task, ``edgefleet.learning.cv_trial``):
    its status (pending/running/done/failed/skipped), validation scores, cost and the worker that ran
    it. ``attempts`` fences claims: only the latest claimer may record the result."""

    __tablename__ = "selection_trials"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    search_id: Mapped[int] = mapped_column(ForeignKey("selection_searches.id", ondelete="CASCADE"))
    candidate: Mapped[int] = mapped_column(Integer, doc="index into the search's candidates")
    fold: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    val_accuracy: Mapped[float | None] = mapped_column(Float)
    val_loss: Mapped[float | None] = mapped_column(Float)
    epochs_run: Mapped[int | None] = mapped_column(Integer)
    params: Mapped[int | None] = mapped_column(Integer, doc="parameter count of the trained model")
    seconds: Mapped[float | None] = mapped_column(Float)
    worker: Mapped[str | None] = mapped_column(String(255), doc="hostname of the worker that ran it")
    pid: Mapped[int | None] = mapped_column(Integer)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float, default=_now)
    started_at: Mapped[float | None] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float)

    __table_args__ = (
        UniqueConstraint("search_id", "candidate", "fold", name="uq_selection_trials_search_candidate_fold"),
        Index("ix_selection_trials_search_status", "search_id", "status"),
    )
