"""``edgefleet cloud ...`` (services) and ``edgefleet model ...`` (train, compress, evaluate, inspect)."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import click

from shared.errors import EdgefleetError
from shared.settings import load_settings
from shared.settings.cloud import CloudSettings

logger = logging.getLogger(__name__)

config_option = click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="EDGEFLEET_CLOUD_CONFIG",
    help="CloudSettings YAML file (EDGEFLEET_* environment variables override it)",
)


def _settings(config_file: Path | None) -> CloudSettings:
    if config_file is not None:
        # Celery workers and in-process tasks read the same file through this variable.
        os.environ["EDGEFLEET_CLOUD_CONFIG"] = str(config_file)
    try:
        return load_settings(CloudSettings, config_file)
    except EdgefleetError as exc:
        raise click.ClickException(str(exc)) from exc


def _console() -> Any:
    from rich.console import Console  # noqa: PLC0415

    # Piped output (files, tests, CI logs) gets wide tables instead of wrapped 80-column ones.
    return Console(width=None if sys.stdout.isatty() else 200)


# ------------------------------------------------------------------------------------------------
# edgefleet cloud
# ------------------------------------------------------------------------------------------------


@click.group()
def cloud() -> None:
    """Run cloud services: ingest, Celery worker and beat, keys, registry, artifacts."""


@cloud.group()
def db() -> None:
    """The registry database."""


@db.command("upgrade")
@config_option
@click.option("--url", default=None, help="SQLAlchemy URL (default: the configured database_url)")
@click.option("--revision", default="head", show_default=True)
def db_upgrade(config_file: Path | None, url: str | None, revision: str) -> None:
    """Create or migrate the registry (Alembic)."""
    from cloud.registry.db import upgrade  # noqa: PLC0415

    settings = _settings(config_file)
    target = url or settings.resolved_database_url
    upgrade(target, revision)
    click.echo(f"registry upgraded to {revision}")


@cloud.command()
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("keys"),
    show_default=True,
)
@click.option("--name", default="signing", show_default=True)
@click.option("--force", is_flag=True, help="overwrite an existing key pair")
def keygen(out_dir: Path, name: str, force: bool) -> None:
    """Write a new ed25519 signing key pair (the private key stays in the cloud; edges get the .pub)."""
    from shared.signing import generate_keypair  # noqa: PLC0415

    private, public = out_dir / f"{name}.key", out_dir / f"{name}.pub"
    if private.exists() and not force:
        raise click.ClickException(f"{private} exists; use --force to replace it")
    key_id = generate_keypair(private, public)
    click.echo(f"key id {key_id}\nprivate {private} (mode 0600)\npublic  {public}")


@cloud.command()
@config_option
@click.option("--concurrency", "-c", type=int, default=None, help="worker processes (default: cores)")
@click.option(
    "--pool", default="prefork", show_default=True, type=click.Choice(["prefork", "solo", "threads"])
)
@click.option("--loglevel", default="INFO", show_default=True)
@click.option("--queues", "-Q", default=None)
def worker(
    config_file: Path | None, concurrency: int | None, pool: str, loglevel: str, queues: str | None
) -> None:
    """Run a Celery worker for the training pipeline."""
    _settings(config_file)
    from cloud.celery_app import app  # noqa: PLC0415

    argv = ["worker", f"--loglevel={loglevel}", f"--pool={pool}"]
    if concurrency:
        argv.append(f"--concurrency={concurrency}")
    if queues:
        argv.append(f"--queues={queues}")
    app.worker_main(argv)


@cloud.command()
@config_option
@click.option("--loglevel", default="INFO", show_default=True)
@click.option("--schedule-file", type=click.Path(dir_okay=False, path_type=Path), default=None)
def beat(config_file: Path | None, loglevel: str, schedule_file: Path | None) -> None:
    """Run Celery beat: checks the retraining triggers on a schedule."""
    settings = _settings(config_file)
    from cloud.celery_app import app  # noqa: PLC0415

    schedule = schedule_file or settings.data_dir / "celerybeat-schedule"
    schedule.parent.mkdir(parents=True, exist_ok=True)
    app.start(["beat", f"--loglevel={loglevel}", f"--schedule={schedule}"])


@cloud.command()
@config_option
@click.option(
    "--max-messages", type=int, default=None, help="stop after this many messages (tests, batch jobs)"
)
@click.option("--idle-exit", type=float, default=None, help="stop after this many idle seconds")
@click.option(
    "--client-id",
    default="edgefleet-cloud-ingest",
    show_default=True,
    help="MQTT client id (persistent session: unique per ingest process)",
)
@click.option(
    "--share-group", default=None, help="split the uplink between ingest processes ($share/GROUP/...)"
)
def ingest(
    config_file: Path | None,
    max_messages: int | None,
    idle_exit: float | None,
    client_id: str,
    share_group: str | None,
) -> None:
    """Consume the edges' uplink from the cloud broker into the registry."""
    from cloud.ingest import Ingest  # noqa: PLC0415

    settings = _settings(config_file)
    service = Ingest(settings, client_id=client_id, share_group=share_group)
    try:
        service.run(max_messages=max_messages, idle_exit_s=idle_exit)
    except KeyboardInterrupt:
        pass
    finally:
        service.close()
    click.echo(json.dumps(service.stats.as_dict()))


