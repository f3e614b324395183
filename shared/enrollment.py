"""Enrollment bundles and claim messages: what a device or an edge reads to join the fleet.

An **enrollment bundle** (``edgefleet fleet enroll ID``, or a claim) holds everything a device, an
edge, a cloud service or an operator's tools need to log in to the broker and to trust the cloud:
its broker username and secret, the broker's URL, the CA that signs the broker's TLS certificate
and the cloud's signing public key. It is written once, mode 0600, and read at every start.

A **claim** lets a device enroll itself on first start with a one-time token
(``edgefleet fleet enroll-token create``, ``TOKEN_ID.SECRET``): it logs in to the broker as
``claim-TOKEN_ID`` with the token's secret, publishes a ``ClaimRequest`` on
``{prefix}/claim/TOKEN_ID/request`` and reads the ``ClaimResponse`` on
``{prefix}/claim/TOKEN_ID/response``. The device makes its own secret (``new_secret``) and sends only
its hash (``broker_hash``): the secret never leaves the device; the cloud stores the hash, which the
broker checks at every connect. The response is the bundle without the password.

Standard library + pydantic only: this module is installed on devices.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import stat
import time
from pathlib import Path
from typing import Final, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from shared.errors import ConfigError, SchemaError
from shared.files import write_private_file
from shared.identity import (
    CONNECTION_SEPARATOR,
    IdentityError,
    IdentityKind,
    OperatorRole,
    check_broker_hash,
    connection_username,
)
from shared.topics import ID_PATTERN

logger = logging.getLogger(__name__)

BUNDLE_VERSION: Final = 1
# A claim's hash must be as costly to attack as the cloud's own, and cheap enough for the broker,
# which computes it at every connect of the device (mosquitto is single-threaded).
CLAIM_HASH_MIN_ITERATIONS: Final = 100_000
CLAIM_HASH_MAX_ITERATIONS: Final = 1_000_000
TOKEN_SEPARATOR: Final = "."  # noqa: S105  (not a password)
CLAIM_USERNAME_PREFIX: Final = "claim-"
TOKEN_ID_PATTERN: Final = r"^[a-z0-9]{6,32}$"  # noqa: S105  (not a password)
MAX_BUNDLE_BYTES: Final = 1024 * 1024
MIN_SECRET: Final = 16
MAX_SECRET: Final = 256
BROKER_SCHEMES: Final = ("mqtt", "mqtts", "tcp", "ssl")


class EnrollmentError(ConfigError):
    """An enrollment bundle, claim token or claim that cannot be used; the message says why."""


class EnrollmentBundle(BaseModel):
    """Everything an identity needs to log in to the broker and to trust the cloud (the contract
    devices, edges and tools read; unknown fields are refused).

    ``password`` is the identity's secret, shown once: the cloud keeps only its hash. It is None in a
    claim response (the device made the secret itself) and in anything printed after enrollment."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1] = BUNDLE_VERSION
    identity_id: str = Field(pattern=ID_PATTERN)
    kind: IdentityKind
    role: OperatorRole | None = Field(default=None, description="operators only: viewer or admin")
    username: str = Field(
        min_length=1,
        max_length=128,
        description="the broker username: the identity id (an edge's connections add /site, /cloud, "
        "/site-K, /cloud-K)",
    )
    password: str | None = Field(default=None, repr=False, description="the secret; None when not shown")
    client_id: str = Field(
        min_length=1,
        max_length=128,
        description="= username. The broker forces it (use_username_as_clientid): whatever id a client "
        "sends, its session is kept under its username, so one identity cannot take another's session",
    )
    broker_url: str = Field(
        description="mqtt(s)://HOST:PORT: the broker's site listener (devices, edges, operators); "
        "the cloud listener for a service identity"
    )
    topic_prefix: str = "ef/v1"
    ca_certificate: str | None = Field(
        default=None, description="PEM of the CA that signs the broker's TLS certificate, or None"
    )
    cloud_public_key: str | None = Field(
        default=None, description="PEM of the cloud's ed25519 signing public key (models, desired state)"
    )
    cloud_key_id: str | None = Field(default=None, description="its key id (shared.signing.key_id)")
    enrolled_via: str = Field(default="cli", description="cli, api or claim:TOKEN_ID")
    issued_at: float = Field(default_factory=time.time)

    @field_validator("broker_url")
    @classmethod
    def _url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in BROKER_SCHEMES or not parts.hostname:
            raise ValueError(f"{value!r} is not an mqtt(s)://HOST[:PORT] URL")
        if parts.username or parts.password:
            raise ValueError("credentials go in username/password, not in the URL")
        return value

    @field_validator("ca_certificate", "cloud_public_key")
    @classmethod
    def _pem(cls, value: str | None) -> str | None:
        if value is not None and "-----BEGIN " not in value:
            raise ValueError("must be PEM text (-----BEGIN ...)")
        return value

    def connection_username(self, connection: str | None = None) -> str:
        """The username of one connection of this identity (edges: ``site``, ``cloud``, ``site-K``)."""
        return connection_username(self.identity_id, connection)

    def without_password(self) -> EnrollmentBundle:
        """The same bundle with the secret left out (safe to print or to send)."""
        return self.model_copy(update={"password": None})


