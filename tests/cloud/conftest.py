"""Fixtures of the cloud tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud.registry.db import downgrade, engine_for, upgrade


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A registry migrated to head, on SQLite and on PostgreSQL; each test starts from an empty
    schema (PostgreSQL's is downgraded to base after it). Test modules that need another database
    (SQLite only, or not migrated) define their own ``db_url``."""
    url = (
        f"sqlite:///{tmp_path / 'registry.db'}"
        if request.param == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    upgrade(url)
    yield url
    engine_for(url).dispose()
    if request.param == "postgresql":
        downgrade(url, "base")
