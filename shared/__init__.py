"""The edgefleet wire contract: message schemas, topics, the telemetry codec, settings and MQTT.

Everything that crosses a process boundary is defined here and only here.
"""

from shared.errors import (
    CodecError,
    ConfigError,
    EdgefleetError,
    SchemaError,
    SignatureError,
    TopicError,
)

__all__ = [
    "CodecError",
    "ConfigError",
    "EdgefleetError",
    "SchemaError",
    "SignatureError",
    "TopicError",
]

__version__ = "0.1.0"
