"""Registry functions of fleet operations: rollouts and their targets, the fleet view (desired vs
reported), edge metrics and samples for the gates, API tokens. Keyword-only; the caller commits."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from cloud.errors import NotFoundError
from cloud.registry.models import (
    ApiToken,
    AuditLog,
    CommandRecord,
    DeploymentTarget,
    DesiredRevision,
    Device,
    DeviceDesiredConfig,
    EdgeMetricsRecord,
    EdgeNode,
    Group,
    ModelVersion,
    Rollout,
    RolloutTarget,
    Sample,
)

ACTIVE_TARGET_STATES = ("pending", "deploying", "rolling_back", "deferred")


# -- rollouts ------------------------------------------------------------------------------------


def plan_waves(edge_ids: Sequence[str], *, canary: float, waves: int) -> list[list[str]]:
    """Wave 0 is the canary (``canary`` edges, or a share of them when < 1), then ``waves`` waves."""
    edges = list(dict.fromkeys(edge_ids))
    if not edges:
        raise ValueError("a rollout needs at least one edge")
    if canary <= 0:
        first: list[str] = []
    else:
        count = round(canary * len(edges)) if canary < 1 else int(canary)
        first = edges[: max(1, min(len(edges), count))]
    rest = edges[len(first) :]
    plan = [first] if first else []
    waves = max(1, waves)
    if rest:
        size = -(-len(rest) // waves)
        plan.extend(rest[i : i + size] for i in range(0, len(rest), size))
    return plan


def previous_model(session: Session, *, edge_id: str) -> ModelVersion | None:
    """What the edge runs now as far as the registry knows: its last desired model, else the reported one."""
    desired = session.get(DesiredRevision, edge_id)
    if desired is not None and desired.model_version_id is not None:
        payload = desired.payload or {}
        if payload.get("action", "deploy") == "deploy":
            return session.get(ModelVersion, desired.model_version_id)
    edge = session.scalar(select(EdgeNode).where(EdgeNode.edge_id == edge_id))
    reported = (edge.reported or {}) if edge is not None else {}
    name, version = reported.get("model_name"), reported.get("model_version")
    if name and version:
        return session.scalar(
            select(ModelVersion).where(ModelVersion.name == name, ModelVersion.version == version)
        )
    return None


def create_rollout(
    session: Session,
    *,
    rollout_id: str,
    model: ModelVersion,
    plan: Sequence[Sequence[str]],
    gates: dict[str, float],
    params: dict[str, Any],
    created_by: str,
) -> Rollout:
    """Record a rollout of ``model`` over the planned waves, all targets pending, each with the
    model it runs now (its rollback target)."""
    rollout = Rollout(
        rollout_id=rollout_id,
        model_version_id=model.id,
        state="running",
        current_wave=0,
        waves=len(plan),
        gates=dict(gates),
        params=dict(params),
        gate_results={},
        created_by=created_by,
    )
    for wave, edges in enumerate(plan):
        for edge_id in edges:
            prev = previous_model(session, edge_id=edge_id)
            edge = session.scalar(select(EdgeNode).where(EdgeNode.edge_id == edge_id))
            reported_version = (edge.reported or {}).get("model_version") if edge is not None else None
            rollout.targets.append(
                RolloutTarget(
                    edge_id=edge_id,
                    wave=wave,
                    state="pending",
                    previous_model_id=prev.id if prev is not None else None,
                    previous_version=prev.version if prev is not None else reported_version,
                )
            )
    session.add(rollout)
    session.flush()
    return rollout


def get_rollout(session: Session, *, rollout_id: str) -> Rollout:
    """The rollout with id ``rollout_id`` (``NotFoundError`` if there is none)."""
    rollout = session.scalar(select(Rollout).where(Rollout.rollout_id == rollout_id))
    if rollout is None:
        raise NotFoundError(f"rollout {rollout_id} does not exist")
    return rollout


def list_rollouts(session: Session, *, limit: int = 50) -> list[Rollout]:
    """The newest rollouts, newest first."""
    return list(session.scalars(select(Rollout).order_by(Rollout.id.desc()).limit(limit)))


def current_desired(session: Session, *, edge_id: str) -> DesiredRevision | None:
    """The last desired-state revision recorded for an edge."""
    return session.get(DesiredRevision, edge_id)


def model_by_id(session: Session, *, model_id: int | None) -> ModelVersion | None:
    """A model version by its row id (None for None or a missing row)."""
    return session.get(ModelVersion, model_id) if model_id else None


def rollout_of_model(session: Session, *, model_version_id: int) -> str | None:
    """The id of the first rollout started for a model version, if any."""
    found = session.scalar(
        select(Rollout.rollout_id).where(Rollout.model_version_id == model_version_id).order_by(Rollout.id)
    )
    return str(found) if found is not None else None


def running_rollouts_of(session: Session, *, model_name: str, except_model_version_id: int) -> list[str]:
    """Running rollouts of other versions of ``model_name``."""
    return list(
        session.scalars(
            select(Rollout.rollout_id)
            .join(ModelVersion, ModelVersion.id == Rollout.model_version_id)
            .where(
                ModelVersion.name == model_name,
                Rollout.state == "running",
                Rollout.model_version_id != except_model_version_id,
            )
            .order_by(Rollout.id)
        )
    )


def rollouts_to_tick(session: Session) -> list[str]:
    """Rollouts the engine still has work on: running ones, and any with targets still converging."""
    running = select(Rollout.rollout_id).where(Rollout.state == "running")
    converging = (
        select(Rollout.rollout_id)
        .join(RolloutTarget, RolloutTarget.rollout_pk == Rollout.id)
        .where(RolloutTarget.state.in_(("deploying", "rolling_back", "deferred")))
    )
    return sorted(set(session.scalars(running)) | set(session.scalars(converging)))


def acquire_lease(session: Session, *, rollout_id: str, seconds: float) -> bool:
    """Atomically take the rollout for ``seconds`` (one tick at a time, on SQLite and PostgreSQL)."""
    now = time.time()
    result = session.execute(
        update(Rollout)
        .where(
            Rollout.rollout_id == rollout_id, or_(Rollout.lease_until.is_(None), Rollout.lease_until < now)
        )
        .values(lease_until=now + seconds)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def release_lease(session: Session, *, rollout_id: str) -> None:
    """Give the rollout's lease back so the next tick may take it at once."""
    session.execute(update(Rollout).where(Rollout.rollout_id == rollout_id).values(lease_until=None))


