"""``/v1/rollouts``: staged rollouts gated on health and quality: start, watch, pause, resume, abort."""

# No "from __future__ import annotations": FastAPI resolves the Annotated aliases at runtime.

from typing import Any

from fastapi import APIRouter, HTTPException

from cloud.api.deps import AUTH_RESPONSES, DatabaseUrlDep, Operator, SessionDep, SettingsDep, Viewer
from cloud.api.schemas import ErrorDetail, RolloutRequest, RolloutStatus
from cloud.errors import NotFoundError
from cloud.fleet import rollouts
from cloud.fleet.wave_gates import DEFAULT_GATES
from cloud.registry import fleet
from cloud.registry.db import session_scope

router = APIRouter(prefix="/v1/rollouts", tags=["rollouts"], responses=AUTH_RESPONSES)

ACTIONS = ("pause", "resume", "abort")


@router.get("", response_model=list[RolloutStatus])
def list_rollouts(_who: Viewer, session: SessionDep) -> list[dict[str, Any]]:
    """The newest rollouts with their targets and gate results."""
    return [rollouts.describe(r) for r in fleet.list_rollouts(session)]


@router.post(
    "",
    status_code=201,
    response_model=RolloutStatus,
    responses={400: {"model": ErrorDetail}, 404: {"model": ErrorDetail}},
)
def start_rollout(
    body: RolloutRequest, who: Operator, settings: SettingsDep, url: DatabaseUrlDep
) -> dict[str, Any]:
    """Record a rollout of ``model`` to ``edges``, a ``group`` or ``all`` edges (exactly one): a canary
    cohort, then ``waves`` waves; the engine publishes the first wave on its next tick."""
    edges = _rollout_edges(url, body.edges, body.group, body.all)
    unknown = set(body.gates) - set(DEFAULT_GATES)
    if unknown:
        raise HTTPException(status_code=422, detail=f"unknown gates {sorted(unknown)}")
    rollout_id = rollouts.start_rollout(
        settings=settings,
        model_ref=body.model,
        edge_ids=edges,
        canary=body.canary,
        waves=body.waves,
        gates={**DEFAULT_GATES, **body.gates},
        params={"min_windows": body.min_windows, "soak_s": body.soak_s},
        actor=f"api:{who.name}",
    )
    return rollouts.status(settings=settings, rollout_id=rollout_id)


@router.get("/{rollout_id}", response_model=RolloutStatus, responses={404: {"model": ErrorDetail}})
def rollout_status(rollout_id: str, _who: Viewer, settings: SettingsDep) -> dict[str, Any]:
    """One rollout: its state, wave, targets and gate results."""
    return rollouts.status(settings=settings, rollout_id=rollout_id)


@router.post(
    "/{rollout_id}/{action}",
    response_model=RolloutStatus,
    responses={400: {"model": ErrorDetail}, 404: {"model": ErrorDetail}},
)
def rollout_action(rollout_id: str, action: str, who: Operator, settings: SettingsDep) -> dict[str, Any]:
    """``pause``, ``resume`` or ``abort`` a rollout; abort rolls back every edge that received the model."""
    if action not in ACTIONS:
        raise HTTPException(status_code=404, detail=f"no rollout action {action!r}")
    rollouts.set_state(settings=settings, rollout_id=rollout_id, action=action, actor=f"api:{who.name}")
    return rollouts.status(settings=settings, rollout_id=rollout_id)


def _rollout_edges(url: str, edges: list[str], group: str | None, everything: bool) -> list[str]:
    if sum((bool(edges), group is not None, everything)) != 1:
        raise HTTPException(status_code=422, detail="give exactly one of edges, group and all")
    if edges:
        return edges
    with session_scope(url) as session:
        if group is not None:
            found = [e.edge_id for e in fleet.edges_in_group(session, tag=group)]
        else:
            found = [e["edge_id"] for e in fleet.fleet_edges(session)]
    if not found:
        raise NotFoundError("no edge matches")
    return found
