"""The registry: SQLAlchemy models, sessions, migrations and every query (keyword-only CRUD)."""
