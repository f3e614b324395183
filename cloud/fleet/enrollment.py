"""Enrollment, claim tokens and revocation: the service layer of ``edgefleet fleet enroll ...``, the
admin API's ``/v1/identities`` and the claim handler (``cloud.fleet.claims``).

``enroll_identity`` makes the identity's secret here (``shared.identity.new_secret``), stores only its
hash (``broker_hash``, mosquitto's ``$7$``) and returns the **enrollment bundle** (shared/enrollment.py)
with the secret in it: the only time it is shown. ``create_claim_tokens`` does the same for one-time
claim tokens (``TOKEN_ID.SECRET``). Every change is audited with its actor (cloud/registry/identities.py)
and bumps the registry's ``auth`` counter, on which ``edgefleet broker run`` regenerates the broker's
password and ACL files: a new identity may log in, and a revoked one is refused (and disconnected),
once the broker has synced.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from cloud.errors import NotFoundError
from cloud.registry import identities
from cloud.registry.db import session_scope
from cloud.registry.models import Identity
from shared.enrollment import TOKEN_SEPARATOR, EnrollmentBundle, EnrollmentError
from shared.errors import EdgefleetError
from shared.identity import (
    IdentityError,
    IdentityKind,
    OperatorRole,
    broker_hash,
    check_identity_id,
    new_secret,
)
from shared.settings.cloud import CloudSettings
from shared.signing import key_id

logger = logging.getLogger(__name__)

MAX_TOKENS_PER_CALL: Final = 1000
TOKEN_ID_BYTES: Final = 6  # 12 hex digits: a short name for logs and the audit, not a secret
_DURATION_RE: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNIT_S: Final = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}


def parse_duration(text: str) -> float:
    """``90s``, ``30m``, ``1h``, ``2d``, ``1w`` or plain seconds -> seconds; ``EnrollmentError`` otherwise."""
    match = _DURATION_RE.match(text)
    if match is None:
        raise EnrollmentError(
            f"duration {text!r}: expected a number with an optional unit s, m, h, d or w (e.g. 90s, 30m, 1h)"
        )
    seconds = float(match.group(1)) * _UNIT_S[match.group(2)]
    if seconds <= 0:
        raise EnrollmentError(f"duration {text!r} must be longer than zero")
    return seconds


# -- what bundles say ----------------------------------------------------------------------------------


def broker_url_for(settings: CloudSettings, kind: IdentityKind | str) -> str:
    """The listener an identity of ``kind`` uses: the cloud listener for services, else the site one."""
    if IdentityKind(kind) is IdentityKind.SERVICE:
        return settings.enrollment.cloud_broker_url or settings.broker.url
    return settings.enrollment.site_broker_url or settings.broker.url


def ca_certificate(settings: CloudSettings) -> str | None:
    """The PEM of the CA configured for the broker (``enrollment.ca_file``, else ``broker.tls_ca``)."""
    path = settings.enrollment.ca_file or settings.broker.tls_ca
    if path is None:
        return None
    try:
        text = Path(path).read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise EnrollmentError(f"broker CA file {path} cannot be read: {exc}") from exc
    if "-----BEGIN CERTIFICATE-----" not in text:
        raise EnrollmentError(f"broker CA file {path} holds no PEM certificate")
    return text


def cloud_public_key(settings: CloudSettings, *, required: bool) -> tuple[str | None, str | None]:
    """The cloud's signing public key (PEM) and its key id; in dev mode a missing pair is generated.

    ``(None, None)`` when no key is configured and ``required`` is false (devices and operators do not
    verify signatures); edges and services need it."""
    from cloud.fleet.desired_state import ensure_keys  # noqa: PLC0415  (cryptography: only when generating)

    try:
        _private, public = settings.key_paths()
        if not public.exists():  # dev mode generates the pair; otherwise ensure_keys says what is missing
            _private, public = ensure_keys(settings)
        pem = public.read_bytes()
    except (EdgefleetError, OSError) as exc:
        if required:
            raise EnrollmentError(f"the cloud's signing public key is not available: {exc}") from exc
        logger.warning("enrollment bundle without the cloud's public key: %s", exc)
        return None, None
    return pem.decode("ascii"), key_id(pem)


def make_bundle(
    settings: CloudSettings,
    *,
    identity_id: str,
    kind: IdentityKind | str,
    role: OperatorRole | str | None = None,
    password: str | None,
    enrolled_via: str = "cli",
) -> EnrollmentBundle:
    """The bundle of ``identity_id`` as this cloud's settings describe the broker and the cloud."""
    kind = IdentityKind(kind)
    public_pem, kid = cloud_public_key(settings, required=kind in (IdentityKind.EDGE, IdentityKind.SERVICE))
    return EnrollmentBundle(
        identity_id=identity_id,
        kind=kind,
        role=None if role is None else OperatorRole(role),
        username=identity_id,
        password=password,
        client_id=identity_id,
        broker_url=broker_url_for(settings, kind),
        topic_prefix=settings.broker.topic_prefix,
        ca_certificate=ca_certificate(settings),
        cloud_public_key=public_pem,
        cloud_key_id=kid,
        enrolled_via=enrolled_via,
    )


