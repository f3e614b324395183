"""The cloud's side of a claim: a device with a one-time claim token asks for its own identity.

``edgefleet broker run`` subscribes to ``{prefix}/claim/+/request`` and calls ``handle_claim`` for each
message, publishing what it returns on ``{prefix}/claim/TOKEN/response``. The broker lets a token log
in (as ``claim-TOKEN_ID``, with the token's secret) only while it is neither used nor expired, and
lets it write only its own request topic: the token id in the topic is authenticated by the broker.

A claim is answered in one registry transaction: the token is marked used by the device and the
device is enrolled with the hash it sent (``ClaimRequest.secret_hash``; the secret stays on the device)
with ``enrolled_via = claim:TOKEN_ID``, both audited. It is refused when the token is unknown, used or
expired, or of another kind than the claimant, or the id is reserved or taken: by an active identity
*or a revoked one* (bringing a revoked id back is an operator's decision, ``edgefleet fleet enroll``; a
token must not revive it), or by a device or edge the fleet has heard from (registry rows from before
enrollment: their history must not go to whoever holds a token). A retried
identical request (same token, same device id, same hash) gets the same answer as the first, so a
device whose response was lost asks again.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Final

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from cloud.fleet.enrollment import make_bundle
from cloud.registry import identities
from cloud.registry.db import lock_for_write, session_scope
from cloud.registry.models import AuditLog, ClaimToken, Device, EdgeNode
from shared.enrollment import (
    TOKEN_ID_PATTERN,
    ClaimErrorCode,
    ClaimRequest,
    ClaimResponse,
    EnrollmentBundle,
    decode_claim_request,
    encode,
    same_hash,
)
from shared.errors import EdgefleetError, SchemaError
from shared.identity import IdentityError, IdentityKind, check_identity_id
from shared.settings.cloud import CloudSettings

logger = logging.getLogger(__name__)

MAX_REQUEST_BYTES: Final = 4096


class ClaimRefused(Exception):  # noqa: N818  (a control-flow signal inside this module, not an error type)
    """A claim answered with an error code."""

    def __init__(self, code: ClaimErrorCode, message: str) -> None:
        super().__init__(message)
        self.code: ClaimErrorCode = code
        self.message = message


def handle_claim(*, settings: CloudSettings, token_id: str, payload: bytes) -> bytes:
    """The response (JSON ``ClaimResponse``) to one claim request received on the token's topic."""
    request_id = ""
    device_id: str | None = None
    try:
        request = _parse(token_id, payload)
        request_id, device_id = request.request_id, request.device_id
        bundle = _claim(settings, token_id, request)
    except ClaimRefused as refused:
        logger.warning("claim %s for %s refused: %s", token_id, device_id or "?", refused.message)
        _audit_refusal(settings, token_id, device_id, refused)
        return encode(
            ClaimResponse(
                ok=False,
                request_id=request_id,
                device_id=device_id,
                error=refused.code,
                message=refused.message,
            )
        )
    except Exception:  # the device gets an answer it can retry on; the log gets the traceback
        logger.exception("claim %s for %s failed", token_id, device_id or "?")
        return encode(
            ClaimResponse(
                ok=False,
                request_id=request_id,
                device_id=device_id,
                error="internal",
                message="the cloud could not handle the claim now; ask again later",
            )
        )
    return encode(ClaimResponse(ok=True, request_id=request_id, device_id=bundle.identity_id, bundle=bundle))


def _parse(token_id: str, payload: bytes) -> ClaimRequest:
    if not re.match(TOKEN_ID_PATTERN, token_id):
        raise ClaimRefused("token_unknown", f"unknown claim token {token_id!r}")
    if len(payload) > MAX_REQUEST_BYTES:
        raise ClaimRefused("bad_request", f"a claim request is at most {MAX_REQUEST_BYTES} bytes")
    try:
        return decode_claim_request(payload)
    except SchemaError as exc:
        raise ClaimRefused("bad_request", str(exc)) from exc


