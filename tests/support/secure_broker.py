"""``broker run`` for tests: mosquitto whose users and ACLs come from a SQLite registry in tmp_path.

Use the ``secure_broker`` fixture (tests/security/conftest.py, tests/cloud/broker/conftest.py) or the
context manager directly::

    from tests.support.secure_broker import SecureBroker

    with SecureBroker(tmp_path) as broker:                      # or the ``secure_broker`` fixture
        secret = broker.enroll("dev-1")                         # kind="device"|"edge"|"service"|"operator"
        link = broker.link("dev-1", secret)                     # an MqttLink on the site listener, started
        assert link.wait_connected(5)
        cloud = broker.link("cloud", broker.enroll("cloud", kind="service"), listener="cloud")
        edge = broker.link("edge-1", edge_secret, connection="site")    # logs in as edge-1/site
        broker.revoke("dev-1")                                  # then poll: refused within ~1 s
        settings = broker.mqtt("dev-1", secret)                 # MqttSettings, for your own client

- ``enroll`` / ``revoke`` / ``add_claim_token`` change the registry (as ``fleet enroll`` would) and wait
  until the broker has applied the change (its files rewritten, SIGHUP sent), so a connection
  attempted right after sees it. Secrets are hashed with ``FAST_ITERATIONS`` (not 210,000: these
  tests check who gets in, not the hash's cost; mosquitto pays the iterations on every connect).
- ``tls=True`` makes a test PKI (``cloud.broker.certs.make_pki``, in ``broker.pki``) and runs both
  listeners TLS only; ``mqtt()``/``link()`` then trust that CA. ``server_cert="server_expired"``
  serves the expired certificate instead; ``x509=True`` adds the client-certificate listener
  (``listener="x509"``; the PKI has ``client-dev-tls`` and ``client-expired``, CN ``dev-tls``).
- ``claim_handler``: a ``(token_id, payload) -> bytes`` function instead of
  ``cloud.fleet.claims.handle_claim`` (the default; None: no claim handler).
- Ports are free loopback ports; the broker runs in-process (``BrokerRunner``: mosquitto is its child)
  with ``SYNC_INTERVAL_S`` set to ``sync_interval_s`` (default: the production 1 s).
- Fixture: ``secure_broker`` (import it into a conftest: ``from tests.support.secure_broker import
  secure_broker  # noqa: F401``); a missing mosquitto FAILS the test.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import pytest

from cloud.broker import sync as broker_sync
from cloud.broker.certs import make_pki
from cloud.broker.claim_bridge import ClaimHandler
from cloud.broker.config import BrokerLayout, TlsFiles
from cloud.broker.run import _USE_REGISTRY, BrokerRunner
from cloud.registry import identities
from cloud.registry.db import engine_for, session_scope, upgrade
from shared.identity import broker_hash, connection_username, new_secret
from shared.mqtt import MqttLink
from shared.private_broker import free_port, mosquitto_binary
from shared.settings.base import MqttSettings
from shared.settings.cloud import CloudSettings
from shared.topics import Topics

FAST_ITERATIONS = 1_000
SYNC_TIMEOUT_S = 5.0
_ids = itertools.count()


class SecureBroker:
    """A ``broker run`` on free ports against a SQLite registry under ``workdir``."""

    def __init__(
        self,
        workdir: Path,
        *,
        tls: bool = False,
        cloud_listener: bool = True,
        claim_handler: ClaimHandler | object | None = _USE_REGISTRY,
        sync_interval_s: float = broker_sync.SYNC_INTERVAL_S,
        topic_prefix: str = "ef/v1",
        server_cert: str = "server",
        x509: bool = False,
    ) -> None:
        self.workdir = workdir
        self.database_url = f"sqlite:///{workdir / 'registry.db'}"
        self.settings = CloudSettings(
            data_dir=workdir / "cloud",
            database_url=self.database_url,
            broker={"topic_prefix": topic_prefix},  # type: ignore[arg-type]
        )
        self.topics = Topics(topic_prefix)
        self.pki: dict[str, Path] = make_pki(workdir / "pki", clients=("dev-tls",)) if tls else {}
        tls_files = (
            TlsFiles(self.pki[server_cert], self.pki[f"{server_cert}_key"], self.pki["ca"]) if tls else None
        )
        self.layout = BrokerLayout(
            data_dir=workdir / "broker",
            port=free_port(),
            cloud_port=free_port() if cloud_listener else 0,
            tls=tls_files,
            x509_port=free_port() if x509 else 0,
        )
        self.sync_interval_s = sync_interval_s
        self.runner = BrokerRunner(
            settings=self.settings,
            database_url=self.database_url,
            layout=self.layout,
            claim_handler=claim_handler,
        )
        self._links: list[MqttLink] = []
        self._saved_interval = broker_sync.SYNC_INTERVAL_S

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> Self:
        upgrade(self.database_url)
        broker_sync.SYNC_INTERVAL_S = self.sync_interval_s
        self.runner.start()
        return self

    def stop(self) -> None:
        for link in self._links:
            with contextlib.suppress(Exception):
                link.stop()
        self._links.clear()
        self.runner.stop()
        broker_sync.SYNC_INTERVAL_S = self._saved_interval
        engine_for(self.database_url).dispose()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self.layout.port

    @property
    def cloud_port(self) -> int:
        return self.layout.cloud_port

    # -- the registry -------------------------------------------------------------------------------
    def revision(self) -> int:
        with session_scope(self.database_url) as session:
            return identities.auth_revision(session)

    def wait_synced(self, timeout: float = SYNC_TIMEOUT_S) -> None:
        """Wait until the broker's files reflect the registry's current revision."""
        target = self.revision()
        if self.runner.sync is not None:
            self.runner.sync.poke()
        deadline = time.monotonic() + timeout
        while self.runner.applied_revision < target:
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"broker applied auth revision {self.runner.applied_revision}, registry is at {target} "
                    f"after {timeout} s; mosquitto log:\n{self.runner.log_tail()}"
                )
            time.sleep(0.02)

    def enroll(
        self, identity_id: str, kind: str = "device", *, role: str | None = None, secret: str | None = None
    ) -> str:
        """Enroll (or re-enroll) ``identity_id``; return its secret once the broker knows it."""
        secret = secret or new_secret()
        with session_scope(self.database_url) as session:
            identities.enroll(
                session,
                identity_id=identity_id,
                kind=kind,
                role=role,
                secret_hash=broker_hash(secret, iterations=FAST_ITERATIONS),
                actor="test",
            )
        self.wait_synced()
        return secret

    def revoke(self, identity_id: str, *, wait: bool = False) -> None:
        """Revoke ``identity_id`` in the registry (``wait``: until the broker applied it)."""
        with session_scope(self.database_url) as session:
            identities.revoke(session, identity_id=identity_id, actor="test")
        if wait:
            self.wait_synced()

    def add_claim_token(
        self, token_id: str | None = None, *, ttl_s: float = 600.0, kind: str = "device"
    ) -> tuple[str, str]:
        """A usable claim token: ``(token_id, secret)`` once the broker lets ``claim-TOKEN`` in."""
        token_id = token_id or f"tok{next(_ids)}{new_secret()[:8].replace('-', 'x').replace('_', 'y')}"
        secret = new_secret()
        with session_scope(self.database_url) as session:
            identities.add_claim_token(
                session,
                token_id=token_id,
                secret_hash=broker_hash(secret, iterations=FAST_ITERATIONS),
                expires_at=time.time() + ttl_s,
                kind=kind,
                actor="test",
            )
        self.wait_synced()
        return token_id, secret

    # -- clients ------------------------------------------------------------------------------------
    def mqtt(
        self,
        username: str | None,
        secret: str | None,
        *,
        listener: str = "site",
        tls_ca: Path | None = None,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        plaintext: bool = False,
        **extra: Any,
    ) -> MqttSettings:
        """Settings of a client of ``listener`` (``site`` or ``cloud``) logging in as ``username``."""
        port = self.layout.port_of(listener)
        tls = self.layout.tls is not None and not plaintext
        return MqttSettings(
            url=f"{'mqtts' if tls else 'mqtt'}://127.0.0.1:{port}",
            username=username,
            password=secret,  # type: ignore[arg-type]
            tls_ca=(tls_ca or self.pki.get("ca")) if tls else None,
            tls_cert=tls_cert,
            tls_key=tls_key,
            topic_prefix=self.topics.prefix,
            reconnect_min_s=0.5,
            reconnect_max_s=1.0,
            **extra,
        )

    def link(
        self,
        username: str | None,
        secret: str | None,
        *,
        connection: str | None = None,
        listener: str = "site",
        client_id: str | None = None,
        clean_session: bool = True,
        start: bool = True,
        **kwargs: Any,
    ) -> MqttLink:
        """An ``MqttLink`` logging in as ``username`` (``connection``: as ``username/connection``),
        started unless ``start=False``; stopped with the broker."""
        settings = self.mqtt(username, secret, listener=listener)
        link = MqttLink(
            settings,
            client_id=client_id
            or f"test-{connection_username(username or 'anon', connection).replace('/', '-')}-{next(_ids)}",
            clean_session=clean_session,
            connection=connection,
            **kwargs,
        )
        self._links.append(link)
        if start:
            link.start()
        return link


@pytest.fixture
def secure_broker(tmp_path: Path) -> Iterator[SecureBroker]:
    """A ``broker run`` (plaintext, site + cloud listeners, the registry's claim handler) for one test."""
    if mosquitto_binary() is None:
        pytest.fail("mosquitto is not installed: scripts/setup installs it with apt-get")
    with SecureBroker(tmp_path / "secure") as broker:
        yield broker
