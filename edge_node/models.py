"""Where a model is swapped: the model manager.

It follows the desired state the cloud retains on the edge's ``desired`` topic:

1. ``received``: the order is parsed; the manifest's ed25519 signature is checked against the
   configured cloud public key *before* anything is downloaded;
2. ``downloading``: the artifact comes from the manifest's ``http(s)://`` or ``file://`` URL;
3. ``verifying``: size and sha256 against the manifest, then the interpreter's input/output shapes
   and dtypes against the manifest;
4. ``warming_up``: one interpreter per worker is built and run on recent real windows (random ones
   if none matches); any NaN/inf output rejects the model;
5. ``swapped``: the artifact is stored, the state file updated (the previous model becomes
   last-good) and the workers' model reference replaced between two batches.

Any failure is reported as ``failed`` with the reason, and the serving model stays. A ``rollback``
order restores last-good. On restart the active model is loaded from disk.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import queue
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import unquote, urlsplit

import numpy as np

from edge_node.errors import DeployError, ModelError
from edge_node.inference import ActiveModel, ModelHolder
from edge_node.runtime import Backend, ModelRunner, describe_model
from shared.errors import EdgefleetError, SchemaError, SignatureError
from shared.schemas import (
    DeploymentProgress,
    DeployStage,
    DesiredAction,
    DesiredState,
    ModelManifest,
    Quantization,
    ReportedState,
    decode_message,
)
from shared.settings.edge import EdgeSettings
from shared.signing import load_public_key, verify_manifest

logger = logging.getLogger(__name__)

STATE_FILE: Final = "state.json"
DOWNLOAD_CHUNK: Final = 1 << 20
DOWNLOAD_RESUMES: Final = 3  # Range requests after a transfer is cut off


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


def fetch_artifact(
    url: str, limit: int, timeout_s: float, *, token: str | None = None, sha256: str | None = None
) -> bytes:
    """Bytes at an ``http(s)://`` or ``file://`` URL, at most ``limit`` + 1 of them.

    ``token``: sent as ``Authorization: Bearer`` over http(s); a 401/403 fails naming authentication.
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
    for attempt in range(DOWNLOAD_RESUMES + 1):
        request = urllib.request.Request(url)  # noqa: S310  (scheme checked above)
        if token is not None:  # not forwarded if the server redirects elsewhere
            request.add_unredirected_header("Authorization", f"Bearer {token}")
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
            if exc.code in (401, 403):
                why = "no download token configured" if token is None else "the download token was refused"
                raise DeployError(f"download: {url}: authentication failed (HTTP {exc.code}: {why})") from exc
            raise DeployError(f"download: {url}: {exc}") from exc
        except (OSError, http.client.HTTPException) as exc:  # URLError, resets and timeouts are OSErrors
            if size == 0 or attempt == DOWNLOAD_RESUMES:
                cut = f" (cut off after {size} bytes, {attempt} resumes)" if size else ""
                raise DeployError(f"download: {url}: {exc}{cut}") from exc
            logger.warning("download of %s cut off after %d bytes (%r): resuming", url, size, exc)
    raise AssertionError("unreachable")  # the last attempt returns or raises


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
        self.orders: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        self.stop_event = threading.Event()
        self._thread: threading.Thread | None = None
        self.public_key = (
            load_public_key(settings.model.public_key) if settings.model.public_key is not None else None
        )
        self.deploys_ok = 0
        self.deploys_failed = 0

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
                self.handle(payload)
            except Exception:  # one bad order must not stop the manager
                logger.exception("deployment order failed unexpectedly")

    def handle(self, payload: bytes) -> None:
        """Carry out one desired-state message (synchronously)."""
        try:
            desired = decode_message(payload, DesiredState)
        except SchemaError as exc:
            logger.warning("desired state rejected: %s", exc)
            return
        if desired.edge_id != self.settings.edge_id:
            logger.error(
                "desired state for edge %s ignored (this is %s)", desired.edge_id, self.settings.edge_id
            )
            return
        if self.state.revision is not None and desired.revision <= self.state.revision:
            logger.debug("desired revision %d already handled", desired.revision)
            return
        version = desired.model.version if desired.model is not None else None
        try:
            if desired.action is DesiredAction.ROLLBACK:
                model = self._rollback(desired)
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
        if self.public_key is None:
            raise DeployError("signature: no cloud public key is configured (model.public_key)")
        try:
            verify_manifest(manifest, self.public_key)
        except SignatureError as exc:
            raise DeployError(f"signature: {exc}") from exc

    def _rollback(self, desired: DesiredState) -> ActiveModel:
        target = self.state.last_good
        if target is None or target == self.state.active:
            raise DeployError("rollback: there is no last-good model on disk")
        self._progress(desired, DeployStage.RECEIVED, None, ok=True)
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
