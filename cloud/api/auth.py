"""Bearer tokens of the admin API. Only the sha256 of a token is stored; the secret is shown once.

Roles: ``viewer`` reads, ``operator`` also sends commands, edits device config and runs rollouts,
``admin`` may do everything (tokens, users, enrolments, keys); each may what the one before may.
``edge`` may only download artifacts (what an edge needs). The web console uses the same roles.
Tokens are 32 random bytes, so a plain sha256 (no slow KDF) is the right hash: there is nothing to
brute-force that a salt or stretching would protect."""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from dataclasses import dataclass

from cloud.errors import AuthError, PermissionDeniedError
from cloud.registry import crud, fleet
from cloud.registry.db import session_scope

logger = logging.getLogger(__name__)

ROLES = ("viewer", "operator", "admin", "edge")
# Person roles in order: each may do what the ones before it may.
PERSON_ROLES = ("viewer", "operator", "admin")
TOKEN_PREFIX = "eft_"  # noqa: S105 - a visible marker, not a secret


@dataclass(frozen=True)
class Principal:
    """Who a request's token belongs to, and its role."""

    name: str
    role: str

    def may(self, role: str) -> bool:
        """Whether this principal may do what ``role`` needs."""
        return role_allows(self.role, role)


def role_allows(held: str, needed: str) -> bool:
    """Whether a holder of role ``held`` may do what ``needed`` needs: admin may do everything, edge
    only what edges need, a person role what it and the roles below it may."""
    if held in {"admin", needed}:
        return True
    if held in PERSON_ROLES and needed in PERSON_ROLES:
        return PERSON_ROLES.index(held) >= PERSON_ROLES.index(needed)
    return False


def hash_token(token: str) -> str:
    """The stored form of a token: its sha256, in hex."""
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(*, database_url: str, name: str, role: str = "admin") -> str:
    """Create a token and return its secret (stored only as a hash)."""
    if role not in ROLES:
        raise AuthError(f"role {role!r}: one of {ROLES}")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    with session_scope(database_url) as session:
        fleet.add_token(session, name=name, role=role, token_hash=hash_token(token), prefix=token[:10])
    return token


def authenticate(*, database_url: str, token: str | None, role: str = "admin") -> Principal:
    """The principal of ``token``; raises ``AuthError`` when it is missing, unknown, revoked, or its
    role may not do what ``role`` needs (admin may do everything)."""
    if not token:
        raise AuthError("missing bearer token")
    digest = hash_token(token)
    with session_scope(database_url) as session:
        found = fleet.token_by_hash(session, token_hash=digest)
        if found is None or not hmac.compare_digest(found.token_hash, digest):
            raise AuthError("unknown token")
        if found.revoked_at is not None:
            raise AuthError("revoked token")
        if not role_allows(found.role, role):
            raise PermissionDeniedError(f"token {found.name!r} (role {found.role}) may not do this")
        found.last_used_at = time.time()
        return Principal(found.name, found.role)


def record_failed_login(*, database_url: str, client: str, channel: str, target: str, reason: str) -> None:
    """An audit log row for a refused sign-in (``channel``: ``api`` or ``console``): who tried from
    where and why it was refused, never the secret that was tried."""
    with session_scope(database_url) as session:
        crud.audit(
            session,
            actor=f"client:{client}",
            action=f"{channel}_auth_failed",
            target=target,
            detail={"client": client, "reason": reason},
        )
    logger.warning("%s: refused a sign-in from %s (%s): %s", channel, client, target, reason)