def _claim(settings: CloudSettings, token_id: str, request: ClaimRequest) -> EnrollmentBundle:
    device_id = request.device_id
    now = time.time()
    try:
        with session_scope(settings.resolved_database_url) as session:
            lock_for_write(session)
            token = session.get(ClaimToken, token_id, with_for_update=True)
            if token is None:
                raise ClaimRefused("token_unknown", f"unknown claim token {token_id!r}")
            kind = IdentityKind(token.kind)
            try:
                check_identity_id(device_id, kind=kind)
            except IdentityError as exc:
                raise ClaimRefused("id_reserved", str(exc)) from exc
            existing = identities.get_identity(session, identity_id=device_id)
            if token.used_at is not None:
                if (
                    token.used_by == device_id
                    and existing is not None
                    and existing.status == identities.ACTIVE
                    and existing.enrolled_via == f"claim:{token_id}"
                    and same_hash(existing.secret_hash or "", request.secret_hash)
                ):
                    logger.info("claim %s for %s asked again: same answer", token_id, device_id)
                    return _bundle(settings, device_id, kind, token_id)
                raise ClaimRefused("token_used", f"claim token {token_id!r} was used already")
            if token.expires_at <= now:
                raise ClaimRefused("token_expired", f"claim token {token_id!r} has expired")
            if request.kind != token.kind:
                raise ClaimRefused(
                    "wrong_kind", f"claim token {token_id!r} enrolls a {token.kind}, not a {request.kind}"
                )
            if existing is None and _seen_in_fleet(session, device_id):
                raise ClaimRefused(
                    "id_taken",
                    f"{device_id!r} has been seen in the fleet already: an operator enrolls it "
                    "(edgefleet fleet enroll), a claim token does not",
                )
            if existing is not None:
                state = "a revoked" if existing.status != identities.ACTIVE else "an enrolled"
                raise ClaimRefused(
                    "id_taken",
                    f"{device_id!r} is {state} {existing.kind}: choose another id, or ask an operator "
                    "(edgefleet fleet enroll)",
                )
            # Read what the bundle needs before changing anything: a configuration error uses no token.
            bundle = _bundle(settings, device_id, kind, token_id)
            identities.use_claim_token(session, token_id=token_id, identity_id=device_id, now=now)
            identities.enroll(
                session,
                identity_id=device_id,
                kind=kind,
                secret_hash=request.secret_hash,
                enrolled_via=f"claim:{token_id}",
                actor=f"claim:{token_id}",
            )
    except IntegrityError as exc:  # another token claimed the same id in the same instant
        raise ClaimRefused("id_taken", f"{device_id!r} was enrolled meanwhile: choose another id") from exc
    logger.info("claim %s: enrolled %s %s", token_id, kind, device_id)
    return bundle


def _seen_in_fleet(session: Session, entity_id: str) -> bool:
    """Whether a device or edge of this id has been heard from (registry rows from before identities,
    or from an identity since deleted): its history must not go to whoever holds a token."""
    device = session.scalar(select(Device.last_seen).where(Device.device_id == entity_id))
    edge = session.scalar(select(EdgeNode.last_seen).where(EdgeNode.edge_id == entity_id))
    return device is not None or edge is not None


def _bundle(settings: CloudSettings, device_id: str, kind: IdentityKind, token_id: str) -> EnrollmentBundle:
    try:
        return make_bundle(
            settings, identity_id=device_id, kind=kind, password=None, enrolled_via=f"claim:{token_id}"
        )
    except EdgefleetError as exc:
        raise RuntimeError(f"enrollment bundle: {exc}") from exc


def _audit_refusal(
    settings: CloudSettings, token_id: str, device_id: str | None, refused: ClaimRefused
) -> None:
    """Refusals are audited too: a token used twice or an id asked for that is taken is worth a look."""
    try:
        with session_scope(settings.resolved_database_url) as session:
            session.add(
                AuditLog(
                    actor=f"claim:{token_id}"[:128],
                    action="claim_refused",
                    target=f"device:{device_id}" if device_id else f"claim:{token_id}"[:128],
                    detail={"error": refused.code, "message": refused.message[:500]},
                )
            )
    except Exception:
        logger.exception("claim %s: the refusal could not be audited", token_id)
