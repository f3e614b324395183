"""Keyword-only registry functions, shared by the Celery tasks, the ingest, the CLI and the future API.

Each takes a ``Session`` and leaves committing to the caller (``session_scope`` commits once)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from sqlalchemy import ColumnElement, and_, func, or_, select
from sqlalchemy.orm import Session

from cloud.errors import NotFoundError
from cloud.registry.models import (
    AuditLog,
    CommandRecord,
    Dataset,
    DeadLetterRecord,
    Decision,
    Deployment,
    DeploymentTarget,
    DesiredRevision,
    Device,
    EdgeMetricsRecord,
    EdgeNode,
    Group,
    Identity,
    LineageEvent,
    ModelVersion,
    PipelineRun,
    ProcessedMessage,
    Sample,
    Trigger,
)

# -- datasets ------------------------------------------------------------------------------------


def get_or_create_dataset(
    session: Session,
    *,
    name: str,
    source: str,
    sha256: str,
    n_samples: int,
    input_shape: Sequence[int],
    class_names: Sequence[str],
    params: dict[str, Any] | None = None,
    path: str | None = None,
) -> Dataset:
    """The dataset with this name and content hash; created the first time (idempotent)."""
    found = session.scalar(select(Dataset).where(Dataset.name == name, Dataset.sha256 == sha256))
    if found is not None:
        return found
    dataset = Dataset(
        name=name,
        source=source,
        sha256=sha256,
        n_samples=n_samples,
        input_shape=list(input_shape),
        class_names=list(class_names),
        params=params or {},
        path=path,
    )
    session.add(dataset)
    session.flush()
    return dataset


def get_dataset(session: Session, *, dataset_id: int) -> Dataset:
    """The dataset with id ``dataset_id`` (``NotFoundError`` if there is none)."""
    dataset = session.get(Dataset, dataset_id)
    if dataset is None:
        raise NotFoundError(f"dataset {dataset_id} does not exist")
    return dataset


# -- pipeline runs and lineage ---------------------------------------------------------------------


def create_run(
    session: Session,
    *,
    model_name: str,
    config: dict[str, Any],
    dataset_id: int | None = None,
    trigger_id: int | None = None,
) -> PipelineRun:
    """Record a pipeline run; the trigger that fired it, if any, is linked to it."""
    run = PipelineRun(model_name=model_name, config=config, dataset_id=dataset_id, trigger_id=trigger_id)
    session.add(run)
    session.flush()
    if trigger_id is not None:
        trigger = session.get(Trigger, trigger_id)
        if trigger is not None:
            trigger.run_id = run.id
    return run


def run_of(session: Session, *, model: ModelVersion) -> PipelineRun | None:
    """The pipeline run that made ``model``, if it was made by one."""
    return session.get(PipelineRun, model.run_id) if model.run_id is not None else None


def latest_run(session: Session) -> PipelineRun | None:
    """The newest pipeline run of any model."""
    return session.scalar(select(PipelineRun).order_by(PipelineRun.id.desc()).limit(1))


def run_in_progress(session: Session, *, model_name: str) -> int | None:
    """The id of a pending or running pipeline run of ``model_name``, if any."""
    return session.scalar(
        select(PipelineRun.id).where(
            PipelineRun.model_name == model_name, PipelineRun.state.in_(("pending", "running"))
        )
    )


def get_run(session: Session, *, run_id: int) -> PipelineRun:
    """The pipeline run with id ``run_id`` (``NotFoundError`` if there is none)."""
    run = session.get(PipelineRun, run_id)
    if run is None:
        raise NotFoundError(f"pipeline run {run_id} does not exist")
    return run


def record_step(
    session: Session,
    *,
    run_id: int,
    step: str,
    detail: dict[str, Any],
    model_version_id: int | None = None,
) -> LineageEvent:
    """Record one step of a run; recording the same step again replaces it (tasks are idempotent)."""
    event = session.scalar(
        select(LineageEvent).where(LineageEvent.run_id == run_id, LineageEvent.step == step)
    )
    if event is None:
        event = LineageEvent(run_id=run_id, step=step)
        session.add(event)
    event.detail = detail
    event.model_version_id = model_version_id
    event.ts = time.time()
    session.flush()
    return event


def finish_run(session: Session, *, run_id: int, state: str, error: str | None = None) -> PipelineRun:
    """Close a run with its final state (published, rejected, failed) and the error, if any."""
    run = get_run(session, run_id=run_id)
    run.state = state
    run.error = error
    run.finished_at = time.time()
    return run


def list_runs(session: Session, *, limit: int = 50) -> list[PipelineRun]:
    """The newest pipeline runs, newest first."""
    return list(session.scalars(select(PipelineRun).order_by(PipelineRun.id.desc()).limit(limit)))


# -- model versions ------------------------------------------------------------------------------


def create_model_version(
    session: Session,
    *,
    name: str,
    version: str,
    variant: str,
    dataset_id: int | None = None,
    parent_id: int | None = None,
    run_id: int | None = None,
    training_config: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    keras_path: str | None = None,
    artifact_path: str | None = None,
    quantization: str | None = None,
) -> ModelVersion:
    """Create ``name@version``, or update the existing one (a retried task rewrites its own output)."""
    model = session.scalar(
        select(ModelVersion).where(ModelVersion.name == name, ModelVersion.version == version)
    )
    if model is None:
        model = ModelVersion(name=name, version=version)
        session.add(model)
    model.variant = variant
    model.dataset_id = dataset_id
    model.parent_id = parent_id
    model.run_id = run_id
    model.training_config = training_config or {}
    model.metrics = metrics or {}
    model.keras_path = keras_path
    model.artifact_path = artifact_path
    model.quantization = quantization
    session.flush()
    return model


def get_model_version(
    session: Session, *, model_id: int | None = None, ref: str | None = None
) -> ModelVersion:
    """By id, or by ``name@version`` (``name@latest`` / ``name@production`` resolve too)."""
    if model_id is not None:
        model = session.get(ModelVersion, model_id)
        if model is None:
            raise NotFoundError(f"model version id {model_id} does not exist")
        return model
    if ref is None:
        raise NotFoundError("give a model id or a NAME@VERSION reference")
    name, sep, version = ref.partition("@")
    if not sep or not name or not version:
        raise NotFoundError(f"model reference {ref!r} must be NAME@VERSION")
    query = select(ModelVersion).where(ModelVersion.name == name)
    if version == "production":
        query = query.where(ModelVersion.status == "production")
    elif version != "latest":
        query = query.where(ModelVersion.version == version)
    found = session.scalar(query.order_by(ModelVersion.id.desc()).limit(1))
    if found is None:
        raise NotFoundError(f"model {ref} does not exist")
    return found


def list_model_versions(
    session: Session, *, name: str | None = None, status: str | None = None, limit: int = 100
) -> list[ModelVersion]:
    """Model versions, newest first, optionally of one name and/or one status."""
    query = select(ModelVersion)
    if name is not None:
        query = query.where(ModelVersion.name == name)
    if status is not None:
        query = query.where(ModelVersion.status == status)
    return list(session.scalars(query.order_by(ModelVersion.id.desc()).limit(limit)))


def production_model(session: Session, *, name: str) -> ModelVersion | None:
    """The production version of ``name``, or None before the first promotion."""
    return session.scalar(
        select(ModelVersion)
        .where(ModelVersion.name == name, ModelVersion.status == "production")
        .order_by(ModelVersion.id.desc())
        .limit(1)
    )


def set_gate_result(session: Session, *, model_id: int, passed: bool, reason: str) -> ModelVersion:
    """Record the promotion gate's verdict on a model; one that failed it becomes 'rejected'."""
    model = get_model_version(session, model_id=model_id)
    model.gate_passed = passed
    model.gate_reason = reason
    if not passed:
        model.status = "rejected"
    return model


