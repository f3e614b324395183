"""The registry: SQLAlchemy models, sessions, Alembic migrations and keyword-only CRUD functions."""
