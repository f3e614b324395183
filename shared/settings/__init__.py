"""Settings, one class per tier: a YAML file, then ``EDGEFLEET_*`` environment variables, then options.

Precedence, highest first: command-line options, environment (``EDGEFLEET_BROKER__URL``; ``__``
separates nested fields), the YAML file given with ``--config``, defaults.
"""

from shared.settings.agent import AgentSettings, SensorSettings
from shared.settings.base import MqttSettings, TierSettings, load_settings, parse_broker_url
from shared.settings.cloud import CloudSettings, Thresholds
from shared.settings.edge import EdgeSettings

__all__ = [
    "AgentSettings",
    "CloudSettings",
    "EdgeSettings",
    "MqttSettings",
    "SensorSettings",
    "Thresholds",
    "TierSettings",
    "load_settings",
    "parse_broker_url",
]
