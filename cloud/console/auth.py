"""Who is signed in to the console: passwords, browser sessions, one-time sign-in links, CSRF tokens.

Secrets never reach the registry: passwords are stored as scrypt hashes, session cookies and sign-in
links as their sha256 (they are 32 random bytes: nothing to brute-force). A session carries its own
CSRF token, compared in constant time on every form; the same roles as the API (viewer, operator,
admin) decide what a session may do. API tokens sign in too (edge tokens do not)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import re
import secrets
import time
from dataclasses import dataclass

from cloud.api import auth as api_auth
from cloud.errors import AuthError, PermissionDeniedError
from cloud.registry import accounts
from cloud.registry.db import session_scope

logger = logging.getLogger(__name__)

SESSION_TTL_S = 12 * 3600.0
SIGNIN_LINK_TTL_S = 3600.0
# A session's last_seen_at is written at most this often (not on every page view).
TOUCH_EVERY_S = 60.0
MIN_PASSWORD_LENGTH = 10
# scrypt N=2**15, r=8, p=3: one of OWASP's equivalent minimum settings (32 MiB, ~0.5 s here); the
# parameters are stored with each hash, so raising them later keeps old hashes verifiable.
SCRYPT_N = 2**15
SCRYPT_R = 8
SCRYPT_P = 3
USERNAME_PATTERN = re.compile(r"[A-Za-z0-9_.@-]{1,64}")


@dataclass(frozen=True)
class ConsoleIdentity:
    """A signed-in browser: who, with which role, and the CSRF token its forms must carry."""

    name: str
    role: str
    principal: str
    csrf_token: str

    def may(self, role: str) -> bool:
        """Whether this session may do what ``role`` needs."""
        return api_auth.role_allows(self.role, role)

    @property
    def actor(self) -> str:
        """Who the audit log and command records name for this session's actions."""
        return f"console:{self.name}"


@dataclass(frozen=True)
class SignedIn:
    """A new session: the cookie to set (shown once) and who it is."""

    cookie: str
    identity: ConsoleIdentity


def _sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


# -- passwords --------------------------------------------------------------------------------------


