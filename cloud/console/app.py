"""The app ``edgefleet cloud api`` serves: the admin API plus the console mounted on it (its
routers, ``/static``, the sign-in redirect and 403 page, and the security headers of every page: a
CSP allowing only this origin's scripts)."""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request, Response
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

from cloud.api import create_app as create_api_app
from cloud.console.deps import ConsoleForbidden, SignInRequired, require
from cloud.console.routes import pages, signin
from cloud.console.templating import STATIC_DIR, render
from cloud.errors import AuthError
from shared.redact import redact_text
from shared.settings.cloud import CloudSettings

# Pages only run this origin's scripts; styles may be inline (uPlot sizes its canvas in style attributes).
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'; object-src 'none'"
)
# FastAPI's own /docs pages load Swagger UI from a CDN with inline scripts: they keep their defaults.
_NO_CSP_PREFIXES = ("/docs", "/redoc", "/openapi.json")


_SIGNIN_LINK = re.compile(r"(/signin/link/)[^/?#\s]+")


class RedactAccessLog(logging.Filter):
    """Keeps secrets out of the server's access log: a one-time sign-in link's secret (in its path)
    and any password or token in a logged URL become ``***``."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the record's arguments; never drops a record."""
        if isinstance(record.args, tuple):
            record.args = tuple(
                _SIGNIN_LINK.sub(r"\1***", redact_text(arg)) if isinstance(arg, str) else arg
                for arg in record.args
            )
        return True


def _redact_access_log() -> None:
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, RedactAccessLog) for f in access.filters):
        access.addFilter(RedactAccessLog())


def create_app(settings: CloudSettings) -> FastAPI:
    """The admin API over the registry and broker of ``settings``, with the console at ``/``."""
    app = create_api_app(settings)
    mount_console(app, routers=pages.ROUTERS)
    return app


def mount_console(app: FastAPI, *, routers: tuple[object, ...] = ()) -> None:
    """Serve the console on ``app``: sign-in plus ``routers`` (the pages), and the static assets."""
    app.include_router(signin.router)
    for router in routers:
        app.include_router(router)  # type: ignore[arg-type]
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_exception_handler(SignInRequired, _sign_in_first)
    app.add_exception_handler(ConsoleForbidden, _forbidden)
    app.middleware("http")(_security_headers)
    # The API's /docs, /redoc and /openapi.json: a browser's session (any role) reads them too.
    app.state.docs_session_auth = _docs_session
    _redact_access_log()


_docs_viewer = require("viewer")


async def _docs_session(request: Request) -> object:
    """A session for the docs pages: a browser without one is sent to sign in; the machine-readable
    ``/openapi.json`` answers 401 instead."""
    try:
        return await _docs_viewer(request)
    except SignInRequired:
        if request.url.path.endswith(".json"):
            raise AuthError("missing bearer token (or console session)") from None
        raise


async def _sign_in_first(request: Request, _exc: Exception) -> Response:
    if request.headers.get("hx-request") or request.url.path.startswith("/events"):
        # htmx follows HX-Redirect; an event stream just ends.
        return Response(status_code=401, headers={"HX-Redirect": "/signin"})
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    next_part = f"?next={target}" if request.method == "GET" and target != "/" else ""
    return RedirectResponse(f"/signin{next_part}", status_code=303)


async def _forbidden(request: Request, exc: Exception) -> Response:
    identity = getattr(request.state, "console_identity", None)
    return render(request, "forbidden.html", identity, status_code=403, reason=str(exc))


async def _security_headers(
    request: Request, call_next: Callable[[Request], Awaitable[Response]]
) -> Response:
    response = await call_next(request)
    if not request.url.path.startswith(_NO_CSP_PREFIXES):
        response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        # Never to other sites. Not "no-referrer": browsers then send "Origin: null" on form posts,
        # which the CSRF origin check must refuse. (The sign-in link's answer sets no-referrer.)
        response.headers.setdefault("Referrer-Policy", "same-origin")
        response.headers.setdefault("X-Frame-Options", "DENY")
    return response
