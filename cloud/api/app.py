"""``edgefleet cloud api``: the same functions as the CLI, over HTTP, behind bearer tokens.

Every route but ``/healthz`` needs ``Authorization: Bearer <token>``; tokens are created with
``edgefleet admin token create`` and stored hashed. There is no default token, in dev mode either.
Artifact downloads accept ``edge`` tokens, answer range requests (206) and carry the sha256."""

# No "from __future__ import annotations": FastAPI resolves the local Admin/Edge aliases at runtime.

import logging
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, JsonValue

from cloud import auth, commands, device_config, rollouts
from cloud.errors import CloudError, NotFoundError
from cloud.gates import DEFAULT_GATES
from cloud.registry import crud, fleet
from cloud.registry.db import session_scope
from shared.settings.cloud import CloudSettings

logger = logging.getLogger(__name__)


class CommandRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    device: str | None = None
    group: str | None = None
    edge: str | None = None
    name: str
    args: dict[str, Any] = Field(default_factory=dict)
    ttl_s: float = Field(default=60.0, gt=0)
    wait_s: float = Field(default=5.0, ge=0, le=120)


class RolloutRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="NAME@VERSION")
    edges: list[str] = Field(default_factory=list)
    group: str | None = None
    all: bool = False
    canary: float = Field(default=1, ge=0)
    waves: int = Field(default=2, ge=1)
    gates: dict[str, float] = Field(default_factory=dict)
    min_windows: int = Field(default=200, ge=1)
    soak_s: float = Field(default=30.0, ge=0)


class DeviceConfigRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    set: dict[str, JsonValue] = Field(default_factory=dict, description="settings to change")
    unset: list[str] = Field(default_factory=list, description="settings to drop from the desired config")


class RollbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    edges: list[str]
    to: str | None = Field(default=None, description="NAME@VERSION, or none for each edge's last-good")


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


_bearer_scheme = HTTPBearer(auto_error=False, description="a token from 'edgefleet admin token create'")


def _require(role: str) -> Any:
    def dependency(
        request: Request, _credentials: Annotated[Any, Depends(_bearer_scheme)] = None
    ) -> auth.Principal:
        try:
            return auth.authenticate(
                database_url=request.app.state.database_url, token=_bearer(request), role=role
            )
        except auth.AuthError as exc:
            raise HTTPException(
                status_code=401 if "privilege" not in str(exc) and "may not" not in str(exc) else 403,
                detail=str(exc),
                headers={"WWW-Authenticate": "Bearer"},
            ) from exc

    return dependency


# Every route names the role it needs in its signature.
Admin = Annotated[auth.Principal, Depends(_require("admin"))]
Edge = Annotated[auth.Principal, Depends(_require("edge"))]


