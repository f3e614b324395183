"""Dependencies of the admin API routes: settings, the registry URL and a session from the app's
state, and the bearer-token principal a route needs (``Admin`` or ``Edge`` in its signature).

A missing, unknown, revoked or under-privileged token raises ``AuthError``; the app's exception
handler answers it (401, or 403 for a valid token of the wrong role)."""

# No "from __future__ import annotations": FastAPI resolves the Annotated aliases at runtime.

from collections.abc import Callable, Iterator
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from cloud.api import auth, ratelimit
from cloud.api.schemas import ErrorDetail
from cloud.errors import AuthError, PermissionDeniedError
from cloud.registry.db import session_scope
from shared.settings.cloud import CloudSettings


def get_settings(request: Request) -> CloudSettings:
    """The settings the app was created with."""
    settings: CloudSettings = request.app.state.settings
    return settings


def get_database_url(request: Request) -> str:
    """The registry's database URL."""
    url: str = request.app.state.database_url
    return url


SettingsDep = Annotated[CloudSettings, Depends(get_settings)]
DatabaseUrlDep = Annotated[str, Depends(get_database_url)]


def get_session(database_url: DatabaseUrlDep) -> Iterator[Session]:
    """A registry session for one request, committed (or rolled back on an error) when the route returns."""
    with session_scope(database_url) as session:
        yield session


# scope="function": the session is closed before the response is sent, as a ``with session_scope``
# block inside the route would be.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]


def bearer_token(request: Request) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


# Only declares the scheme in the OpenAPI document (the "Authorize" button of /docs); the header is
# read by ``bearer_token`` so that every refusal is an ``AuthError`` with the same answers.
_bearer_scheme = HTTPBearer(auto_error=False, description="a token from 'edgefleet admin token create'")


def client_address(request: Request) -> str:
    """The address a request came from (the peer: a reverse proxy in front is one address)."""
    return request.client.host if request.client else "unknown"


def authenticate_request(request: Request, role: str) -> auth.Principal:
    """The principal of the request's bearer token, which must be allowed ``role``.

    An unknown or revoked token is a failed sign-in: audited (without the token) and counted against
    the client's address; an address with too many recent failures is refused (429) before its token is
    even looked at. A missing token is only a 401."""
    token = bearer_token(request)
    client = client_address(request)
    if token is not None and ratelimit.API_TOKENS.blocked(client):
        raise ratelimit.TooManyFailuresError(ratelimit.API_TOKENS.window_s)
    database_url = get_database_url(request)
    try:
        return auth.authenticate(database_url=database_url, token=token, role=role)
    except PermissionDeniedError:
        raise  # a valid token of the wrong role: no failed sign-in
    except AuthError as exc:
        if token is not None:
            ratelimit.API_TOKENS.record(client)
            auth.record_failed_login(
                database_url=database_url,
                client=client,
                channel="api",
                target=f"{request.method} {request.url.path}",
                reason=str(exc),
            )
        raise


def require(role: str) -> Callable[..., auth.Principal]:
    """A dependency: the principal of the request's bearer token, which must be allowed ``role``."""

    def dependency(
        request: Request,
        _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer_scheme)] = None,
    ) -> auth.Principal:
        return authenticate_request(request, role)

    return dependency


# Every route names the role it needs in its signature.
Viewer = Annotated[auth.Principal, Depends(require("viewer"))]
Operator = Annotated[auth.Principal, Depends(require("operator"))]
Admin = Annotated[auth.Principal, Depends(require("admin"))]
Edge = Annotated[auth.Principal, Depends(require("edge"))]

# The refusals of a route behind a token, for the OpenAPI document.
AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorDetail, "description": "missing, unknown or revoked token"},
    403: {"model": ErrorDetail, "description": "a token whose role may not use this route"},
    429: {"model": ErrorDetail, "description": "too many failed sign-ins from this address recently"},
}