def identity_row(identity: Identity) -> dict[str, Any]:
    """An identity as the CLI and the API show it: never its hash."""
    return {
        "identity_id": identity.identity_id,
        "kind": identity.kind,
        "role": identity.role,
        "status": identity.status,
        "label_trusted": identity.label_trusted,
        "enrolled_via": identity.enrolled_via,
        "created_at": identity.created_at,
        "updated_at": identity.updated_at,
        "revoked_at": identity.revoked_at,
    }


# -- operations ----------------------------------------------------------------------------------------


def enroll_identity(
    *,
    settings: CloudSettings,
    identity_id: str,
    kind: IdentityKind | str,
    role: OperatorRole | str | None = None,
    reissue: bool = False,
    actor: str,
    enrolled_via: str = "cli",
) -> EnrollmentBundle:
    """Enroll ``identity_id`` (or re-enroll a revoked one, or with ``reissue`` give an active one a new
    secret: its old secret stops working at the broker's next sync) and return its bundle, password
    included: shown once, the registry keeps only the hash. ``EnrollmentError`` says what is wrong."""
    try:
        kind = IdentityKind(kind)
        role = None if role is None else OperatorRole(role)
    except ValueError as exc:
        raise EnrollmentError(str(exc)) from exc
    try:
        check_identity_id(identity_id, kind=kind)
    except IdentityError as exc:
        raise EnrollmentError(str(exc)) from exc
    if role is not None and kind is not IdentityKind.OPERATOR:
        raise EnrollmentError(f"only operators have a role; {identity_id!r} is a {kind}")
    if kind is IdentityKind.OPERATOR and role is None:
        role = OperatorRole.VIEWER
    secret = new_secret()
    # Everything the bundle needs is read before the registry changes: a configuration error leaves no
    # identity behind whose secret nobody has seen.
    bundle = make_bundle(
        settings, identity_id=identity_id, kind=kind, role=role, password=secret, enrolled_via=enrolled_via
    )
    try:
        with session_scope(settings.resolved_database_url) as session:
            identities.enroll(
                session,
                identity_id=identity_id,
                kind=kind,
                secret_hash=broker_hash(secret),
                role=role,
                reissue=reissue,
                enrolled_via=enrolled_via,
                actor=actor,
            )
    except (IdentityError, ValueError) as exc:
        raise EnrollmentError(str(exc)) from exc
    logger.info("enrolled %s %s (by %s, via %s)", kind, identity_id, actor, enrolled_via)
    return bundle


def revoke_identity(*, settings: CloudSettings, identity_id: str, actor: str) -> dict[str, Any]:
    """End ``identity_id``: the broker refuses it and closes its connections at its next sync.
    ``NotFoundError`` if there is no such identity; revoking twice changes nothing."""
    with session_scope(settings.resolved_database_url) as session:
        identity = identities.revoke(session, identity_id=identity_id, actor=actor)
        row = identity_row(identity)
    logger.info("revoked %s %s (by %s)", row["kind"], identity_id, actor)
    return row