def deployment_target(session: Session, *, edge_id: str, revision: int) -> DeploymentTarget | None:
    """How far ``edge_id`` got with desired revision ``revision``, if it was part of a deployment."""
    return session.scalar(
        select(DeploymentTarget).where(
            DeploymentTarget.edge_id == edge_id, DeploymentTarget.revision == revision
        )
    )


def get_edge(session: Session, *, edge_id: str) -> EdgeNode | None:
    """The edge with id ``edge_id``, or None."""
    return session.scalar(select(EdgeNode).where(EdgeNode.edge_id == edge_id))


# -- gate inputs -----------------------------------------------------------------------------------


def metrics_of(
    session: Session,
    *,
    edge_id: str,
    model_version: str | None,
    since: float = 0.0,
    until: float | None = None,
) -> list[dict[str, Any]]:
    """An edge's metrics reports (as sent) while it ran ``model_version``, between ``since`` and
    ``until``, oldest first: the input of the wave gates."""
    query = select(EdgeMetricsRecord).where(
        EdgeMetricsRecord.edge_id == edge_id,
        EdgeMetricsRecord.model_version == model_version,
        EdgeMetricsRecord.ts >= since,
    )
    if until is not None:
        query = query.where(EdgeMetricsRecord.ts <= until)
    return [r.data for r in session.scalars(query.order_by(EdgeMetricsRecord.ts))]


def teacher_pairs(
    session: Session, *, edge_ids: Sequence[str], model_version: str, since: float
) -> list[tuple[str, str]]:
    """(edge prediction, teacher label) of the samples ``edge_ids`` uplinked under ``model_version``
    since ``since``: the input of the teacher agreement gate."""
    rows = session.execute(
        select(Sample.predicted, Sample.label).where(
            Sample.edge_id.in_(list(edge_ids)),
            Sample.model_version == model_version,
            Sample.received_at >= since,
            Sample.label_source == "teacher",
            Sample.label.is_not(None),
        )
    )
    return [(str(p), str(label)) for p, label in rows]


# -- fleet view ------------------------------------------------------------------------------------


def fleet_edges(session: Session) -> list[dict[str, Any]]:
    """Every edge with its online state, last seen, desired vs reported model, and whether they agree."""
    groups = {g.id: g.name for g in session.scalars(select(Group))}
    return [
        _edge_row(session, edge, groups)
        for edge in session.scalars(select(EdgeNode).order_by(EdgeNode.edge_id))
    ]


