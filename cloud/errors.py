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