def promote(session: Session, *, model_id: int, actor: str = "pipeline") -> ModelVersion:
    """Make ``model_id`` the production version of its name; the previous one becomes 'retired'."""
    model = get_model_version(session, model_id=model_id)
    for old in session.scalars(
        select(ModelVersion).where(
            ModelVersion.name == model.name, ModelVersion.status == "production", ModelVersion.id != model.id
        )
    ):
        old.status = "retired"
    model.status = "production"
    audit(session, actor=actor, action="promote", target=model.ref, detail={"model_id": model.id})
    return model


def withdraw(
    session: Session, *, model_id: int, reason: str, actor: str = "rollout-engine"
) -> ModelVersion | None:
    """A production model whose rollout was halted or aborted stops being production: it becomes
    'withdrawn' and the version it replaced is production again, so the next pipeline run trains from
    and is gated against what the fleet actually serves. Returns the restored version (None when the
    model was not production or nothing preceded it)."""
    model = get_model_version(session, model_id=model_id)
    if model.status != "production":
        return None
    model.status = "withdrawn"
    previous = session.scalar(
        select(ModelVersion)
        .where(ModelVersion.name == model.name, ModelVersion.status == "retired", ModelVersion.id < model.id)
        .order_by(ModelVersion.id.desc())
        .limit(1)
    )
    if previous is not None:
        previous.status = "production"
    audit(
        session,
        actor=actor,
        action="withdraw",
        target=model.ref,
        detail={"reason": reason, "restored": previous.ref if previous is not None else None},
    )
    return previous