def hash_password(password: str) -> str:
    """``scrypt$N$r$p$salt$hash`` (base64), a fresh 16-byte salt each time."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(
        password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, maxmem=128 * 1024 * 1024, dklen=32
    )
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, stored: str) -> bool:
    """Whether ``password`` matches ``stored`` (constant-time compare; False for a malformed hash)."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest)
        actual = hashlib.scrypt(
            password.encode(),
            salt=base64.b64decode(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            maxmem=128 * 1024 * 1024,
            dklen=len(expected),
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


# A hash to verify against when the user does not exist, so both answers take as long.
_DUMMY_HASH = "scrypt$32768$8$3$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="


def check_new_user(username: str, role: str, password: str) -> None:
    """Raise ``AuthError`` naming what is wrong with a new user's name, role or password."""
    if not USERNAME_PATTERN.fullmatch(username):
        raise AuthError(f"username {username!r}: 1-64 letters, digits or _ . @ -")
    if role not in api_auth.PERSON_ROLES:
        raise AuthError(f"role {role!r}: one of {', '.join(api_auth.PERSON_ROLES)}")
    if len(password) < MIN_PASSWORD_LENGTH:
        raise AuthError(f"password: at least {MIN_PASSWORD_LENGTH} characters")


def create_user(*, database_url: str, username: str, role: str, password: str) -> None:
    """Create a console user (the password is stored only as a scrypt hash)."""
    check_new_user(username, role, password)
    with session_scope(database_url) as session:
        accounts.add_user(session, username=username, role=role, password_hash=hash_password(password))


# -- sessions ---------------------------------------------------------------------------------------


def _new_session(database_url: str, *, name: str, principal: str, role: str) -> SignedIn:
    cookie = secrets.token_urlsafe(32)
    csrf = secrets.token_urlsafe(32)
    now = time.time()
    with session_scope(database_url) as session:
        accounts.purge_expired_sessions(session, now=now)
        accounts.add_session(
            session,
            session_hash=_sha256(cookie),
            principal=principal,
            role=role,
            csrf_token=csrf,
            expires_at=now + SESSION_TTL_S,
        )
    logger.info("console: %s signed in (role %s)", principal, role)
    return SignedIn(cookie, ConsoleIdentity(name=name, role=role, principal=principal, csrf_token=csrf))


def sign_in_password(*, database_url: str, username: str, password: str) -> SignedIn:
    """A session for a user whose password matches; ``AuthError`` (one message for every refusal)."""
    with session_scope(database_url) as session:
        user = accounts.user_by_name(session, username=username)
        stored = user.password_hash if user is not None else _DUMMY_HASH
        matches = verify_password(password, stored)
        if user is None or not matches or user.disabled_at is not None:
            raise AuthError("wrong username or password")
        user.last_login_at = time.time()
        role = user.role
    return _new_session(database_url, name=username, principal=f"user:{username}", role=role)


def sign_in_token(*, database_url: str, token: str) -> SignedIn:
    """A session for an API token of a person role (viewer, operator, admin); edge tokens are refused."""
    try:
        principal = api_auth.authenticate(database_url=database_url, token=token.strip(), role="viewer")
    except PermissionDeniedError as exc:
        raise AuthError("this token may not sign in to the console") from exc
    return _new_session(
        database_url, name=principal.name, principal=f"token:{principal.name}", role=principal.role
    )


def create_signin_link(
    *, database_url: str, name: str = "demo", role: str = "admin", ttl_s: float | None = None
) -> str:
    """A one-time sign-in secret (for ``/signin/link/<secret>``), valid for ``ttl_s`` seconds."""
    if role not in api_auth.PERSON_ROLES:
        raise AuthError(f"role {role!r}: one of {', '.join(api_auth.PERSON_ROLES)}")
    secret = secrets.token_urlsafe(32)
    with session_scope(database_url) as session:
        accounts.add_signin_link(
            session,
            link_hash=_sha256(secret),
            name=name,
            role=role,
            expires_at=time.time() + (SIGNIN_LINK_TTL_S if ttl_s is None else ttl_s),
        )
    return secret


def sign_in_link(*, database_url: str, secret: str) -> SignedIn:
    """A session for an unused, unexpired sign-in link (which is used up); ``AuthError`` otherwise."""
    with session_scope(database_url) as session:
        link = accounts.use_signin_link(session, link_hash=_sha256(secret), now=time.time())
        if link is None:
            raise AuthError("this sign-in link is unknown, expired or used already")
        name, role = link.name, link.role
    return _new_session(database_url, name=name, principal=f"link:{name}", role=role)


def session_of(*, database_url: str, cookie: str | None) -> ConsoleIdentity | None:
    """The identity of a session cookie, or None when unknown, expired, or its user or token is gone."""
    if not cookie:
        return None
    now = time.time()
    with session_scope(database_url) as session:
        row = accounts.session_by_hash(session, session_hash=_sha256(cookie))
        if row is None or row.expires_at < now:
            return None
        if not accounts.principal_active(session, principal=row.principal):
            accounts.end_session(session, session_hash=row.session_hash)
            return None
        if now - row.last_seen_at > TOUCH_EVERY_S:
            row.last_seen_at = now
        return ConsoleIdentity(
            name=row.principal.partition(":")[2],
            role=row.role,
            principal=row.principal,
            csrf_token=row.csrf_token,
        )


def sign_out(*, database_url: str, cookie: str | None) -> None:
    """End the session of ``cookie`` (nothing when there is none)."""
    if cookie:
        with session_scope(database_url) as session:
            accounts.end_session(session, session_hash=_sha256(cookie))


def csrf_matches(identity: ConsoleIdentity, submitted: str | None) -> bool:
    """Whether a form's or header's CSRF token is the session's (constant time)."""
    return bool(submitted) and hmac.compare_digest(identity.csrf_token.encode(), (submitted or "").encode())
