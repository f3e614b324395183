"""The cloud tier: registry, ingest, learning on Celery, fleet operations, the admin API and CLI."""
