"""``/v1/identities``: broker identities, as ``edgefleet fleet enroll / revoke / identities`` (admin only).

``POST /v1/identities`` answers with the enrollment bundle, password included: the only time it is
shown (the registry keeps its hash). Nothing here ever returns a hash."""

# No "from __future__ import annotations": FastAPI resolves the Annotated aliases at runtime.

from typing import Any, Literal

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, ConfigDict, Field

from cloud.api.deps import AUTH_RESPONSES, Admin, SettingsDep
from cloud.api.schemas import ErrorDetail
from cloud.fleet import enrollment
from shared.enrollment import EnrollmentBundle, EnrollmentError
from shared.topics import ID_PATTERN

router = APIRouter(prefix="/v1/identities", tags=["identities"], responses=AUTH_RESPONSES)


class EnrollRequest(BaseModel):
    """An identity to enroll (or re-enroll when revoked, or reissue with ``reissue``)."""

    model_config = ConfigDict(extra="forbid")

    identity_id: str = Field(pattern=ID_PATTERN)
    kind: Literal["device", "edge", "service", "operator"]
    role: Literal["viewer", "admin"] | None = None
    reissue: bool = False


class IdentityRow(BaseModel):
    """An identity, never its hash."""

    identity_id: str
    kind: str
    role: str | None
    status: str
    label_trusted: bool
    enrolled_via: str
    created_at: float
    updated_at: float
    revoked_at: float | None


@router.post(
    "",
    response_model=EnrollmentBundle,
    status_code=201,
    responses={400: {"model": ErrorDetail, "description": "reserved or taken id, bad kind or role"}},
)
def enroll(body: EnrollRequest, who: Admin, settings: SettingsDep) -> EnrollmentBundle:
    """Enroll an identity; the answer is its enrollment bundle with the password, shown once."""
    try:
        return enrollment.enroll_identity(
            settings=settings,
            identity_id=body.identity_id,
            kind=body.kind,
            role=body.role,
            reissue=body.reissue,
            actor=f"api:{who.name}",
            enrolled_via="api",
        )
    except EnrollmentError as exc:
        raise HTTPException(status_code=400, detail=str(exc)) from exc


@router.post("/{identity_id}/revoke", response_model=IdentityRow, responses={404: {"model": ErrorDetail}})
def revoke(identity_id: str, who: Admin, settings: SettingsDep) -> dict[str, Any]:
    """Revoke an identity: the broker refuses it (and closes its connections) at its next sync."""
    return enrollment.revoke_identity(settings=settings, identity_id=identity_id, actor=f"api:{who.name}")


@router.get("", response_model=list[IdentityRow])
def list_identities(
    _who: Admin,
    settings: SettingsDep,
    kind: Literal["device", "edge", "service", "operator"] | None = None,
    status: Literal["active", "revoked"] | None = None,
) -> list[dict[str, Any]]:
    """Every identity (optionally of one kind and/or status), without hashes."""
    return enrollment.list_identity_rows(settings=settings, kind=kind, status=status)
