"""Real service processes for tests: mosquitto and redis-server on free loopback ports."""

from __future__ import annotations

import dataclasses
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from shared import private_broker
from shared.private_broker import DURABLE, PrivateMosquitto, PrivateRedis

START_TIMEOUT_S = 10.0


def wait_port(port: int, timeout: float = START_TIMEOUT_S) -> None:
    """Wait until something listens on 127.0.0.1:``port``; ``TimeoutError`` otherwise."""
    if not private_broker.wait_port(port, timeout=timeout):
        raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


class Mosquitto(PrivateMosquitto):
    """A private mosquitto with persistence on; ``restart()`` keeps its port and its sessions."""

    def __init__(self, workdir: Path, extra_conf: str = "") -> None:
        super().__init__(workdir, dataclasses.replace(DURABLE, extra_conf=extra_conf))


class RedisServer(PrivateRedis):
    """A private redis-server (nothing persisted) on a free port: ``url``, ``start()``, ``stop()``."""


ADMIN_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


@dataclass
class PostgresDatabase:
    """A uniquely named database on an existing PostgreSQL server, dropped by ``drop()``."""

    admin_url: str = ADMIN_POSTGRES_URL
    name: str = field(default_factory=lambda: f"edgefleet_test_{os.getpid()}_{uuid.uuid4().hex[:8]}")

    @property
    def url(self) -> str:
        base, _, _ = self.admin_url.rpartition("/")
        return f"{base}/{self.name}"

    def _execute(self, sql: str) -> None:
        import psycopg2  # noqa: PLC0415  (cloud extra; only tests that use PostgreSQL need it)

        conn = psycopg2.connect(self.admin_url, connect_timeout=5)
        try:
            conn.autocommit = True  # CREATE / DROP DATABASE cannot run in a transaction
            with conn.cursor() as cur:
                cur.execute(sql)
        finally:
            conn.close()

    def create(self) -> None:
        self._execute(f'CREATE DATABASE "{self.name}"')

    def drop(self) -> None:
        self._execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
