"""``edgefleet model ...``: train, compress, evaluate, inspect, label and roll back models."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click
import yaml

from cloud.cli.common import (
    actor,
    api_call,
    api_option,
    config_option,
    fail,
    get_console,
    settings_from,
    target_edges,
)
from shared.errors import EdgefleetError
from shared.settings.cloud import CloudSettings

DEFAULT_FOLDS = 3  # cloud.learning.selection.DEFAULT_FOLDS (not imported: numpy, for --help)
WORKER_WAIT_S = 60.0  # --select: how long to wait for a Celery worker to answer


@click.group()
def model() -> None:
    """Train, compress, evaluate and inspect models (the registry's lineage)."""


def _ensure_db(settings: CloudSettings) -> str:
    from cloud.registry.db import upgrade  # noqa: PLC0415  (SQLAlchemy + Alembic: only when a command runs)
    from cloud.worker.app import use_settings  # noqa: PLC0415  (Celery: the app is built on import, so after --config is read)

    use_settings(settings)  # the task functions this process may run read the same settings

    url = settings.resolved_database_url
    upgrade(url)
    return url


def _pipeline_config(**fields: Any) -> Any:
    from cloud.learning.pipeline import PipelineConfig  # noqa: PLC0415  (numpy and the learning code: only to train)

    return PipelineConfig(**{k: v for k, v in fields.items() if v is not None})


@model.command()
@config_option
@click.option(
    "--dataset",
    default="vibration",
    show_default=True,
    help="digits | vibration | basicmotions | aeon:NAME | PATH.npz",
)
@click.option("--name", "model_name", default=None, help="model name (default: the dataset name)")
@click.option("--epochs", type=int, default=None)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--n-windows", type=int, default=None, help="windows of a generated dataset")
@click.option("--variant", "variants", multiple=True, help="variants to build (default: all)")
@click.option("--deploy-variant", default="int8", show_default=True)
@click.option("--include-samples", is_flag=True, help="add labelled uplinked samples")
@click.option(
    "--pipeline-config",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="a PipelineConfig JSON/YAML file (overridden by the options above)",
)
@click.option("--celery", "use_celery", is_flag=True, help="run on the Celery workers instead of in-process")
@click.option(
    "--select",
    is_flag=True,
    help="first choose the training config by k-fold cross-validation on the train split: each "
    "trial is a Celery task (start `edgefleet cloud worker`), this command waits and prints the "
    "candidates' CV scores, then trains the chosen one (--epochs caps every candidate)",
)
@click.option(
    "--select-budget-s",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="with --select: the search's time budget (trials not started by then are skipped)",
)
@click.option(
    "--folds",
    type=click.IntRange(min=2),
    default=None,
    help=f"with --select: cross-validation folds (default {DEFAULT_FOLDS}; fewer if a class is small)",
)
def train(  # noqa: PLR0917 - click passes options positionally
    config_file: Path | None,
    dataset: str,
    model_name: str | None,
    epochs: int | None,
    seed: int,
    n_windows: int | None,
    variants: tuple[str, ...],
    deploy_variant: str,
    include_samples: bool,
    pipeline_config: Path | None,
    use_celery: bool,
    select: bool,
    select_budget_s: float | None,
    folds: int | None,
) -> None:
    """Train -> compress -> evaluate -> gate -> sign -> publish, recorded in the registry.

    With --select, a model-selection search on the Celery workers picks the run's training config
    first; the run's config records the search's id (selection_search_id)."""
    from cloud.learning.pipeline import PipelineConfig  # noqa: PLC0415  (numpy and the learning code: only to train)

    if not select and (select_budget_s is not None or folds is not None):
        raise click.UsageError("--select-budget-s and --folds go with --select")
    settings = settings_from(config_file)
    _ensure_db(settings)
    base: dict[str, Any] = {}
    if pipeline_config is not None:
        base = yaml.safe_load(pipeline_config.read_text()) or {}
    if Path(dataset).is_file():
        dataset = str(Path(dataset).resolve())  # workers may run in another directory
    base.update({"dataset": dataset, "seed": seed, "deploy_variant": deploy_variant})
    base["model_name"] = model_name or base.get("model_name") or Path(dataset).stem
    if n_windows:
        base["n_windows"] = n_windows
    if include_samples:
        base["include_samples"] = True
    if epochs:
        base.setdefault("training", {})["epochs"] = epochs
    if variants:
        base.setdefault("compression", {})["variants"] = list(variants)
    config = PipelineConfig.model_validate(base)
    if select:
        config = _select_training(
            settings, config, folds=folds or DEFAULT_FOLDS, budget_s=select_budget_s, epochs=epochs
        )
    if use_celery:
        _train_on_celery(settings, config)
    else:
        _train_in_process(settings, config)


def _select_training(
    settings: CloudSettings, config: Any, *, folds: int, budget_s: float | None, epochs: int | None
) -> Any:
    """Run a model-selection search for ``config``'s dataset from this process (its trials are
    ``cv_trial`` tasks on the Celery workers; never from inside a task, which would wait on a worker
    it occupies), print the candidates' CV scores and return ``config`` with the chosen candidate as
    its ``training`` section and the search's id as ``selection_search_id``."""
    from cloud.learning import selection  # noqa: PLC0415  (numpy and the learning code: only to train)
    from cloud.learning.pipeline import PipelineConfig  # noqa: PLC0415  (numpy and the learning code: only to train)
    from cloud.worker import tasks  # noqa: PLC0415  (Celery and the learning tasks: only to train)
    from cloud.worker.app import app as celery_app  # noqa: PLC0415  (Celery: only to train)

    if config.dataset == "samples":
        raise click.ClickException(
            "--select needs a dataset (a built-in, aeon:NAME or an .npz file), not 'samples'"
        )
    console = get_console()
    if config.include_samples:
        console.print("note: the search scores the dataset alone; uplinked samples join the run's own fit")
    normalize = config.preprocessing.normalize
    try:
        x, y, n_classes = selection.load_train_part(config.dataset, seed=config.seed, normalize=normalize)
    except EdgefleetError as exc:
        raise fail(exc) from exc
    candidates = selection.candidates_for(list(x.shape[1:]), len(y), n_classes, seed=config.seed)
    if epochs:
        candidates = [
            c.model_copy(update={"config": c.config.model_copy(update={"epochs": epochs})})
            for c in candidates
        ]
    _wait_for_workers(settings, celery_app)
    console.print(
        f"model selection on {config.dataset}: {len(candidates)} candidates x {folds} folds"
        f" on the Celery workers, budget {f'{budget_s:g} s' if budget_s else 'none'}"
    )
    try:
        search = tasks.run_search(
            dataset=config.dataset,
            candidates=candidates,
            folds=folds,
            seed=config.seed,
            budget_s=budget_s,
            normalize=normalize,
            name=f"model train: {config.model_name}",
        )
    except EdgefleetError as exc:
        raise fail(exc) from exc
    console.print(_scores_table(search))
    chosen = search.best_candidate
    if chosen is None:
        raise click.ClickException(
            f"model selection search {search.search_id}: no trial finished ({search.status_counts()}); "
            "are the workers up? a larger --select-budget-s?"
        )
    best = search.best_score
    assert best is not None
    assert best.mean_accuracy is not None
    console.print(
        f"search {search.search_id}: chose {chosen.name} (CV accuracy {best.mean_accuracy:.4f} over "
        f"{best.folds_done} folds) in {search.seconds:.1f} s"
    )
    return PipelineConfig.model_validate(
        {
            **config.model_dump(mode="json"),
            "training": chosen.config.model_dump(mode="json"),
            "selection_search_id": search.search_id,
        }
    )


def _wait_for_workers(settings: CloudSettings, app: Any) -> None:
    """Wait until a Celery worker answers a ping (up to ``WORKER_WAIT_S``); the SQLite transport has
    no broadcast, so there the trials just queue until a worker takes them."""
    if settings.resolved_broker_url.startswith("sqla+"):
        return
    deadline = time.monotonic() + WORKER_WAIT_S
    while True:
        try:
            if app.control.ping(timeout=1.0):
                return
        except Exception as exc:  # kombu's connection errors vary by transport
            raise click.ClickException(f"cannot reach the Celery broker: {exc}") from exc
        if time.monotonic() >= deadline:
            raise click.ClickException(
                f"no Celery worker answered in {WORKER_WAIT_S:g} s: --select runs its trials on the "
                "workers (edgefleet cloud worker)"
            )


def _scores_table(search: Any) -> Any:
    from rich.table import Table  # noqa: PLC0415  (rich: only when printing)

    table = Table(title=f"model selection search {search.search_id}: {search.folds}-fold CV accuracy")
    for column in ("candidate", "CV accuracy", "std", "folds", "params", "seconds", ""):
        table.add_column(column, justify="left" if column in ("candidate", "") else "right")
    for score in search.scores:
        table.add_row(
            score.name,
            f"{score.mean_accuracy:.4f}" if score.mean_accuracy is not None else "-",
            f"{score.std_accuracy:.4f}" if score.std_accuracy is not None else "-",
            f"{score.folds_done}/{score.folds}",
            f"{score.params:,}" if score.params is not None else "-",
            f"{score.seconds:.1f}",
            "chosen" if score.candidate == search.best else "",
        )
    return table


def _steps(config: Any) -> list[tuple[str, Any, tuple[Any, ...]]]:
    """The pipeline's steps in order, as (label, step function, extra arguments)."""
    from cloud.learning import steps  # noqa: PLC0415  (TensorFlow: only for the commands that train)

    ordered: list[tuple[str, Any, tuple[Any, ...]]] = [
        ("dataset", steps.prepare_dataset, ()),
        ("train", steps.train, ()),
    ]
    for variant in steps.variants_for(config):
        ordered.append((f"compress {variant}", steps.compress, (variant,)))
        ordered.append((f"evaluate {variant}", steps.evaluate, (variant,)))
    ordered += [("gate", steps.gate, ()), ("sign", steps.sign, ()), ("publish", steps.publish, ())]
    return ordered


def _train_in_process(settings: CloudSettings, config: Any) -> None:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: PLC0415  (rich: only when printing)

    from cloud.learning import steps  # noqa: PLC0415  (TensorFlow: only for the commands that train)

    run_id = steps.create_run(settings, config=config)
    ordered = _steps(config)
    console = get_console()
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        overall = progress.add_task(f"run {run_id}", total=len(ordered))
        epochs = progress.add_task("epochs", total=config.training.epochs, visible=False)

        def on_epoch(epoch: int, total: int, logs: dict[str, float]) -> None:
            acc = logs.get("val_accuracy")
            progress.update(
                epochs,
                completed=epoch,
                total=total,
                visible=True,
                description=f"epoch (val acc {acc:.3f})" if acc is not None else "epoch",
            )

        try:
            for label, step, args in ordered:
                progress.update(overall, description=label)
                if step is steps.train:
                    step(settings, run_id, *args, on_epoch=on_epoch)
                else:
                    step(settings, run_id, *args)
                progress.advance(overall)
        except Exception as exc:
            steps.mark_failed(settings, run_id, exc)
            raise
    _print_run(settings, run_id)


def _train_on_celery(settings: CloudSettings, config: Any) -> None:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: PLC0415  (rich: only when printing)

    from cloud.registry import crud  # noqa: PLC0415  (SQLAlchemy: only when a command runs)
    from cloud.registry.db import session_scope  # noqa: PLC0415  (SQLAlchemy: only when a command runs)
    from cloud.worker import tasks  # noqa: PLC0415  (Celery and the learning tasks: only for --celery)

    run_id, result = tasks.start_pipeline(config=config)
    total = len(_steps(config))
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=get_console(),
    ) as progress:
        bar = progress.add_task(f"run {run_id} on Celery", total=total)
        while True:
            with session_scope(settings.resolved_database_url) as session:
                run = crud.get_run(session, run_id=run_id)
                done, state = len(run.steps), run.state
                last = run.steps[-1].step if run.steps else "queued"
            progress.update(bar, completed=done, description=f"run {run_id}: {last}")
            if state in ("published", "rejected", "failed") or result.failed():
                break
            time.sleep(0.5)
    # Drop the result's Redis subscription now: left to interpreter shutdown it fails noisily.
    result.backend.remove_pending_result(result)
    del result
    _print_run(settings, run_id)


