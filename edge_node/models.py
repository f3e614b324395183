"""Where a model is swapped: the model manager.

It follows the desired state the cloud retains on the edge's ``desired`` topic:

1. ``received``: the order is parsed and admitted (below); the manifest's ed25519 signature is
   checked against the edge's key ring *before* anything is downloaded;
2. ``downloading``: the artifact comes from the manifest's ``http(s)://`` or ``file://`` URL;
3. ``verifying``: size and sha256 against the manifest, then the interpreter's input/output shapes
   and dtypes against the manifest;
4. ``warming_up``: one interpreter per worker is built and run on recent real windows (random ones
   if none matches); any NaN/inf output rejects the model;
5. ``swapped``: the artifact is stored, the state file updated (the previous model becomes
   last-good) and the workers' model reference replaced between two batches.

Any failure is reported as ``failed`` with the reason, and the serving model stays. A ``rollback``
order names the version it goes back to: with a manifest it installs that model (downloaded, or
from the store), without one it restores last-good if that is the named version. On restart the
active model is loaded from disk.

Before any of that, the order itself must be admitted (``ModelManager._admit``), else it is
*refused*: nothing is downloaded, the revision is not taken, the old model keeps serving, and the
refusal is logged (warning), reported (``DeploymentProgress`` stage ``refused`` with the reason) and
counted (``edge_desired_refused_total{reason}``). An order is refused when it

- does not decode (``malformed``), or is for another edge (``wrong_edge``);
- is unsigned (``unsigned``), names a key outside the edge's ring (``unknown_key``) or a revoked one
  (``revoked_key``), or its signature does not verify (``bad_signature``: any field changed);
- has a revision not above the last one applied (``stale_revision``; that revision itself is the
  retained order seen again, silently ignored), persisted in ``models/state.json``;
- has expired or carries no expiry (``expired``);
- names a model whose digest is not the one signed (``digest_mismatch``);
- is a rollback naming no version, or a different one than its manifest (``rollback_unnamed``);
- would install a model *older* than the serving one without being a rollback (``downgrade``).
  "Older" compares the manifests' signed ``created_at`` (when the cloud built and signed the
  model): a candidate created before the serving model is older. A serving model without a
  signature (a local ``--model``) sets no floor.

The key ring (``edge_node/trust.py``) starts from ``model.public_key`` and follows the cloud's
signed ``KeyRing`` announcements, handled on the same thread as the orders, in arrival order.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import logging
import os
import queue
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import unquote, urlsplit

import numpy as np

from edge_node.errors import DeployError, ModelError
from edge_node.inference import ActiveModel, ModelHolder
from edge_node.runtime import Backend, ModelRunner, describe_model
from edge_node.trust import TrustRing
from shared.errors import EdgefleetError, SchemaError, SignatureError
from shared.redact import redact_url
from shared.schemas import (
    DeploymentProgress,
    DeployStage,
    DesiredAction,
    DesiredState,
    KeyRing,
    ModelManifest,
    Quantization,
    ReportedState,
    decode_message,
    manifest_digest,
)
from shared.settings.edge import EdgeSettings
from shared.signing import verify_desired, verify_manifest

logger = logging.getLogger(__name__)

STATE_FILE: Final = "state.json"
TRUST_DIR: Final = "trust"
CLOCK_SKEW_S: Final = 60.0  # an order is expired once expires_at is this far behind the edge's clock


class RefusedError(EdgefleetError):
    """An order the edge does not accept; ``code`` is the metric label, the message the reason."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code


@dataclass(frozen=True)
class KeyUpdate:
    """A ``KeyRing`` payload from the keys topic, queued with the orders (handled in arrival order)."""

    payload: bytes


DOWNLOAD_CHUNK: Final = 1 << 20
DOWNLOAD_RESUMES: Final = 3  # Range requests after a transfer is cut off
# The realm of the cloud's artifact server (cloud.artifacts.BASIC_REALM): only a server challenging for
# it gets the edge's identity.
ARTIFACT_REALM: Final = "edgefleet artifacts"


@dataclass
class ManagerState:
    """What survives a restart (``models/state.json``)."""

    active: str | None = None  # sha256 of the active artifact
    last_good: str | None = None
    revision: int | None = None
    last_ok: bool | None = None
    last_reason: str | None = None
    manifests: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> str:
        """The state as JSON (``models/state.json``)."""
        return json.dumps(self.__dict__, indent=2, sort_keys=True)


