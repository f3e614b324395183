"""One exception hierarchy for the whole project; lower-level errors are mapped at the boundary."""

from __future__ import annotations


class EdgefleetError(Exception):
    """Base of every error edgefleet raises on purpose."""


class ConfigError(EdgefleetError):
    """A settings file, environment variable or option is invalid."""


class TopicError(EdgefleetError, ValueError):
    """A topic or an id used in a topic is malformed."""


class CodecError(EdgefleetError, ValueError):
    """A binary telemetry payload is malformed; ``field`` names the part that was wrong."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = message


class SchemaError(EdgefleetError, ValueError):
    """A JSON control message does not match any schema of the contract."""


class SignatureError(EdgefleetError):
    """A model manifest signature is missing or does not verify."""


class MqttError(EdgefleetError):
    """The MQTT client could not connect, subscribe or publish."""


class BrokerError(EdgefleetError):
    """A private broker (``shared.private_broker``) is not installed, did not start or did not listen."""
