"""``/v1/audit``: who did what, newest first."""

# No "from __future__ import annotations": FastAPI resolves the Annotated aliases at runtime.

from typing import Annotated, Any

from fastapi import APIRouter, Query

from cloud.api.deps import AUTH_RESPONSES, SessionDep, Viewer
from cloud.api.schemas import AuditEntry
from cloud.registry import fleet

router = APIRouter(prefix="/v1/audit", tags=["audit"], responses=AUTH_RESPONSES)


@router.get("", response_model=list[AuditEntry])
def audit_log(
    _who: Viewer,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    action: str | None = None,
) -> list[dict[str, Any]]:
    """The newest ``limit`` audit log entries, optionally of one ``action``."""
    return [fleet.audit_row(a) for a in fleet.audit_entries(session, limit=limit, action=action)]
