"""Errors of the edge node, under the project's one hierarchy (``shared.errors.EdgefleetError``)."""

from __future__ import annotations

from shared.errors import EdgefleetError


class EdgeError(EdgefleetError):
    """Base of edge-node errors."""


class BackendError(EdgeError):
    """No backend could be loaded, or a model could not be run."""


class ModelError(EdgeError):
    """A model artifact is unusable: wrong shapes or dtypes, not loadable, or bad outputs."""


class DeployError(EdgeError):
    """A deployment order could not be carried out; the message says which check failed."""