def _edge_row(session: Session, edge: EdgeNode, groups: dict[int, str]) -> dict[str, Any]:
    desired = session.get(DesiredRevision, edge.edge_id)
    payload = desired.payload if desired is not None else {}
    model = (payload or {}).get("model") or {}
    desired_version = model.get("version")
    action = (payload or {}).get("action")
    if action == "rollback":
        desired_version = None  # "whatever last-good is": not a version the registry names
    reported = edge.reported or {}
    reported_version = reported.get("model_version")
    reported_revision = reported.get("desired_revision")
    desired_revision = desired.revision if desired is not None else None
    converged = desired_revision is None or (
        reported_revision is not None and reported_revision >= desired_revision
    )
    health = "ok"
    if reported.get("last_deploy_ok") is False:
        health = f"deploy failed: {reported.get('last_deploy_reason')}"
    return {
        "edge_id": edge.edge_id,
        "state": edge.state,
        "last_seen": edge.last_seen,
        "group": groups.get(edge.group_id) if edge.group_id is not None else None,
        "tags": list(edge.tags or []),
        "desired_revision": desired_revision,
        "desired_action": action,
        "desired_version": desired_version,
        "reported_revision": reported_revision,
        "reported_version": reported_version,
        "last_good_version": reported.get("last_good_version"),
        "in_sync": converged,
        "health": health,
    }


def fleet_edge(session: Session, *, edge_id: str) -> dict[str, Any]:
    """One edge's ``fleet_edges`` row, plus its latest metrics report and its devices."""
    edge = get_edge(session, edge_id=edge_id)
    if edge is None:
        raise NotFoundError(f"edge {edge_id} is not in the registry")
    groups = {g.id: g.name for g in session.scalars(select(Group))}
    row = _edge_row(session, edge, groups)
    latest = session.scalar(
        select(EdgeMetricsRecord)
        .where(EdgeMetricsRecord.edge_id == edge_id)
        .order_by(EdgeMetricsRecord.ts.desc())
        .limit(1)
    )
    row["metrics"] = latest.data if latest is not None else None
    row["devices"] = [d.device_id for d in devices_of(session, edge_id=edge_id)]
    return row


# Online state of a device in the registry: "online" / "offline" from its own birth and LWT, relayed
# by an edge of its site; "unreachable" when the edge that relayed it went offline (nobody can tell);
# "unknown" until some edge reported a status for it.
DEVICE_STATES = ("online", "offline", "unreachable", "unknown")
# DeviceSeen fields kept in Device.info (state and last_seen have columns of their own).
_SEEN_INFO = (
    "since",
    "agent_version",
    "sensor",
    "rate_hz",
    "window",
    "hop",
    "config",
    "config_revision",
    "config_error",
    "fault",
    "outbox_depth",
    "dropped_windows",
)


def record_device_seen(session: Session, *, edge_id: str, seen: dict[str, Any]) -> Device:
    """Store what edge ``edge_id`` reports of one device (a ``DeviceSeen`` as JSON).

    The device is created if unknown. Its state and reported fields come from the newest report of
    any edge (every edge of a site hears the same retained status); ``last_seen`` only moves forward.
    The device is recorded behind the reporting edge when it is behind none yet, or behind an edge
    that is not online (failover to another edge of the site); otherwise its edge stays."""
    device = session.scalar(select(Device).where(Device.device_id == seen["device_id"]))
    if device is None:
        device = Device(device_id=seen["device_id"], tags=[], info={}, state="unknown")
        session.add(device)
    owner = device.edge_id
    if owner is None or owner == edge_id:
        device.edge_id = edge_id
    else:
        current = get_edge(session, edge_id=owner)
        if current is None or current.state != "online":
            device.edge_id = edge_id
    if seen.get("state") is not None:
        device.state = seen["state"]
        device.info = {
            **(device.info or {}),
            **{k: seen.get(k) for k in _SEEN_INFO},
            "status_reason": seen.get("reason"),
            "reported_by": edge_id,
        }
    elif seen.get("fault") is not None or seen.get("outbox_depth") is not None:
        device.info = {**(device.info or {}), **{k: seen.get(k) for k in ("fault", "outbox_depth")}}
    last_seen = seen.get("last_seen")
    if last_seen is not None and (device.last_seen is None or last_seen > device.last_seen):
        device.last_seen = float(last_seen)
    session.flush()
    return device


