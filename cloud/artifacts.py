"""The artifact store (a local directory, served over HTTP with Range support; optionally mirrored
to an S3-compatible bucket) and the server edges download models from."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from cloud.errors import PublishError
from shared.schemas import ModelManifest
from shared.settings.cloud import CloudSettings, S3Settings

logger = logging.getLogger(__name__)

ARTIFACT_NAME = "model.tflite"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks so large artifacts are not loaded whole."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ArtifactStore:
    """``<root>/<name>/<version>/model.tflite`` (+ ``manifest.json``), addressed by ``base_url`` or file://."""

    def __init__(self, root: Path, *, base_url: str | None = None) -> None:
        self.root = root
        self.base_url = base_url.rstrip("/") if base_url else None

    def relative(self, name: str, version: str) -> str:
        """The artifact's path below the store root, as it appears in download URLs."""
        return f"{name}/{version}/{ARTIFACT_NAME}"

    def path(self, name: str, version: str) -> Path:
        """Where the artifact of ``name@version`` lives on disk."""
        return self.root / name / version / ARTIFACT_NAME

    def url(self, name: str, version: str) -> str:
        """The URL edges download the artifact from: under ``base_url``, else a file:// URI."""
        if self.base_url:
            return f"{self.base_url}/{quote(self.relative(name, version))}"
        return self.path(name, version).resolve().as_uri()

    def put(self, source: Path, *, name: str, version: str, sha256: str) -> Path:
        """Copy an artifact in atomically; refuses content whose hash is not ``sha256``."""
        target = self.path(name, version)
        if target.exists() and sha256_file(target) == sha256:
            return target  # already published (a retried task)
        actual = sha256_file(source)
        if actual != sha256:
            raise PublishError(f"artifact {source} has sha256 {actual}, expected {sha256}")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".tmp")
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
        return target

    def write_manifest(self, manifest: ModelManifest) -> Path:
        """Write ``manifest.json`` next to its artifact, atomically."""
        path = self.root / manifest.name / manifest.version / "manifest.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(manifest.model_dump_json(indent=2))
        os.replace(tmp, path)
        return path


SHA256_METADATA = "sha256"  # x-amz-meta-sha256 on every uploaded object