def set_label_trust(
    *, settings: CloudSettings, identity_id: str, trusted: bool, actor: str
) -> dict[str, Any]:
    """Mark a device a trusted labeller (its labels may train models) or not."""
    try:
        with session_scope(settings.resolved_database_url) as session:
            identity = identities.set_label_trust(
                session, identity_id=identity_id, trusted=trusted, actor=actor
            )
            return identity_row(identity)
    except NotFoundError:
        raise
    except ValueError as exc:
        raise EnrollmentError(str(exc)) from exc


def list_identity_rows(
    *, settings: CloudSettings, kind: IdentityKind | str | None = None, status: str | None = None
) -> list[dict[str, Any]]:
    """Every identity (optionally of one kind / status), without hashes."""
    if kind is not None:
        try:
            kind = IdentityKind(kind)
        except ValueError as exc:
            raise EnrollmentError(str(exc)) from exc
    with session_scope(settings.resolved_database_url) as session:
        return [identity_row(i) for i in identities.list_identities(session, kind=kind, status=status)]


def create_claim_tokens(
    *,
    settings: CloudSettings,
    count: int,
    ttl_s: float,
    kind: IdentityKind | str = IdentityKind.DEVICE,
    actor: str,
) -> list[str]:
    """``count`` one-time claim tokens (``TOKEN_ID.SECRET``) valid for ``ttl_s`` seconds: shown once,
    stored as hashes. Each lets one device log in as ``claim-TOKEN_ID`` and claim one identity."""
    if not 1 <= count <= MAX_TOKENS_PER_CALL:
        raise EnrollmentError(f"--count must be 1-{MAX_TOKENS_PER_CALL}, not {count}")
    limit = settings.enrollment.claim_token_max_ttl_s
    if not 0 < ttl_s <= limit:
        raise EnrollmentError(f"a claim token lives more than 0 and at most {limit:.0f} s, not {ttl_s:g} s")
    try:
        kind = IdentityKind(kind)
    except ValueError as exc:
        raise EnrollmentError(str(exc)) from exc
    if kind not in (IdentityKind.DEVICE, IdentityKind.EDGE):
        raise EnrollmentError(f"claim tokens enroll devices or edges, not {kind}")
    expires_at = time.time() + ttl_s
    issued: list[tuple[str, str]] = [(secrets.token_hex(TOKEN_ID_BYTES), new_secret()) for _ in range(count)]
    hashed = [(token_id, broker_hash(secret)) for token_id, secret in issued]
    try:
        with session_scope(settings.resolved_database_url) as session:
            for token_id, secret_hash in hashed:
                identities.add_claim_token(
                    session,
                    token_id=token_id,
                    secret_hash=secret_hash,
                    expires_at=expires_at,
                    kind=kind,
                    actor=actor,
                )
    except ValueError as exc:
        raise EnrollmentError(str(exc)) from exc
    logger.info("created %d %s claim token(s) valid %g s (by %s)", count, kind, ttl_s, actor)
    return [f"{token_id}{TOKEN_SEPARATOR}{secret}" for token_id, secret in issued]


def claim_token_rows(
    *, settings: CloudSettings, token_ids: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """Claim tokens (never their hashes): id, kind, created, expires, used (when and by whom)."""
    from sqlalchemy import select  # noqa: PLC0415

    from cloud.registry.models import ClaimToken  # noqa: PLC0415

    with session_scope(settings.resolved_database_url) as session:
        query = select(ClaimToken).order_by(ClaimToken.created_at, ClaimToken.token_id)
        if token_ids is not None:
            query = query.where(ClaimToken.token_id.in_(list(token_ids)))
        return [
            {
                "token_id": t.token_id,
                "kind": t.kind,
                "created_at": t.created_at,
                "expires_at": t.expires_at,
                "used_at": t.used_at,
                "used_by": t.used_by,
                "created_by": t.created_by,
            }
            for t in session.scalars(query)
        ]