@cloud.command("serve-artifacts")
@config_option
@click.option("--host", default=None)
@click.option("--port", type=int, default=None)
@click.option("--dir", "root", type=click.Path(file_okay=False, path_type=Path), default=None)
def serve_artifacts(config_file: Path | None, host: str | None, port: int | None, root: Path | None) -> None:
    """Serve the artifact directory over HTTP (Range requests supported, for resumable downloads)."""
    from cloud.publishing import ArtifactServer  # noqa: PLC0415

    settings = _settings(config_file)
    server = ArtifactServer(
        root or settings.resolved_artifact_dir,
        host=host or settings.artifact_host,
        port=settings.artifact_port if port is None else port,
    )
    click.echo(f"serving {root or settings.resolved_artifact_dir} at {server.url}")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()


@cloud.command("publish-desired")
@config_option
@click.option("--edge", "edges", multiple=True, required=True, help="edge id (repeatable)")
@click.option("--model", "model_ref", required=True, help="NAME@VERSION (or NAME@production)")
@click.option("--rollout-id", default=None)
def publish_desired(
    config_file: Path | None, edges: tuple[str, ...], model_ref: str, rollout_id: str | None
) -> None:
    """Tell edges to deploy a signed model: retained DesiredState (QoS1) on each edge's desired topic."""
    from cloud.publishing import publish_desired_state  # noqa: PLC0415

    settings = _settings(config_file)
    sent = publish_desired_state(
        settings=settings, edge_ids=list(edges), model_ref=model_ref, rollout_id=rollout_id
    )
    for desired in sent:
        assert desired.model is not None
        click.echo(f"{desired.edge_id}: revision {desired.revision} -> {desired.model.ref}")


# ------------------------------------------------------------------------------------------------
# edgefleet model
# ------------------------------------------------------------------------------------------------


@click.group()
def model() -> None:
    """Train, compress, evaluate and inspect models (the registry's lineage)."""


def _ensure_db(settings: CloudSettings) -> str:
    from cloud.celery_app import use_settings  # noqa: PLC0415
    from cloud.registry.db import upgrade  # noqa: PLC0415

    use_settings(settings)  # the task functions this process may run read the same settings

    url = settings.resolved_database_url
    upgrade(url)
    return url


def _pipeline_config(**fields: Any) -> Any:
    from cloud.workflow import PipelineConfig  # noqa: PLC0415

    return PipelineConfig(**{k: v for k, v in fields.items() if v is not None})