def next_version(session: Session, *, name: str) -> str:
    """The next free ``vN`` for ``name`` (variants append a suffix: ``v3-int8``)."""
    count = session.scalar(
        select(func.count()).select_from(PipelineRun).where(PipelineRun.model_name == name)
    )
    return f"v{int(count or 0)}"


# -- triggers ------------------------------------------------------------------------------------


def record_trigger(
    session: Session, *, kind: str, reason: str, model_name: str, detail: dict[str, Any] | None = None
) -> Trigger:
    """Record a retraining trigger that fired, with its reason (the run is linked when it starts)."""
    trigger = Trigger(kind=kind, reason=reason, model_name=model_name, detail=detail or {})
    session.add(trigger)
    session.flush()
    return trigger


def last_trigger(session: Session, *, model_name: str, kind: str | None = None) -> Trigger | None:
    """The newest trigger of ``model_name`` (of one ``kind`` if given), or None."""
    query = select(Trigger).where(Trigger.model_name == model_name)
    if kind is not None:
        query = query.where(Trigger.kind == kind)
    return session.scalar(query.order_by(Trigger.id.desc()).limit(1))


def all_triggers(session: Session) -> list[Trigger]:
    """Every trigger that fired, oldest first."""
    return list(session.scalars(select(Trigger).order_by(Trigger.id)))


def list_triggers(session: Session, *, limit: int = 50) -> list[Trigger]:
    """The newest triggers, newest first."""
    return list(session.scalars(select(Trigger).order_by(Trigger.id.desc()).limit(limit)))


# -- uplink: samples, metrics, status, decisions, dead letters -------------------------------------


def already_processed(session: Session, *, message_key: str) -> bool:
    """Whether the uplink message with this key was stored already (the ingest's dedup check)."""
    return session.get(ProcessedMessage, message_key) is not None


def mark_processed(session: Session, *, message_key: str) -> None:
    """Remember that the uplink message with this key is stored, in the same transaction."""
    session.add(ProcessedMessage(message_key=message_key))


# Who may label data that trains models. A device's label is evaluation metadata unless the device is
# a trusted labeller (``identities.set_label_trust``): see ``training_samples_clause``.
TRAINING_LABEL_SOURCES = ("teacher", "human", "operator")


def add_sample(session: Session, **fields: Any) -> Sample:
    """Store one uplinked sample; ``fields`` are ``Sample`` columns. ``label_trusted`` defaults to
    whether ``label_source`` is a teacher or an operator: a device label trains only when the caller
    (the ingest) found its device a trusted labeller and says so."""
    fields.setdefault(
        "label_trusted",
        fields.get("label") is not None and fields.get("label_source") in TRAINING_LABEL_SOURCES,
    )
    sample = Sample(**fields)
    session.add(sample)
    return sample


