"""Settings plumbing shared by every tier: YAML + environment loading and the MQTT connection."""

from __future__ import annotations

import contextvars
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Self, TypeVar
from urllib.parse import unquote, urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from shared.errors import ConfigError
from shared.redact import redact_url
from shared.topics import DEFAULT_PREFIX, Topics

_yaml_file: contextvars.ContextVar[Path | None] = contextvars.ContextVar("edgefleet_yaml_file", default=None)


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    """The parts of a broker URL: host, port, TLS and credentials."""

    host: str
    port: int
    tls: bool
    username: str | None
    password: str | None


def parse_broker_url(url: str) -> BrokerAddress:
    """Parse ``mqtt://[user[:pass]@]host[:port]`` (``mqtts://`` for TLS, default ports 1883 / 8883)."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise ConfigError(f"broker URL {redact_url(url)!r}: scheme must be mqtt:// or mqtts://")
    tls = parts.scheme in ("mqtts", "ssl")
    if not parts.hostname:
        raise ConfigError(f"broker URL {redact_url(url)!r}: no host")
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError as exc:
        raise ConfigError(f"broker URL {redact_url(url)!r}: bad port") from exc
    return BrokerAddress(
        host=parts.hostname,
        port=port,
        tls=tls,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
    )


class MqttSettings(BaseModel):
    """One MQTT connection. Credentials in the URL are accepted but ``username``/``password`` win."""

    model_config = ConfigDict(extra="forbid")

    url: str = "mqtt://127.0.0.1:1883"
    username: str | None = None
    password: SecretStr | None = None
    tls_ca: Path | None = Field(default=None, description="CA bundle; setting it (or mqtts://) turns on TLS")
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_insecure: bool = Field(default=False, description="skip hostname verification (testing only)")
    keepalive_s: int = Field(default=30, ge=5, le=3600)
    reconnect_min_s: float = Field(default=0.5, gt=0)
    reconnect_max_s: float = Field(default=30.0, gt=0)
    max_inflight: int = Field(default=200, ge=1, le=65535)
    topic_prefix: str = DEFAULT_PREFIX

    @model_validator(mode="after")
    def _check(self) -> Self:
        try:
            parse_broker_url(self.url)
        except ConfigError as exc:  # a ValueError, so pydantic reports it with the file and field
            raise ValueError(str(exc)) from exc
        Topics(self.topic_prefix)
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must be >= reconnect_min_s")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        return self

    @property
    def address(self) -> BrokerAddress:
        """The broker URL, parsed."""
        return parse_broker_url(self.url)

    @property
    def topics(self) -> Topics:
        """The topic names under this broker's prefix."""
        return Topics(self.topic_prefix)

    @property
    def use_tls(self) -> bool:
        """Whether to connect with TLS (``mqtts://`` or a CA file given)."""
        return self.address.tls or self.tls_ca is not None

    def credentials(self) -> tuple[str | None, str | None]:
        """Username and password: the explicit settings first, else those in the URL."""
        addr = self.address
        user = self.username or addr.username
        password = self.password.get_secret_value() if self.password else addr.password
        return user, password


class TierSettings(BaseSettings):
    """Base of each tier's settings class."""

    model_config = SettingsConfigDict(
        env_prefix="EDGEFLEET_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    dev_mode: bool = Field(
        default=False, description="allow built-in development secrets; never in production"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,  # noqa: ARG003  (pydantic-settings' signature)
        file_secret_settings: PydanticBaseSettingsSource,  # noqa: ARG003
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Precedence: init arguments, then environment, then the YAML file, then defaults."""
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _yaml_file.get()
        if path is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=path))
        return tuple(sources)


S = TypeVar("S", bound=TierSettings)


def _drop_none(data: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            nested = _drop_none(value)
            if nested:
                out[key] = nested
        elif value is not None:
            out[key] = value
    return out


def load_settings(cls: type[S], config_file: Path | str | None = None, **overrides: Any) -> S:
    """Build ``cls`` from the YAML file, the environment and ``overrides`` (``None`` values ignored).

    Errors are raised as ``ConfigError`` naming the file and every field that was wrong.
    """
    path = Path(config_file) if config_file is not None else None
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
    token = _yaml_file.set(path)
    try:
        return cls(**_drop_none(overrides))
    except ValidationError as exc:
        where = f" (file {path})" if path else ""
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"invalid {cls.__name__}{where}: {problems}") from exc
    finally:
        _yaml_file.reset(token)