@model.command()
@config_option
@click.option(
    "--dataset", default="vibration", show_default=True, help="digits | vibration | basicmotions | PATH.npz"
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
) -> None:
    """Train -> compress -> evaluate -> gate -> sign -> publish, recorded in the registry."""
    import yaml  # noqa: PLC0415

    from cloud.workflow import PipelineConfig  # noqa: PLC0415

    settings = _settings(config_file)
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
    if use_celery:
        _train_on_celery(settings, config)
    else:
        _train_in_process(settings, config)


def _steps(config: Any) -> list[tuple[str, Any, tuple[Any, ...]]]:
    from cloud import tasks  # noqa: PLC0415

    steps: list[tuple[str, Any, tuple[Any, ...]]] = [
        ("dataset", tasks.prepare_dataset, ()),
        ("train", tasks.train, ()),
    ]
    for variant in tasks.variants_for(config):
        steps.append((f"compress {variant}", tasks.compress, (variant,)))
        steps.append((f"evaluate {variant}", tasks.evaluate, (variant,)))
    steps += [("gate", tasks.gate, ()), ("sign", tasks.sign, ()), ("publish", tasks.publish, ())]
    return steps


def _train_in_process(settings: CloudSettings, config: Any) -> None:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: PLC0415

    from cloud import tasks  # noqa: PLC0415
    from cloud.registry import crud  # noqa: PLC0415
    from cloud.registry.db import session_scope  # noqa: PLC0415

    del settings
    run_id = tasks.create_run(config=config)
    steps = _steps(config)
    console = _console()
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        overall = progress.add_task(f"run {run_id}", total=len(steps))
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

        tasks.progress_hook = on_epoch
        try:
            for label, task, args in steps:
                progress.update(overall, description=label)
                task(run_id, *args)
                progress.advance(overall)
        except Exception as exc:
            with session_scope(tasks.current_url()) as session:
                crud.finish_run(session, run_id=run_id, state="failed", error=f"{type(exc).__name__}: {exc}")
            raise
        finally:
            tasks.progress_hook = None
    _print_run(run_id)


def _train_on_celery(settings: CloudSettings, config: Any) -> None:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: PLC0415

    from cloud import tasks  # noqa: PLC0415
    from cloud.registry import crud  # noqa: PLC0415
    from cloud.registry.db import session_scope  # noqa: PLC0415

    run_id, result = tasks.start_pipeline(config=config)
    total = len(_steps(config))
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=_console(),
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
    _print_run(run_id)


def _print_run(run_id: int) -> None:

    from cloud import tasks  # noqa: PLC0415
    from cloud.registry import crud  # noqa: PLC0415
    from cloud.registry.db import session_scope  # noqa: PLC0415

    with session_scope(tasks.current_url()) as session:
        run = crud.get_run(session, run_id=run_id)
        versions = [
            m
            for m in crud.list_model_versions(session, name=run.model_name, limit=1000)
            if m.run_id == run_id
        ]
        table = _metrics_table(f"run {run_id}: {run.state}", sorted(versions, key=lambda m: m.id))
        gate = next((e for e in run.steps if e.step == "gate"), None)
        console = _console()
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
    from rich.table import Table  # noqa: PLC0415

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
    from rich.progress import Progress  # noqa: PLC0415

    from cloud import tasks  # noqa: PLC0415
    from cloud.registry import crud  # noqa: PLC0415
    from cloud.registry.db import session_scope  # noqa: PLC0415

    settings = _settings(config_file)
    with session_scope(_ensure_db(settings)) as session:
        found = crud.get_model_version(session, ref=ref)
        if found.run_id is None:
            raise click.ClickException(
                f"{ref} was not made by a pipeline run; it has no base model to compress"
            )
        run_id = found.run_id
    with Progress(console=_console()) as progress:
        bar = progress.add_task("variants", total=len(variants))
        for variant in variants:
            progress.update(bar, description=f"compress {variant}")
            tasks.compress(run_id, variant)
            tasks.evaluate(run_id, variant)
            progress.advance(bar)
    _print_run(run_id)


