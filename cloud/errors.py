"""Errors of the cloud tier, all under ``EdgefleetError``."""

from __future__ import annotations

from shared.errors import EdgefleetError


class CloudError(EdgefleetError):
    """Base of cloud-tier errors."""


class NotFoundError(CloudError):
    """A registry record that was asked for does not exist."""


class DatasetError(CloudError):
    """A dataset cannot be loaded or is malformed."""


class TrainingError(CloudError):
    """Training, compression or evaluation failed."""


class PublishError(CloudError):
    """An artifact could not be stored, signed or announced."""


class RolloutError(CloudError):
    """A rollout cannot be started or changed as asked."""


class CommandRequestError(CloudError):
    """Targets or arguments of a command sent to devices are wrong."""


class DeviceConfigError(CloudError):
    """A desired device config the registry refuses (unknown or restart-only setting), or one the
    broker did not take."""


class DeviceConfigUnpublishedError(DeviceConfigError):
    """The revision is recorded but the broker did not take it; beat publishes it later."""


class AuthError(CloudError):
    """No usable credentials: a missing, unknown or revoked token (HTTP 401)."""


class PermissionDeniedError(AuthError):
    """Valid credentials whose role may not do what was asked (HTTP 403)."""


class MalformedMessageError(CloudError):
    """A message the ingest cannot store; the reason is counted and dead-lettered."""


class DemoError(CloudError):
    """The demo cannot start or run its topology."""


class SupervisorError(DemoError):
    """A process of the demo's topology could not be started or died."""


class DemoInterruptedError(DemoError):
    """The demo was stopped by a signal (Ctrl-C or SIGTERM)."""
