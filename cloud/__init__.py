"""The cloud tier: registry, ingest, Celery training pipeline, artifact publishing."""
