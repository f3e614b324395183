"""Dependencies of the console's pages: the signed-in identity with the role a page needs, and for
every POST the session's CSRF token (form field ``csrf_token`` or header ``X-CSRF-Token``) and a
same-origin check.

A page names what it needs in its signature: ``Viewer`` / ``Operator`` / ``Admin`` to read, and
``ViewerForm`` / ``OperatorForm`` / ``AdminForm`` for a POST. No session raises ``SignInRequired``
(a redirect to ``/signin``); a role that may not, or a missing or wrong CSRF token, raises
``ConsoleForbidden`` (403). The handlers are in ``cloud.console.app``."""

# No "from __future__ import annotations": FastAPI resolves the Annotated aliases at runtime.

from collections.abc import Awaitable, Callable
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import Depends, Request
from starlette.concurrency import run_in_threadpool

from cloud.api.deps import get_database_url
from cloud.console import auth
from cloud.console.auth import ConsoleIdentity

SESSION_COOKIE = "ef_session"
CSRF_HEADER = "x-csrf-token"
CSRF_FIELD = "csrf_token"


class SignInRequired(Exception):  # noqa: N818 - a control-flow signal, answered with a redirect
    """No valid session: the browser is sent to the sign-in page."""


class ConsoleForbidden(Exception):  # noqa: N818 - answered with a 403 page
    """A session whose role may not do this, or a form without the session's CSRF token."""


async def current_identity(request: Request) -> ConsoleIdentity:
    """The identity of the request's session cookie; ``SignInRequired`` when there is none."""
    cached = getattr(request.state, "console_identity", None)
    if cached is not None:
        return cached  # type: ignore[no-any-return]
    identity = await run_in_threadpool(
        auth.session_of,
        database_url=get_database_url(request),
        cookie=request.cookies.get(SESSION_COOKIE),
    )
    if identity is None:
        raise SignInRequired
    request.state.console_identity = identity
    return identity


def same_origin(request: Request) -> bool:
    """Whether the request's Origin (or, without one, Referer) is this host; absent counts as same."""
    source = request.headers.get("origin") or request.headers.get("referer")
    if not source or source == "null":
        return source is None
    parts = urlsplit(source)
    return parts.netloc == request.headers.get("host", "") and parts.scheme == request.url.scheme


async def check_csrf(request: Request, identity: ConsoleIdentity) -> None:
    """``ConsoleForbidden`` unless the request carries the session's CSRF token and comes from here."""
    submitted = request.headers.get(CSRF_HEADER)
    if submitted is None and "form" in request.headers.get("content-type", ""):
        form = await request.form()  # cached by Starlette: the route reads the same form
        value = form.get(CSRF_FIELD)
        submitted = value if isinstance(value, str) else None
    if not auth.csrf_matches(identity, submitted):
        raise ConsoleForbidden("the form's CSRF token is missing or wrong: reload the page and try again")
    if not same_origin(request):
        raise ConsoleForbidden("a form posted from another site")


def require(role: str, *, form: bool = False) -> Callable[[Request], Awaitable[ConsoleIdentity]]:
    """A dependency: the signed-in identity, which must be allowed ``role``; with ``form`` also the
    request's CSRF token."""

    async def dependency(request: Request) -> ConsoleIdentity:
        identity = await current_identity(request)
        if not identity.may(role):
            raise ConsoleForbidden(f"{identity.name} (role {identity.role}) may not do this: it needs {role}")
        if form:
            await check_csrf(request, identity)
        return identity

    return dependency


Viewer = Annotated[ConsoleIdentity, Depends(require("viewer"))]
Operator = Annotated[ConsoleIdentity, Depends(require("operator"))]
Admin = Annotated[ConsoleIdentity, Depends(require("admin"))]
ViewerForm = Annotated[ConsoleIdentity, Depends(require("viewer", form=True))]
OperatorForm = Annotated[ConsoleIdentity, Depends(require("operator", form=True))]
AdminForm = Annotated[ConsoleIdentity, Depends(require("admin", form=True))]
