"""``/v1/artifacts``: model files for edges (``edge`` tokens), with range requests and the sha256.

The second path is the artifact store's own layout (``<name>/<version>/model.tflite``): with
``artifact_base_url = <api>/v1/artifacts`` published manifests point here and edges download with
their token (``model.download_token``)."""

# No "from __future__ import annotations": FastAPI resolves the Annotated aliases at runtime.

from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.responses import FileResponse

from cloud.api.deps import AUTH_RESPONSES, Edge, SessionDep, SettingsDep
from cloud.api.schemas import ErrorDetail
from cloud.artifacts import store_for
from cloud.errors import NotFoundError
from cloud.registry import crud

router = APIRouter(prefix="/v1/artifacts", tags=["artifacts"], responses=AUTH_RESPONSES)

_BINARY = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
_CHECKSUM = {"X-Checksum-SHA256": {"description": "sha256 of the whole file", "schema": {"type": "string"}}}
# FileResponse answers the body itself: the OpenAPI document describes it here.
DOWNLOAD_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "the model file", "content": _BINARY, "headers": _CHECKSUM},
    206: {"description": "the requested byte range of it", "content": _BINARY, "headers": _CHECKSUM},
    404: {"model": ErrorDetail, "description": "no such model version, or no artifact file"},
    416: {"description": "a range outside the file"},
}


@router.get("/{name}/{version}", response_class=FileResponse, responses=DOWNLOAD_RESPONSES)
@router.get("/{name}/{version}/model.tflite", response_class=FileResponse, responses=DOWNLOAD_RESPONSES)
def artifact(name: str, version: str, _who: Edge, session: SessionDep, settings: SettingsDep) -> FileResponse:
    """The model file of ``name@version``; answers ``Range`` requests (206) and carries its sha256 in
    ``X-Checksum-SHA256``."""
    model = crud.get_model_version(session, ref=f"{name}@{version}")
    path, sha = model.artifact_path, model.artifact_sha256
    stored = store_for(settings).path(name, version)
    file = stored if stored.is_file() else Path(path) if path else None
    if file is None or not file.is_file():
        raise NotFoundError(f"model {name}@{version} has no artifact file")
    headers = {"X-Checksum-SHA256": sha} if sha else {}
    return FileResponse(file, media_type="application/octet-stream", headers=headers)