class S3ArtifactStore(ArtifactStore):
    """The local store plus an S3-compatible bucket: ``<prefix>/<name>/<version>/model.tflite``.

    The local copy stays (the cloud's own artifact endpoint and ``serve-artifacts`` keep working);
    ``url()`` is the object's stable public URL, ``<public_base_url>/<key>``. Each object carries its
    sha256 as user metadata, so a retried ``put`` skips the upload when the bucket already holds the
    same content. Uploads send Content-MD5, which AWS S3, MinIO and Ceph RGW check on receipt.
    Client errors become ``PublishError`` naming the bucket and key."""

    def __init__(self, root: Path, s3: S3Settings, *, client: Any = None) -> None:
        super().__init__(root, base_url=None)
        self.s3 = s3
        self.bucket = s3.bucket
        self.prefix = s3.prefix.strip("/")
        self.public_base_url = s3.public_base_url.rstrip("/")
        self._client = client
        self.uploads = 0  # objects written to the bucket by this store
        self.skipped = 0  # puts that found the same content already in the bucket

    def key(self, name: str, version: str, filename: str = ARTIFACT_NAME) -> str:
        """The object key of one file of ``name@version``, under the configured prefix."""
        relative = f"{name}/{version}/{filename}"
        return f"{self.prefix}/{relative}" if self.prefix else relative

    def url(self, name: str, version: str) -> str:
        """The object's public URL, which is what edges download from."""
        return self.object_url(self.key(name, version))

    def object_url(self, key: str) -> str:
        """The public URL of an object key: ``<public_base_url>/<key>``."""
        return f"{self.public_base_url}/{quote(key)}"

    @property
    def client(self) -> Any:
        """The boto3 S3 client, made on first use unless one was passed in."""
        if self._client is None:
            self._client = _s3_client(self.s3)
        return self._client

    def _error(self, action: str, key: str, exc: Exception) -> PublishError:
        where = f" at {self.s3.endpoint_url}" if self.s3.endpoint_url else ""
        return PublishError(f"S3 {action} s3://{self.bucket}/{key}{where} failed: {exc}")

    def remote_sha256(self, key: str) -> str | None:
        """The sha256 recorded on the object, or None when there is no object (or no record)."""
        from botocore.exceptions import BotoCoreError, ClientError  # noqa: PLC0415  (botocore: the s3 extra)

        try:
            head = self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            code = _error_code(exc)
            if code in ("404", "NoSuchKey", "NotFound"):
                return None
            if code in ("403", "AccessDenied"):
                # Without s3:ListBucket, AWS answers 403 rather than 404 for a missing key; an existing
                # object we may read answers 200. Upload, and let the PUT report a real denial.
                logger.debug("HEAD s3://%s/%s forbidden; treating it as absent", self.bucket, key)
                return None
            raise self._error("HEAD", key, exc) from exc
        except BotoCoreError as exc:
            raise self._error("HEAD", key, exc) from exc
        metadata = head.get("Metadata") or {}
        return metadata.get(SHA256_METADATA)

    def _upload(self, key: str, path: Path, *, sha256: str, content_type: str) -> None:
        """One PUT streamed from ``path``, with Content-MD5 and the sha256 as object metadata."""
        from botocore.exceptions import BotoCoreError, ClientError  # noqa: PLC0415  (botocore: the s3 extra)

        digest = hashlib.md5(usedforsecurity=False)
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        try:
            with path.open("rb") as body:
                self.client.put_object(
                    Bucket=self.bucket,
                    Key=key,
                    Body=body,
                    ContentMD5=base64.b64encode(digest.digest()).decode(),
                    ContentType=content_type,
                    Metadata={SHA256_METADATA: sha256},
                )
        except (BotoCoreError, ClientError) as exc:
            raise self._error("PUT", key, exc) from exc
        except OSError as exc:
            raise PublishError(f"cannot read {path} to upload it to s3://{self.bucket}/{key}: {exc}") from exc
        self.uploads += 1

    def put(self, source: Path, *, name: str, version: str, sha256: str) -> Path:
        """The local ``put`` (hash checked, atomic), then the upload unless the bucket has it already."""
        local = super().put(source, name=name, version=version, sha256=sha256)
        key = self.key(name, version)
        remote = self.remote_sha256(key)
        if remote == sha256:
            self.skipped += 1
            logger.debug("s3://%s/%s already holds sha256 %s", self.bucket, key, sha256)
            return local
        if remote is not None:
            logger.warning(
                "s3://%s/%s holds sha256 %s; replacing it with %s", self.bucket, key, remote, sha256
            )
        self._upload(key, local, sha256=sha256, content_type="application/octet-stream")
        logger.info("uploaded %s@%s to s3://%s/%s", name, version, self.bucket, key)
        return local

    def write_manifest(self, manifest: ModelManifest) -> Path:
        """Write the manifest locally, then upload it unless the bucket holds the same content."""
        path = super().write_manifest(manifest)
        key = self.key(manifest.name, manifest.version, "manifest.json")
        sha = sha256_file(path)
        if self.remote_sha256(key) == sha:
            self.skipped += 1
        else:
            self._upload(key, path, sha256=sha, content_type="application/json")
        return path


def _error_code(exc: Exception) -> str | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = (response.get("Error") or {}).get("Code")
        return str(code) if code else None
    return None