@model.command()
@config_option
@click.argument("ref")
def evaluate(config_file: Path | None, ref: str) -> None:
    """Re-evaluate a model's artifact with LiteRT on its run's held-out split."""
    from cloud import tasks  # noqa: PLC0415
    from cloud.registry import crud  # noqa: PLC0415
    from cloud.registry.db import session_scope  # noqa: PLC0415

    settings = _settings(config_file)
    with session_scope(_ensure_db(settings)) as session:
        found = crud.get_model_version(session, ref=ref)
        if found.run_id is None:
            raise click.ClickException(f"{ref} has no run (no held-out split to evaluate on)")
        run_id, variant = found.run_id, found.variant
    tasks.evaluate(run_id, variant)
    with session_scope(settings.resolved_database_url) as session:
        _console().print(_metrics_table(ref, [crud.get_model_version(session, ref=ref)]))


@model.command("list")
@config_option
@click.option("--name", default=None)
@click.option("--status", default=None, type=click.Choice(["candidate", "production", "rejected", "retired"]))
@click.option("--limit", default=50, show_default=True)
def list_models(config_file: Path | None, name: str | None, status: str | None, limit: int) -> None:
    """Model versions with their metrics."""
    from cloud.registry import crud  # noqa: PLC0415
    from cloud.registry.db import session_scope  # noqa: PLC0415

    settings = _settings(config_file)
    with session_scope(_ensure_db(settings)) as session:
        _console().print(
            _metrics_table("models", crud.list_model_versions(session, name=name, status=status, limit=limit))
        )


@model.command()
@config_option
@click.argument("ref")
def show(config_file: Path | None, ref: str) -> None:
    """One model: lineage (parent, dataset, run steps), config, metrics, gate reason, manifest."""
    from cloud.registry import crud  # noqa: PLC0415
    from cloud.registry.db import session_scope  # noqa: PLC0415

    settings = _settings(config_file)
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
                "steps": [{"step": e.step, "model_version_id": e.model_version_id} for e in run.steps],
            }
    click.echo(json.dumps(info, indent=2, default=str))


@model.command()
@config_option
@click.argument("ref_a")
@click.argument("ref_b")
def diff(config_file: Path | None, ref_a: str, ref_b: str) -> None:
    """Two models' metrics and configs side by side."""
    from rich.table import Table  # noqa: PLC0415

    from cloud.registry import crud  # noqa: PLC0415
    from cloud.registry.db import session_scope  # noqa: PLC0415

    settings = _settings(config_file)
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
    _console().print(table)


@model.command()
@config_option
@click.option("--sample", "sample_id", default=None, help="sample id to label")
@click.option("--label", default=None, help="the label to give it")
@click.option("--limit", default=20, show_default=True, help="unlabelled samples to list")
def label(config_file: Path | None, sample_id: str | None, label: str | None, limit: int) -> None:
    """List unlabelled uplinked samples, or label one: --sample ID --label CLASS."""
    from rich.table import Table  # noqa: PLC0415

    from cloud.registry import crud  # noqa: PLC0415
    from cloud.registry.db import session_scope  # noqa: PLC0415

    settings = _settings(config_file)
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
    _console().print(table)


# ------------------------------------------------------------------------------------------------
# fleet operations: edgefleet cloud api, edgefleet model rollback (code in cloud.fleet_cli / cloud.api)
# ------------------------------------------------------------------------------------------------


@cloud.command("api")
@config_option
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8080, show_default=True)
def api(config_file: Path | None, host: str, port: int) -> None:
    """Serve the admin HTTP API (bearer tokens: edgefleet admin token create)."""
    import uvicorn  # noqa: PLC0415

    from cloud.api import create_app  # noqa: PLC0415
    from cloud.registry.db import upgrade  # noqa: PLC0415

    settings = _settings(config_file)
    upgrade(settings.resolved_database_url)
    uvicorn.run(create_app(settings), host=host, port=port, log_level="info")


from cloud.fleet_cli import model_rollback as _model_rollback  # noqa: E402  (after ``model`` exists)

model.add_command(_model_rollback)
