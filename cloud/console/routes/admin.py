"""The console's admin page (admins only): API tokens (create with a role, the secret shown once;
revoke), console users (create, change role, disable / enable), one-time sign-in links, and the
signing key in use (read-only). Every action is written to the audit log as the CLI writes it, with
``console:<name>`` as the actor."""

# No "from __future__ import annotations": FastAPI resolves the Annotated aliases at runtime.

import hashlib
from typing import Annotated, Any

from fastapi import Form, Request
from fastapi.responses import HTMLResponse, Response
from fastapi.routing import APIRouter
from starlette.concurrency import run_in_threadpool

from cloud.api import auth as api_auth
from cloud.api.deps import get_database_url, get_settings
from cloud.console import auth
from cloud.console.auth import ConsoleIdentity
from cloud.console.deps import Admin, AdminForm
from cloud.console.templating import back_to, flash_of, render
from cloud.errors import CloudError
from cloud.registry import accounts, crud, fleet, learning_views
from cloud.registry.db import session_scope
from shared.errors import EdgefleetError
from shared.settings.cloud import CloudSettings
from shared.signing import key_id

router = APIRouter(include_in_schema=False)

MAX_LINK_TTL_MIN = 7 * 24 * 60


def _audit(
    url: str, user: ConsoleIdentity, action: str, target: str, detail: dict[str, Any] | None = None
) -> None:
    with session_scope(url) as session:
        crud.audit(session, actor=user.actor, action=action, target=target, detail=detail)


def _signing_keys(settings: CloudSettings, used: dict[str, int]) -> dict[str, Any]:
    """The configured key pair as far as the public half tells: paths, key id, fingerprint."""
    try:
        private, public = settings.key_paths()
    except EdgefleetError as exc:
        return {"error": str(exc), "used": used}
    if not public.exists():
        return {
            "error": f"no public key at {public} yet"
            + (" (dev mode generates one when the first model is signed)" if settings.dev_mode else ""),
            "used": used,
        }
    pem = public.read_bytes()
    return {
        "error": None,
        "key_id": key_id(pem),
        "fingerprint": hashlib.sha256(pem).hexdigest(),
        "public_path": str(public),
        "private_path": str(private),
        "private_present": private.exists(),
        "dev_mode": settings.dev_mode,
        "used": used,
    }


def _page(request: Request, user: ConsoleIdentity, *, status_code: int = 200, **extra: Any) -> HTMLResponse:
    settings = get_settings(request)
    with session_scope(get_database_url(request)) as session:
        tokens = [
            {
                "name": t.name,
                "role": t.role,
                "prefix": t.prefix,
                "created_at": t.created_at,
                "last_used_at": t.last_used_at,
                "revoked_at": t.revoked_at,
            }
            for t in fleet.list_tokens(session)
        ]
        users = [
            {
                "name": u.username,
                "role": u.role,
                "created_at": u.created_at,
                "last_login_at": u.last_login_at,
                "disabled_at": u.disabled_at,
            }
            for u in accounts.list_users(session)
        ]
        used = learning_views.signing_key_use(session)
    context = {"flash": None, "flash_kind": "ok", **flash_of(request), **extra}
    return render(
        request,
        "admin.html",
        user,
        status_code=status_code,
        nav="/admin",
        tokens=tokens,
        users=users,
        keys=_signing_keys(settings, used),
        token_roles=api_auth.ROLES,
        person_roles=api_auth.PERSON_ROLES,
        **context,
    )


@router.get("/admin", response_class=HTMLResponse)
def admin_page(request: Request, user: Admin) -> HTMLResponse:
    """Tokens, users, sign-in links and the signing key."""
    return _page(request, user)


# -- tokens ------------------------------------------------------------------------------------------


@router.post("/admin/tokens", response_class=HTMLResponse)
async def create_token(
    request: Request,
    user: AdminForm,
    name: Annotated[str, Form()] = "",
    role: Annotated[str, Form()] = "viewer",
) -> Response:
    """Create an API token; the page shows its secret this once (only its hash is stored)."""
    name = name.strip()
    url = get_database_url(request)
    if not name:
        return back_to("/admin", "Token not created: it needs a name", error=True)
    try:
        secret = await run_in_threadpool(api_auth.create_token, database_url=url, name=name, role=role)
    except (CloudError, ValueError) as exc:
        return back_to("/admin", f"Token not created: {exc}", error=True)
    await run_in_threadpool(_audit, url, user, "token_create", name, {"role": role})
    return await run_in_threadpool(
        lambda: _page(
            request,
            user,
            status_code=200,
            new_token={"name": name, "role": role, "secret": secret},
            flash=f"Token {name} created (role {role}): copy its secret now, it is not shown again",
        )
    )