def _s3_client(s3: S3Settings) -> Any:
    try:
        import boto3  # noqa: PLC0415  (boto3: the s3 extra)
        from botocore.config import Config  # noqa: PLC0415  (the s3 extra)
    except ImportError as exc:
        raise PublishError(
            "the S3 artifact store needs boto3: pip install 'edgefleet[s3]' (or unset s3 in the settings)"
        ) from exc
    config = Config(
        connect_timeout=s3.timeout_s,
        read_timeout=s3.timeout_s,
        retries={"max_attempts": s3.max_attempts, "mode": "standard"},
        s3={"addressing_style": s3.addressing_style},
        # Content-MD5 is sent explicitly; the newer default CRC checksums (aws-chunked bodies) are not
        # understood by every S3-compatible store.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    credentials: dict[str, str] = {}
    if s3.access_key_id is not None and s3.secret_access_key is not None:
        credentials = {
            "aws_access_key_id": s3.access_key_id.get_secret_value(),
            "aws_secret_access_key": s3.secret_access_key.get_secret_value(),
        }
    session = boto3.session.Session()
    return session.client(
        "s3", endpoint_url=s3.endpoint_url, region_name=s3.region, config=config, **credentials
    )


def store_for(settings: CloudSettings) -> ArtifactStore:
    """The local store, or the S3-backed one (which keeps the local copy) when ``settings.s3`` is set."""
    if settings.s3 is not None:
        return S3ArtifactStore(settings.resolved_artifact_dir, settings.s3)
    return ArtifactStore(settings.resolved_artifact_dir, base_url=settings.artifact_base_url)


# -- who may download what ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Refusal:
    """Why a download is refused: the HTTP status and a message for the body."""

    status: HTTPStatus
    detail: str


class EdgeArtifactAccess:
    """Edges authenticate with their identity (HTTP Basic: enrollment username and secret, checked
    against the registry's ``$7$`` hash) and may download only the artifacts of model versions sent
    to them: their current desired state, or any deployment that targeted them (so a rollback finds
    its model again). Nobody else downloads: devices, operators and services are refused (403).

    Verified credentials are remembered for ``cache_ttl_s`` (the hash costs ~0.1 s of a core per
    check): a revoked edge loses access at most that long after its revocation. Failures are
    remembered for as long, so repeating a wrong secret costs no hashing either."""

    def __init__(self, database_url: str, *, cache_ttl_s: float = 30.0, cache_max: int = 4096) -> None:
        self.database_url = database_url
        self.cache_ttl_s = cache_ttl_s
        self.cache_max = cache_max
        self._cache: dict[tuple[str, str], tuple[float, str | Refusal]] = {}
        self._lock = threading.Lock()

    def authenticate(self, username: str, secret: str) -> str | Refusal:
        """The edge id of ``username`` when ``secret`` is its identity's, else a ``Refusal`` (401/403)."""
        key = (username, hashlib.sha256(secret.encode()).hexdigest())
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None and cached[0] > now:
                return cached[1]
        result = self._verify(username, secret)
        with self._lock:
            if len(self._cache) >= self.cache_max:
                self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
                if len(self._cache) >= self.cache_max:
                    self._cache.clear()
            self._cache[key] = (now + self.cache_ttl_s, result)
        return result

    def _verify(self, username: str, secret: str) -> str | Refusal:
        from cloud.registry import identities  # noqa: PLC0415  (SQLAlchemy: only a server with auth needs it)
        from cloud.registry.db import session_scope  # noqa: PLC0415
        from shared.identity import IdentityKind, identity_of_username, verify_broker_hash  # noqa: PLC0415

        identity_id = identity_of_username(username)
        with session_scope(self.database_url) as session:
            identity = identities.active_identity(session, identity_id=identity_id)
            stored = identity.secret_hash if identity is not None else None
            kind = identity.kind if identity is not None else None
        # Unknown identities are hashed against a dummy so both answers take as long.
        matches = verify_broker_hash(secret, stored or _DUMMY_HASH)
        if stored is None or not matches:
            return Refusal(HTTPStatus.UNAUTHORIZED, "unknown identity or wrong secret")
        if kind != str(IdentityKind.EDGE):
            return Refusal(
                HTTPStatus.FORBIDDEN, f"identity {identity_id!r} is a {kind}: only edges download artifacts"
            )
        return identity_id

    def authorize(self, edge_id: str, name: str, version: str) -> Refusal | None:
        """None when ``name@version`` was sent to ``edge_id``; a 404 or 403 ``Refusal`` otherwise."""
        from sqlalchemy import select  # noqa: PLC0415  (SQLAlchemy: only a server with auth needs it)

        from cloud.registry.db import session_scope  # noqa: PLC0415
        from cloud.registry.models import (  # noqa: PLC0415
            Deployment,
            DeploymentTarget,
            DesiredRevision,
            ModelVersion,
        )

        with session_scope(self.database_url) as session:
            model_id = session.scalar(
                select(ModelVersion.id).where(ModelVersion.name == name, ModelVersion.version == version)
            )
            if model_id is None:
                return Refusal(HTTPStatus.NOT_FOUND, f"no artifact {name}@{version}")
            desired = session.scalar(
                select(DesiredRevision.edge_id).where(
                    DesiredRevision.edge_id == edge_id, DesiredRevision.model_version_id == model_id
                )
            )
            deployed = desired is not None or session.scalar(
                select(DeploymentTarget.id)
                .join(Deployment, Deployment.id == DeploymentTarget.deployment_id)
                .where(DeploymentTarget.edge_id == edge_id, Deployment.model_version_id == model_id)
                .limit(1)
            )
        if not deployed:
            return Refusal(HTTPStatus.FORBIDDEN, f"{name}@{version} was never sent to edge {edge_id!r}")
        return None


# A well-formed $7$ hash of a random secret nobody knows (same cost as a real one).
_DUMMY_HASH = "$7$210000$AAAAAAAAAAAAAAAA$" + "A" * 86 + "=="


# -- HTTP artifact server with Range support --------------------------------------------------------

_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")
# The only files an edge downloads: <name>/<version>/model.tflite (and its manifest).
_SEGMENT = r"([A-Za-z0-9][A-Za-z0-9_.+-]{0,63})"
_ARTIFACT_PATH_RE = re.compile(rf"^/{_SEGMENT}/{_SEGMENT}/(model\.tflite|manifest\.json)$")
BASIC_REALM = "edgefleet artifacts"


class ArtifactHandler(SimpleHTTPRequestHandler):
    """GET/HEAD of ``<name>/<version>/model.tflite`` (or ``manifest.json``) under the store root;
    single ``Range: bytes=a-b`` requests answer 206. Never a directory listing.

    With ``access`` (``EdgeArtifactAccess``) every request needs an edge's HTTP Basic credentials and
    the model must have been sent to that edge; refusals are 401 (no or wrong credentials), 403 (not
    an edge, or not its model) and 404 (no such artifact), each with a JSON ``{"detail": ...}`` body.
    ``/healthz`` answers 200 to anyone (container health checks)."""

    access: EdgeArtifactAccess | None = None
    server_version = "edgefleet-artifacts"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:
        """Send the request log to this module's logger at debug level instead of stderr."""
        logger.debug("artifact server: %s", format % args)

    def _refuse(self, refusal: Refusal) -> None:
        body = json.dumps({"detail": refusal.detail}).encode()
        self.send_response(refusal.status)
        if refusal.status == HTTPStatus.UNAUTHORIZED:
            self.send_header("WWW-Authenticate", f'Basic realm="{BASIC_REALM}", charset="UTF-8"')
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _credentials(self) -> tuple[str, str] | None:
        scheme, _, encoded = self.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "basic" or not encoded.strip():
            return None
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True).decode()
        except (ValueError, UnicodeDecodeError):
            return None
        username, colon, secret = decoded.partition(":")
        return (username, secret) if colon and username and secret else None

    def _check(self) -> bool:
        """Whether the request may be answered; sends the refusal when not."""
        path = urlsplit(self.path).path
        match = _ARTIFACT_PATH_RE.match(unquote(path))
        if self.access is None:
            if match is None:
                self._refuse(Refusal(HTTPStatus.NOT_FOUND, "no such artifact"))
                return False
            return True
        credentials = self._credentials()
        if credentials is None:
            self._refuse(Refusal(HTTPStatus.UNAUTHORIZED, "an edge's identity is needed (HTTP Basic)"))
            return False
        who = self.access.authenticate(*credentials)
        if isinstance(who, Refusal):
            logger.warning(
                "artifact server: refused %s from %s for %s: %s",
                credentials[0],
                self.client_address[0],
                path,
                who.detail,
            )
            self._refuse(who)
            return False
        if match is None:
            self._refuse(Refusal(HTTPStatus.NOT_FOUND, "no such artifact"))
            return False
        refusal = self.access.authorize(who, match.group(1), match.group(2))
        if refusal is not None:
            logger.warning("artifact server: %s may not fetch %s: %s", who, path, refusal.detail)
            self._refuse(refusal)
            return False
        return True

    def do_GET(self) -> None:
        """A download, once the request passes the access check; ``/healthz`` answers anyone."""
        if urlsplit(self.path).path == "/healthz":
            body = b'{"status": "ok"}'
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        if self._check():
            super().do_GET()

    def do_HEAD(self) -> None:
        """A HEAD, once the request passes the access check."""
        if self._check():
            super().do_HEAD()

    def list_directory(self, path: Any) -> None:  # noqa: ARG002  (the base class's signature)
        """Never list a directory."""
        self._refuse(Refusal(HTTPStatus.NOT_FOUND, "no such artifact"))

    def send_error(
        self,
        code: int,
        message: str | None = None,
        explain: str | None = None,  # noqa: ARG002  (the base class's signature)
    ) -> None:
        """Errors of the file handler (404, 416, ...) as JSON bodies too."""
        self._refuse(Refusal(HTTPStatus(code), message or HTTPStatus(code).phrase))

    def send_head(self) -> Any:
        """Answer a single-range request with 206 and that slice; others go to the plain file handler."""
        header = self.headers.get("Range")
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self._refuse(Refusal(HTTPStatus.NOT_FOUND, "no such artifact"))
            return None
        if not header:
            return super().send_head()
        size = path.stat().st_size
        match = _RANGE_RE.match(header.strip())
        if match is None or (not match.group(1) and not match.group(2)):
            self.send_error(
                HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, "only one bytes=a-b range is supported"
            )
            return None
        first_s, last_s = match.groups()
        if first_s:
            first = int(first_s)
            last = min(int(last_s), size - 1) if last_s else size - 1
        else:  # suffix: the last N bytes
            first, last = max(0, size - int(last_s)), size - 1
        if first >= size or last < first:
            self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        handle = path.open("rb")
        handle.seek(first)
        self.send_response(HTTPStatus.PARTIAL_CONTENT)
        self.send_header("Content-Type", self.guess_type(str(path)))
        self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
        self.send_header("Content-Length", str(last - first + 1))
        self.end_headers()
        self._remaining: int | None = last - first + 1
        return handle

    def end_headers(self) -> None:
        """Advertise ``Accept-Ranges: bytes`` on every response."""
        self.send_header("Accept-Ranges", "bytes")
        super().end_headers()

    def copyfile(self, source: Any, outputfile: Any) -> None:
        """Copy only the requested range's bytes after a 206, else the whole file."""
        remaining = getattr(self, "_remaining", None)
        if remaining is None:
            super().copyfile(source, outputfile)
            return
        while remaining > 0:
            block = source.read(min(65536, remaining))
            if not block:
                break
            outputfile.write(block)
            remaining -= len(block)
        self._remaining = None


