"""``edgefleet cloud api``: the same functions as the CLI, over HTTP, behind bearer tokens.

Every route but ``/healthz`` needs ``Authorization: Bearer <token>``; tokens are created with
``edgefleet admin token create`` and stored hashed. There is no default token, in dev mode either.
Artifact downloads accept ``edge`` tokens, answer range requests (206) and carry the sha256.
The web console (``cloud.console``, a layer above this one) adds its pages to this app:
``cloud.console.app.create_app`` is what ``edgefleet cloud api`` serves.

The API's own description (``/openapi.json``, ``/docs``, ``/redoc``) needs a viewer too: a bearer token,
or a console session (``docs_session_auth`` on the app's state, set by the console). Unknown or revoked
tokens are failed sign-ins: audited and limited per client address (429, ``cloud.api.ratelimit``).

This module only builds the app: the routes are in ``cloud.api.routes`` (one router per resource),
their dependencies in ``cloud.api.deps``, their bodies in ``cloud.api.schemas``. Errors of the cloud
tier (``cloud.errors``) become HTTP answers here, at the boundary, each as ``{"detail": message}``."""

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.concurrency import run_in_threadpool

from cloud.api.deps import authenticate_request, bearer_token
from cloud.api.ratelimit import TooManyFailuresError
from cloud.api.routes import artifacts, audit, commands, devices, edges, health, identities, models, rollouts
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
    # The description of the API is served below, behind a viewer's credentials, not by FastAPI itself.
    app = FastAPI(title="edgefleet admin API", version="1", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings = settings
    app.state.database_url = settings.resolved_database_url
    app.state.docs_session_auth = None

    app.add_exception_handler(NotFoundError, _not_found)
    app.add_exception_handler(TooManyFailuresError, _too_many)
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
        identities.router,
    ):
        app.include_router(router)
    _serve_docs(app)
    return app


# A console session for the docs pages (set by cloud.console): the identity, or an exception.
DocsSessionAuth = Callable[[Request], Awaitable[Any]]


async def docs_reader(request: Request) -> object:
    """Who may read the API's description: a viewer's bearer token, else a console session (when the
    console is mounted), else 401."""
    session_auth: DocsSessionAuth | None = request.app.state.docs_session_auth
    if bearer_token(request) is None and session_auth is not None:
        return await session_auth(request)
    return await run_in_threadpool(authenticate_request, request, "viewer")


def _serve_docs(app: FastAPI) -> None:
    title = f"{app.title} - docs"

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(request: Request) -> JSONResponse:
        await docs_reader(request)
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        await docs_reader(request)
        return get_swagger_ui_html(openapi_url="/openapi.json", title=title)

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        await docs_reader(request)
        return get_redoc_html(openapi_url="/openapi.json", title=title)


def _detail(status_code: int, exc: Exception, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status_code, content={"detail": str(exc)}, headers=headers)


async def _not_found(_request: Request, exc: Exception) -> JSONResponse:
    return _detail(404, exc)


async def _refused(_request: Request, exc: Exception) -> JSONResponse:
    # A valid token whose role may not do this is forbidden (403); no usable token is 401.
    status = 403 if isinstance(exc, PermissionDeniedError) else 401
    return _detail(status, exc, headers={"WWW-Authenticate": "Bearer"})


async def _too_many(_request: Request, exc: Exception) -> JSONResponse:
    retry = int(getattr(exc, "retry_after_s", 300))
    return _detail(429, exc, headers={"Retry-After": str(retry)})


async def _unpublished(_request: Request, exc: Exception) -> JSONResponse:
    # Recorded; beat publishes it when the broker is back (or PUT again).
    return _detail(503, exc)


async def _bad_request(_request: Request, exc: Exception) -> JSONResponse:
    return _detail(400, exc)