def create_app(settings: CloudSettings) -> FastAPI:
    url = settings.resolved_database_url
    app = FastAPI(title="edgefleet admin API", version="1")
    app.state.database_url = url

    @app.exception_handler(NotFoundError)
    async def _not_found(_request: Request, exc: NotFoundError) -> Any:
        from fastapi.responses import JSONResponse  # noqa: PLC0415

        return JSONResponse(status_code=404, content={"detail": str(exc)})

    @app.exception_handler(CloudError)
    async def _bad(_request: Request, exc: CloudError) -> Any:
        from fastapi.responses import JSONResponse  # noqa: PLC0415

        return JSONResponse(status_code=400, content={"detail": str(exc)})

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/fleet/edges")
    def list_edges(_who: Admin) -> list[dict[str, Any]]:
        with session_scope(url) as session:
            return fleet.fleet_edges(session)

    @app.get("/v1/fleet/edges/{edge_id}")
    def show_edge(edge_id: str, _who: Admin) -> dict[str, Any]:
        with session_scope(url) as session:
            return fleet.fleet_edge(session, edge_id=edge_id)

    @app.get("/v1/fleet/devices")
    def list_devices(_who: Admin) -> list[dict[str, Any]]:
        with session_scope(url) as session:
            return fleet.fleet_devices(session)

    @app.get("/v1/fleet/devices/{device_id}")
    def show_device(device_id: str, _who: Admin) -> dict[str, Any]:
        with session_scope(url) as session:
            return fleet.fleet_device(session, device_id=device_id)

    @app.put("/v1/fleet/devices/{device_id}/config")
    def set_device_config(device_id: str, body: DeviceConfigRequest, who: Admin) -> dict[str, Any]:
        """A new desired-config revision, published retained on the device's desired topic; an
        empty body publishes the current one again."""
        try:
            return device_config.set_device_config(
                settings=settings,
                device_id=device_id,
                changes=body.set,
                unset=body.unset,
                actor=f"api:{who.name}",
            )
        except device_config.DeviceConfigUnpublishedError as exc:
            # Recorded; beat publishes it when the broker is back (or PUT again).
            raise HTTPException(status_code=503, detail=str(exc)) from exc

    @app.post("/v1/commands")
    def send_command(body: CommandRequest, who: Admin) -> dict[str, Any]:
        targets = commands.resolve_targets(
            settings=settings, device=body.device, group=body.group, edge=body.edge
        )
        result = commands.send_commands(
            settings=settings,
            device_ids=targets,
            name=body.name,
            args=body.args,
            ttl_s=body.ttl_s,
            wait_s=body.wait_s,
            sender=f"api:{who.name}",
        )
        return {"summary": result.summary(), "outcomes": [o.__dict__ for o in result.outcomes]}

    @app.get("/v1/models")
    def list_models(_who: Admin, name: str | None = None) -> list[dict[str, Any]]:
        with session_scope(url) as session:
            return [_model_row(m) for m in crud.list_model_versions(session, name=name)]

    @app.get("/v1/models/{ref}")
    def show_model(ref: str, _who: Admin) -> dict[str, Any]:
        with session_scope(url) as session:
            model = crud.get_model_version(session, ref=ref)
            return {**_model_row(model), "manifest": model.manifest, "metrics": model.metrics}

    @app.post("/v1/models/rollback")
    def rollback(body: RollbackRequest, who: Admin) -> dict[str, Any]:
        sent = rollouts.rollback_edges(
            settings=settings, edge_ids=body.edges, to_ref=body.to, actor=f"api:{who.name}"
        )
        return {
            "orders": [{"edge_id": d.edge_id, "revision": d.revision, "action": d.action.value} for d in sent]
        }

    @app.get("/v1/rollouts")
    def list_rollouts(_who: Admin) -> list[dict[str, Any]]:
        with session_scope(url) as session:
            return [rollouts.describe(r) for r in fleet.list_rollouts(session)]

    @app.post("/v1/rollouts", status_code=201)
    def start_rollout(body: RolloutRequest, who: Admin) -> dict[str, Any]:
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

    @app.get("/v1/rollouts/{rollout_id}")
    def rollout_status(rollout_id: str, _who: Admin) -> dict[str, Any]:
        return rollouts.status(settings=settings, rollout_id=rollout_id)

    @app.post("/v1/rollouts/{rollout_id}/{action}")
    def rollout_action(rollout_id: str, action: str, who: Admin) -> dict[str, Any]:
        if action not in ("pause", "resume", "abort"):
            raise HTTPException(status_code=404, detail=f"no rollout action {action!r}")
        rollouts.set_state(settings=settings, rollout_id=rollout_id, action=action, actor=f"api:{who.name}")
        return rollouts.status(settings=settings, rollout_id=rollout_id)

    @app.get("/v1/audit")
    def audit_log(
        _who: Admin,
        limit: Annotated[int, Query(ge=1, le=1000)] = 50,
        action: str | None = None,
    ) -> list[dict[str, Any]]:
        with session_scope(url) as session:
            return [fleet.audit_row(a) for a in fleet.audit_entries(session, limit=limit, action=action)]

    # The second form is the artifact store's own layout (<name>/<version>/model.tflite): with
    # ``artifact_base_url = <api>/v1/artifacts`` published manifests point here and edges download
    # with their token (``model.download_token``).
    @app.get("/v1/artifacts/{name}/{version}")
    @app.get("/v1/artifacts/{name}/{version}/model.tflite")
    def artifact(name: str, version: str, _who: Edge) -> FileResponse:
        with session_scope(url) as session:
            model = crud.get_model_version(session, ref=f"{name}@{version}")
            path, sha = model.artifact_path, model.artifact_sha256
        from cloud.publishing import store_for  # noqa: PLC0415

        stored = store_for(settings).path(name, version)
        file = stored if stored.is_file() else Path(path) if path else None
        if file is None or not file.is_file():
            raise NotFoundError(f"model {name}@{version} has no artifact file")
        headers = {"X-Checksum-SHA256": sha} if sha else {}
        return FileResponse(file, media_type="application/octet-stream", headers=headers)

    return app


def _model_row(model: Any) -> dict[str, Any]:
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