def mark_edge_devices_unreachable(session: Session, *, edge_id: str) -> int:
    """The edge went offline: its devices that were online become "unreachable" (not stale "online");
    the next report of an edge that hears them sets their state again. Returns how many changed."""
    result = session.execute(
        update(Device).where(Device.edge_id == edge_id, Device.state == "online").values(state="unreachable")
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


def set_device_config(
    session: Session,
    *,
    device_id: str,
    changes: dict[str, Any],
    unset: Sequence[str] = (),
    actor: str = "unknown",
) -> DeviceDesiredConfig:
    """Merge ``changes`` into the device's desired config and drop the ``unset`` keys, as a new revision
    (also with nothing to change: a new revision publishes the same config again). The device row is
    created if the device is not known yet. The caller publishes the new revision."""
    if session.scalar(select(Device).where(Device.device_id == device_id)) is None:
        session.add(Device(device_id=device_id, tags=[], info={}, state="unknown"))
    current = session.get(DeviceDesiredConfig, device_id)
    config = dict(current.config or {}) if current is not None else {}
    config.update(changes)
    for key in unset:
        config.pop(key, None)
    if current is None:
        current = DeviceDesiredConfig(device_id=device_id, revision=0, config={})
        session.add(current)
    current.revision += 1
    current.config = config
    current.updated_by = actor
    current.updated_at = time.time()
    current.published_at = None
    session.flush()
    return current


def device_desired_config(session: Session, *, device_id: str) -> DeviceDesiredConfig | None:
    """The device's desired config revision, or None when none was ever set."""
    return session.get(DeviceDesiredConfig, device_id)


def unpublished_device_configs(session: Session) -> list[DeviceDesiredConfig]:
    """Desired device configs recorded but not (yet) taken by the broker."""
    query = select(DeviceDesiredConfig).where(DeviceDesiredConfig.published_at.is_(None))
    return list(session.scalars(query.order_by(DeviceDesiredConfig.device_id)))


def device_configs_to_publish(session: Session, *, now: float, stale_s: float) -> list[DeviceDesiredConfig]:
    """What beat publishes: revisions the broker never took, and revisions published at least
    ``stale_s`` ago that an online device still does not report (its birth names an older revision
    or none: the retained message was lost, e.g. a broker without persistence restarted). A device
    that refused a revision reports it, so it is not sent again."""
    found = unpublished_device_configs(session)
    devices = {d.device_id: d for d in session.scalars(select(Device).where(Device.state == "online"))}
    query = select(DeviceDesiredConfig).where(DeviceDesiredConfig.published_at <= now - stale_s)
    for desired in session.scalars(query.order_by(DeviceDesiredConfig.device_id)):
        device = devices.get(desired.device_id)
        if device is None:
            continue  # offline: the retained message waits for it on the broker
        reported = (device.info or {}).get("config_revision")
        if reported is None or reported < desired.revision:
            found.append(desired)
    return found


def mark_device_config_published(session: Session, *, device_id: str, revision: int) -> None:
    """Stamp ``revision`` as taken by the broker, unless a newer revision replaced it meanwhile."""
    current = session.get(DeviceDesiredConfig, device_id)
    if current is not None and current.revision == revision:
        current.published_at = time.time()


def _device_row(
    device: Device, groups: dict[int, str], desired: DeviceDesiredConfig | None
) -> dict[str, Any]:
    info = device.info or {}
    reported_revision = info.get("config_revision")
    config_error = info.get("config_error")
    desired_revision = desired.revision if desired is not None else None
    config_in_sync = desired_revision is None or (
        reported_revision is not None and reported_revision >= desired_revision and not config_error
    )
    if config_error:
        health = f"config refused: {config_error}"
    elif info.get("fault"):
        health = f"fault: {info['fault']}"
    elif device.state == "unknown":
        health = "-"
    else:
        health = "ok"
    return {
        "device_id": device.device_id,
        "edge_id": device.edge_id,
        "state": device.state,
        "reason": info.get("status_reason"),
        "last_seen": device.last_seen,
        "group": groups.get(device.group_id) if device.group_id is not None else None,
        "tags": list(device.tags or []),
        "desired_config_revision": desired_revision,
        "reported_config_revision": reported_revision,
        "config_in_sync": config_in_sync,
        "health": health,
    }


def fleet_devices(session: Session) -> list[dict[str, Any]]:
    """Every device: its edge, online state, last seen, group, tags, desired vs reported config
    revision (``config_in_sync``) and health."""
    groups = {g.id: g.name for g in session.scalars(select(Group))}
    desired = {d.device_id: d for d in session.scalars(select(DeviceDesiredConfig))}
    return [
        _device_row(d, groups, desired.get(d.device_id))
        for d in session.scalars(select(Device).order_by(Device.device_id))
    ]


def get_device(session: Session, *, device_id: str) -> Device | None:
    """The device with id ``device_id``, or None."""
    return session.scalar(select(Device).where(Device.device_id == device_id))


def fleet_device(session: Session, *, device_id: str) -> dict[str, Any]:
    """One device: its ``fleet_devices`` row, plus desired vs reported config, what its birth said
    and its last heartbeat's health figures."""
    device = get_device(session, device_id=device_id)
    if device is None:
        raise NotFoundError(f"device {device_id} is not in the registry")
    groups = {g.id: g.name for g in session.scalars(select(Group))}
    desired = session.get(DeviceDesiredConfig, device_id)
    row = _device_row(device, groups, desired)
    info = device.info or {}
    reported = info.get("config") or {}
    wanted = dict(desired.config or {}) if desired is not None else {}
    row.update(
        {
            "since": info.get("since"),
            "reported_by": info.get("reported_by"),
            "agent_version": info.get("agent_version"),
            "sensor": info.get("sensor"),
            "desired_config": wanted,
            "desired_config_updated_by": desired.updated_by if desired is not None else None,
            "desired_config_published_at": desired.published_at if desired is not None else None,
            "reported_config": reported,
            "config_error": info.get("config_error"),
            # Per desired key: what is wanted and what the device reports running.
            "config_diff": {
                key: {"desired": value, "reported": reported.get(key)}
                for key, value in sorted(wanted.items())
                if key != "sensor"
            },
            "fault": info.get("fault"),
            "outbox_depth": info.get("outbox_depth"),
            "dropped_windows": info.get("dropped_windows"),
        }
    )
    return row


def devices_of(session: Session, *, edge_id: str) -> list[Device]:
    """The devices recorded behind ``edge_id``, by id."""
    return list(session.scalars(select(Device).where(Device.edge_id == edge_id).order_by(Device.device_id)))


def devices_in_group(session: Session, *, tag: str) -> list[Device]:
    """Devices in the group called ``tag`` or carrying the tag ``tag``."""
    group = session.scalar(select(Group).where(Group.name == tag))
    return [
        device
        for device in session.scalars(select(Device).order_by(Device.device_id))
        if (group is not None and device.group_id == group.id) or tag in (device.tags or [])
    ]


def edges_in_group(session: Session, *, tag: str) -> list[EdgeNode]:
    """Edges in the group called ``tag`` or carrying the tag ``tag``."""
    group = session.scalar(select(Group).where(Group.name == tag))
    return [
        e
        for e in session.scalars(select(EdgeNode).order_by(EdgeNode.edge_id))
        if (group is not None and e.group_id == group.id) or tag in (e.tags or [])
    ]


def commands_by_id(session: Session, *, command_ids: Sequence[str]) -> list[CommandRecord]:
    """The recorded commands with these ids (with their acks, once they came)."""
    return list(session.scalars(select(CommandRecord).where(CommandRecord.command_id.in_(list(command_ids)))))


# -- API tokens -------------------------------------------------------------------------------------


def add_token(session: Session, *, name: str, role: str, token_hash: str, prefix: str) -> ApiToken:
    """Store a new API token by its hash; a name already taken is a ``ValueError``."""
    if session.scalar(select(ApiToken).where(ApiToken.name == name)) is not None:
        raise ValueError(f"a token called {name!r} exists already")
    token = ApiToken(name=name, role=role, token_hash=token_hash, prefix=prefix)
    session.add(token)
    session.flush()
    return token


def list_tokens(session: Session) -> list[ApiToken]:
    """Every API token, oldest first, revoked ones included."""
    return list(session.scalars(select(ApiToken).order_by(ApiToken.id)))


def revoke_token(session: Session, *, name: str) -> ApiToken:
    """Revoke the token called ``name`` (idempotent; ``NotFoundError`` if there is none)."""
    token = session.scalar(select(ApiToken).where(ApiToken.name == name))
    if token is None:
        raise NotFoundError(f"no token called {name!r}")
    if token.revoked_at is None:
        token.revoked_at = time.time()
    return token


def token_by_hash(session: Session, *, token_hash: str) -> ApiToken | None:
    """The token whose secret hashes to ``token_hash`` (how the API authenticates), or None."""
    return session.scalar(select(ApiToken).where(ApiToken.token_hash == token_hash))


def audit_entries(session: Session, *, limit: int = 50, action: str | None = None) -> list[AuditLog]:
    """The newest ``limit`` audit log entries, optionally of one ``action``."""
    query = select(AuditLog)
    if action is not None:
        query = query.where(AuditLog.action == action)
    return list(session.scalars(query.order_by(AuditLog.id.desc()).limit(limit)))


def audit_row(entry: AuditLog) -> dict[str, Any]:
    """An audit log entry as the CLI and the API show it."""
    return {
        "ts": entry.ts,
        "actor": entry.actor,
        "action": entry.action,
        "target": entry.target,
        "detail": dict(entry.detail or {}),
    }