class ArtifactServer:
    """The artifact directory over HTTP in a background thread (``port=0`` picks a free port).

    ``access`` is required and explicit: an ``EdgeArtifactAccess`` (edges authenticate and fetch only
    their own models: what ``edgefleet cloud serve-artifacts`` runs), or ``None`` for an open server
    (tests and local development only: ``serve-artifacts --no-auth``)."""

    def __init__(
        self, root: Path, *, access: EdgeArtifactAccess | None, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        root.mkdir(parents=True, exist_ok=True)

        def handler(*args: Any, **kwargs: Any) -> ArtifactHandler:
            return _Handler(*args, directory=str(root), **kwargs)

        class _Handler(ArtifactHandler):
            pass

        _Handler.access = access
        self.access = access
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (the one picked when constructed with ``port=0``)."""
        return int(self.httpd.server_address[1])

    @property
    def url(self) -> str:
        """The server's base URL, ``http://host:port``."""
        host = self.httpd.server_address[0]
        return f"http://{host if isinstance(host, str) else host.decode()}:{self.port}"

    def start(self) -> None:
        """Serve from a daemon thread and return at once."""
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="artifact-server", daemon=True)
        self._thread.start()

    def serve_forever(self) -> None:
        """Serve in the calling thread until ``stop()`` (``edgefleet serve-artifacts``)."""
        self.httpd.serve_forever()

    def stop(self) -> None:
        """Stop serving, close the socket and join the background thread."""
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