class ClaimRequest(BaseModel):
    """A device asking for its identity with a claim token (on ``{prefix}/claim/TOKEN/request``).

    ``secret_hash`` is ``broker_hash(secret)`` of a secret the device made (``new_secret``) and keeps:
    the cloud stores the hash, the broker checks it. Sending the same request again (same device id,
    same hash) gets the same answer, so a device whose response was lost simply asks again."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1] = 1
    type: Literal["claim_request"] = "claim_request"
    device_id: str = Field(pattern=ID_PATTERN)
    kind: Literal["device", "edge"] = Field(
        default="device", description="what the claimant is: a token of another kind is refused, unused"
    )
    secret_hash: str = Field(max_length=256)
    request_id: str = Field(default="", max_length=64, description="echoed in the response")

    @field_validator("secret_hash")
    @classmethod
    def _hash(cls, value: str) -> str:
        try:
            check_broker_hash(value)
        except IdentityError as exc:
            raise ValueError(str(exc)) from exc
        iterations = int(value.split("$")[2])
        if not CLAIM_HASH_MIN_ITERATIONS <= iterations <= CLAIM_HASH_MAX_ITERATIONS:
            raise ValueError(
                f"hash iterations {iterations}: must be "
                f"{CLAIM_HASH_MIN_ITERATIONS}-{CLAIM_HASH_MAX_ITERATIONS}"
            )
        return value


ClaimErrorCode = Literal[
    "bad_request",
    "token_unknown",
    "token_used",
    "token_expired",
    "wrong_kind",
    "id_taken",
    "id_reserved",
    "internal",
]


class ClaimResponse(BaseModel):
    """The cloud's answer (on ``{prefix}/claim/TOKEN/response``): the bundle without the password,
    or an error code and a message saying what was wrong."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1] = 1
    type: Literal["claim_response"] = "claim_response"
    ok: bool
    request_id: str = Field(default="", max_length=64)
    device_id: str | None = None
    bundle: EnrollmentBundle | None = None
    error: ClaimErrorCode | None = None
    message: str | None = Field(default=None, max_length=1024)


def encode(message: BaseModel) -> bytes:
    """A claim message or bundle as compact JSON bytes."""
    return message.model_dump_json(exclude_none=False).encode()


def decode_claim_request(payload: bytes) -> ClaimRequest:
    """Parse a ``ClaimRequest``; ``SchemaError`` says what is wrong."""
    try:
        return ClaimRequest.model_validate_json(payload)
    except ValidationError as exc:
        raise SchemaError(f"claim request: {_problems(exc)}") from exc


def decode_claim_response(payload: bytes) -> ClaimResponse:
    """Parse a ``ClaimResponse``; ``SchemaError`` says what is wrong."""
    try:
        return ClaimResponse.model_validate_json(payload)
    except ValidationError as exc:
        raise SchemaError(f"claim response: {_problems(exc)}") from exc


def _problems(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()
    )


# -- claim tokens -----------------------------------------------------------------------------------


def split_claim_token(token: str) -> tuple[str, str]:
    """``TOKEN_ID.SECRET`` -> (token id, secret); ``EnrollmentError`` if it is not one."""
    token_id, sep, secret = token.strip().partition(TOKEN_SEPARATOR)
    if not sep or not re.match(TOKEN_ID_PATTERN, token_id) or not MIN_SECRET <= len(secret) <= MAX_SECRET:
        raise EnrollmentError(
            "a claim token is TOKEN_ID.SECRET as printed by 'edgefleet fleet enroll-token create'"
        )
    return token_id, secret


def claim_username(token_id: str) -> str:
    """The broker username a claim token logs in with (only to ask for its identity)."""
    return f"{CLAIM_USERNAME_PREFIX}{token_id}"