def _print_run(settings: CloudSettings, run_id: int) -> None:
    from cloud.registry import crud  # noqa: PLC0415  (SQLAlchemy: only when a command runs)
    from cloud.registry.db import session_scope  # noqa: PLC0415  (SQLAlchemy: only when a command runs)

    with session_scope(settings.resolved_database_url) as session:
        run = crud.get_run(session, run_id=run_id)
        versions = [
            m
            for m in crud.list_model_versions(session, name=run.model_name, limit=1000)
            if m.run_id == run_id
        ]
        table = _metrics_table(f"run {run_id}: {run.state}", sorted(versions, key=lambda m: m.id))
        gate = next((e for e in run.steps if e.step == "gate"), None)
        console = get_console()
        console.print(table)
        if gate is not None:
            console.print(
                f"gate: {'passed' if gate.detail.get('passed') else 'failed'}: {gate.detail.get('reason')}"
            )
        if run.error:
            console.print(f"[red]error: {run.error}")
        published = next((e for e in run.steps if e.step == "publish" and "url" in e.detail), None)
        if published is not None:
            console.print(f"published {published.detail['ref']} at {published.detail['url']}")


def _metrics_table(title: str, versions: list[Any]) -> Any:
    from rich.table import Table  # noqa: PLC0415  (rich: only when printing)

    table = Table(title=title)
    for column in ("model", "variant", "status", "size", "gzip", "accuracy", "macro-F1", "b1 µs", "b64 /s"):
        table.add_column(column, justify="right" if column not in ("model", "variant", "status") else "left")
    for m in versions:
        metrics = m.metrics or {}

        def fmt(key: str, spec: str, metrics: dict[str, Any] = metrics) -> str:
            value = metrics.get(key)
            return format(value, spec) if value is not None else "-"

        table.add_row(
            m.ref,
            m.variant,
            m.status,
            fmt("size_bytes", ",.0f"),
            fmt("gzip_bytes", ",.0f"),
            fmt("accuracy", ".4f"),
            fmt("macro_f1", ".4f"),
            fmt("latency_us_b1", ".1f"),
            fmt("throughput_b64", ",.0f"),
        )
    return table


