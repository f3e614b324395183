"""The learning pipeline's steps as plain functions over run ids: prepare -> train -> compress ->
evaluate -> gate -> sign -> publish (-> deploy). Each is idempotent (re-running a step rewrites its own
outputs) and records what it did in the registry. Celery tasks (``cloud.worker.tasks``) and the
in-process CLI both call these."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from cloud.artifacts import sha256_file, store_for
from cloud.errors import DatasetError, RolloutError
from cloud.fleet import rollouts
from cloud.fleet.desired_state import publish_desired_state
from cloud.fleet.desired_state import sign as sign_manifest
from cloud.fleet.wave_gates import DEFAULT_GATES
from cloud.learning import compression, datasets, pipeline, promotion
from cloud.learning.evaluation import LiteRTModel
from cloud.learning.pipeline import PipelineConfig, Prepared
from cloud.learning.training import EpochCallback, count_params
from cloud.registry import crud, fleet
from cloud.registry.db import session_scope
from edge_node.preprocessing import (
    InputSpec,
    WindowRejectedError,
    normalize_fitted,
    prepare_batch,
    prepare_window,
)
from shared.schemas import ModelManifest, Normalization, Preprocessing
from shared.settings.cloud import CloudSettings

logger = logging.getLogger(__name__)


# Versions trained before ``preprocessing`` was recorded: windows of exactly the input shape, as is.
_LEGACY_PREPROCESSING = Preprocessing(normalize="none", length="exact")


@dataclass(frozen=True)
class ModelInput:
    """How raw windows become one model version's inputs, exactly as an edge serving it computes
    them: ``spec`` (``edge_node.preprocessing.prepare_window``), then its own fitted statistics
    (``mean``/``std``, the runner's ``normalize_fitted``) when it has them."""

    spec: InputSpec
    mean: np.ndarray | None = None
    std: np.ndarray | None = None

    @classmethod
    def of(cls, spec: InputSpec, normalization: Normalization | dict[str, Any] | None) -> ModelInput:
        """``spec`` with the fitted ``normalization`` (a manifest's or a training config's), if any."""
        if normalization is None:
            return cls(spec)
        norm = Normalization.model_validate(normalization)
        return cls(spec, np.asarray(norm.mean, dtype=np.float32), np.asarray(norm.std, dtype=np.float32))

    def window(self, values: np.ndarray, channels: Sequence[str] | None) -> np.ndarray:
        """One raw window (time, channels) as the model's input; ``WindowRejectedError`` if it cannot be."""
        return self._fitted(prepare_window(values, channels, self.spec))

    def batch(
        self, x: np.ndarray, channels: Sequence[str] | None, *, lengths: np.ndarray | None = None
    ) -> np.ndarray:
        """Raw rows (n, time, ...) (each cut to ``lengths`` when given) as the model's inputs."""
        return self._fitted(prepare_batch(x, channels, self.spec, lengths=lengths))

    def _fitted(self, x: np.ndarray) -> np.ndarray:
        if self.mean is None or self.std is None:
            return x
        return normalize_fitted(x, self.mean, self.std)


def model_input(
    manifest: dict[str, Any] | None,
    training_config: dict[str, Any] | None,
    *,
    input_shape: Sequence[int] | None = None,
) -> ModelInput | None:
    """How a registered model version takes raw windows: from its signed ``manifest`` when that
    records ``preprocessing``, else from its ``training_config`` (``preprocessing``,
    ``normalization``, ``input_shape``, ``channels``, as ``train`` stores them). A version trained
    before preprocessing was recorded keeps its old contract: windows of exactly its input shape
    (``input_shape``: the artifact's, else the recorded one), channels not checked, standardized
    with its recorded ``normalization``. None when a legacy version records neither a manifest
    nor a normalization (nothing says how it was fed). ``DatasetError`` when what is recorded is
    inconsistent."""
    cfg = training_config or {}
    signed: ModelManifest | None = None
    if manifest:
        try:
            signed = ModelManifest.model_validate(manifest)
        except ValidationError as exc:
            logger.debug("stored manifest not usable (%s); using the training config", exc)
    try:
        if signed is not None and signed.preprocessing is not None:
            return ModelInput.of(InputSpec.of(signed), signed.normalization)
        if cfg.get("preprocessing"):
            pre = Preprocessing.model_validate(cfg["preprocessing"])
            shape = cfg.get("input_shape") or input_shape
            if not shape:
                raise DatasetError("the training config records preprocessing but no input_shape")
            normalization = cfg.get("normalization") if pre.normalize == "fitted" else None
            if pre.normalize == "fitted" and not normalization:
                raise DatasetError("the training config records fitted normalisation but no statistics")
            channels = cfg.get("channels")
            spec = InputSpec(
                input_shape=tuple(int(d) for d in shape),
                channels=tuple(channels) if channels is not None else None,
                preprocessing=pre,
            )
            return ModelInput.of(spec, normalization)
        if signed is None and "normalization" not in cfg:
            return None
        legacy_shape = input_shape or (signed.input_shape if signed is not None else cfg.get("input_shape"))
        if not legacy_shape:
            return None
        legacy = InputSpec(
            input_shape=tuple(int(d) for d in legacy_shape),
            channels=None,  # as before: the shape alone was checked
            preprocessing=_LEGACY_PREPROCESSING,
            reorder=False,
        )
        return ModelInput.of(legacy, signed.normalization if signed is not None else cfg.get("normalization"))
    except ValidationError as exc:
        raise DatasetError(f"recorded preprocessing or normalization is invalid: {exc}") from exc


def run_dir(settings: CloudSettings, run_id: int) -> Path:
    """Where a run keeps its Keras and ``.tflite`` files."""
    return settings.data_dir / "runs" / str(run_id)


def run_config(settings: CloudSettings, run_id: int) -> PipelineConfig:
    """The pipeline config the run was created with."""
    with session_scope(settings.resolved_database_url) as session:
        return PipelineConfig.model_validate(crud.get_run(session, run_id=run_id).config)


def version_name(run_id: int, variant: str) -> str:
    """The version string of a run's variant, e.g. ``r7-int8``."""
    return f"r{run_id}-{variant}"


def prepared_data(settings: CloudSettings, run_id: int) -> Prepared:
    """The run's frozen dataset, split and normalised as training saw it."""
    config = run_config(settings, run_id)
    with session_scope(settings.resolved_database_url) as session:
        run = crud.get_run(session, run_id=run_id)
        if run.dataset_id is None:
            raise DatasetError(f"run {run_id} has no dataset yet (prepare_dataset did not run)")
        path = crud.get_dataset(session, dataset_id=run.dataset_id).path
    if path is None:
        raise DatasetError(f"dataset of run {run_id} has no frozen snapshot")
    dataset = datasets.load_npz(path)
    return pipeline.prepare(dataset, seed=config.seed, preprocessing=config.preprocessing)


def prepare_dataset(settings: CloudSettings, run_id: int) -> int:
    """Freeze the run's dataset to ``data_dir/datasets/<sha256>.npz`` and register it."""
    config = run_config(settings, run_id)
    if config.dataset == "samples":
        dataset = _labelled_samples_dataset(settings, config.model_name)
    else:
        dataset = datasets.load(
            config.dataset,
            seed=config.seed,
            n_windows=config.n_windows,
            drift=config.drift,
            length=config.preprocessing.length,
            input_length=config.preprocessing.input_length,
        )
        if config.include_samples:
            dataset = _with_samples(settings, dataset, config.model_name)
    sha = dataset.sha256()
    path = settings.data_dir / "datasets" / f"{sha}.npz"
    if not path.exists():
        dataset.save(path)
    with session_scope(settings.resolved_database_url) as session:
        record = crud.get_or_create_dataset(
            session,
            name=dataset.name,
            source=dataset.source,
            sha256=sha,
            n_samples=len(dataset.y),
            input_shape=dataset.input_shape,
            class_names=dataset.class_names,
            params=dataset.params,
            path=str(path.resolve()),
        )
        run = crud.get_run(session, run_id=run_id)
        run.dataset_id = record.id
        run.state = "running"
        crud.record_step(
            session,
            run_id=run_id,
            step="dataset",
            detail={
                "dataset_id": record.id,
                "sha256": sha,
                "n_samples": len(dataset.y),
                "source": dataset.source,
            },
        )
        return record.id


def _with_samples(settings: CloudSettings, dataset: Any, model_name: str) -> Any:
    """``dataset`` plus the labelled uplinked windows of the same shape and classes."""
    try:
        uplink = _labelled_samples_dataset(settings, model_name, class_names=dataset.class_names)
    except DatasetError as exc:
        logger.info("no uplinked samples added: %s", exc)
        return dataset
    if uplink.input_shape != dataset.input_shape:
        logger.warning(
            "uplinked samples of shape %s do not match %s; not added", uplink.input_shape, dataset.input_shape
        )
        return dataset
    n_added = len(uplink.y)
    dataset.X = np.concatenate([dataset.X, uplink.X])
    dataset.y = np.concatenate([dataset.y, uplink.y])
    if dataset.split is not None:  # uplinked windows only ever train: the published test part stays as is
        dataset.split = np.concatenate([dataset.split, np.full(n_added, datasets.TRAIN, dtype=np.int8)])
    if dataset.lengths is not None:
        full = np.full(n_added, uplink.X.shape[1], dtype=np.int64)
        dataset.lengths = np.concatenate([dataset.lengths, full])
    dataset.source = f"{dataset.source}+samples"
    dataset.params = {**dataset.params, "uplinked_samples": len(uplink.y)}
    return dataset


def _labelled_samples_dataset(
    settings: CloudSettings, model_name: str, *, class_names: list[str] | None = None
) -> Any:
    """Uplinked samples whose label may train: a teacher's, an operator's, or a trusted labeller
    device's (``crud.training_samples_clause``). Other devices' labels only evaluate models."""
    with session_scope(settings.resolved_database_url) as session:
        if class_names is None:
            production = crud.production_model(session, name=model_name)
            if production is None or production.manifest is None:
                raise DatasetError(
                    f"dataset 'samples' needs a production {model_name} to take class names from"
                )
            class_names = list(production.manifest["class_names"])
        rows = [
            (s.window, s.label)
            for s in crud.list_samples(
                session, labelled=True, training=True, limit=1_000_000, with_window=True
            )
            if s.window is not None and s.label is not None
        ]
    return datasets.samples_dataset(rows, class_names=class_names, name=f"{model_name}-uplink")


def train(settings: CloudSettings, run_id: int, *, on_epoch: EpochCallback | None = None) -> int:
    """Train the base (float) model; registered as the run's ``float32`` version with its Keras file."""
    config = run_config(settings, run_id)
    prepared = prepared_data(settings, run_id)
    keras_path = run_dir(settings, run_id) / "base.keras"
    history: list[dict[str, float]] = []

    def record_epoch(epoch: int, epochs: int, logs: dict[str, float]) -> None:
        history.append({"epoch": epoch, **logs})
        if on_epoch is not None:
            on_epoch(epoch, epochs, logs)

    start = time.perf_counter()
    model = pipeline.train_base(prepared, config.training, on_epoch=record_epoch)
    pipeline.save_keras(model, keras_path)
    seconds = time.perf_counter() - start
    with session_scope(settings.resolved_database_url) as session:
        run = crud.get_run(session, run_id=run_id)
        production = crud.production_model(session, name=config.model_name)
        version = crud.create_model_version(
            session,
            name=config.model_name,
            version=version_name(run_id, "float32"),
            variant="float32",
            dataset_id=run.dataset_id,
            parent_id=production.id if production is not None else None,
            run_id=run_id,
            training_config={
                "training": config.training.model_dump(),
                "normalization": prepared.normalization,
                "preprocessing": prepared.preprocessing.model_dump(mode="json"),
                "class_names": prepared.dataset.class_names,
                "input_shape": prepared.input_shape,
                "sample_rate_hz": prepared.dataset.sample_rate_hz,
                "channels": prepared.dataset.channels,
            },
            keras_path=str(keras_path.resolve()),
            quantization="float32",
        )
        crud.record_step(
            session,
            run_id=run_id,
            step="train",
            model_version_id=version.id,
            detail={"seconds": round(seconds, 2), "params": count_params(model), "history": history},
        )
        return version.id


def compress(settings: CloudSettings, run_id: int, variant: str) -> int:
    """Build one variant's ``.tflite`` from the run's base model."""
    config = run_config(settings, run_id)
    with session_scope(settings.resolved_database_url) as session:
        base = crud.get_model_version(session, ref=f"{config.model_name}@{version_name(run_id, 'float32')}")
        base_id, base_parent, keras_path, base_cfg = (
            base.id,
            base.parent_id,
            base.keras_path,
            dict(base.training_config),
        )
        dataset_id = base.dataset_id
        existing = crud.list_model_versions(session, name=config.model_name, limit=1000)
        signed = next(
            (m for m in existing if m.version == version_name(run_id, variant) and m.manifest), None
        )
        if signed is not None:
            # Signed and published: its artifact is what edges verify; never rebuild it.
            logger.info("%s is signed; compress skipped", signed.ref)
            return signed.id
    if keras_path is None:
        raise DatasetError(f"run {run_id}: the base model has no Keras file")
    prepared = prepared_data(settings, run_id)
    base_model = pipeline.load_keras(Path(keras_path))
    start = time.perf_counter()
    flatbuffer, model = pipeline.compress_variant(
        variant, base_model, prepared, config.training, config.compression
    )
    artifact = run_dir(settings, run_id) / f"{variant}.tflite"
    tmp = artifact.with_suffix(".tmp")
    tmp.write_bytes(flatbuffer)
    tmp.replace(artifact)
    sparsity = compression.sparsity_of(model)
    with session_scope(settings.resolved_database_url) as session:
        version = crud.create_model_version(
            session,
            name=config.model_name,
            version=version_name(run_id, variant),
            variant=variant,
            dataset_id=dataset_id,
            parent_id=base_parent if variant == "float32" else base_id,
            run_id=run_id,
            training_config={**base_cfg, "compression": config.compression.model_dump()},
            keras_path=keras_path if variant == "float32" else None,
            artifact_path=str(artifact.resolve()),
            quantization=compression.quantization_of(variant),
        )
        version.artifact_sha256 = sha256_file(artifact)
        version.artifact_size = len(flatbuffer)
        crud.record_step(
            session,
            run_id=run_id,
            step=f"compress:{variant}",
            model_version_id=version.id,
            detail={
                "seconds": round(time.perf_counter() - start, 2),
                "size_bytes": len(flatbuffer),
                "sparsity": round(sparsity, 4),
                "sha256": version.artifact_sha256,
            },
        )
        return version.id


def evaluate(settings: CloudSettings, run_id: int, variant: str) -> dict[str, float]:
    """Accuracy, macro-F1, size, gzip size and LiteRT latency of one variant on the held-out split."""
    config = run_config(settings, run_id)
    with session_scope(settings.resolved_database_url) as session:
        version = crud.get_model_version(session, ref=f"{config.model_name}@{version_name(run_id, variant)}")
        artifact = version.artifact_path
    if artifact is None:
        raise DatasetError(f"{config.model_name}@{version_name(run_id, variant)} has no artifact to evaluate")
    prepared = prepared_data(settings, run_id)
    result = pipeline.evaluate(Path(artifact).read_bytes(), prepared)
    metrics = {k: float(v) for k, v in result.as_dict().items() if isinstance(v, int | float)}
    with session_scope(settings.resolved_database_url) as session:
        version = crud.get_model_version(session, ref=f"{config.model_name}@{version_name(run_id, variant)}")
        version.metrics = metrics
        crud.record_step(
            session, run_id=run_id, step=f"evaluate:{variant}", model_version_id=version.id, detail=metrics
        )
    return metrics


def gate(settings: CloudSettings, run_id: int) -> bool:
    """Compare the deploy variant with production on this run's held-out split; record why either way."""
    config = run_config(settings, run_id)
    thresholds = settings.thresholds
    with session_scope(settings.resolved_database_url) as session:
        candidate = crud.get_model_version(
            session, ref=f"{config.model_name}@{version_name(run_id, config.deploy_variant)}"
        )
        production = crud.production_model(session, name=config.model_name)
        cand_acc = float(candidate.metrics.get("accuracy", 0.0))
        prod_ref = production.ref if production is not None else None
        prod_artifact = production.artifact_path if production is not None else None
        prod_recorded = float(production.metrics.get("accuracy", 0.0)) if production is not None else None
        prod_manifest = production.manifest if production is not None else None
        prod_cfg = dict(production.training_config or {}) if production is not None else {}
    prod_acc = prod_recorded
    basis = "recorded"
    if prod_artifact is not None and Path(prod_artifact).exists():
        # Fair comparison: production re-scored on the same held-out rows as the candidate, each
        # model fed as its edges feed it (its own preprocessing and fitted statistics).
        prepared = prepared_data(settings, run_id)
        try:
            prod_acc = _rescore(Path(prod_artifact).read_bytes(), prepared, prod_manifest, prod_cfg)
            basis = "re-evaluated on this run's held-out split"
        except (ValueError, RuntimeError, DatasetError) as exc:
            logger.warning(
                "production %s could not be re-evaluated (%s); using its recorded accuracy", prod_ref, exc
            )
    result = promotion.decide(
        candidate_accuracy=cand_acc,
        production_accuracy=prod_acc,
        margin=thresholds.gate_margin,
        min_accuracy=thresholds.gate_min_accuracy,
        production_ref=prod_ref,
    )
    reason = result.reason if prod_acc is None else f"{result.reason} ({basis})"
    with session_scope(settings.resolved_database_url) as session:
        crud.set_gate_result(session, model_id=candidate.id, passed=result.passed, reason=reason)
        crud.record_step(
            session,
            run_id=run_id,
            step="gate",
            model_version_id=candidate.id,
            detail={
                "passed": result.passed,
                "reason": reason,
                "production": prod_ref,
                "production_accuracy": prod_acc,
            },
        )
    logger.info("gate for %s: %s", candidate.ref, reason)
    return result.passed


def _rescore(
    flatbuffer: bytes, prepared: Prepared, manifest: dict[str, Any] | None, training_config: dict[str, Any]
) -> float:
    """Accuracy of another model version (production) on ``prepared``'s held-out rows, brought to
    its input by its own preprocessing (``model_input``). A version that records nothing of how it
    was fed is scored on the candidate's inputs, as the gate always did."""
    runtime = LiteRTModel(flatbuffer)
    feed = model_input(manifest, training_config, input_shape=runtime.input_shape)
    index = prepared.splits.test_index
    if feed is None or index is None:
        return pipeline.evaluate(flatbuffer, prepared).accuracy
    dataset = prepared.dataset
    lengths = dataset.lengths[index] if dataset.lengths is not None else None
    try:
        x = feed.batch(dataset.X[index], dataset.channels, lengths=lengths)
    except WindowRejectedError as exc:
        raise DatasetError(f"held-out rows do not fit production's input: {exc}") from exc
    y = prepared.splits.y_test
    if not len(y):
        return 0.0
    predicted = runtime.predict(x).argmax(axis=1)
    return float(np.mean(predicted == y))


def sign(settings: CloudSettings, run_id: int) -> str | None:
    """Sign the manifest of a candidate that passed the gate (ed25519); skipped, and recorded, otherwise."""
    config = run_config(settings, run_id)
    store = store_for(settings)
    with session_scope(settings.resolved_database_url) as session:
        model = crud.get_model_version(
            session, ref=f"{config.model_name}@{version_name(run_id, config.deploy_variant)}"
        )
        if not model.gate_passed:
            crud.record_step(
                session, run_id=run_id, step="sign", model_version_id=model.id, detail={"skipped": "gate"}
            )
            return None
        if model.artifact_sha256 is None or model.artifact_size is None or model.artifact_path is None:
            raise DatasetError(f"{model.ref} has no artifact to sign")
        runtime = LiteRTModel(Path(model.artifact_path).read_bytes(), num_threads=1)
        cfg = model.training_config
        parent = model.parent
        manifest = ModelManifest(
            name=model.name,
            version=model.version,
            created_at=model.created_at,
            quantization=model.quantization or "float32",
            sha256=model.artifact_sha256,
            size_bytes=model.artifact_size,
            url=store.url(model.name, model.version),
            input_shape=runtime.input_shape,
            input_dtype=runtime.input_dtype,
            output_shape=runtime.output_shape,
            output_dtype=runtime.output_dtype,
            class_names=list(cfg["class_names"]),
            normalization=Normalization(**cfg["normalization"]) if cfg.get("normalization") else None,
            sample_rate_hz=cfg.get("sample_rate_hz"),
            channels=cfg.get("channels"),
            # Versions trained before preprocessing was recorded keep the old (exact-shape) contract.
            preprocessing=Preprocessing.model_validate(cfg["preprocessing"])
            if cfg.get("preprocessing")
            else None,
            metrics={k: float(v) for k, v in model.metrics.items()},
            parent_version=parent.version if parent is not None else None,
            dataset_id=str(model.dataset_id) if model.dataset_id is not None else None,
        )
        signed = sign_manifest(manifest, settings)
        model.manifest = signed.model_dump(mode="json")
        model.signature = signed.signature
        model.key_id = signed.key_id
        model.artifact_url = signed.url
        crud.record_step(
            session, run_id=run_id, step="sign", model_version_id=model.id, detail={"key_id": signed.key_id}
        )
        return signed.signature


def publish(settings: CloudSettings, run_id: int) -> str:
    """Put the signed artifact and manifest in the store, promote it, finish the run; then deploy it to
    ``deploy_edges`` if any: directly or as a staged rollout (``PipelineConfig.deploy``)."""
    config = run_config(settings, run_id)
    store = store_for(settings)
    with session_scope(settings.resolved_database_url) as session:
        model = crud.get_model_version(
            session, ref=f"{config.model_name}@{version_name(run_id, config.deploy_variant)}"
        )
        if model.manifest is None:
            crud.record_step(
                session,
                run_id=run_id,
                step="publish",
                model_version_id=model.id,
                detail={"skipped": model.gate_reason},
            )
            crud.finish_run(session, run_id=run_id, state="rejected", error=model.gate_reason)
            return "rejected"
        manifest = ModelManifest.model_validate(model.manifest)
        if model.artifact_path is None:
            raise DatasetError(f"{model.ref} has no artifact to publish")
        path = store.put(
            Path(model.artifact_path), name=model.name, version=model.version, sha256=manifest.sha256
        )
        store.write_manifest(manifest)
        crud.promote(session, model_id=model.id)
        crud.record_step(
            session,
            run_id=run_id,
            step="publish",
            model_version_id=model.id,
            detail={"url": manifest.url, "path": str(path), "ref": model.ref},
        )
        crud.finish_run(session, run_id=run_id, state="published")
        ref, model_id = model.ref, model.id
    if config.deploy_edges:
        deploy(settings, config, run_id=run_id, model_id=model_id, ref=ref)
    return ref


def deploy(settings: CloudSettings, config: PipelineConfig, *, run_id: int, model_id: int, ref: str) -> None:
    """Send the published model to ``config.deploy_edges``: directly, or through a staged rollout
    (``config.deploy``). Idempotent: a retried publish finds the rollout it started for this model
    version and starts no second one (a direct deploy repeated is a new revision of the same model,
    which an edge already serving it treats as a no-op)."""
    plan = config.deploy
    mode = plan.mode
    if mode == "rollout" and plan.first_model == "direct" and _is_first_model(settings, config, run_id):
        mode = "direct"
        logger.info("%s has no production predecessor: deployed directly (deploy.first_model)", ref)
    if mode == "direct":
        publish_desired_state(
            settings=settings, edge_ids=config.deploy_edges, model_ref=ref, actor="pipeline"
        )
        return
    with session_scope(settings.resolved_database_url) as session:
        existing = fleet.rollout_of_model(session, model_version_id=model_id)
        superseded = fleet.running_rollouts_of(
            session, model_name=config.model_name, except_model_version_id=model_id
        )
    if existing is not None:
        logger.info("%s: rollout %s already started (publish retried)", ref, existing)
        return
    rollout_id = rollouts.start_rollout(
        settings=settings,
        model_ref=ref,
        edge_ids=config.deploy_edges,
        canary=plan.canary,
        waves=plan.waves,
        gates={**DEFAULT_GATES, **plan.gates},
        params=dict(plan.params),
        actor=f"pipeline run {run_id}",
    )
    # An older rollout of this model name still advancing would push its older model to edges
    # after this one: it is paused (not aborted: its edges are not rolled back, this rollout takes
    # them from where they are).
    for old in superseded:
        try:
            rollouts.set_state(
                settings=settings, rollout_id=old, action="pause", actor=f"superseded by {rollout_id}"
            )
        except RolloutError as exc:
            logger.info("rollout %s not paused: %s", old, exc)
    with session_scope(settings.resolved_database_url) as session:
        crud.record_step(
            session,
            run_id=run_id,
            step="rollout",
            model_version_id=model_id,
            detail={"rollout_id": rollout_id, "edges": config.deploy_edges, "superseded": superseded},
        )


def _is_first_model(settings: CloudSettings, config: PipelineConfig, run_id: int) -> bool:
    """No production model existed when this run trained (its base model has no parent)."""
    with session_scope(settings.resolved_database_url) as session:
        base = crud.get_model_version(session, ref=f"{config.model_name}@{version_name(run_id, 'float32')}")
        return base.parent_id is None


def mark_failed(settings: CloudSettings, run_id: int, error: BaseException) -> None:
    """Record the run as failed with the error that stopped it."""
    with session_scope(settings.resolved_database_url) as session:
        crud.finish_run(session, run_id=run_id, state="failed", error=f"{type(error).__name__}: {error}")


def create_run(settings: CloudSettings, *, config: PipelineConfig, trigger_id: int | None = None) -> int:
    """Record a new pipeline run (linked to the trigger that fired it, if any); returns its id."""
    with session_scope(settings.resolved_database_url) as session:
        run = crud.create_run(
            session,
            model_name=config.model_name,
            config=config.model_dump(mode="json"),
            trigger_id=trigger_id,
        )
        return run.id


def variants_for(config: PipelineConfig) -> list[str]:
    """The variants a run builds: the configured ones plus the deploy variant, in order, once each."""
    return list(dict.fromkeys([*config.compression.variants, config.deploy_variant]))
