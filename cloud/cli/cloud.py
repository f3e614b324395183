"""``edgefleet cloud ...``: run the cloud services (ingest, Celery worker and beat, artifacts, API)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from cloud.artifacts import ArtifactServer, EdgeArtifactAccess
from cloud.cli.common import (
    config_option,
    settings_from,
)
from cloud.cli.keys import keys as keys_group
from cloud.fleet.desired_state import publish_desired_state
from shared.signing import generate_keypair


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
    from cloud.registry.db import upgrade  # noqa: PLC0415  (SQLAlchemy + Alembic: only for this command)

    settings = settings_from(config_file)
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
    private, public = out_dir / f"{name}.key", out_dir / f"{name}.pub"
    if private.exists() and not force:
        raise click.ClickException(f"{private} exists; use --force to replace it")
    key_id = generate_keypair(private, public)
    click.echo(f"key id {key_id}\nprivate {private} (mode 0600)\npublic  {public}")


cloud.add_command(keys_group)  # edgefleet cloud keys rotate|revoke|list (cloud/cli/keys.py)


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
    settings_from(config_file)
    from cloud.worker.app import app  # noqa: PLC0415  (Celery: the app is built on import, so after --config is read)

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
    settings = settings_from(config_file)
    from cloud.worker.app import app  # noqa: PLC0415  (Celery: the app is built on import, so after --config is read)

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
    from cloud.ingest import Ingest  # noqa: PLC0415  (SQLAlchemy: only for this command)

    settings = settings_from(config_file)
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
@click.option(
    "--no-auth",
    is_flag=True,
    help="DEVELOPMENT ONLY: serve every artifact to anyone (default: edges authenticate with their "
    "identity and fetch only the models sent to them)",
)
def serve_artifacts(
    config_file: Path | None, host: str | None, port: int | None, root: Path | None, *, no_auth: bool
) -> None:
    """Serve the artifact directory over HTTP (Range requests supported, for resumable downloads).

    Each edge authenticates with HTTP Basic (its enrollment username and secret, checked against the
    registry) and may download only the artifacts of models sent to it; no directory listing."""
    settings = settings_from(config_file)
    access = None if no_auth else EdgeArtifactAccess(settings.resolved_database_url)
    server = ArtifactServer(
        root or settings.resolved_artifact_dir,
        access=access,
        host=host or settings.artifact_host,
        port=settings.artifact_port if port is None else port,
    )
    mode = "OPEN TO ANYONE (--no-auth)" if access is None else "edges only, each its own models"
    click.echo(f"serving {root or settings.resolved_artifact_dir} at {server.url}: {mode}")
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
    settings = settings_from(config_file)
    sent = publish_desired_state(
        settings=settings, edge_ids=list(edges), model_ref=model_ref, rollout_id=rollout_id
    )
    for desired in sent:
        assert desired.model is not None
        click.echo(f"{desired.edge_id}: revision {desired.revision} -> {desired.model.ref}")


@cloud.command("api")
@config_option
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8080, show_default=True)
def api(config_file: Path | None, host: str, port: int) -> None:
    """Serve the admin HTTP API (bearer tokens: edgefleet admin token create) and the web console at /."""
    import uvicorn  # noqa: PLC0415  (uvicorn: only to serve the API)

    from cloud.console.app import create_app  # noqa: PLC0415  (FastAPI: only to serve the API)
    from cloud.registry.db import upgrade  # noqa: PLC0415  (SQLAlchemy + Alembic: only for this command)

    settings = settings_from(config_file)
    upgrade(settings.resolved_database_url)
    # Not "console: ...": that line is the demo's one-time sign-in link.
    click.echo(f"serving the API and the web console on http://{host}:{port}/", err=True)
    # Open event streams of console pages would otherwise hold a stop until they end.
    uvicorn.run(create_app(settings), host=host, port=port, log_level="info", timeout_graceful_shutdown=3)
