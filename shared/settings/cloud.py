"""Settings of the cloud tier (``edgefleet cloud ...`` and ``edgefleet model ...``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Self
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from shared.errors import ConfigError
from shared.settings.base import MqttSettings, TierSettings
from shared.signing import ORDER_LIFETIME_S


class Thresholds(BaseModel):
    """Labelling, gating and retraining thresholds."""

    model_config = ConfigDict(extra="forbid")

    pseudo_label_confidence: float = Field(
        default=0.9, gt=0, le=1, description="teacher confidence needed to pseudo-label an uplinked sample"
    )
    gate_margin: float = Field(
        default=0.01, ge=0, le=1, description="a candidate may be this much worse than production and pass"
    )
    gate_min_accuracy: float = Field(default=0.0, ge=0, le=1, description="absolute floor for any candidate")
    drift_accuracy_drop: float = Field(
        default=0.05, gt=0, le=1, description="retrain when edge accuracy falls this far below the baseline"
    )
    drift_confidence_drop: float = Field(
        default=0.10, gt=0, le=1, description="retrain when mean edge confidence falls this far"
    )
    new_labelled_samples: int = Field(default=500, ge=1, description="retrain after this many new labels")
    periodic_retrain_s: float = Field(default=86400.0, gt=0, description="retrain at least this often")
    trigger_check_s: float = Field(default=60.0, gt=0, description="how often beat checks the triggers")
    min_metrics_windows: int = Field(
        default=200, ge=1, description="labelled windows an edge must report before its accuracy counts"
    )


class IngestSettings(BaseModel):
    """Who the ingest trusts and how much it takes from each edge (``ingest`` section)."""

    model_config = ConfigDict(extra="forbid")

    require_enrolled_edges: bool = Field(
        default=True,
        description="store uplink only from enrolled, active edge identities and device reports only of "
        "enrolled, active devices the edge serves; anything else is dead-lettered (off: trust every "
        "edge id, a warning at start)",
    )
    max_payload_bytes: int = Field(
        default=1_048_576,
        ge=1024,
        le=16_777_216,
        description="a larger message is dead-lettered 'too_large' without being decoded",
    )
    edge_rate_per_s: float = Field(
        default=500.0, gt=0, description="messages per second each edge may send, sustained (token bucket)"
    )
    edge_burst: int = Field(
        default=5000, ge=1, description="messages an edge may send at once above its rate (bucket size)"
    )
    rejected_dead_letters_per_minute: int = Field(
        default=20,
        ge=0,
        description="rejected messages (rate_limited, too_large, unknown_edge, ...) stored as dead "
        "letters per edge per minute; the rest are only counted",
    )
    device_ttl_s: float = Field(
        default=3600.0,
        gt=0,
        description="a device its edge saw this recently stays that edge's: another edge's report of it "
        "is dead-lettered 'not_served' unless both edges are in the same registry group",
    )


class S3Settings(BaseModel):
    """An S3-compatible bucket that receives every published artifact and manifest.

    Edges download from ``public_base_url``: the URL is inside the signed manifest, which the registry
    keeps and re-sends on every deploy and rollback, so it must stay valid for as long as the model
    may be deployed (presigned URLs expire and are not offered). Edges check sha256 and the ed25519
    signature, so the URL need not be secret."""

    model_config = ConfigDict(extra="forbid")

    bucket: str = Field(min_length=3, max_length=63, description="must exist; it is not created")
    public_base_url: str = Field(
        description="http(s) URL edges download from; an object's URL is <public_base_url>/<key>, e.g. "
        "https://BUCKET.s3.REGION.amazonaws.com, https://minio.example:9000/BUCKET or a CDN"
    )
    endpoint_url: str | None = Field(
        default=None, description="S3 API endpoint for MinIO, Ceph RGW, R2, ...; default AWS for region"
    )
    prefix: str = Field(default="", description="key folder, e.g. 'edgefleet/models' (slashes trimmed)")
    region: str | None = Field(default=None, description="default: boto3's (AWS_DEFAULT_REGION, config)")
    access_key_id: SecretStr | None = Field(
        default=None, description="EDGEFLEET_S3__ACCESS_KEY_ID; unset: boto3's default credential chain"
    )
    secret_access_key: SecretStr | None = Field(
        default=None, description="EDGEFLEET_S3__SECRET_ACCESS_KEY; set together with access_key_id"
    )
    addressing_style: Literal["auto", "path", "virtual"] = Field(
        default="auto", description="'path' for most MinIO / Ceph deployments without wildcard DNS"
    )
    timeout_s: float = Field(default=30.0, gt=0, description="connect and read timeout of one request")
    max_attempts: int = Field(default=5, ge=1, le=20, description="tries per request (boto3 retries)")

    @model_validator(mode="after")
    def _check(self) -> Self:
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ValueError("access_key_id and secret_access_key go together")
        for name in ("public_base_url", "endpoint_url"):
            value = getattr(self, name)
            if value is not None and (
                urlsplit(value).scheme not in ("http", "https") or not urlsplit(value).netloc
            ):
                raise ValueError(f"{name} {value!r} must be an http(s):// URL")
        return self


class EnrollmentSettings(BaseModel):
    """What enrollment bundles tell devices, edges, services and operators (``edgefleet fleet enroll``)."""

    model_config = ConfigDict(extra="forbid")

    site_broker_url: str | None = Field(
        default=None,
        description="the broker's site listener as devices, edges and operators reach it, e.g. "
        "mqtts://broker.example:8883; default: broker.url",
    )
    cloud_broker_url: str | None = Field(
        default=None, description="the broker's cloud listener, for service identities; default: broker.url"
    )
    ca_file: Path | None = Field(
        default=None,
        description="PEM of the CA that signs the broker's TLS certificate, copied into bundles; "
        "default: broker.tls_ca",
    )
    claim_token_max_ttl_s: float = Field(
        default=30 * 86400.0, gt=0, description="longest lifetime a claim token may be given"
    )

    @model_validator(mode="after")
    def _check(self) -> Self:
        for name in ("site_broker_url", "cloud_broker_url"):
            value = getattr(self, name)
            if value is None:
                continue
            parts = urlsplit(value)
            if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl") or not parts.hostname:
                raise ValueError(f"{name} {value!r} must be an mqtt(s)://HOST[:PORT] URL")
            if parts.username or parts.password:
                raise ValueError(f"{name}: no credentials in the URL (bundles carry their own)")
        return self


class CloudSettings(TierSettings):
    """Settings of the cloud services: registry, Celery, broker, artifacts, keys, thresholds."""

    data_dir: Path = Field(default=Path("var/cloud"), description="registry file, artifacts, dev keys")
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; default sqlite:///<data_dir>/registry.db"
    )
    redis_url: str = Field(default="redis://127.0.0.1:6379/0", description="Celery broker and result backend")
    celery_broker_url: str | None = Field(
        default=None,
        description="overrides redis_url for the broker, e.g. sqla+sqlite:///var/cloud/celery.db",
    )
    celery_result_url: str | None = Field(default=None, description="overrides redis_url for results")
    broker: MqttSettings = Field(default_factory=MqttSettings, description="the cloud MQTT broker")
    enrollment: EnrollmentSettings = Field(
        default_factory=EnrollmentSettings, description="broker URLs and CA written into enrollment bundles"
    )
    artifact_dir: Path | None = Field(default=None, description="default <data_dir>/artifacts")
    artifact_base_url: str | None = Field(
        default=None, description="http(s) URL the artifact server is reachable at; default file:// URLs"
    )
    artifact_host: str = "127.0.0.1"
    artifact_port: int = Field(default=8765, ge=0, le=65535)
    s3: S3Settings | None = Field(
        default=None, description="also publish artifacts to an S3-compatible bucket (extra 's3')"
    )
    signing_private_key: Path | None = Field(default=None, description="ed25519 PEM; dev mode: generated")
    signing_public_key: Path | None = None
    signing_keys_dir: Path | None = Field(
        default=None,
        description="the key ring (ring.json and rotated key pairs); default the signing key's directory",
    )
    desired_ttl_s: float = Field(
        default=ORDER_LIFETIME_S, gt=0, description="lifetime of a signed desired-state order (expires_at)"
    )
    thresholds: Thresholds = Field(default_factory=Thresholds)
    ingest_batch: int = Field(default=200, ge=1, le=100_000, description="messages per registry transaction")
    ingest_flush_s: float = Field(default=0.5, gt=0)
    ingest: IngestSettings = Field(
        default_factory=IngestSettings, description="the ingest's trust in edges and per-edge limits"
    )
    task_time_limit_s: float = Field(default=1800.0, gt=0)

    @model_validator(mode="after")
    def _keys(self) -> Self:
        # The public key alone is fine for a verifier; a private key without its public key is not.
        if self.signing_private_key is not None and self.signing_public_key is None:
            raise ValueError("signing_private_key needs signing_public_key")
        return self

    @property
    def resolved_database_url(self) -> str:
        """The SQLAlchemy URL of the registry (default: SQLite under ``data_dir``)."""
        return self.database_url or f"sqlite:///{(self.data_dir / 'registry.db').resolve()}"

    @property
    def resolved_artifact_dir(self) -> Path:
        """Where model artifacts are stored (default: under ``data_dir``)."""
        return self.artifact_dir or self.data_dir / "artifacts"

    @property
    def resolved_broker_url(self) -> str:
        """Celery's broker URL (default: the Redis URL)."""
        return self.celery_broker_url or self.redis_url

    @property
    def resolved_result_url(self) -> str:
        """Celery's result backend URL (default: the Redis URL)."""
        return self.celery_result_url or self.redis_url

    @property
    def resolved_keys_dir(self) -> Path:
        """Where the signing key ring lives (default: the directory of the signing key)."""
        return self.signing_keys_dir or self.key_paths()[0].parent

    def key_paths(self) -> tuple[Path, Path]:
        """The signing key pair's paths; in dev mode they default to files under ``data_dir``."""
        if self.signing_private_key is not None and self.signing_public_key is not None:
            return self.signing_private_key, self.signing_public_key
        if self.dev_mode:
            keys = self.data_dir / "keys"
            return keys / "signing.key", keys / "signing.pub"
        raise ConfigError(
            "no signing key configured: set signing_private_key and signing_public_key "
            "(edgefleet cloud keygen writes a pair), or dev_mode for generated development keys"
        )
