"""Sign-in (password or API token), one-time sign-in links, sign-out.

The sign-in form has no session yet, so its CSRF protection is a double-submit cookie: the form's
hidden token must equal the ``ef_signin_csrf`` cookie set when the form was shown. Failed attempts
are limited per client address (``cloud.api.ratelimit``: the same rule as the API's bearer tokens) and
each is written to the audit log (``console_auth_failed``: address, what was tried, why; never the
password, token or link)."""

# No "from __future__ import annotations": FastAPI resolves the Annotated aliases at runtime.

import hmac
import secrets
from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from cloud.api import ratelimit
from cloud.api.auth import record_failed_login
from cloud.api.deps import client_address, get_database_url
from cloud.console import auth
from cloud.console.deps import SESSION_COOKIE, ViewerForm
from cloud.console.templating import render
from cloud.errors import AuthError

router = APIRouter(include_in_schema=False)

SIGNIN_CSRF_COOKIE = "ef_signin_csrf"


def _client(request: Request) -> str:
    return client_address(request)


def _too_many_failures(client: str) -> bool:
    return ratelimit.CONSOLE_SIGNIN.blocked(client)


async def _record_failure(request: Request, client: str, *, target: str, reason: str) -> None:
    ratelimit.CONSOLE_SIGNIN.record(client)
    await run_in_threadpool(
        record_failed_login,
        database_url=get_database_url(request),
        client=client,
        channel="console",
        target=target,
        reason=reason,
    )


def _safe_next(target: str | None) -> str:
    # Only paths of this site: "//evil.example" or "https://..." would be an open redirect.
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/"


def set_session_cookie(request: Request, response: Response, cookie: str) -> None:
    """The session cookie: HttpOnly, SameSite=Lax, Secure when the console is served over TLS."""
    response.set_cookie(
        SESSION_COOKIE,
        cookie,
        max_age=int(auth.SESSION_TTL_S),
        httponly=True,
        samesite="lax",
        secure=request.url.scheme == "https",
        path="/",
    )


def _signin_page(request: Request, *, error: str | None = None, status_code: int = 200) -> HTMLResponse:
    csrf = secrets.token_urlsafe(24)
    response = render(
        request,
        "signin.html",
        None,
        status_code=status_code,
        error=error,
        signin_csrf=csrf,
        next=_safe_next(request.query_params.get("next")),
    )
    response.set_cookie(
        SIGNIN_CSRF_COOKIE,
        csrf,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/signin",
    )
    return response


@router.get("/signin", response_class=HTMLResponse)
def signin_form(request: Request) -> HTMLResponse:
    """The sign-in page: a username and password, or an API token."""
    return _signin_page(request)


@router.post("/signin", response_class=HTMLResponse)
async def signin(
    request: Request,
    *,
    csrf_token: Annotated[str, Form()] = "",
    username: Annotated[str, Form()] = "",
    password: Annotated[str, Form()] = "",
    token: Annotated[str, Form()] = "",
    next_path: Annotated[str, Form(alias="next")] = "/",
) -> Response:
    """Check the password (or token) and start a session; the same answer for every refusal."""
    expected = request.cookies.get(SIGNIN_CSRF_COOKIE, "")
    if not expected or not hmac.compare_digest(expected.encode(), csrf_token.encode()):
        return _signin_page(request, error="The form expired: please sign in again.", status_code=403)
    client = _client(request)
    if _too_many_failures(client):
        return _signin_page(request, error="Too many failed attempts: wait a few minutes.", status_code=429)
    url = get_database_url(request)
    try:
        if token:
            signed = await run_in_threadpool(auth.sign_in_token, database_url=url, token=token)
        else:
            signed = await run_in_threadpool(
                auth.sign_in_password, database_url=url, username=username, password=password
            )
    except AuthError as exc:
        # The user name tried is recorded (it says whose account is attacked); what was typed as the
        # password or token never is.
        target = "token" if token else f"user:{username[:64]}"
        await _record_failure(request, client, target=target, reason=str(exc))
        return _signin_page(request, error=str(exc), status_code=401)
    response = RedirectResponse(_safe_next(next_path), status_code=303)
    set_session_cookie(request, response, signed.cookie)
    response.delete_cookie(SIGNIN_CSRF_COOKIE, path="/signin")
    return response


@router.get("/signin/link/{secret}", response_class=HTMLResponse)
async def signin_link(request: Request, secret: str) -> Response:
    """Use a one-time sign-in link (the demo prints one): start a session and go to the fleet."""
    client = _client(request)
    if _too_many_failures(client):
        return _signin_page(request, error="Too many failed attempts: wait a few minutes.", status_code=429)
    try:
        signed = await run_in_threadpool(
            auth.sign_in_link, database_url=get_database_url(request), secret=secret
        )
    except AuthError as exc:
        await _record_failure(request, client, target="signin-link", reason=str(exc))
        return _signin_page(request, error=str(exc), status_code=401)
    # The secret is in this URL: no referrer from it, not even to this site.
    response = RedirectResponse("/", status_code=303, headers={"Referrer-Policy": "no-referrer"})
    set_session_cookie(request, response, signed.cookie)
    return response


@router.post("/signout")
async def signout(request: Request, _who: ViewerForm) -> Response:
    """End this browser's session."""
    await run_in_threadpool(
        auth.sign_out, database_url=get_database_url(request), cookie=request.cookies.get(SESSION_COOKIE)
    )
    response = RedirectResponse("/signin", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response
