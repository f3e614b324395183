"""``/v1/models``: model versions of the registry, and manual rollback of edges."""

# No "from __future__ import annotations": FastAPI resolves the Annotated aliases at runtime.

from typing import Any

from fastapi import APIRouter

from cloud.api.deps import AUTH_RESPONSES, Operator, SessionDep, SettingsDep, Viewer
from cloud.api.schemas import ErrorDetail, ModelDetail, ModelRow, RollbackRequest, RollbackResult
from cloud.fleet import rollouts
from cloud.registry import crud
from cloud.registry.models import ModelVersion

router = APIRouter(prefix="/v1/models", tags=["models"], responses=AUTH_RESPONSES)


@router.get("", response_model=list[ModelRow])
def list_models(_who: Viewer, session: SessionDep, name: str | None = None) -> list[dict[str, Any]]:
    """Every model version, or those of one model ``name``."""
    return [_model_row(m) for m in crud.list_model_versions(session, name=name)]


@router.get("/{ref}", response_model=ModelDetail, responses={404: {"model": ErrorDetail}})
def show_model(ref: str, _who: Viewer, session: SessionDep) -> dict[str, Any]:
    """One model version (``NAME@VERSION``) with its manifest and metrics."""
    model = crud.get_model_version(session, ref=ref)
    return {**_model_row(model), "manifest": model.manifest, "metrics": model.metrics}


@router.post("/rollback", response_model=RollbackResult, responses={404: {"model": ErrorDetail}})
def rollback(body: RollbackRequest, who: Operator, settings: SettingsDep) -> dict[str, Any]:
    """Deploy ``to`` (``NAME@VERSION``) to the edges, or (none) order each back to its last-good model."""
    sent = rollouts.rollback_edges(
        settings=settings, edge_ids=body.edges, to_ref=body.to, actor=f"api:{who.name}"
    )
    return {
        "orders": [{"edge_id": d.edge_id, "revision": d.revision, "action": d.action.value} for d in sent]
    }


def _model_row(model: ModelVersion) -> dict[str, Any]:
    return {
        "ref": model.ref,
        "variant": model.variant,
        "status": model.status,
        "quantization": model.quantization,
        "sha256": model.artifact_sha256,
        "size": model.artifact_size,
        "signed": model.signature is not None,
        "created_at": model.created_at,
    }
