"""Read-only queries of the web console's models, rollouts, learning, audit and admin pages that the
rest of the registry does not already answer. Every list is bounded (a limit, or a page of the audit
log); keyword-only, the caller owns the session."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from cloud.registry.models import AuditLog, EdgeNode, Group, ModelVersion, PipelineRun, Rollout

MAX_LIST = 500


# -- models ------------------------------------------------------------------------------------------


def models_of_run(session: Session, *, run_id: int, limit: int = 50) -> list[ModelVersion]:
    """The model versions a pipeline run built (its base and every variant), oldest first."""
    query = select(ModelVersion).where(ModelVersion.run_id == run_id).order_by(ModelVersion.id).limit(limit)
    return list(session.scalars(query))


def models_of_runs(session: Session, *, run_ids: Sequence[int]) -> list[ModelVersion]:
    """The model versions built by any of ``run_ids`` (at most ``MAX_LIST``), oldest first."""
    if not run_ids:
        return []
    query = (
        select(ModelVersion)
        .where(ModelVersion.run_id.in_(list(run_ids)))
        .order_by(ModelVersion.id)
        .limit(MAX_LIST)
    )
    return list(session.scalars(query))


def children_of(session: Session, *, model_id: int, limit: int = 50) -> list[ModelVersion]:
    """The versions whose parent is ``model_id`` (variants of a base, or models retrained from it)."""
    query = (
        select(ModelVersion).where(ModelVersion.parent_id == model_id).order_by(ModelVersion.id).limit(limit)
    )
    return list(session.scalars(query))


def edges_serving(session: Session, *, name: str, version: str, limit: int = 200) -> list[EdgeNode]:
    """Edges that last reported running ``version`` (of model ``name`` when they name the model)."""
    query = select(EdgeNode).where(EdgeNode.model_version == version).order_by(EdgeNode.edge_id).limit(limit)
    return [
        edge for edge in session.scalars(query) if (edge.reported or {}).get("model_name") in (None, name)
    ]


def serving_counts(session: Session, *, versions: Sequence[str]) -> dict[str, int]:
    """How many edges report running each of ``versions`` (version -> count, absent when none)."""
    if not versions:
        return {}
    rows = session.execute(
        select(EdgeNode.model_version, func.count())
        .where(EdgeNode.model_version.in_(list(versions)))
        .group_by(EdgeNode.model_version)
    )
    return {str(version): int(count) for version, count in rows}


def rollouts_of_model(session: Session, *, model_version_id: int, limit: int = 20) -> list[Rollout]:
    """The newest rollouts of one model version, newest first."""
    query = (
        select(Rollout)
        .where(Rollout.model_version_id == model_version_id)
        .order_by(Rollout.id.desc())
        .limit(limit)
    )
    return list(session.scalars(query))


def deployable_models(session: Session, *, limit: int = 200) -> list[ModelVersion]:
    """Signed model versions (what a rollout may send), newest first."""
    query = (
        select(ModelVersion)
        .where(ModelVersion.signature.is_not(None), ModelVersion.status.not_in(("rejected", "withdrawn")))
        .order_by(ModelVersion.id.desc())
        .limit(limit)
    )
    return list(session.scalars(query))


def accuracy_history(session: Session, *, limit: int = MAX_LIST) -> list[ModelVersion]:
    """The newest ``limit`` model versions with metrics, oldest first (the accuracy chart's points)."""
    query = select(ModelVersion).order_by(ModelVersion.id.desc()).limit(limit)
    found = [m for m in session.scalars(query) if m.metrics]
    return sorted(found, key=lambda m: (m.created_at, m.id))


def runs_by_id(session: Session, *, run_ids: Sequence[int]) -> dict[int, PipelineRun]:
    """Pipeline runs by id (those that exist)."""
    if not run_ids:
        return {}
    query = select(PipelineRun).where(PipelineRun.id.in_(list(run_ids))).limit(MAX_LIST)
    return {run.id: run for run in session.scalars(query)}


def models_by_id(session: Session, *, model_ids: Sequence[int]) -> dict[int, ModelVersion]:
    """Model versions by id (those that exist)."""
    if not model_ids:
        return {}
    query = select(ModelVersion).where(ModelVersion.id.in_(list(model_ids))).limit(MAX_LIST)
    return {model.id: model for model in session.scalars(query)}


# -- fleet targets of the rollout form -----------------------------------------------------------------


def group_names(session: Session, *, limit: int = 200) -> list[str]:
    """Group names, alphabetically."""
    return list(session.scalars(select(Group.name).order_by(Group.name).limit(limit)))


def edge_ids(session: Session, *, limit: int = 1000) -> list[str]:
    """Edge ids, alphabetically."""
    return list(session.scalars(select(EdgeNode.edge_id).order_by(EdgeNode.edge_id).limit(limit)))


# -- audit ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditPage:
    """One page of the filtered audit log, newest first, and whether older entries follow."""

    entries: list[AuditLog]
    has_more: bool


def audit_page(
    session: Session,
    *,
    actor: str | None = None,
    action: str | None = None,
    target: str | None = None,
    since: float | None = None,
    until: float | None = None,
    offset: int = 0,
    limit: int = 50,
) -> AuditPage:
    """Audit entries whose actor and target contain the given texts (case-insensitive), of one
    ``action``, between ``since`` and ``until``; ``limit`` of them after skipping ``offset``."""
    query = select(AuditLog)
    if actor:
        query = query.where(func.lower(AuditLog.actor).contains(actor.lower(), autoescape=True))
    if action:
        query = query.where(AuditLog.action == action)
    if target:
        query = query.where(func.lower(AuditLog.target).contains(target.lower(), autoescape=True))
    if since is not None:
        query = query.where(AuditLog.ts >= since)
    if until is not None:
        query = query.where(AuditLog.ts <= until)
    limit = max(1, min(limit, MAX_LIST))
    rows = list(session.scalars(query.order_by(AuditLog.id.desc()).offset(max(0, offset)).limit(limit + 1)))
    return AuditPage(entries=rows[:limit], has_more=len(rows) > limit)


def audit_actions(session: Session, *, limit: int = 200) -> list[str]:
    """The distinct actions in the audit log, alphabetically (the filter's choices)."""
    return list(session.scalars(select(AuditLog.action).distinct().order_by(AuditLog.action).limit(limit)))


# -- admin ---------------------------------------------------------------------------------------------


def signing_key_use(session: Session) -> dict[str, int]:
    """Key id -> how many model versions were signed with it."""
    rows = session.execute(
        select(ModelVersion.key_id, func.count())
        .where(ModelVersion.key_id.is_not(None))
        .group_by(ModelVersion.key_id)
    )
    return {str(key): int(count) for key, count in rows}
