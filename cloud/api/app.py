"""``edgefleet cloud api``: the same functions as the CLI, over HTTP, behind bearer tokens.

Every route but ``/healthz`` needs ``Authorization: Bearer <token>``; tokens are created with
``edgefleet admin token create`` and stored hashed. There is no default token, in dev mode either.
Artifact downloads accept ``edge`` tokens, answer range requests (206) and carry the sha256.
The web console (``cloud.console``, a layer above this one) adds its pages to this app:
``cloud.console.app.create_app`` is what ``edgefleet cloud api`` serves.

This module only builds the app: the routes are in ``cloud.api.routes`` (one router per resource),
their dependencies in ``cloud.api.deps``, their bodies in ``cloud.api.schemas``. Errors of the cloud
tier (``cloud.errors``) become HTTP answers here, at the boundary, each as ``{"detail": message}``."""

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from cloud.api.routes import artifacts, audit, commands, devices, edges, health, models, rollouts
from cloud.errors import (
    AuthError,
    CloudError,
    DeviceConfigUnpublishedError,
    NotFoundError,
    PermissionDeniedError,
)
from shared.settings.cloud import CloudSettings


def create_app(settings: CloudSettings) -> FastAPI:
    """The admin API over the registry and broker of ``settings``."""
    app = FastAPI(title="edgefleet admin API", version="1")
    app.state.settings = settings
    app.state.database_url = settings.resolved_database_url

    app.add_exception_handler(NotFoundError, _not_found)
    app.add_exception_handler(AuthError, _refused)
    app.add_exception_handler(DeviceConfigUnpublishedError, _unpublished)
    app.add_exception_handler(CloudError, _bad_request)

    for router in (
        health.router,
        edges.router,
        devices.router,
        commands.router,
        models.router,
        rollouts.router,
        audit.router,
        artifacts.router,
    ):
        app.include_router(router)
    return app


def _detail(status_code: int, exc: Exception, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status_code, content={"detail": str(exc)}, headers=headers)


async def _not_found(_request: Request, exc: Exception) -> JSONResponse:
    return _detail(404, exc)


async def _refused(_request: Request, exc: Exception) -> JSONResponse:
    # A valid token whose role may not do this is forbidden (403); no usable token is 401.
    status = 403 if isinstance(exc, PermissionDeniedError) else 401
    return _detail(status, exc, headers={"WWW-Authenticate": "Bearer"})


async def _unpublished(_request: Request, exc: Exception) -> JSONResponse:
    # Recorded; beat publishes it when the broker is back (or PUT again).
    return _detail(503, exc)


async def _bad_request(_request: Request, exc: Exception) -> JSONResponse:
    return _detail(400, exc)
