"""Shared fixtures: real services on loopback. Nothing that crosses a network is mocked.

- ``mosquitto``: a private mosquitto per test on a free port (persistence on); ``.restart()`` keeps
  its port and sessions.
- ``redis_server``: one private redis-server per session on a free port.
- ``postgres_url``: a uniquely named database on the PostgreSQL at 127.0.0.1:5432 (trust auth,
  user postgres; ``.ci/run`` and ``scripts/setup`` make sure it answers), dropped after the session.
- ``browser`` / ``page``: headless Debian chromium through Playwright (tests/support/browser.py); a
  page's console errors fail its test. Missing chromium skips them outside CI (``$CI`` unset).

A missing service FAILS the test (never skips): CI must not pass by testing less.
"""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from shared.private_broker import mosquitto_binary, redis_binary
from tests.support.brokers import ADMIN_POSTGRES_URL, Mosquitto, PostgresDatabase, RedisServer
from tests.support.browser import launch_browser, open_page, remember_report

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page


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
    if redis_binary() is None:
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


# --- Browser tests for the web console: Debian's chromium through Playwright (tests/support/browser.py).
# Module-scoped: Playwright's sync API keeps an asyncio loop running on the main thread while it is
# open, and later tests calling asyncio.run() (the load generator's) would find it there.
@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Headless chromium for one test module; skipped where it is missing, failed under CI."""
    yield from launch_browser()


@pytest.fixture
def page(browser: Browser, request: pytest.FixtureRequest) -> Iterator[Page]:
    """A fresh 1280x860 page; console errors fail the test, a failed test leaves a screenshot."""
    yield from open_page(browser, request)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    # The page fixture screenshots failed tests: it needs each phase's outcome at teardown.
    report = yield
    remember_report(item, report)
    return report