def training_samples_clause() -> ColumnElement[bool]:
    """The samples whose label may train models: labelled by a teacher or an operator, or by a device
    that was a trusted labeller when the sample arrived (``label_trusted``) and still is one (an active
    device identity with ``label_trusted``): untrusting or revoking a device takes its labels out of
    every later training set and retrain count, and trusting one does not bring in what it sent before."""
    trusted_devices = select(Identity.identity_id).where(
        Identity.kind == "device", Identity.status == "active", Identity.label_trusted.is_(True)
    )
    return and_(
        Sample.label.is_not(None),
        Sample.label_trusted.is_(True),
        or_(
            Sample.label_source.in_(TRAINING_LABEL_SOURCES),
            and_(Sample.label_source == "device", Sample.device_id.in_(trusted_devices)),
        ),
    )


def count_samples(
    session: Session, *, labelled: bool | None = None, since: float | None = None, training: bool = False
) -> int:
    """How many samples, all or only (un)labelled, optionally received after ``since``; ``training``:
    only those whose label may train models (``training_samples_clause``)."""
    query = select(func.count()).select_from(Sample)
    if labelled is True:
        query = query.where(Sample.label_source != "none")
    elif labelled is False:
        query = query.where(Sample.label_source == "none")
    if training:
        query = query.where(training_samples_clause())
    if since is not None:
        query = query.where(Sample.received_at > since)
    return int(session.scalar(query) or 0)


def list_samples(
    session: Session,
    *,
    labelled: bool | None = None,
    limit: int = 100,
    with_window: bool | None = None,
    training: bool = False,
) -> list[Sample]:
    """Samples in arrival order, all or only (un)labelled, optionally only those with a window;
    ``training``: only those whose label may train models (``training_samples_clause``)."""
    query = select(Sample)
    if labelled is True:
        query = query.where(Sample.label_source != "none")
    elif labelled is False:
        query = query.where(Sample.label_source == "none")
    if training:
        query = query.where(training_samples_clause())
    if with_window:
        query = query.where(Sample.window.is_not(None))
    return list(session.scalars(query.order_by(Sample.id).limit(limit)))


def set_label(
    session: Session,
    *,
    sample_id: str,
    label: str,
    source: str = "human",
    confidence: float | None = None,
    trusted: bool | None = None,
) -> Sample:
    """Label a sample and say who labelled it (human, teacher, device). ``trusted`` (whether the label
    may train) defaults to whether ``source`` is a teacher or an operator."""
    sample = session.scalar(select(Sample).where(Sample.sample_id == sample_id))
    if sample is None:
        raise NotFoundError(f"sample {sample_id} does not exist")
    sample.label = label
    sample.label_source = source
    sample.label_confidence = confidence
    sample.label_trusted = source in TRAINING_LABEL_SOURCES if trusted is None else trusted
    return sample


def upsert_edge(session: Session, *, edge_id: str, **fields: Any) -> EdgeNode:
    """Create or update an edge with ``fields``; stamps ``last_seen`` (an edge is heard from)."""
    edge = session.scalar(select(EdgeNode).where(EdgeNode.edge_id == edge_id))
    if edge is None:
        edge = EdgeNode(edge_id=edge_id, tags=[], reported={})
        session.add(edge)
    for key, value in fields.items():
        setattr(edge, key, value)
    edge.last_seen = time.time()
    session.flush()
    return edge


def upsert_device(session: Session, *, device_id: str, **fields: Any) -> Device:
    """Create or update a device with ``fields``; ``last_seen`` is left to the status it reports."""
    device = session.scalar(select(Device).where(Device.device_id == device_id))
    if device is None:
        device = Device(device_id=device_id, tags=[], info={})
        session.add(device)
    for key, value in fields.items():
        setattr(device, key, value)
    # last_seen is not touched: registering a device is not hearing from it (edges report that).
    session.flush()
    return device


