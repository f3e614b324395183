"""Celery tasks of the learning pipeline. Each is named, takes ids (never ORM objects), is idempotent
(re-running a step rewrites its own outputs), has time limits, and retries only on transient errors
(lost database or broker connections). ``pipeline`` chains them as a canvas recording lineage."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from celery import chain, group
from celery.result import AsyncResult
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError

from cloud.celery_app import app, get_settings
from cloud.errors import DatasetError
from cloud.registry import crud
from cloud.registry.db import session_scope
from shared.settings.cloud import CloudSettings

logger = logging.getLogger(__name__)

TRANSIENT = (OperationalError, InterfaceError, DisconnectionError, RedisConnectionError, RedisTimeoutError)
TASK_OPTIONS: dict[str, Any] = {
    "autoretry_for": TRANSIENT,
    "retry_backoff": True,
    "retry_backoff_max": 60,
    "retry_kwargs": {"max_retries": 5},
    "acks_late": True,
}


def _task(**options: Any) -> Callable[[Callable[..., Any]], Any]:
    """``app.task`` with a type (Celery ships none); every task gets the configured time limits."""
    decorator: Callable[[Callable[..., Any]], Any] = app.task(**_limits(), **options)
    return decorator


def _limits() -> dict[str, float]:
    limit = get_settings().task_time_limit_s
    return {"soft_time_limit": limit, "time_limit": limit + 60}


# Set by the in-process CLI to draw epoch progress bars; workers report epochs as task state.
progress_hook: Any = None


def _url() -> str:
    return get_settings().resolved_database_url


def current_url() -> str:
    return _url()


def _run_dir(settings: CloudSettings, run_id: int) -> Path:
    return settings.data_dir / "runs" / str(run_id)


def _config(run_id: int) -> Any:
    from cloud.workflow import PipelineConfig  # noqa: PLC0415

    with session_scope(_url()) as session:
        return PipelineConfig.model_validate(crud.get_run(session, run_id=run_id).config)


def _version(run_id: int, variant: str) -> str:
    return f"r{run_id}-{variant}"


def _prepared(run_id: int) -> Any:
    from cloud import datasets, workflow  # noqa: PLC0415

    config = _config(run_id)
    with session_scope(_url()) as session:
        run = crud.get_run(session, run_id=run_id)
        if run.dataset_id is None:
            raise DatasetError(f"run {run_id} has no dataset yet (prepare_dataset did not run)")
        path = crud.get_dataset(session, dataset_id=run.dataset_id).path
    if path is None:
        raise DatasetError(f"dataset of run {run_id} has no frozen snapshot")
    dataset = datasets.load_npz(path)
    return workflow.prepare(dataset, seed=config.seed)


# -- steps -----------------------------------------------------------------------------------------


@_task(name="edgefleet.pipeline.prepare_dataset", **TASK_OPTIONS)
def prepare_dataset(run_id: int) -> int:
    """Freeze the run's dataset to ``data_dir/datasets/<sha256>.npz`` and register it."""
    from cloud import datasets  # noqa: PLC0415

    settings = get_settings()
    config = _config(run_id)
    if config.dataset == "samples":
        dataset = _labelled_samples_dataset(config.model_name)
    else:
        dataset = datasets.load(
            config.dataset, seed=config.seed, n_windows=config.n_windows, drift=config.drift
        )
        if config.include_samples:
            dataset = _with_samples(dataset, config.model_name)
    sha = dataset.sha256()
    path = settings.data_dir / "datasets" / f"{sha}.npz"
    if not path.exists():
        dataset.save(path)
    with session_scope(_url()) as session:
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