@router.post("/admin/tokens/{name}/revoke")
async def revoke_token(request: Request, user: AdminForm, name: str) -> Response:
    """Revoke a token: the API (and console sessions signed in with it) refuse it from now on."""

    def run() -> None:
        with session_scope(get_database_url(request)) as session:
            fleet.revoke_token(session, name=name)
            crud.audit(session, actor=user.actor, action="token_revoke", target=name)

    try:
        await run_in_threadpool(run)
    except CloudError as exc:
        return back_to("/admin", f"Not revoked: {exc}", error=True)
    return back_to("/admin", f"Token {name} revoked")


# -- users ---------------------------------------------------------------------------------------------


@router.post("/admin/users")
async def create_user(
    request: Request,
    user: AdminForm,
    username: Annotated[str, Form()] = "",
    role: Annotated[str, Form()] = "viewer",
    password: Annotated[str, Form()] = "",
) -> Response:
    """Create a console user with a password (stored as a scrypt hash)."""
    username = username.strip()
    url = get_database_url(request)
    try:
        await run_in_threadpool(
            auth.create_user, database_url=url, username=username, role=role, password=password
        )
    except (CloudError, ValueError) as exc:
        return back_to("/admin", f"User not created: {exc}", error=True)
    await run_in_threadpool(_audit, url, user, "user_create", username, {"role": role})
    return back_to("/admin", f"User {username} created (role {role})")


@router.post("/admin/users/{username}")
async def change_user(
    request: Request,
    user: AdminForm,
    username: str,
    role: Annotated[str, Form()] = "",
    disabled: Annotated[str, Form()] = "",
) -> Response:
    """Change a user's role, or disable / enable it; its open sessions end at once."""
    new_role = role or None
    if new_role is not None and new_role not in api_auth.PERSON_ROLES:
        return back_to("/admin", f"Role {role!r}: one of {', '.join(api_auth.PERSON_ROLES)}", error=True)
    flag = {"yes": True, "no": False}.get(disabled)
    if new_role is None and flag is None:
        return back_to("/admin", "Nothing to change", error=True)

    def run() -> None:
        with session_scope(get_database_url(request)) as session:
            accounts.set_user(session, username=username, role=new_role, disabled=flag)
            detail = {"role": new_role, "disabled": flag, "password_changed": False}
            crud.audit(session, actor=user.actor, action="user_set", target=username, detail=detail)

    try:
        await run_in_threadpool(run)
    except CloudError as exc:
        return back_to("/admin", f"Not changed: {exc}", error=True)
    what = f"role {new_role}" if new_role else ("disabled" if flag else "enabled")
    return back_to("/admin", f"User {username}: {what}")


# -- sign-in links -------------------------------------------------------------------------------------


@router.post("/admin/signin-links", response_class=HTMLResponse)
async def create_signin_link(
    request: Request,
    user: AdminForm,
    name: Annotated[str, Form()] = "link",
    role: Annotated[str, Form()] = "viewer",
    ttl_min: Annotated[float, Form()] = 60.0,
) -> Response:
    """A one-time sign-in link (shown once), valid for ``ttl_min`` minutes."""
    name = name.strip() or "link"
    url = get_database_url(request)
    if not 0 < ttl_min <= MAX_LINK_TTL_MIN:
        return back_to("/admin", f"Validity: 1 to {MAX_LINK_TTL_MIN} minutes", error=True)
    if not auth.USERNAME_PATTERN.fullmatch(name):
        return back_to("/admin", "Name: 1-64 letters, digits or _ . @ -", error=True)
    try:
        secret = await run_in_threadpool(
            auth.create_signin_link, database_url=url, name=name, role=role, ttl_s=ttl_min * 60
        )
    except CloudError as exc:
        return back_to("/admin", f"No link created: {exc}", error=True)
    await run_in_threadpool(_audit, url, user, "signin_link_create", name, {"role": role})
    link = f"{str(request.base_url).rstrip('/')}/signin/link/{secret}"
    return await run_in_threadpool(
        lambda: _page(
            request,
            user,
            status_code=200,
            new_link={"name": name, "role": role, "url": link, "ttl_min": ttl_min},
            flash=f"Sign-in link for {name} (role {role}) created: it works once",
        )
    )