def record_device_status(session: Session, *, status: Any) -> bool:
    """A device's birth / LWT / shutdown status (``shared.schemas.DeviceStatus``): its state and what
    it reported. An older status than the one recorded (a retained message replayed on reconnect)
    changes nothing, except a last will: its ``ts`` is when the device connected (the will is
    registered then), not when the broker found it gone, so it is always newer news than the birth
    of the same connection. Returns whether it was recorded."""
    device = session.scalar(select(Device).where(Device.device_id == status.device_id))
    info = dict(device.info or {}) if device is not None else {}
    lwt = status.state.value == "offline" and status.reason == "lwt"
    if float(info.get("status_ts", 0.0)) > status.ts and not lwt:
        return False
    info["status_ts"] = max(status.ts, float(info.get("status_ts", 0.0)))
    info["status_reason"] = status.reason
    for key in ("agent_version", "sensor", "rate_hz", "window", "hop", "channels"):
        value = getattr(status, key)
        if value is not None:
            info[key] = list(value) if isinstance(value, tuple) else value
    if status.state.value == "online":  # what it runs, and which desired config it applied
        for key in ("config", "config_revision", "config_error"):
            info[key] = getattr(status, key)
    device = upsert_device(session, device_id=status.device_id, state=status.state.value, info=info)
    # When the device said so (birth, shutdown); for a last will, when the cloud heard of it.
    seen = time.time() if lwt else status.ts
    device.last_seen = max(seen, device.last_seen or 0.0)
    return True


def list_edges(session: Session) -> list[EdgeNode]:
    """Every edge known to the registry, by id."""
    return list(session.scalars(select(EdgeNode).order_by(EdgeNode.edge_id)))


def add_metrics(session: Session, **fields: Any) -> EdgeMetricsRecord:
    """Store one edge metrics report; ``fields`` are ``EdgeMetricsRecord`` columns."""
    record = EdgeMetricsRecord(**fields)
    session.add(record)
    return record


def last_metrics_before(session: Session, *, edge_id: str, ts: float) -> EdgeMetricsRecord | None:
    """An edge's last metrics report at or before ``ts``."""
    return session.scalars(
        select(EdgeMetricsRecord)
        .where(EdgeMetricsRecord.edge_id == edge_id, EdgeMetricsRecord.ts <= ts)
        .order_by(EdgeMetricsRecord.ts.desc())
        .limit(1)
    ).first()


def recent_metrics(session: Session, *, since: float) -> list[EdgeMetricsRecord]:
    """Every edge metrics report after ``since``, oldest first."""
    return list(
        session.scalars(
            select(EdgeMetricsRecord).where(EdgeMetricsRecord.ts > since).order_by(EdgeMetricsRecord.ts)
        )
    )


def add_decision(session: Session, **fields: Any) -> Decision:
    """Store one local decision an edge took; ``fields`` are ``Decision`` columns."""
    record = Decision(**fields)
    session.add(record)
    return record


def add_dead_letter(
    session: Session, *, source: str, topic: str, reason: str, payload: bytes, payload_size: int | None = None
) -> DeadLetterRecord:
    """Store a message nobody could process, with its reason; at most 4 KiB of its payload are kept."""
    record = DeadLetterRecord(
        source=source,
        topic=topic,
        reason=reason,
        payload=payload[:4096],
        payload_size=len(payload) if payload_size is None else payload_size,
    )
    session.add(record)
    return record


def count_dead_letters(session: Session, *, source: str | None = None) -> int:
    """How many dead letters, all or from one ``source`` (an edge id, or 'ingest')."""
    query = select(func.count()).select_from(DeadLetterRecord)
    if source is not None:
        query = query.where(DeadLetterRecord.source == source)
    return int(session.scalar(query) or 0)


# -- groups, tags, commands --------------------------------------------------------------------------


def create_group(session: Session, *, name: str, description: str = "") -> Group:
    """The group called ``name``, created if missing (idempotent)."""
    group = session.scalar(select(Group).where(Group.name == name))
    if group is None:
        group = Group(name=name, description=description)
        session.add(group)
        session.flush()
    return group


