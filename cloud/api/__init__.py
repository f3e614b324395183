"""The admin HTTP API (FastAPI): fleet, commands, models, rollouts, and artifact download for edges."""

from cloud.api.app import create_app

__all__ = ["create_app"]
