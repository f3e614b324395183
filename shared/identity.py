"""Who may connect to the broker: identity kinds, the usernames their connections log in with, secrets
and the hashes the broker checks them against.

Every device, edge, cloud service and operator has one identity in the registry (``fleet enroll``).
The broker forces ``client id = username`` (``use_username_as_clientid``), so a client id belongs to
exactly one identity. An identity with several connections (an edge: site and cloud links, one pair
per worker process) logs each of them in as ``{identity}/{connection}``: the broker's password file
holds one line per connection name, all with the identity's hash.

Secrets are random (``new_secret``), shown once and stored only as a hash in mosquitto's own format
(``$7$``: PBKDF2-HMAC-SHA512 with a salt and an iteration count), which the broker's password file
takes as is. Standard library only: ``shared`` is installed on devices.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from enum import StrEnum
from typing import Final

from shared.topics import ID_PATTERN

# OWASP's 2023 figure for PBKDF2-HMAC-SHA512. The broker pays it once per connect (~0.1 s of one core).
HASH_ITERATIONS: Final = 210_000
HASH_SALT_BYTES: Final = 12
SECRET_BYTES: Final = 32
# Edge worker processes that get their own pair of connections (``site-K``, ``cloud-K``); an edge
# started with more processes than this is refused at start by the edge's settings.
MAX_EDGE_WORKERS: Final = 32
CONNECTION_SEPARATOR: Final = "/"

_ID_RE: Final = re.compile(ID_PATTERN)
_CONNECTION_RE: Final = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")
# Names the broker and the cloud use for themselves: no enrolled identity may take them.
RESERVED_IDS: Final = frozenset(
    {"cloud", "ops", "health", "admin", "root", "broker", "mosquitto", "anonymous"}
)
RESERVED_PREFIXES: Final = ("edgefleet", "claim", "broker", "$", "bench-")


class IdentityKind(StrEnum):
    """What an identity is; it decides the identity's broker permissions."""

    DEVICE = "device"
    EDGE = "edge"
    SERVICE = "service"  # the cloud's own processes (ingest, workers, API, rollouts)
    OPERATOR = "operator"  # a person's tools (edgefleet tail): read-only unless role admin


class OperatorRole(StrEnum):
    """What an operator identity may do on the broker."""

    VIEWER = "viewer"  # reads ef/v1/#
    ADMIN = "admin"  # reads and writes ef/v1/#


class IdentityError(ValueError):
    """An identity id, connection name, secret or hash that cannot be used; the message says which."""


def check_identity_id(identity_id: str, *, kind: IdentityKind | str | None = None) -> str:
    """``identity_id`` if it may be enrolled (a topic-safe id, not a reserved name), else ``IdentityError``.

    The ``cloud`` service identity is the one reserved name allowed, and only for kind ``service``."""
    if not _ID_RE.match(identity_id):
        raise IdentityError(
            f"identity id {identity_id!r}: must be 1-64 of [A-Za-z0-9_.:-], starting with a letter or digit"
        )
    if ":" in identity_id:  # the broker's password file splits ``username:hash`` at the first ':'
        raise IdentityError(
            f"identity id {identity_id!r}: ':' is not allowed (it separates a broker user from its hash)"
        )
    if kind == IdentityKind.SERVICE and identity_id == "cloud":
        return identity_id
    lowered = identity_id.lower()
    if lowered in RESERVED_IDS or lowered.startswith(RESERVED_PREFIXES):
        raise IdentityError(f"identity id {identity_id!r} is reserved for the broker and the cloud")
    return identity_id


def connection_username(identity_id: str, connection: str | None = None) -> str:
    """The username (and so the client id) a connection of ``identity_id`` logs in with."""
    if connection is None:
        return identity_id
    if not _CONNECTION_RE.match(connection):
        raise IdentityError(f"connection name {connection!r}: must be 1-32 of [a-z0-9-]")
    return f"{identity_id}{CONNECTION_SEPARATOR}{connection}"


def identity_of_username(username: str) -> str:
    """The identity a broker username belongs to (the part before ``/``)."""
    return username.split(CONNECTION_SEPARATOR, 1)[0]


def edge_connections(max_workers: int = MAX_EDGE_WORKERS) -> tuple[str, ...]:
    """Every connection name an edge may use: ``site`` and ``cloud`` (the supervisor or a one-process
    edge) and ``site-K`` / ``cloud-K`` for worker K."""
    names = ["site", "cloud"]
    for worker in range(max_workers):
        names += [f"site-{worker}", f"cloud-{worker}"]
    return tuple(names)


def new_secret() -> str:
    """A fresh random secret (256 bits, URL-safe text): shown once, stored only as ``broker_hash``."""
    return secrets.token_urlsafe(SECRET_BYTES)


def broker_hash(secret: str, *, iterations: int = HASH_ITERATIONS, salt: bytes | None = None) -> str:
    """mosquitto's ``$7$`` hash of ``secret``: ``$7$ITERATIONS$SALT_B64$PBKDF2_SHA512_B64``."""
    if not secret:
        raise IdentityError("an empty secret cannot be hashed")
    if iterations < 1:
        raise IdentityError(f"hash iterations must be positive, not {iterations}")
    salt = salt if salt is not None else secrets.token_bytes(HASH_SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", secret.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_broker_hash(secret: str, stored: str) -> bool:
    """Whether ``secret`` matches a ``$7$`` hash (constant-time compare; a malformed hash is ``False``)."""
    parts = stored.split("$")
    if len(parts) != 5 or parts[1] != "7":
        return False
    try:
        iterations = int(parts[2])
        salt = base64.b64decode(parts[3], validate=True)
        expected = base64.b64decode(parts[4], validate=True)
    except ValueError:
        return False
    if iterations < 1:
        return False
    digest = hashlib.pbkdf2_hmac("sha512", secret.encode(), salt, iterations)
    return hmac.compare_digest(digest, expected)


def check_broker_hash(stored: str) -> str:
    """``stored`` if it is a well-formed ``$7$`` hash (safe to write into a password file), else
    ``IdentityError``."""
    if not re.fullmatch(r"\$7\$[1-9][0-9]{0,8}\$[A-Za-z0-9+/=]{4,64}\$[A-Za-z0-9+/=]{16,128}", stored):
        raise IdentityError("not a mosquitto $7$ (PBKDF2-SHA512) hash")
    return stored
