"""Queries of broker identities and claim tokens (tables of migration 0006).

Keyword-only functions shared by the CLI, the API, the claim handler and ``broker run``. Only hashes
come in: secrets are made and hashed by the caller (``shared.identity``). Every change bumps the
``auth`` counter, which ``broker run`` polls to know when to regenerate the broker's files, and is
written to the audit log with its actor."""

from __future__ import annotations

import time

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from cloud.errors import NotFoundError
from cloud.registry.models import AuditLog, ClaimToken, Identity, RegistryCounter
from shared.identity import IdentityKind, OperatorRole, check_broker_hash, check_identity_id

AUTH_COUNTER = "auth"
ACTIVE = "active"
REVOKED = "revoked"


# -- the change counter ------------------------------------------------------------------------------


def auth_revision(session: Session) -> int:
    """How many changes identities and claim tokens have seen (0 before the first)."""
    value = session.scalar(select(RegistryCounter.value).where(RegistryCounter.name == AUTH_COUNTER))
    return int(value or 0)


def _bump(session: Session) -> None:
    counter = session.get(RegistryCounter, AUTH_COUNTER)
    if counter is None:
        session.add(RegistryCounter(name=AUTH_COUNTER, value=1))
    else:
        session.execute(
            update(RegistryCounter)
            .where(RegistryCounter.name == AUTH_COUNTER)
            .values(value=RegistryCounter.value + 1)
        )
    session.flush()


def _audit(session: Session, *, actor: str, action: str, target: str, detail: dict[str, object]) -> None:
    session.add(AuditLog(actor=actor, action=action, target=target, detail=detail))


# -- identities --------------------------------------------------------------------------------------


def get_identity(session: Session, *, identity_id: str) -> Identity | None:
    """The identity called ``identity_id`` (active or revoked), or None."""
    return session.scalar(select(Identity).where(Identity.identity_id == identity_id))


def active_identity(
    session: Session, *, identity_id: str, kind: IdentityKind | str | None = None
) -> Identity | None:
    """The identity if it exists, is active and (when given) of ``kind``; else None."""
    identity = get_identity(session, identity_id=identity_id)
    if identity is None or identity.status != ACTIVE:
        return None
    if kind is not None and identity.kind != str(kind):
        return None
    return identity


def list_identities(
    session: Session, *, kind: IdentityKind | str | None = None, status: str | None = None
) -> list[Identity]:
    """Identities ordered by id, optionally of one kind and/or status."""
    query = select(Identity).order_by(Identity.id)
    if kind is not None:
        query = query.where(Identity.kind == str(kind))
    if status is not None:
        query = query.where(Identity.status == status)
    return list(session.scalars(query))


def enroll(
    session: Session,
    *,
    identity_id: str,
    kind: IdentityKind | str,
    secret_hash: str,
    role: OperatorRole | str | None = None,
    reissue: bool = False,
    enrolled_via: str = "cli",
    actor: str = "cli",
) -> Identity:
    """Create ``identity_id`` with ``secret_hash``, or give a revoked one a new secret (re-enrollment).

    An active identity gets a new secret only with ``reissue`` (its old secret stops working); its
    kind never changes. ``ValueError`` names what is wrong."""
    kind = IdentityKind(kind)
    check_identity_id(identity_id, kind=kind)
    check_broker_hash(secret_hash)
    if kind is IdentityKind.OPERATOR:
        role = OperatorRole(role or OperatorRole.VIEWER)
    elif role is not None:
        raise ValueError(f"only operators have a role; {identity_id!r} is a {kind}")
    identity = get_identity(session, identity_id=identity_id)
    now = time.time()
    if identity is None:
        identity = Identity(
            identity_id=identity_id,
            kind=str(kind),
            role=None if role is None else str(role),
            secret_hash=secret_hash,
            status=ACTIVE,
            label_trusted=False,
            enrolled_via=enrolled_via,
            created_at=now,
            updated_at=now,
        )
        session.add(identity)
        action = "enroll"
    else:
        if identity.kind != str(kind):
            raise ValueError(f"{identity_id!r} is enrolled as a {identity.kind}, not a {kind}")
        if identity.status == ACTIVE and not reissue:
            raise ValueError(
                f"{identity_id!r} is enrolled already; "
                "reissue its secret explicitly (--reissue) or revoke it first"
            )
        action = "reissue" if identity.status == ACTIVE else "re-enroll"
        identity.secret_hash = secret_hash
        identity.status = ACTIVE
        identity.revoked_at = None
        identity.enrolled_via = enrolled_via
        identity.updated_at = now
        if role is not None:
            identity.role = str(role)
    _audit(
        session,
        actor=actor,
        action=action,
        target=f"{kind}:{identity_id}",
        detail={"kind": str(kind), "role": None if role is None else str(role), "via": enrolled_via},
    )
    _bump(session)
    return identity


