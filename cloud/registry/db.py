"""Engine and session setup, and Alembic migrations run from code (``upgrade(url)``)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from shared.redact import redact_url

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    # busy_timeout first: writers wait for each other instead of failing with "database is locked".
    cursor.execute("PRAGMA busy_timeout=10000")
    # WAL: the ingest writes while workers and the CLI read. WAL is a property of the file: switching
    # needs the database to itself and fails at once while another connection uses it, so it is done
    # only when the file is not in WAL yet (``upgrade`` switches a new registry before anyone uses it).
    _ensure_wal(cursor)
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _ensure_wal(cursor: Any) -> None:
    mode = cursor.execute("PRAGMA journal_mode").fetchone()
    if mode is not None and str(mode[0]).lower() not in ("wal", "memory"):
        cursor.execute("PRAGMA journal_mode=WAL")


def make_engine(url: str) -> Engine:
    """A new engine for ``url``; SQLite gets its directory, a 30 s lock timeout and the pragmas above."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[1] if "///" in url else ""
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(with_installed_driver(url), pool_pre_ping=True)


def with_installed_driver(url: str) -> str:
    """``postgresql://`` as ``postgresql+psycopg2://``: SQLAlchemy 2.1 picks psycopg 3 for a bare
    ``postgresql://``, and the cloud extra installs psycopg2. Other URLs are returned unchanged."""
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg2://" + url.split("://", 1)[1]
    return url


@lru_cache(maxsize=16)
def engine_for(url: str) -> Engine:
    """One engine per URL per process (Celery workers and the ingest reuse it)."""
    return make_engine(url)


def session_factory(url: str) -> sessionmaker[Session]:
    """Sessions on the URL's shared engine; objects stay readable after commit."""
    return sessionmaker(engine_for(url), expire_on_commit=False)


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    session = session_factory(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def lock_for_write(session: Session) -> None:
    """Take SQLite's write lock now (waiting up to its busy timeout); a no-op on other databases.

    A transaction that reads before it writes would otherwise be refused the upgrade to a write at
    once ("database is locked", SQLITE_BUSY_SNAPSHOT, no busy wait) if another connection committed
    in between."""
    if session.get_bind().dialect.name == "sqlite":
        session.connection().exec_driver_sql("BEGIN IMMEDIATE")


@contextmanager
def savepoint(session: Session) -> Iterator[None]:
    """A nested transaction: an error inside rolls back only what was done inside."""
    with session.begin_nested():
        yield


def has_changes(session: Session) -> bool:
    """Whether the session holds new or modified objects not yet flushed."""
    return bool(session.dirty or session.new)


def alembic_config(url: str) -> Any:
    """Alembic's config for ``url``: this package's migrations, and the caller's logging left alone."""
    from alembic.config import Config  # noqa: PLC0415  (Alembic: only migrations need it)

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    config.attributes["configure_logger"] = False
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the registry at ``url`` to ``revision`` with Alembic (creates the SQLite file if needed)."""
    alembic_logger = logging.getLogger("alembic")
    if not alembic_logger.isEnabledFor(logging.DEBUG):
        alembic_logger.setLevel(logging.WARNING)  # a line per plugin and step is noise at INFO
    from alembic import command  # noqa: PLC0415  (Alembic: only migrations need it)

    if url.startswith("sqlite") and "///" in url:
        path = url.split("///", 1)[1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(url), revision)
    if url.startswith("sqlite"):
        # Alembic's engine has no pragmas: switch a new file to WAL now, with no one else on it yet.
        engine = make_engine(url)
        try:
            with engine.connect():
                pass
        finally:
            engine.dispose()
    logger.debug("registry at %s upgraded to %s", redact_url(url), revision)


def downgrade(url: str, revision: str = "base") -> None:
    """Take the registry at ``url`` back to ``revision`` with Alembic (the migration tests use it)."""
    from alembic import command  # noqa: PLC0415  (Alembic: only migrations need it)

    command.downgrade(alembic_config(url), revision)