@model.command()
@config_option
@click.argument("ref")
@click.option("--variant", "variants", multiple=True, required=True, help="variant(s) to (re)build")
def compress(config_file: Path | None, ref: str, variants: tuple[str, ...]) -> None:
    """Build and evaluate more variants of a run's base model (REF: any version of that run)."""
    from rich.progress import Progress  # noqa: PLC0415  (rich: only when printing)

    from cloud.learning import steps  # noqa: PLC0415  (TensorFlow: only for the commands that train)
    from cloud.registry import crud  # noqa: PLC0415  (SQLAlchemy: only when a command runs)
    from cloud.registry.db import session_scope  # noqa: PLC0415  (SQLAlchemy: only when a command runs)

    settings = settings_from(config_file)
    with session_scope(_ensure_db(settings)) as session:
        found = crud.get_model_version(session, ref=ref)
        if found.run_id is None:
            raise click.ClickException(
                f"{ref} was not made by a pipeline run; it has no base model to compress"
            )
        run_id = found.run_id
    with Progress(console=get_console()) as progress:
        bar = progress.add_task("variants", total=len(variants))
        for variant in variants:
            progress.update(bar, description=f"compress {variant}")
            steps.compress(settings, run_id, variant)
            steps.evaluate(settings, run_id, variant)
            progress.advance(bar)
    _print_run(settings, run_id)