def sha256_hex(content: bytes) -> str:
    """SHA-256 of ``content`` in hex."""
    return hashlib.sha256(content).hexdigest()


def download_identity(settings: EdgeSettings) -> tuple[str, str] | None:
    """The edge's identity for artifact downloads (HTTP Basic): the username and secret of its cloud
    link (from its enrollment), or None when it has none or a ``download_token`` is configured."""
    if settings.model.download_token is not None:
        return None
    username, secret = settings.cloud.credentials()
    return (username, secret) if username and secret else None


def _asks_identity(exc: urllib.error.HTTPError) -> bool:
    """Whether a 401 challenges for an edge's identity: ``Basic realm="edgefleet artifacts"``."""
    challenge = exc.headers.get("WWW-Authenticate", "") if exc.headers is not None else ""
    return challenge.lower().startswith("basic") and f'realm="{ARTIFACT_REALM}"' in challenge


def _refusal_detail(exc: urllib.error.HTTPError) -> str:
    """The ``detail`` of a JSON error body (the artifact server's and the API's), else ``""``."""
    try:
        body = json.loads(exc.read(4096) or b"{}")
    except (OSError, ValueError):
        return ""
    detail = body.get("detail") if isinstance(body, dict) else None
    return f": {detail}" if isinstance(detail, str) else ""


def fetch_artifact(
    url: str,
    limit: int,
    timeout_s: float,
    *,
    token: str | None = None,
    basic: tuple[str, str] | None = None,
    sha256: str | None = None,
) -> bytes:
    """Bytes at an ``http(s)://`` or ``file://`` URL, at most ``limit`` + 1 of them.

    ``token``: sent as ``Authorization: Bearer`` over http(s). Else ``basic`` (the edge's identity:
    username, secret) as HTTP Basic, but only to a server that asks for it: a 401 challenging for realm
    ``ARTIFACT_REALM`` (the cloud's artifact server); a bucket or CDN a manifest points at never sees
    it. A 401/403 fails naming authentication and the server's reason.
    ``sha256``: when the server states the artifact's digest (``X-Checksum-SHA256``) and it differs,
    fail before downloading the body. A transfer cut off after some bytes (connection reset, read
    timeout, fewer bytes than Content-Length) is resumed with ``Range: bytes=<got>-``, at most
    ``DOWNLOAD_RESUMES`` times; a server that answers the range with a full 200 is read from the start."""
    parts = urlsplit(url)
    if parts.scheme == "file":
        path = Path(unquote(parts.path))
        try:
            with path.open("rb") as fh:
                return fh.read(limit + 1)
        except OSError as exc:
            raise DeployError(f"download: cannot read {path}: {exc}") from exc
    if parts.scheme not in ("http", "https"):
        raise DeployError(f"download: URL scheme {parts.scheme!r} is not http, https or file")
    chunks: list[bytes] = []
    size = 0
    resumes = 0
    identify = False  # send the identity: set once the server challenged for it
    while True:
        request = urllib.request.Request(url)  # noqa: S310  (scheme checked above)
        if token is not None:  # not forwarded if the server redirects elsewhere
            request.add_unredirected_header("Authorization", f"Bearer {token}")
        elif basic is not None and identify:
            pair = base64.b64encode(f"{basic[0]}:{basic[1]}".encode()).decode()
            request.add_unredirected_header("Authorization", f"Basic {pair}")
        if size:
            request.add_header("Range", f"bytes={size}-")
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310
                stated = response.headers.get("X-Checksum-SHA256")
                if sha256 is not None and stated and stated.lower() != sha256.lower():
                    raise DeployError(
                        f"download: {url} serves sha256 {stated[:12]}…, the manifest says {sha256[:12]}…"
                    )
                if size and not (
                    response.status == 206
                    and response.headers.get("Content-Range", "").startswith(f"bytes {size}-")
                ):
                    chunks, size = [], 0  # the range was not honoured: this is the whole artifact
                while size <= limit:
                    chunk = response.read(DOWNLOAD_CHUNK)
                    if not chunk:
                        break
                    chunks.append(chunk)
                    size += len(chunk)
                missing = getattr(response, "length", None)  # http.client: body bytes still owed
                if size <= limit and missing:
                    raise http.client.IncompleteRead(b"", missing)
            return b"".join(chunks)
        except urllib.error.HTTPError as exc:
            challenged = exc.code == 401 and token is None and basic is not None
            if challenged and not identify and _asks_identity(exc):
                identify = True  # our artifact server: log in and ask again
                continue
            if exc.code in (401, 403):
                if token is not None:
                    why = "the download token was refused"
                elif basic is not None:
                    why = f"identity {basic[0]!r} was refused"
                else:
                    why = "no download token configured"
                raise DeployError(
                    f"download: {redact_url(url)}: authentication failed (HTTP {exc.code}: {why})"
                    f"{_refusal_detail(exc)}"
                ) from exc
            raise DeployError(f"download: {redact_url(url)}: {exc}{_refusal_detail(exc)}") from exc
        except (OSError, http.client.HTTPException) as exc:  # URLError, resets and timeouts are OSErrors
            if size == 0 or resumes == DOWNLOAD_RESUMES:
                cut = f" (cut off after {size} bytes, {resumes} resumes)" if size else ""
                raise DeployError(f"download: {redact_url(url)}: {exc}{cut}") from exc
            resumes += 1
            logger.warning("download of %s cut off after %d bytes (%r): resuming", redact_url(url), size, exc)


