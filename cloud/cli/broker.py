"""``edgefleet broker ...``: run mosquitto with users and ACLs from the registry; make test certificates."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from types import FrameType

import click

from cloud.cli.common import config_option, fail, registry_url, settings_from
from shared.errors import EdgefleetError

logger = logging.getLogger(__name__)

_FILE = click.Path(dir_okay=False, exists=True, path_type=Path)


@click.group()
def broker() -> None:
    """The MQTT broker whose users and ACLs come from the registry."""


@broker.command("run")
@config_option
@click.option(
    "--port", type=click.IntRange(1, 65535), required=True, help="site listener: devices, edges, operators"
)
@click.option(
    "--cloud-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="cloud listener: the cloud's service identities (default: --port + 1; 0: none)",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="config, password and ACL files, secrets, log and persistence",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="address both listeners bind to")
@click.option(
    "--tls-cert", type=_FILE, help="server certificate (PEM); with --tls-key and --tls-ca: TLS only"
)
@click.option("--tls-key", type=_FILE, help="server private key (PEM)")
@click.option("--tls-ca", type=_FILE, help="CA bundle (PEM) of the listeners")
@click.option(
    "--x509-port",
    type=click.IntRange(0, 65535),
    default=0,
    help="with TLS: a listener for client certificates of --tls-ca (CN = username); 0: none",
)
@click.option("--tls-crl", type=_FILE, help="with --x509-port: revoked client certificates (PEM CRL)")
def run(
    *,
    config_file: Path | None,
    port: int,
    cloud_port: int | None,
    data_dir: Path,
    host: str,
    tls_cert: Path | None,
    tls_key: Path | None,
    tls_ca: Path | None,
    x509_port: int,
    tls_crl: Path | None,
) -> None:
    """Run mosquitto in the foreground until SIGTERM/SIGINT, its users and ACLs following the
    registry (enroll, revoke, claim tokens) within about a second."""
    from cloud.broker.config import BrokerLayout, TlsFiles  # noqa: PLC0415  (SQLAlchemy: only when run)
    from cloud.broker.run import BrokerRunner  # noqa: PLC0415

    tls_given = [f for f in (tls_cert, tls_key, tls_ca) if f is not None]
    if tls_given and len(tls_given) != 3:
        raise click.UsageError("--tls-cert, --tls-key and --tls-ca go together")
    if (x509_port or tls_crl) and not tls_given:
        raise click.UsageError("--x509-port and --tls-crl need --tls-cert, --tls-key and --tls-ca")
    cloud = port + 1 if cloud_port is None else cloud_port
    if cloud > 65535:
        raise click.UsageError(f"--port {port} + 1 is no port: give --cloud-port")
    ports = [p for p in (port, cloud, x509_port) if p]
    if len(set(ports)) != len(ports):
        raise click.UsageError(f"--port, --cloud-port and --x509-port must differ: {ports}")
    if tls_cert is not None:
        from cloud.broker.certs import certificate_problem  # noqa: PLC0415  (cryptography: only with TLS)

        problem = certificate_problem(tls_cert)
        if problem is not None:
            raise click.ClickException(f"--tls-cert {problem}")
    settings = settings_from(config_file)
    url = registry_url(config_file)
    tls = (
        TlsFiles(cert=tls_cert, key=tls_key, ca=tls_ca, crl=tls_crl)
        if tls_cert and tls_key and tls_ca
        else None
    )
    layout = BrokerLayout(
        data_dir=data_dir, port=port, cloud_port=cloud, host=host, tls=tls, x509_port=x509_port
    )
    runner = BrokerRunner(settings=settings, database_url=url, layout=layout, echo=True)
    stop = threading.Event()

    def _stop(signum: int, _frame: FrameType | None) -> None:
        logger.info("signal %d: stopping the broker", signum)
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        runner.start()
    except EdgefleetError as exc:
        raise fail(exc) from exc
    try:
        code = runner.wait(stop)
    finally:
        runner.stop()
    if code is not None and not stop.is_set():
        raise click.ClickException(
            f"mosquitto exited with code {code}; the last lines of {runner.log_path}:\n{runner.log_tail()}"
        )


@broker.command("make-certs")
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option(
    "--hostname",
    default="localhost",
    show_default=True,
    help="server name (SAN next to 127.0.0.1, localhost)",
)
@click.option("--days", type=click.IntRange(1, 3650), default=365, show_default=True)
@click.option(
    "--client", "clients", multiple=True, help="also a client certificate with this CN (repeatable)"
)
def make_certs(*, directory: Path, hostname: str, days: int, clients: tuple[str, ...]) -> None:
    """Write a test CA, a server certificate (and an expired one) and client certificates into DIR.
    For tests and development: the CA key is written next to them, unencrypted."""
    from cloud.broker.certs import make_pki  # noqa: PLC0415  (cryptography: only when used)

    paths = make_pki(directory, hostname=hostname, days=days, clients=clients)
    for name, path in paths.items():
        click.echo(f"{name}: {path}")