@model.command()
@config_option
@click.argument("ref")
def evaluate(config_file: Path | None, ref: str) -> None:
    """Re-evaluate a model's artifact with LiteRT on its run's held-out split."""
    from cloud.learning import steps  # noqa: PLC0415  (TensorFlow: only for the commands that train)
    from cloud.registry import crud  # noqa: PLC0415  (SQLAlchemy: only when a command runs)
    from cloud.registry.db import session_scope  # noqa: PLC0415  (SQLAlchemy: only when a command runs)

    settings = settings_from(config_file)
    with session_scope(_ensure_db(settings)) as session:
        found = crud.get_model_version(session, ref=ref)
        if found.run_id is None:
            raise click.ClickException(f"{ref} has no run (no held-out split to evaluate on)")
        run_id, variant = found.run_id, found.variant
    steps.evaluate(settings, run_id, variant)
    with session_scope(settings.resolved_database_url) as session:
        get_console().print(_metrics_table(ref, [crud.get_model_version(session, ref=ref)]))


@model.command("list")
@config_option
@click.option("--name", default=None)
@click.option("--status", default=None, type=click.Choice(["candidate", "production", "rejected", "retired"]))
@click.option("--limit", default=50, show_default=True)
def list_models(config_file: Path | None, name: str | None, status: str | None, limit: int) -> None:
    """Model versions with their metrics."""
    from cloud.registry import crud  # noqa: PLC0415  (SQLAlchemy: only when a command runs)
    from cloud.registry.db import session_scope  # noqa: PLC0415  (SQLAlchemy: only when a command runs)

    settings = settings_from(config_file)
    with session_scope(_ensure_db(settings)) as session:
        get_console().print(
            _metrics_table("models", crud.list_model_versions(session, name=name, status=status, limit=limit))
        )


