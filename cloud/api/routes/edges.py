"""``/v1/fleet/edges``: the fleet's edges, desired vs reported model."""

# No "from __future__ import annotations": FastAPI resolves the Annotated aliases at runtime.

from typing import Any

from fastapi import APIRouter

from cloud.api.deps import AUTH_RESPONSES, SessionDep, Viewer
from cloud.api.schemas import EdgeDetail, EdgeRow, ErrorDetail
from cloud.registry import fleet

router = APIRouter(prefix="/v1/fleet/edges", tags=["fleet"], responses=AUTH_RESPONSES)


@router.get("", response_model=list[EdgeRow])
def list_edges(_who: Viewer, session: SessionDep) -> list[dict[str, Any]]:
    """Every edge with its online state, last seen, desired vs reported model, and whether they agree."""
    return fleet.fleet_edges(session)


@router.get("/{edge_id}", response_model=EdgeDetail, responses={404: {"model": ErrorDetail}})
def show_edge(edge_id: str, _who: Viewer, session: SessionDep) -> dict[str, Any]:
    """One edge: its fleet row, its latest metrics and the devices behind it."""
    return fleet.fleet_edge(session, edge_id=edge_id)