def _with_samples(dataset: Any, model_name: str) -> Any:
    """``dataset`` plus the labelled uplinked windows of the same shape and classes."""
    import numpy as np  # noqa: PLC0415

    try:
        uplink = _labelled_samples_dataset(model_name, class_names=dataset.class_names)
    except DatasetError as exc:
        logger.info("no uplinked samples added: %s", exc)
        return dataset
    if uplink.input_shape != dataset.input_shape:
        logger.warning(
            "uplinked samples of shape %s do not match %s; not added", uplink.input_shape, dataset.input_shape
        )
        return dataset
    dataset.X = np.concatenate([dataset.X, uplink.X])
    dataset.y = np.concatenate([dataset.y, uplink.y])
    dataset.source = f"{dataset.source}+samples"
    dataset.params = {**dataset.params, "uplinked_samples": len(uplink.y)}
    return dataset


def _labelled_samples_dataset(model_name: str, *, class_names: list[str] | None = None) -> Any:
    """Uplinked samples labelled by the device, the teacher or a human."""
    from cloud import datasets  # noqa: PLC0415

    with session_scope(_url()) as session:
        if class_names is None:
            production = crud.production_model(session, name=model_name)
            if production is None or production.manifest is None:
                raise DatasetError(
                    f"dataset 'samples' needs a production {model_name} to take class names from"
                )
            class_names = list(production.manifest["class_names"])
        rows = [
            (s.window, s.label)
            for s in crud.list_samples(session, labelled=True, limit=1_000_000, with_window=True)
            if s.window is not None and s.label is not None
        ]
    return datasets.samples_dataset(rows, class_names=class_names, name=f"{model_name}-uplink")