@model.command()
@config_option
@click.argument("ref")
def show(config_file: Path | None, ref: str) -> None:
    """One model: lineage (parent, dataset, run steps), config, metrics, gate reason, manifest."""
    from cloud.registry import crud  # noqa: PLC0415  (SQLAlchemy: only when a command runs)
    from cloud.registry.db import session_scope  # noqa: PLC0415  (SQLAlchemy: only when a command runs)

    settings = settings_from(config_file)
    with session_scope(_ensure_db(settings)) as session:
        m = crud.get_model_version(session, ref=ref)
        info: dict[str, Any] = {
            "ref": m.ref,
            "variant": m.variant,
            "status": m.status,
            "parent": m.parent.ref if m.parent is not None else None,
            "dataset": {
                "id": m.dataset.id,
                "name": m.dataset.name,
                "source": m.dataset.source,
                "sha256": m.dataset.sha256,
                "n_samples": m.dataset.n_samples,
            }
            if m.dataset
            else None,
            "run_id": m.run_id,
            "metrics": m.metrics,
            "gate": {"passed": m.gate_passed, "reason": m.gate_reason},
            "artifact": {
                "path": m.artifact_path,
                "url": m.artifact_url,
                "sha256": m.artifact_sha256,
                "size": m.artifact_size,
                "quantization": m.quantization,
            },
            "signature": {"key_id": m.key_id, "signed": m.signature is not None},
            "training_config": m.training_config,
        }
        if m.run_id is not None:
            run = crud.get_run(session, run_id=m.run_id)
            info["run"] = {
                "state": run.state,
                "trigger_id": run.trigger_id,
                "selection_search_id": (run.config or {}).get("selection_search_id"),
                "steps": [{"step": e.step, "model_version_id": e.model_version_id} for e in run.steps],
            }
    click.echo(json.dumps(info, indent=2, default=str))