def assign(
    session: Session,
    *,
    edge_id: str | None = None,
    device_id: str | None = None,
    group: str | None = None,
    tags: Sequence[str] | None = None,
) -> EdgeNode | Device:
    """Put an edge or a device in ``group`` and/or replace its ``tags``."""
    if (edge_id is None) == (device_id is None):
        raise ValueError("give exactly one of edge_id and device_id")
    fields: dict[str, Any] = {}
    if group is not None:
        fields["group_id"] = create_group(session, name=group).id
    if tags is not None:
        fields["tags"] = sorted(set(tags))
    if edge_id is not None:
        return upsert_edge(session, edge_id=edge_id, **fields)
    assert device_id is not None
    return upsert_device(session, device_id=device_id, **fields)


def record_command(session: Session, *, command: Any) -> CommandRecord:
    """Store a ``shared.schemas.Command`` once (by ``command_id``)."""
    found = session.scalar(select(CommandRecord).where(CommandRecord.command_id == command.command_id))
    if found is not None:
        return found
    record = CommandRecord(
        command_id=command.command_id,
        device_id=command.device_id,
        name=command.name.value,
        args=dict(command.args),
        sender=command.sender,
        issued_at=command.issued_at,
        expires_at=command.expires_at,
    )
    session.add(record)
    session.flush()
    return record


def record_ack(session: Session, *, ack: Any) -> CommandRecord | None:
    """Attach a ``shared.schemas.CommandAck`` to its command; None when the command is unknown."""
    record = session.scalar(select(CommandRecord).where(CommandRecord.command_id == ack.command_id))
    if record is None:
        return None
    record.ack_status = ack.status.value
    record.ack_error = ack.error
    record.ack_result = dict(ack.result)
    record.acked_at = ack.ts
    return record


# -- deployments ---------------------------------------------------------------------------------


def next_desired_revision(session: Session, *, edge_id: str) -> int:
    """The revision the next desired state of ``edge_id`` gets (monotonic per edge, from 1)."""
    current = session.get(DesiredRevision, edge_id)
    return 1 if current is None else current.revision + 1


def record_desired(
    session: Session, *, edge_id: str, revision: int, model_version_id: int | None, payload: dict[str, Any]
) -> DesiredRevision:
    """Remember the desired state last sent to an edge: its revision, model and message."""
    current = session.get(DesiredRevision, edge_id)
    if current is None:
        current = DesiredRevision(edge_id=edge_id, revision=revision, payload=payload)
        session.add(current)
    current.revision = revision
    current.model_version_id = model_version_id
    current.payload = payload
    current.updated_at = time.time()
    session.flush()
    return current


def create_deployment(
    session: Session, *, model_version_id: int, targets: dict[str, int], rollout_id: str | None = None
) -> Deployment:
    """A deployment of one model to edges; ``targets`` maps edge id -> desired revision."""
    deployment = Deployment(model_version_id=model_version_id, rollout_id=rollout_id, state="published")
    deployment.targets = [DeploymentTarget(edge_id=edge, revision=rev) for edge, rev in targets.items()]
    session.add(deployment)
    session.flush()
    return deployment


def update_deployment_target(
    session: Session, *, edge_id: str, revision: int, stage: str, ok: bool, reason: str | None
) -> DeploymentTarget | None:
    """Record how far an edge got deploying one revision (stage, ok, reason); None when
    that revision was not part of a deployment."""
    target = session.scalar(
        select(DeploymentTarget).where(
            DeploymentTarget.edge_id == edge_id, DeploymentTarget.revision == revision
        )
    )
    if target is None:
        return None
    target.stage = stage
    target.ok = ok
    target.reason = reason
    target.updated_at = time.time()
    return target


# -- audit ---------------------------------------------------------------------------------------


def audit(
    session: Session, *, actor: str, action: str, target: str, detail: dict[str, Any] | None = None
) -> None:
    """Add an entry to the audit log: who (``actor``) did what (``action``) to what (``target``)."""
    session.add(AuditLog(actor=actor, action=action, target=target, detail=detail or {}))


def list_audit(session: Session, *, limit: int = 100) -> list[AuditLog]:
    """The newest audit log entries, newest first."""
    return list(session.scalars(select(AuditLog).order_by(AuditLog.id.desc()).limit(limit)))
