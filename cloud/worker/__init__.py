"""The Celery worker: the app, named tasks wrapping learning/ and fleet/, triggers, the rollout tick."""