@_task(name="edgefleet.pipeline.train", **TASK_OPTIONS)
def train(run_id: int) -> int:
    """Train the base (float) model; registered as the run's ``float32`` version with its Keras file."""
    from cloud import workflow  # noqa: PLC0415
    from cloud.training import count_params  # noqa: PLC0415

    settings = get_settings()
    config = _config(run_id)
    prepared = _prepared(run_id)
    keras_path = _run_dir(settings, run_id) / "base.keras"
    history: list[dict[str, float]] = []

    def on_epoch(epoch: int, epochs: int, logs: dict[str, float]) -> None:
        history.append({"epoch": epoch, **logs})
        if progress_hook is not None:
            progress_hook(epoch, epochs, logs)
        if train.request.id is not None:
            train.update_state(state="PROGRESS", meta={"epoch": epoch, "epochs": epochs})

    start = time.perf_counter()
    model = workflow.train_base(prepared, config.training, on_epoch=on_epoch)
    workflow.save_keras(model, keras_path)
    seconds = time.perf_counter() - start
    with session_scope(_url()) as session:
        run = crud.get_run(session, run_id=run_id)
        production = crud.production_model(session, name=config.model_name)
        version = crud.create_model_version(
            session,
            name=config.model_name,
            version=_version(run_id, "float32"),
            variant="float32",
            dataset_id=run.dataset_id,
            parent_id=production.id if production is not None else None,
            run_id=run_id,
            training_config={
                "training": config.training.model_dump(),
                "normalization": {"mean": prepared.mean, "std": prepared.std},
                "class_names": prepared.dataset.class_names,
                "input_shape": prepared.dataset.input_shape,
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


@_task(name="edgefleet.pipeline.compress", **TASK_OPTIONS)
def compress(run_id: int, variant: str) -> int:
    """Build one variant's ``.tflite`` from the run's base model."""
    from cloud import compression, workflow  # noqa: PLC0415
    from cloud.publishing import sha256_file  # noqa: PLC0415

    settings = get_settings()
    config = _config(run_id)
    with session_scope(_url()) as session:
        base = crud.get_model_version(session, ref=f"{config.model_name}@{_version(run_id, 'float32')}")
        base_id, base_parent, keras_path, base_cfg = (
            base.id,
            base.parent_id,
            base.keras_path,
            dict(base.training_config),
        )
        dataset_id = base.dataset_id
        existing = crud.list_model_versions(session, name=config.model_name, limit=1000)
        signed = next((m for m in existing if m.version == _version(run_id, variant) and m.manifest), None)
        if signed is not None:
            # Signed and published: its artifact is what edges verify; never rebuild it.
            logger.info("%s is signed; compress skipped", signed.ref)
            return signed.id
    if keras_path is None:
        raise DatasetError(f"run {run_id}: the base model has no Keras file")
    prepared = _prepared(run_id)
    base_model = workflow.load_keras(Path(keras_path))
    start = time.perf_counter()
    flatbuffer, model = workflow.compress_variant(
        variant, base_model, prepared, config.training, config.compression
    )
    artifact = _run_dir(settings, run_id) / f"{variant}.tflite"
    tmp = artifact.with_suffix(".tmp")
    tmp.write_bytes(flatbuffer)
    tmp.replace(artifact)
    sparsity = compression.sparsity_of(model)
    with session_scope(_url()) as session:
        version = crud.create_model_version(
            session,
            name=config.model_name,
            version=_version(run_id, variant),
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


@_task(name="edgefleet.pipeline.evaluate", **TASK_OPTIONS)
def evaluate(run_id: int, variant: str) -> dict[str, float]:
    """Accuracy, macro-F1, size, gzip size and LiteRT latency of one variant on the held-out split."""
    from cloud import workflow  # noqa: PLC0415

    config = _config(run_id)
    with session_scope(_url()) as session:
        version = crud.get_model_version(session, ref=f"{config.model_name}@{_version(run_id, variant)}")
        artifact = version.artifact_path
    if artifact is None:
        raise DatasetError(f"{config.model_name}@{_version(run_id, variant)} has no artifact to evaluate")
    prepared = _prepared(run_id)
    result = workflow.evaluate(Path(artifact).read_bytes(), prepared)
    metrics = {k: float(v) for k, v in result.as_dict().items() if isinstance(v, int | float)}
    with session_scope(_url()) as session:
        version = crud.get_model_version(session, ref=f"{config.model_name}@{_version(run_id, variant)}")
        version.metrics = metrics
        crud.record_step(
            session, run_id=run_id, step=f"evaluate:{variant}", model_version_id=version.id, detail=metrics
        )
    return metrics


@_task(name="edgefleet.pipeline.gate", **TASK_OPTIONS)
def gate(run_id: int) -> bool:
    """Compare the deploy variant with production on this run's held-out split; record why either way."""
    from cloud import gate as gate_logic  # noqa: PLC0415
    from cloud import workflow  # noqa: PLC0415

    settings = get_settings()
    config = _config(run_id)
    thresholds = settings.thresholds
    with session_scope(_url()) as session:
        candidate = crud.get_model_version(
            session, ref=f"{config.model_name}@{_version(run_id, config.deploy_variant)}"
        )
        production = crud.production_model(session, name=config.model_name)
        cand_acc = float(candidate.metrics.get("accuracy", 0.0))
        prod_ref = production.ref if production is not None else None
        prod_artifact = production.artifact_path if production is not None else None
        prod_recorded = float(production.metrics.get("accuracy", 0.0)) if production is not None else None
    prod_acc = prod_recorded
    basis = "recorded"
    if prod_artifact is not None and Path(prod_artifact).exists():
        # Fair comparison: production re-scored on the candidate's held-out data, when shapes match.
        prepared = _prepared(run_id)
        try:
            prod_acc = workflow.evaluate(Path(prod_artifact).read_bytes(), prepared).accuracy
            basis = "re-evaluated on this run's held-out split"
        except (ValueError, RuntimeError) as exc:
            logger.warning(
                "production %s could not be re-evaluated (%s); using its recorded accuracy", prod_ref, exc
            )
    result = gate_logic.decide(
        candidate_accuracy=cand_acc,
        production_accuracy=prod_acc,
        margin=thresholds.gate_margin,
        min_accuracy=thresholds.gate_min_accuracy,
        production_ref=prod_ref,
    )
    reason = result.reason if prod_acc is None else f"{result.reason} ({basis})"
    with session_scope(_url()) as session:
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


@_task(name="edgefleet.pipeline.sign", **TASK_OPTIONS)
def sign(run_id: int) -> str | None:
    """Sign the manifest of a candidate that passed the gate (ed25519); skipped, and recorded, otherwise."""
    from cloud.publishing import sign as sign_manifest  # noqa: PLC0415
    from cloud.publishing import store_for  # noqa: PLC0415
    from shared.schemas import ModelManifest, Normalization  # noqa: PLC0415

    settings = get_settings()
    config = _config(run_id)
    store = store_for(settings)
    with session_scope(_url()) as session:
        model = crud.get_model_version(
            session, ref=f"{config.model_name}@{_version(run_id, config.deploy_variant)}"
        )
        if not model.gate_passed:
            crud.record_step(
                session, run_id=run_id, step="sign", model_version_id=model.id, detail={"skipped": "gate"}
            )
            return None
        if model.artifact_sha256 is None or model.artifact_size is None or model.artifact_path is None:
            raise DatasetError(f"{model.ref} has no artifact to sign")
        from cloud.evaluation import LiteRTModel  # noqa: PLC0415

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
            normalization=Normalization(**cfg["normalization"]),
            sample_rate_hz=cfg.get("sample_rate_hz"),
            channels=cfg.get("channels"),
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


@_task(name="edgefleet.pipeline.publish", **TASK_OPTIONS)
def publish(run_id: int) -> str:
    """Put the signed artifact and manifest in the store, promote it, finish the run; then deploy it to
    ``deploy_edges`` if any: directly or as a staged rollout (``PipelineConfig.deploy``)."""
    from cloud.publishing import store_for  # noqa: PLC0415
    from shared.schemas import ModelManifest  # noqa: PLC0415

    settings = get_settings()
    config = _config(run_id)
    store = store_for(settings)
    with session_scope(_url()) as session:
        model = crud.get_model_version(
            session, ref=f"{config.model_name}@{_version(run_id, config.deploy_variant)}"
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
        _deploy(settings, config, run_id=run_id, model_id=model_id, ref=ref)
    return ref


def _deploy(settings: CloudSettings, config: Any, *, run_id: int, model_id: int, ref: str) -> None:
    """Send the published model to ``config.deploy_edges``: directly, or through a staged rollout
    (``config.deploy``). Idempotent: a retried publish finds the rollout it started for this model
    version and starts no second one (a direct deploy repeated is a new revision of the same model,
    which an edge already serving it treats as a no-op)."""
    from cloud.publishing import publish_desired_state  # noqa: PLC0415

    deploy = config.deploy
    mode = deploy.mode
    if mode == "rollout" and deploy.first_model == "direct" and _is_first_model(config, run_id):
        mode = "direct"
        logger.info("%s has no production predecessor: deployed directly (deploy.first_model)", ref)
    if mode == "direct":
        publish_desired_state(
            settings=settings, edge_ids=config.deploy_edges, model_ref=ref, actor="pipeline"
        )
        return
    from cloud import rollouts  # noqa: PLC0415
    from cloud.gates import DEFAULT_GATES  # noqa: PLC0415

    existing = _rollout_of(settings, model_id)
    if existing is not None:
        logger.info("%s: rollout %s already started (publish retried)", ref, existing)
        return
    superseded = _active_rollouts(settings, model_name=config.model_name, except_model_id=model_id)
    rollout_id = rollouts.start_rollout(
        settings=settings,
        model_ref=ref,
        edge_ids=config.deploy_edges,
        canary=deploy.canary,
        waves=deploy.waves,
        gates={**DEFAULT_GATES, **deploy.gates},
        params=dict(deploy.params),
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
        except rollouts.RolloutError as exc:
            logger.info("rollout %s not paused: %s", old, exc)
    with session_scope(_url()) as session:
        crud.record_step(
            session,
            run_id=run_id,
            step="rollout",
            model_version_id=model_id,
            detail={"rollout_id": rollout_id, "edges": config.deploy_edges, "superseded": superseded},
        )


def _is_first_model(config: Any, run_id: int) -> bool:
    """No production model existed when this run trained (its base model has no parent)."""
    with session_scope(_url()) as session:
        base = crud.get_model_version(session, ref=f"{config.model_name}@{_version(run_id, 'float32')}")
        return base.parent_id is None


def _rollout_of(settings: CloudSettings, model_id: int) -> str | None:
    """The id of a rollout already started for the model version ``model_id``, if any."""
    from sqlalchemy import select  # noqa: PLC0415

    from cloud.registry.models import Rollout  # noqa: PLC0415

    with session_scope(settings.resolved_database_url) as session:
        found = session.scalar(
            select(Rollout.rollout_id).where(Rollout.model_version_id == model_id).order_by(Rollout.id)
        )
        return str(found) if found is not None else None


def _active_rollouts(settings: CloudSettings, *, model_name: str, except_model_id: int) -> list[str]:
    """Running rollouts of other versions of ``model_name``."""
    from sqlalchemy import select  # noqa: PLC0415

    from cloud.registry.models import ModelVersion, Rollout  # noqa: PLC0415

    with session_scope(settings.resolved_database_url) as session:
        return list(
            session.scalars(
                select(Rollout.rollout_id)
                .join(ModelVersion, ModelVersion.id == Rollout.model_version_id)
                .where(
                    ModelVersion.name == model_name,
                    Rollout.state == "running",
                    Rollout.model_version_id != except_model_id,
                )
                .order_by(Rollout.id)
            )
        )


@_task(name="edgefleet.pipeline.failed")
def mark_failed(request: Any, exc: BaseException, traceback: Any, run_id: int) -> None:  # noqa: ARG001
    """Errback of the canvas: the run is marked failed with the error that stopped it."""
    with session_scope(_url()) as session:
        crud.finish_run(session, run_id=run_id, state="failed", error=f"{type(exc).__name__}: {exc}")
    logger.error("pipeline run %d failed: %s", run_id, exc)


# -- the canvas ------------------------------------------------------------------------------------


def pipeline_canvas(run_id: int, variants: list[str]) -> Any:
    """prepare -> train -> (compress -> evaluate per variant, in parallel) -> gate -> sign -> publish."""
    per_variant = group(chain(compress.si(run_id, v), evaluate.si(run_id, v)) for v in variants)
    return chain(
        prepare_dataset.si(run_id),
        train.si(run_id),
        per_variant,
        gate.si(run_id),
        sign.si(run_id),
        publish.si(run_id),
    ).on_error(mark_failed.s(run_id=run_id))


def create_run(*, config: Any, trigger_id: int | None = None) -> int:
    with session_scope(_url()) as session:
        run = crud.create_run(
            session,
            model_name=config.model_name,
            config=config.model_dump(mode="json"),
            trigger_id=trigger_id,
        )
        if trigger_id is not None:
            from cloud.registry.models import Trigger  # noqa: PLC0415

            trigger = session.get(Trigger, trigger_id)
            if trigger is not None:
                trigger.run_id = run.id
        return run.id


def variants_for(config: Any) -> list[str]:
    return list(dict.fromkeys([*config.compression.variants, config.deploy_variant]))


def start_pipeline(*, config: Any, trigger_id: int | None = None) -> tuple[int, AsyncResult]:
    """Record a run and launch its canvas; returns the run id and the canvas result."""
    run_id = create_run(config=config, trigger_id=trigger_id)
    result = pipeline_canvas(run_id, variants_for(config)).apply_async()
    return run_id, result


@_task(name="edgefleet.pipeline.start", **TASK_OPTIONS)
def pipeline(config: dict[str, Any], trigger_id: int | None = None) -> int:
    """Start a whole pipeline run from a config dict (what beat and the triggers send)."""
    from cloud.workflow import PipelineConfig  # noqa: PLC0415

    run_id, _ = start_pipeline(config=PipelineConfig.model_validate(config), trigger_id=trigger_id)
    return run_id