@model.command()
@config_option
@click.argument("ref_a")
@click.argument("ref_b")
def diff(config_file: Path | None, ref_a: str, ref_b: str) -> None:
    """Two models' metrics and configs side by side."""
    from rich.table import Table  # noqa: PLC0415  (rich: only when printing)

    from cloud.registry import crud  # noqa: PLC0415  (SQLAlchemy: only when a command runs)
    from cloud.registry.db import session_scope  # noqa: PLC0415  (SQLAlchemy: only when a command runs)

    settings = settings_from(config_file)
    with session_scope(_ensure_db(settings)) as session:
        a, b = crud.get_model_version(session, ref=ref_a), crud.get_model_version(session, ref=ref_b)
        table = Table(title=f"{a.ref} vs {b.ref}")
        for column in ("field", a.ref, b.ref, "change"):
            table.add_column(column)
        for key in sorted(set(a.metrics) | set(b.metrics)):
            va, vb = a.metrics.get(key), b.metrics.get(key)
            change = f"{vb - va:+.4g}" if isinstance(va, int | float) and isinstance(vb, int | float) else ""
            table.add_row(
                key, f"{va:.4g}" if va is not None else "-", f"{vb:.4g}" if vb is not None else "-", change
            )
        for key in ("variant", "status", "dataset_id", "quantization", "artifact_sha256"):
            va, vb = getattr(a, key), getattr(b, key)
            table.add_row(key, str(va), str(vb), "" if va == vb else "differs")
        ca, cb = a.training_config.get("training", {}), b.training_config.get("training", {})
        for key in sorted(set(ca) | set(cb)):
            if ca.get(key) != cb.get(key):
                table.add_row(f"training.{key}", str(ca.get(key)), str(cb.get(key)), "differs")
    get_console().print(table)


@model.command()
@config_option
@click.option("--sample", "sample_id", default=None, help="sample id to label")
@click.option("--label", default=None, help="the label to give it")
@click.option("--limit", default=20, show_default=True, help="unlabelled samples to list")
def label(config_file: Path | None, sample_id: str | None, label: str | None, limit: int) -> None:
    """List unlabelled uplinked samples, or label one: --sample ID --label CLASS."""
    from rich.table import Table  # noqa: PLC0415  (rich: only when printing)

    from cloud.registry import crud  # noqa: PLC0415  (SQLAlchemy: only when a command runs)
    from cloud.registry.db import session_scope  # noqa: PLC0415  (SQLAlchemy: only when a command runs)

    settings = settings_from(config_file)
    with session_scope(_ensure_db(settings)) as session:
        if sample_id is not None or label is not None:
            if sample_id is None or label is None:
                raise click.ClickException("give both --sample and --label")
            sample = crud.set_label(session, sample_id=sample_id, label=label, source="human")
            crud.audit(session, actor="cli", action="label", target=sample_id, detail={"label": label})
            click.echo(f"{sample.sample_id}: labelled {label}")
            return
        table = Table(title=f"unlabelled samples ({crud.count_samples(session, labelled=False)} in all)")
        for column in ("sample", "edge", "device", "predicted", "confidence", "reason", "window"):
            table.add_column(column)
        for s in crud.list_samples(session, labelled=False, limit=limit):
            table.add_row(
                s.sample_id,
                s.edge_id,
                s.device_id,
                s.predicted,
                f"{s.confidence:.3f}",
                s.reason,
                "yes" if s.window is not None else s.privacy,
            )
    get_console().print(table)


@model.command("rollback")
@click.option("--to", "to_ref", default=None, help="NAME@VERSION to deploy; default: each edge's last-good")
@click.option("--edge", "edges", multiple=True, help="edge id (repeatable)")
@click.option("--group", default=None)
@click.option("--all", "everything", is_flag=True)
@config_option
@api_option
def model_rollback(
    *,
    to_ref: str | None,
    edges: tuple[str, ...],
    group: str | None,
    everything: bool,
    config_file: Path | None,
    api_url: str | None,
) -> None:
    """Send edges back: to --to NAME@VERSION, or to the last-good model each keeps on disk."""
    targets = target_edges(config_file, ",".join(edges) if edges else None, group, everything)
    if api_url:
        result = api_call("POST", api_url, "/v1/models/rollback", {"edges": targets, "to": to_ref})
        for order in result["orders"]:
            click.echo(f"{order['edge_id']}: revision {order['revision']} {order['action']}")
        return
    from cloud.fleet import rollouts  # noqa: PLC0415  (SQLAlchemy: not on the --api path)

    try:
        sent = rollouts.rollback_edges(
            settings=settings_from(config_file), edge_ids=targets, to_ref=to_ref, actor=actor()
        )
    except EdgefleetError as exc:
        raise fail(exc) from exc
    for desired in sent:
        what = desired.model.ref if desired.model is not None else "last-good"
        click.echo(f"{desired.edge_id}: revision {desired.revision} -> {what}")