def read_claim_token(path: Path) -> tuple[str, str]:
    """The one claim token in ``path`` (``TOKEN_ID.SECRET``, surrounding whitespace ignored)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise EnrollmentError(f"claim token file {path} does not exist") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise EnrollmentError(f"claim token file {path} cannot be read: {exc}") from exc
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if len(lines) != 1:
        raise EnrollmentError(
            f"claim token file {path} must hold exactly one token (TOKEN_ID.SECRET), found {len(lines)} lines"
        )
    try:
        return split_claim_token(lines[0])
    except EnrollmentError as exc:
        raise EnrollmentError(f"claim token file {path}: {exc}") from exc


# -- bundle files -----------------------------------------------------------------------------------


def write_bundle(bundle: EnrollmentBundle, path: Path) -> None:
    """Write ``bundle`` (with its password) to ``path`` as JSON, mode 0600, atomically."""
    write_private_file(path, (bundle.model_dump_json(indent=2) + "\n").encode())


def load_bundle(path: Path, *, need_password: bool = True) -> EnrollmentBundle:
    """Read an enrollment bundle; ``EnrollmentError`` says what is wrong with the file.

    A file others may read is used but logged as a warning (it holds a secret)."""
    try:
        st = path.stat()
    except FileNotFoundError as exc:
        raise EnrollmentError(f"enrollment file {path} does not exist") from exc
    except OSError as exc:
        raise EnrollmentError(f"enrollment file {path} cannot be read: {exc}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise EnrollmentError(f"enrollment file {path} is not a regular file")
    if st.st_size > MAX_BUNDLE_BYTES:
        raise EnrollmentError(f"enrollment file {path} is {st.st_size} bytes: not a bundle")
    if st.st_mode & 0o077:
        logger.warning(
            "enrollment file %s is readable by others (mode %o): chmod 600 it", path, st.st_mode & 0o777
        )
    try:
        raw = path.read_bytes()
        data = json.loads(raw)
    except OSError as exc:
        raise EnrollmentError(f"enrollment file {path} cannot be read: {exc}") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise EnrollmentError(f"enrollment file {path} is not JSON: {exc}") from exc
    try:
        bundle = EnrollmentBundle.model_validate(data)
    except ValidationError as exc:
        raise EnrollmentError(
            f"enrollment file {path} is not an enrollment bundle: {_problems(exc)}"
        ) from exc
    if need_password and not bundle.password:
        raise EnrollmentError(f"enrollment file {path} has no password: use the bundle printed at enrollment")
    return bundle


def trust_file(bundle_path: Path, suffix: str, text: str, *, fallback_dir: Path) -> Path:
    """A PEM of the bundle (CA, cloud key) as a file the TLS and signature code can read: beside the
    bundle (``<bundle><suffix>``, rewritten only when it changed), or under ``fallback_dir`` when the
    bundle's directory is read-only (e.g. a config mount)."""
    name = bundle_path.name + suffix
    for path in (bundle_path.with_name(name), fallback_dir / name):
        try:
            if path.exists() and path.read_text(encoding="ascii") == text:
                return path
            write_private_file(path, text.encode("ascii"), mode=0o644)
        except (OSError, UnicodeDecodeError) as exc:
            logger.debug("cannot write %s (%s)", path, exc)
            continue
        return path
    raise EnrollmentError(f"cannot write {name} beside {bundle_path} nor under {fallback_dir}")


def identity_in_bundle(path: Path) -> str | None:
    """The ``identity_id`` of the bundle at ``path``, or None when there is no readable bundle there
    (``load_bundle`` says why when the bundle is actually used)."""
    try:
        data = json.loads(path.read_bytes()[:MAX_BUNDLE_BYTES])
    except (OSError, ValueError):
        return None
    identity = data.get("identity_id") if isinstance(data, dict) else None
    return identity if isinstance(identity, str) else None


def same_hash(a: str, b: str) -> bool:
    """Constant-time equality of two stored hashes."""
    return hmac.compare_digest(a.encode(), b.encode())


__all__ = [
    "CONNECTION_SEPARATOR",
    "ClaimRequest",
    "ClaimResponse",
    "EnrollmentBundle",
    "EnrollmentError",
    "claim_username",
    "decode_claim_request",
    "decode_claim_response",
    "encode",
    "identity_in_bundle",
    "load_bundle",
    "read_claim_token",
    "same_hash",
    "split_claim_token",
    "trust_file",
    "write_bundle",
    "write_private_file",
]
