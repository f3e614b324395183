"""Alembic environment: the URL comes from the caller (``cloud.registry.db.upgrade(url)``)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool

from cloud.registry.db import with_installed_driver
from cloud.registry.models import Base

config = context.config
target_metadata = Base.metadata


def run_offline() -> None:
    """Render the migrations as SQL for the configured URL without connecting (Alembic's ``--sql``)."""
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    """Run the migrations over a connection to the configured URL (what ``upgrade`` does)."""
    url = config.get_main_option("sqlalchemy.url")
    assert url is not None
    engine = create_engine(with_installed_driver(url), poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