def derive_manifest(content: bytes, path: Path, backend: Backend, settings: EdgeSettings) -> ModelManifest:
    """A manifest for a bare ``--model`` file: shapes and dtypes read from the model itself."""
    info = describe_model(backend, content, settings.runtime)
    classes = info["output_shape"][-1]
    names = settings.model.class_names or [f"class_{i}" for i in range(classes)]
    if len(names) != classes:
        raise ModelError(f"{len(names)} class names given; the model has {classes} outputs")
    digest = sha256_hex(content)
    return ModelManifest(
        name=path.stem[:64] or "local",
        version=f"local-{digest[:12]}",
        quantization=Quantization.INT8 if info["input_dtype"] in ("int8", "uint8") else Quantization.FLOAT32,
        sha256=digest,
        size_bytes=len(content),
        url=path.resolve().as_uri(),
        input_shape=info["input_shape"],
        input_dtype=info["input_dtype"],
        output_shape=info["output_shape"],
        output_dtype=info["output_dtype"],
        class_names=names,
    )


class ModelManager:
    """Owns the model store on disk and swaps ``holder.current``; runs orders on its own thread."""

    def __init__(
        self,
        settings: EdgeSettings,
        backend: Backend,
        holder: ModelHolder,
        *,
        warmup_windows: Callable[[], list[np.ndarray]],
        on_swap: Callable[[ActiveModel], None],
        publish_progress: Callable[[DeploymentProgress], None],
        publish_reported: Callable[[ReportedState], None],
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.holder = holder
        self.store = settings.data_dir / "models"
        self.store.mkdir(parents=True, exist_ok=True)
        self._warmup_windows = warmup_windows
        self._on_swap = on_swap
        self._publish_progress = publish_progress
        self._publish_reported = publish_reported
        self.state = self._load_state()
        self.orders: queue.SimpleQueue[bytes | KeyUpdate] = queue.SimpleQueue()
        self.stop_event = threading.Event()
        self._thread: threading.Thread | None = None
        self.ring = TrustRing(
            settings.data_dir / TRUST_DIR, settings.model.public_key, settings.model.trusted_keys_dir
        )
        self.deploys_ok = 0
        self.deploys_failed = 0
        self.refused: Counter[str] = Counter()  # edge_desired_refused_total{reason}
        self._parked: bytes | None = None  # the last order refused for a key the ring did not know

    # -- state on disk ----------------------------------------------------------------------------
    def _load_state(self) -> ManagerState:
        path = self.store / STATE_FILE
        if not path.exists():
            return ManagerState()
        try:
            data = json.loads(path.read_text())
            return ManagerState(**data)
        except (OSError, ValueError, TypeError) as exc:
            logger.warning(
                "model state file %s unreadable (%s): starting without a deployed model", path, exc
            )
            return ManagerState()

    def _save_state(self) -> None:
        path = self.store / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self.state.to_json())
        os.replace(tmp, path)

    def _artifact_path(self, sha: str) -> Path:
        return self.store / f"{sha}.tflite"

    def _store_artifact(self, content: bytes, manifest: ModelManifest) -> Path:
        path = self._artifact_path(manifest.sha256)
        if not path.exists():
            tmp = path.with_suffix(".part")
            with tmp.open("wb") as fh:
                fh.write(content)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        self.state.manifests[manifest.sha256] = manifest.model_dump(mode="json")
        return path

    def _prune(self) -> None:
        keep = {s for s in (self.state.active, self.state.last_good) if s}
        self.state.manifests = {k: v for k, v in self.state.manifests.items() if k in keep}
        for path in self.store.glob("*.tflite"):
            if path.stem not in keep:
                path.unlink(missing_ok=True)

    # -- building a model ---------------------------------------------------------------------------
    def prepare(self, content: bytes, manifest: ModelManifest, path: Path) -> ActiveModel:
        """Interpreters for every worker, checked against the manifest and warmed up. Off the hot path."""
        runners = []
        for _ in range(self.settings.batching.workers):
            interpreter = self.backend.make_interpreter(content, self.settings.runtime)
            runners.append(ModelRunner(interpreter, manifest, self.settings.batching.max_batch))
        batch = self._warmup_batch(manifest)
        for runner in runners:
            out = runner.predict(batch)
            if not np.isfinite(out).all():
                raise ModelError("warm-up: the model produced NaN or infinity")
            runner.predict(batch[:1])  # also warm the batch-1 path used at low load
        return ActiveModel(manifest, tuple(runners), manifest.sha256, str(path))

    def _warmup_batch(self, manifest: ModelManifest) -> np.ndarray:
        shape = list(manifest.input_shape)
        count = self.settings.model.warmup_windows
        recent = [w for w in self._warmup_windows() if list(w.shape) == shape][-count:]
        if len(recent) < count:
            rng = np.random.default_rng(0)
            recent += [
                rng.normal(0.0, 1.0, size=shape).astype(np.float32) for _ in range(count - len(recent))
            ]
        return np.stack(recent).astype(np.float32)

    def _swap(self, model: ActiveModel) -> None:
        self.holder.swap(model)
        self._on_swap(model)
        logger.info("serving model %s (sha256 %s)", model.manifest.ref, model.sha256[:12])

    # -- start-up -----------------------------------------------------------------------------------
    def start_up(self) -> ActiveModel | None:
        """Load the active model from disk, else last-good, else the configured local model."""
        for sha in (self.state.active, self.state.last_good):
            if sha is None:
                continue
            try:
                model = self._load_stored(sha)
            except (EdgefleetError, OSError, ValueError) as exc:
                logger.warning("stored model %s unusable: %s", sha[:12], exc)
                continue
            if sha != self.state.active:
                self.state.active = sha
                self._save_state()
            self._swap(model)
            return model
        if self.settings.model.path is not None:
            model = self._load_local(self.settings.model.path, self.settings.model.manifest)
            self._swap(model)
            return model
        return None

    def _load_stored(self, sha: str) -> ActiveModel:
        manifest = ModelManifest.model_validate(self.state.manifests[sha])
        path = self._artifact_path(sha)
        content = path.read_bytes()
        if sha256_hex(content) != sha:
            raise DeployError(f"{path} does not match its sha256 any more")
        return self.prepare(content, manifest, path)

    def _load_local(self, path: Path, manifest_path: Path | None) -> ActiveModel:
        try:
            content = path.read_bytes()
        except OSError as exc:
            raise ModelError(f"cannot read model {path}: {exc}") from exc
        if manifest_path is not None:
            try:
                manifest = decode_message(manifest_path.read_bytes(), ModelManifest)
            except (OSError, SchemaError) as exc:
                raise ModelError(f"manifest {manifest_path}: {exc}") from exc
            if manifest.sha256 != sha256_hex(content):
                raise ModelError(f"{path} does not match the sha256 in {manifest_path}")
        else:
            manifest = derive_manifest(content, path, self.backend, self.settings)
        return self.prepare(content, manifest, path)

    # -- orders from the cloud ----------------------------------------------------------------------
    def start(self) -> None:
        """Start the thread that carries out deployment orders."""
        self._thread = threading.Thread(target=self._run, name="edge-models", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the deployment thread."""
        self.stop_event.set()
        if self._thread is not None:
            self._thread.join(30)

    def _run(self) -> None:
        while not self.stop_event.is_set():
            try:
                payload = self.orders.get(timeout=0.1)
            except queue.Empty:
                continue
            try:
                if isinstance(payload, KeyUpdate):
                    self.handle_keys(payload.payload)
                else:
                    self.handle(payload)
            except Exception:  # one bad order must not stop the manager
                logger.exception("deployment order failed unexpectedly")

    def submit_keys(self, payload: bytes) -> None:
        """Queue a ``KeyRing`` message from the keys topic (handled between orders, in order)."""
        self.orders.put(KeyUpdate(payload))

    def handle_keys(self, payload: bytes) -> None:
        """Apply the cloud's key ring announcements this edge can verify (synchronously); an order
        refused earlier for want of its key is tried again once the ring changed."""
        try:
            ring = decode_message(payload, KeyRing)
        except SchemaError as exc:
            logger.warning("key ring message rejected: %s", exc)
            return
        update = self.ring.apply(ring)
        for why in update.refused:
            logger.warning("key announcement refused: %s", why)
        for kid in update.added:
            logger.info("key ring: trusting key %s", kid)
        for kid in update.revoked:
            logger.warning("key ring: key %s revoked", kid)
        if update.changed and self._parked is not None:
            parked, self._parked = self._parked, None
            self.handle(parked)

    def handle(self, payload: bytes) -> None:
        """Carry out one desired-state message (synchronously)."""
        try:
            desired = decode_message(payload, DesiredState)
        except SchemaError as exc:
            self._refuse(RefusedError("malformed", f"undecodable order: {exc}"), None)
            return
        if self.state.revision is not None and desired.revision == self.state.revision:
            logger.debug("desired revision %d already handled", desired.revision)  # the retained order again
            return
        try:
            self._admit(desired)
        except RefusedError as exc:
            if exc.code == "unknown_key":
                self._parked = payload
            self._refuse(exc, desired)
            return
        version = desired.model.version if desired.model is not None else desired.rollback_to
        try:
            if desired.action is DesiredAction.ROLLBACK:
                model = self._deploy(desired) if desired.model is not None else self._rollback(desired)
                stage = DeployStage.ROLLED_BACK
            else:
                model = self._deploy(desired)
                stage = DeployStage.SWAPPED
        except (EdgefleetError, OSError, ValueError) as exc:
            reason = str(exc)
            self.deploys_failed += 1
            logger.warning("deployment of revision %d failed: %s", desired.revision, reason)
            self.state.revision = desired.revision
            self.state.last_ok, self.state.last_reason = False, reason
            self._save_state()
            self._progress(desired, DeployStage.FAILED, version, ok=False, reason=reason)
            self._publish_reported(self.reported())
            return
        self.deploys_ok += 1
        self.state.revision = desired.revision
        self.state.last_ok, self.state.last_reason = True, None
        self._save_state()
        self._progress(desired, stage, model.version, ok=True)
        self._publish_reported(self.reported())

    # -- admitting an order ----------------------------------------------------------------------------
    def _admit(self, desired: DesiredState) -> None:
        """Raise ``RefusedError`` unless this edge may act on ``desired`` (see the module docstring)."""
        if desired.edge_id != self.settings.edge_id:
            raise RefusedError(
                "wrong_edge", f"order for edge {desired.edge_id}, this is {self.settings.edge_id}"
            )
        if self.settings.model.require_signature:
            self._check_order_signature(desired)
        if self.state.revision is not None and desired.revision < self.state.revision:
            raise RefusedError(
                "stale_revision",
                f"revision {desired.revision} is not above {self.state.revision}, the last one applied",
            )
        if desired.expires_at is None:
            if self.settings.model.require_signature:
                raise RefusedError("expired", "the order carries no expiry")
        elif desired.expires_at + CLOCK_SKEW_S < time.time():
            raise RefusedError("expired", f"the order expired at {desired.expires_at:.0f} (epoch s)")
        digest = manifest_digest(desired.model) if desired.model is not None else None
        if (desired.model_digest is not None or self.settings.model.require_signature) and (
            desired.model_digest != digest
        ):
            raise RefusedError("digest_mismatch", "the model is not the one the order's digest names")
        if desired.action is DesiredAction.ROLLBACK:
            if desired.rollback_to is None:
                raise RefusedError("rollback_unnamed", "a rollback must name the version it goes back to")
            if desired.model is not None and desired.model.version != desired.rollback_to:
                raise RefusedError(
                    "rollback_unnamed",
                    f"the rollback names {desired.rollback_to} but carries {desired.model.ref}",
                )
        elif desired.model is not None:
            self._check_not_older(desired.model)

    def _check_order_signature(self, desired: DesiredState) -> None:
        if desired.signature is None:
            raise RefusedError("unsigned", "the order is unsigned")
        if desired.key_id is not None and self.ring.is_revoked(desired.key_id):
            raise RefusedError("revoked_key", f"the order is signed by revoked key {desired.key_id}")
        key = self.ring.active(desired.key_id)
        if key is None and not self.ring.keys:
            raise RefusedError("unknown_key", "no cloud public key is configured (model.public_key)")
        if key is None:
            raise RefusedError("unknown_key", f"the order is signed by key {desired.key_id}, not in the ring")
        try:
            verify_desired(desired, key)
        except SignatureError as exc:
            raise RefusedError("bad_signature", str(exc)) from exc

    def _check_not_older(self, manifest: ModelManifest) -> None:
        current = self.holder.current
        if current is None or current.manifest.signature is None or current.sha256 == manifest.sha256:
            return
        if manifest.created_at < current.manifest.created_at:
            raise RefusedError(
                "downgrade",
                f"{manifest.ref} is older than the serving {current.manifest.ref}: "
                "only a signed rollback naming that version may install it",
            )

    def _refuse(self, refusal: RefusedError, desired: DesiredState | None) -> None:
        self.refused[refusal.code] += 1
        revision = desired.revision if desired is not None else None
        logger.warning(
            "desired state r%s refused (%s): %s; the serving model stays",
            revision if revision is not None else "?",
            refusal.code,
            refusal,
        )
        if desired is None:
            return  # nothing to report it against: no revision
        version = desired.model.version if desired.model is not None else desired.rollback_to
        self._progress(
            desired, DeployStage.REFUSED, version, ok=False, reason=f"refused ({refusal.code}): {refusal}"
        )

    def _progress(
        self,
        desired: DesiredState,
        stage: DeployStage,
        version: str | None,
        *,
        ok: bool,
        reason: str | None = None,
    ) -> None:
        msg = DeploymentProgress(
            edge_id=self.settings.edge_id,
            revision=desired.revision,
            rollout_id=desired.rollout_id,
            model_version=version,
            stage=stage,
            ok=ok,
            reason=reason,
        )
        try:
            self._publish_progress(msg)
        except EdgefleetError as exc:
            logger.warning("deploy progress not published: %s", exc)

    def _deploy(self, desired: DesiredState) -> ActiveModel:
        manifest = desired.model
        assert manifest is not None  # DesiredState validates deploy orders carry a model
        self._progress(desired, DeployStage.RECEIVED, manifest.version, ok=True)
        self._check_signature(manifest)
        current = self.holder.current
        if current is not None and current.sha256 == manifest.sha256 and current.manifest == manifest:
            return current  # already serving exactly this model
        self._progress(desired, DeployStage.DOWNLOADING, manifest.version, ok=True)
        limit = self.settings.model.max_artifact_bytes
        if manifest.size_bytes > limit:
            raise DeployError(f"size: {manifest.size_bytes} bytes exceeds the limit of {limit}")
        token = self.settings.model.download_token
        content = fetch_artifact(
            manifest.url,
            manifest.size_bytes,
            self.settings.model.download_timeout_s,
            token=token.get_secret_value() if token is not None else None,
            basic=download_identity(self.settings),
            sha256=manifest.sha256,
        )
        self._progress(desired, DeployStage.VERIFYING, manifest.version, ok=True)
        if len(content) != manifest.size_bytes:
            raise DeployError(
                f"size: the artifact has {len(content)} bytes, the manifest says {manifest.size_bytes} "
                "(truncated or wrong file)"
            )
        digest = sha256_hex(content)
        if digest != manifest.sha256:
            raise DeployError(f"sha256: the artifact hashes to {digest}, the manifest says {manifest.sha256}")
        self._progress(desired, DeployStage.WARMING_UP, manifest.version, ok=True)
        path = self._artifact_path(manifest.sha256)
        try:
            model = self.prepare(content, manifest, path)
        except ModelError as exc:
            raise DeployError(f"model check: {exc}") from exc
        self._store_artifact(content, manifest)
        previous = self.holder.current
        self._swap(model)
        if previous is not None and previous.sha256 in self.state.manifests:
            self.state.last_good = previous.sha256
        elif previous is not None:  # a local --model: keep it as last-good too
            self._store_artifact(Path(previous.path).read_bytes(), previous.manifest)
            self.state.last_good = previous.sha256
        self.state.active = manifest.sha256
        self._prune()
        return model

    def _check_signature(self, manifest: ModelManifest) -> None:
        if not self.settings.model.require_signature:
            return
        keys = self.ring.known(manifest.key_id)
        if not keys:
            raise DeployError(
                "signature: no cloud public key is configured (model.public_key)"
                if not self.ring.keys
                else f"signature: model {manifest.ref} is signed by key {manifest.key_id}, not in the ring"
            )
        error: SignatureError | None = None
        for key in keys:
            try:
                verify_manifest(manifest, key)
                return
            except SignatureError as exc:
                error = exc
        raise DeployError(f"signature: {error}")

    def _rollback(self, desired: DesiredState) -> ActiveModel:
        target = self.state.last_good
        if target is None or target == self.state.active:
            raise DeployError("rollback: there is no last-good model on disk")
        stored = self.state.manifests.get(target) or {}
        if stored.get("version") != desired.rollback_to:
            raise DeployError(
                f"rollback: the last-good model is {stored.get('version')}, "
                f"the order names {desired.rollback_to}"
            )
        self._progress(desired, DeployStage.RECEIVED, desired.rollback_to, ok=True)
        model = self._load_stored(target)
        self._swap(model)
        self.state.active = target
        self.state.last_good = None
        self._prune()
        return model

    def reported(self) -> ReportedState:
        """What this edge runs, for its status message."""
        current = self.holder.current
        last_good = self.state.manifests.get(self.state.last_good or "")
        return ReportedState(
            model_name=current.manifest.name if current else None,
            model_version=current.version if current else None,
            model_sha256=current.sha256 if current else None,
            last_good_version=str(last_good["version"]) if last_good else None,
            desired_revision=self.state.revision,
            last_deploy_ok=self.state.last_ok,
            last_deploy_reason=self.state.last_reason,
        )


class WorkerModels(ModelManager):
    """The model side of one worker process of a multi-process edge (``edge_node/supervisor.py``).

    The supervisor's manager downloads, verifies (signature, size, sha256), stores and records every
    artifact once; a worker only builds and warms up its own interpreters of the model it is told:
    ``initial`` at start-up, then ``stage`` (on ``Prepare``) and ``activate`` (on ``Commit``). It
    runs no orders thread and never writes the model store."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.initial: tuple[Path, Path, ModelManifest] | None = None  # (read from, stored at, manifest)

    def start_up(self) -> ActiveModel | None:
        """The model the supervisor serves now (``initial``), built and swapped in; ``None`` if none."""
        if self.initial is None:
            return None
        model = self.stage(*self.initial)
        self._swap(model)
        return model

    def stage(self, source: Path, stored: Path, manifest: ModelManifest) -> ActiveModel:
        """Interpreters of the artifact at ``source`` (checked against the manifest's sha256 again:
        a truncated file must not load), warmed up, not yet serving."""
        try:
            content = source.read_bytes()
        except OSError as exc:
            raise ModelError(f"cannot read {source}: {exc}") from exc
        if sha256_hex(content) != manifest.sha256:
            raise ModelError(f"{source} does not match the manifest's sha256")
        return self.prepare(content, manifest, stored)

    def activate(self, model: ActiveModel) -> None:
        """Serve ``model`` from the next batch on."""
        self._swap(model)

    def start(self) -> None:
        """No orders thread: the supervisor carries out deployment orders."""

    def stop(self) -> None:
        """Nothing to stop."""