def revoke(session: Session, *, identity_id: str, actor: str = "cli") -> Identity:
    """End ``identity_id``: the broker refuses it (and closes its live connections) at its next sync.

    ``NotFoundError`` if there is no such identity; revoking a revoked one changes nothing."""
    identity = get_identity(session, identity_id=identity_id)
    if identity is None:
        raise NotFoundError(f"no identity called {identity_id!r}")
    if identity.status == REVOKED:
        return identity
    now = time.time()
    identity.status = REVOKED
    identity.revoked_at = now
    identity.updated_at = now
    _audit(session, actor=actor, action="revoke", target=f"{identity.kind}:{identity_id}", detail={})
    _bump(session)
    return identity


def set_label_trust(session: Session, *, identity_id: str, trusted: bool, actor: str = "cli") -> Identity:
    """Mark a device a trusted labeller (its labels may train models) or not."""
    identity = get_identity(session, identity_id=identity_id)
    if identity is None:
        raise NotFoundError(f"no identity called {identity_id!r}")
    if identity.kind != IdentityKind.DEVICE:
        raise ValueError(f"{identity_id!r} is a {identity.kind}; only devices label data")
    if identity.label_trusted != trusted:
        identity.label_trusted = trusted
        identity.updated_at = time.time()
        _audit(
            session,
            actor=actor,
            action="set_label_trust",
            target=f"device:{identity_id}",
            detail={"trusted": trusted},
        )
    return identity


def label_trusted_devices(session: Session) -> set[str]:
    """Ids of the active devices whose labels may train models."""
    query = select(Identity.identity_id).where(
        Identity.kind == str(IdentityKind.DEVICE),
        Identity.status == ACTIVE,
        Identity.label_trusted.is_(True),
    )
    return set(session.scalars(query))


# -- claim tokens ------------------------------------------------------------------------------------


def add_claim_token(
    session: Session,
    *,
    token_id: str,
    secret_hash: str,
    expires_at: float,
    kind: IdentityKind | str = IdentityKind.DEVICE,
    actor: str = "cli",
) -> ClaimToken:
    """A new one-time claim token (its secret already hashed)."""
    kind = IdentityKind(kind)
    if kind not in (IdentityKind.DEVICE, IdentityKind.EDGE):
        raise ValueError(f"claim tokens enroll devices or edges, not {kind}")
    check_broker_hash(secret_hash)
    token = ClaimToken(
        token_id=token_id,
        kind=str(kind),
        secret_hash=secret_hash,
        created_at=time.time(),
        expires_at=expires_at,
        created_by=actor,
    )
    session.add(token)
    _audit(
        session,
        actor=actor,
        action="create_claim_token",
        target=f"claim:{token_id}",
        detail={"kind": str(kind), "expires_at": expires_at},
    )
    _bump(session)
    return token


def get_claim_token(session: Session, *, token_id: str) -> ClaimToken | None:
    """The claim token ``token_id`` (used, expired or not), or None."""
    return session.get(ClaimToken, token_id)


def usable_claim_tokens(session: Session, *, now: float | None = None) -> list[ClaimToken]:
    """Claim tokens neither used nor expired: the broker lets these log in."""
    now = time.time() if now is None else now
    query = (
        select(ClaimToken)
        .where(ClaimToken.used_at.is_(None), ClaimToken.expires_at > now)
        .order_by(ClaimToken.token_id)
    )
    return list(session.scalars(query))


def next_claim_expiry(session: Session, *, now: float | None = None) -> float | None:
    """When the next usable claim token expires (the broker must drop it then), or None."""
    tokens = usable_claim_tokens(session, now=now)
    return min((token.expires_at for token in tokens), default=None)


def use_claim_token(
    session: Session, *, token_id: str, identity_id: str, now: float | None = None
) -> ClaimToken:
    """Mark a token used by ``identity_id``; ``ValueError`` if it is unknown, used or expired."""
    now = time.time() if now is None else now
    token = session.get(ClaimToken, token_id, with_for_update=True)
    if token is None:
        raise ValueError(f"unknown claim token {token_id!r}")
    if token.used_at is not None:
        raise ValueError(f"claim token {token_id!r} was used already")
    if token.expires_at <= now:
        raise ValueError(f"claim token {token_id!r} has expired")
    token.used_at = now
    token.used_by = identity_id
    _audit(
        session,
        actor=f"claim:{token_id}",
        action="use_claim_token",
        target=f"claim:{token_id}",
        detail={"identity": identity_id},
    )
    _bump(session)
    return token
