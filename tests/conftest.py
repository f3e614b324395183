"""Shared fixtures: real services on loopback. Nothing that crosses a network is mocked.

- ``mosquitto``: a private mosquitto per test on a free port (persistence on); ``.restart()`` keeps
  its port and sessions.
- ``redis_server``: one private redis-server per session on a free port.
- ``postgres_url``: a uniquely named database on the PostgreSQL at 127.0.0.1:5432 (trust auth,
  user postgres; ``.ci/run`` and ``scripts/setup`` make sure it answers), dropped after the session.

A missing service FAILS the test (never skips): CI must not pass by testing less.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.private_broker import mosquitto_binary
from tests.support.brokers import ADMIN_POSTGRES_URL, Mosquitto, PostgresDatabase, RedisServer


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A fresh mosquitto (persistence on) for one test; ``.restart()`` keeps port and sessions."""
    if mosquitto_binary() is None:
        pytest.fail("mosquitto is not installed: scripts/setup installs it with apt-get")
    broker = Mosquitto(workdir=tmp_path / "mosquitto")
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None and not Path("/usr/bin/redis-server").exists():
        pytest.fail("redis-server is not installed: scripts/setup installs it with apt-get")
    server = RedisServer(workdir=tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """``postgresql://postgres@127.0.0.1:5432/<unique name>``: a new database for this session."""
    database = PostgresDatabase(
        admin_url=os.environ.get("EDGEFLEET_TEST_POSTGRES_ADMIN_URL", ADMIN_POSTGRES_URL)
    )
    try:
        database.create()
    except ImportError as exc:
        pytest.fail(f"psycopg2 is not installed ({exc}): pip install -e '.[all,dev]'")
    except Exception as exc:  # psycopg2.OperationalError and friends: the server is not there
        pytest.fail(
            f"PostgreSQL at {database.admin_url} is not reachable ({exc}); "
            "scripts/setup installs and starts it (pg_ctlcluster ... main start)"
        )
    yield database.url
    database.drop()
