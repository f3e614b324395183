"""Settings of the device agent (``edgefleet agent run``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.codec import MAX_SAMPLES
from shared.enrollment import identity_in_bundle
from shared.settings.base import MqttSettings, TierSettings
from shared.topics import ID_PATTERN

# Settings a running agent may change (``set_config`` command, desired config); the rest need a
# restart. ``sensor`` only as ``{"options": {...}}``.
RUNTIME_SETTINGS: Final = frozenset(
    {
        "rate_hz",
        "window",
        "hop",
        "encoding",
        "int16_scale",
        "send_labels",
        "heartbeat_interval_s",
        "outbox_max_windows",
        "outbox_max_age_s",
        "max_in_flight",
        "log_level",
        "sensor",
    }
)


class SensorSettings(BaseModel):
    """Which sensor to run and its options; each sensor class validates its own ``options``."""

    model_config = ConfigDict(extra="forbid")

    kind: str = "simulated"
    options: dict[str, Any] = Field(default_factory=dict)


class AgentSettings(TierSettings):
    """Settings of one device agent (YAML file, ``EDGEFLEET_*`` environment, options)."""

    device_id: str = Field(pattern=ID_PATTERN)
    broker: MqttSettings = Field(default_factory=MqttSettings)
    sensor: SensorSettings = Field(default_factory=SensorSettings)
    rate_hz: float = Field(default=100.0, gt=0, le=100_000, description="samples per second per channel")
    window: int = Field(default=100, ge=1, le=MAX_SAMPLES, description="samples per window")
    hop: int | None = Field(default=None, ge=1, description="samples between window starts (default: window)")
    encoding: Literal["float32", "int16"] = "float32"
    int16_scale: float = Field(default=0.001, gt=0, description="value per int16 step when encoding is int16")
    send_labels: bool = Field(
        default=True, description="attach the simulator's ground truth as evaluation metadata"
    )
    data_dir: Path = Field(default=Path("var/agent"), description="outbox, sequence and command state")
    outbox_max_windows: int = Field(default=200_000, ge=10)
    outbox_max_age_s: float = Field(default=7 * 86400.0, gt=0)
    heartbeat_interval_s: float = Field(default=10.0, gt=0)
    actuator: str = Field(default="log", description="actuator plugin for 'actuate' commands")
    command_ttl_cap_s: float = Field(default=86400.0, gt=0, description="longest expiry accepted")
    max_in_flight: int = Field(
        default=20, ge=1, le=1000, description="windows published but not yet PUBACKed, at most"
    )
    enrollment_file: Path | None = Field(
        default=None,
        description="this device's enrollment bundle (edgefleet fleet enroll --out, or written by a claim): "
        "broker username, password, client id, CA and (unless broker.url is set) the broker URL come from "
        "it; device_id defaults to its identity",
    )
    claim_token_file: Path | None = Field(
        default=None,
        description="a file holding ONE claim token (TOKEN_ID.SECRET, edgefleet fleet enroll-token create): "
        "on first start, when enrollment_file does not exist yet, the agent claims its identity with it "
        "and writes enrollment_file (0600). Each device needs its own token",
    )
    claim_timeout_s: float = Field(
        default=120.0, gt=0, le=3600, description="give up a claim that got no answer after this long"
    )
    claim_sync_timeout_s: float = Field(
        default=120.0,
        gt=0,
        le=3600,
        description="after a claim, wait at most this long for the broker to accept the new identity",
    )
    client_id: str | None = Field(
        default=None,
        max_length=128,
        description="MQTT client id (default ef-dev-<device_id>; an enrollment bundle sets its username, "
        "which a broker with use_username_as_clientid forces anyway)",
    )
    command_inbox_max: int = Field(
        default=1000,
        ge=1,
        le=100_000,
        description="commands and desired configs received but not yet handled, at most; beyond it "
        "they are dropped (the sender gets no ack) and counted",
    )
    hold_unrouted: bool = Field(
        default=True,
        description="speak MQTT 5 and keep a window the broker accepted but routed to no subscriber "
        "(no edge subscribed yet, e.g. right after a broker restart: mosquitto does not restore "
        "shared subscriptions) in the outbox, sending it again a moment later; off: MQTT 3.1.1, a "
        "PUBACK alone means delivered",
    )

    @model_validator(mode="before")
    @classmethod
    def _device_id_from_bundle(cls, data: Any) -> Any:
        # An enrolled device needs no separate device_id: it is the bundle's identity.
        if isinstance(data, dict) and not data.get("device_id") and data.get("enrollment_file"):
            identity = identity_in_bundle(Path(data["enrollment_file"]))
            if identity is not None:
                return {**data, "device_id": identity}
        return data

    @model_validator(mode="after")
    def _hop(self) -> Self:
        if self.hop is not None and self.hop > self.window * 64:
            raise ValueError("hop may be at most 64 windows long")
        return self

    @property
    def effective_hop(self) -> int:
        """Samples between window starts: ``hop``, or the window length when unset."""
        return self.hop or self.window
