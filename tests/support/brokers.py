"""Real service processes for tests: mosquitto and redis-server on free loopback ports."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from shared import private_broker
from shared.private_broker import DURABLE, PrivateMosquitto, free_port

START_TIMEOUT_S = 10.0


def wait_port(port: int, timeout: float = START_TIMEOUT_S) -> None:
    """Wait until something listens on 127.0.0.1:``port``; ``TimeoutError`` otherwise."""
    if not private_broker.wait_port(port, timeout=timeout):
        raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


class Mosquitto(PrivateMosquitto):
    """A private mosquitto with persistence on; ``restart()`` keeps its port and its sessions."""

    def __init__(self, workdir: Path, extra_conf: str = "") -> None:
        super().__init__(workdir, dataclasses.replace(DURABLE, extra_conf=extra_conf))


@dataclass
class RedisServer:
    workdir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
                "--logfile",
                str(self.workdir / "redis.log"),
            ],
        )
        wait_port(self.port)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


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
