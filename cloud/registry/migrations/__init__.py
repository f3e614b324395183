"""Alembic migrations of the registry (``versions/``); ``cloud.registry.db.upgrade`` runs them."""
