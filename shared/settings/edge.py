"""Settings of the edge node (``edgefleet edge run``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from shared.codec import DESCRIPTOR_CACHE_MAX_BYTES
from shared.enrollment import identity_in_bundle
from shared.schemas import ID_PATTERN, Privacy
from shared.settings.base import MqttSettings, TierSettings

BackendName = Literal["auto", "ai-edge-litert", "tflite-runtime", "tensorflow"]


class RuntimeSettings(BaseModel):
    """Which LiteRT backend runs the model, and how."""

    model_config = ConfigDict(extra="forbid")

    backend: BackendName = Field(
        default="auto", description="auto tries ai-edge-litert, then tflite-runtime, then tensorflow.lite"
    )
    num_threads: int = Field(default=1, ge=1, le=64, description="threads per interpreter")
    xnnpack: bool = Field(default=True, description="use the XNNPACK CPU delegate (3-6x faster on int8)")
    delegate: str | None = Field(default=None, description="path of an external delegate library (Edge TPU)")
    delegate_options: dict[str, str] = Field(default_factory=dict)


class BatchSettings(BaseModel):
    """How inference batches windows, and how many workers run them."""

    model_config = ConfigDict(extra="forbid")

    max_batch: int = Field(default=64, ge=1, le=4096)
    max_wait_ms: float = Field(
        default=0.0,
        ge=0,
        le=1000,
        description="wait for more windows once one is in; 0 takes what is queued (it grows under load)",
    )
    workers: int = Field(default=1, ge=1, le=64, description="inference threads, one interpreter each")
    queue_max: int = Field(default=100_000, ge=1, description="windows waiting for inference before dropping")
    inbox_max: int = Field(
        default=20_000,
        ge=1,
        le=1_000_000,
        description="site messages received but not yet taken by a worker, at most. Beyond it, with "
        "ack_after_decision, QoS1 telemetry is left un-PUBACKed on the broker and redelivered once the "
        "edge has caught up (the site link reconnects); otherwise it is dropped; counted either way "
        "(edge_inbox_full_total)",
    )
    ack_after_decision: bool = Field(
        default=True,
        description="PUBACK a telemetry message only once its window is decided: a crash loses nothing "
        "(the broker redelivers); needs the broker's max_inflight_messages well above max_batch",
    )


class CacheSettings(BaseModel):
    """The cache of results for windows seen before."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    max_entries: int = Field(default=4096, ge=1)


class UplinkSettings(BaseModel):
    """Hard-example mining and the durable uplink queue."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    low_confidence: float = Field(default=0.6, ge=0, le=1, description="top-1 probability below this is hard")
    min_margin: float = Field(default=0.2, ge=0, le=1, description="top1 - top2 below this is hard")
    random_fraction: float = Field(default=0.001, ge=0, le=1, description="share of ordinary windows sent")
    budget_per_minute: int = Field(default=120, ge=0, description="samples queued per minute, at most")
    privacy: Privacy = Privacy.FULL
    queue_max: int = Field(default=50_000, ge=1, description="rows on disk; the oldest go first when full")
    inflight_max: int = Field(default=100, ge=1, description="unacknowledged uplink publishes")


class ModelSettings(BaseModel):
    """The model to start with when no deployed model is on disk yet."""

    model_config = ConfigDict(extra="forbid")

    path: Path | None = Field(default=None, description="a .tflite file for local use")
    manifest: Path | None = Field(default=None, description="its ModelManifest (JSON); optional")
    class_names: list[str] | None = Field(
        default=None, description="class names when there is no manifest (default class_0, class_1, ...)"
    )
    public_key: Path | None = Field(
        default=None,
        description="the cloud's ed25519 public key (PEM): the root of the edge's key ring, which learns "
        "rotations and revocations the cloud announces signed by a key it already trusts",
    )
    trusted_keys_dir: Path | None = Field(
        default=None, description="a directory of further trusted public keys (*.pub / *.pem)"
    )
    require_signature: bool = Field(
        default=True,
        description="refuse desired-state orders and deployed models without a valid signature by a "
        "key of the ring (local --model is trusted); false is for development only",
    )
    warmup_windows: int = Field(default=8, ge=1, le=1024)
    download_timeout_s: float = Field(default=60.0, gt=0)
    download_token: SecretStr | None = Field(
        default=None,
        description="bearer token (role 'edge', `edgefleet admin token create`) sent with http(s) "
        "artifact downloads, for manifests that point at the cloud API's /v1/artifacts",
    )
    max_artifact_bytes: int = Field(default=256 * 1024 * 1024, gt=0)


class MetricsSettings(BaseModel):
    """The Prometheus endpoint and the periodic metrics message."""

    model_config = ConfigDict(extra="forbid")

    port: int = Field(default=9400, ge=0, le=65535, description="Prometheus port; 0 disables the endpoint")
    bind: str = Field(default="127.0.0.1", description="address the endpoint listens on")
    publish_interval_s: float = Field(default=10.0, gt=0, description="EdgeMetrics on the metrics topic")


class EdgeSettings(TierSettings):
    """Settings of one edge node (YAML file, ``EDGEFLEET_*`` environment, options)."""

    edge_id: str = Field(pattern=ID_PATTERN)
    site_broker: MqttSettings = Field(
        default_factory=MqttSettings, description="devices: telemetry, commands"
    )
    cloud_broker: MqttSettings | None = Field(
        default=None,
        description="cloud: desired state, status, decisions, samples (default: the site broker)",
    )
    enrollment_file: Path | None = Field(
        default=None,
        description="this edge's enrollment bundle (edgefleet fleet enroll EDGE --kind edge --out FILE): "
        "the site and cloud links log in with its identity (as EDGE/site, EDGE/cloud, EDGE/site-K, ...) "
        "and password, trust its CA, and connect to its broker URL unless site_broker.url / cloud_broker "
        "are set; its cloud public key (written beside it) is model.public_key unless that is set; "
        "edge_id defaults to its identity",
    )
    share_group: str | None = Field(default=None, description="split a site's devices: $share/<group>/...")
    processes: Annotated[int, Field(ge=1, le=256)] | Literal["auto"] = Field(
        default="auto",
        description="worker processes of this edge (auto: one per CPU it may use); above 1 a supervisor "
        "runs them in one shared-subscription group under one edge identity",
    )
    data_dir: Path = Field(default=Path("var/edge"), description="models, uplink queue, state")
    model: ModelSettings = Field(default_factory=ModelSettings)
    rules_file: Path | None = Field(default=None, description="YAML rules file")
    runtime: RuntimeSettings = Field(default_factory=RuntimeSettings)
    batching: BatchSettings = Field(default_factory=BatchSettings)
    cache: CacheSettings = Field(default_factory=CacheSettings)
    uplink: UplinkSettings = Field(default_factory=UplinkSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    decoder_cache_max_bytes: int = Field(
        default=DESCRIPTOR_CACHE_MAX_BYTES,
        ge=0,
        le=1024 * 1024 * 1024,
        description="the telemetry decoder's cache of validated window descriptors (device id, "
        "channels, shape), least recently used evicted beyond this many bytes; 0 disables it",
    )
    dedup_window: int = Field(default=1024, ge=1, le=1_000_000, description="seqs remembered per device")
    dedup_max_devices: int = Field(default=100_000, ge=1)
    device_ttl_s: float = Field(
        default=3600.0,
        ge=60,
        description="a device silent this long is forgotten: dedup state, rule state (kept at least a "
        "rule's cooldown), the device table and devices seen; a window of it after that is new to the edge",
    )
    command_ttl_s: float = Field(default=30.0, gt=0)
    dead_letter_qos: Literal[0, 1] = 0
    gil_switch_interval_ms: float | None = Field(
        default=None,
        gt=0,
        le=100,
        description="sys.setswitchinterval for the edge process (None: Python's 5 ms). 0.5 ms cut tail "
        "latency in our runs but cost ~30% throughput: paho and the workers share one GIL",
    )

    @model_validator(mode="before")
    @classmethod
    def _edge_id_from_bundle(cls, data: Any) -> Any:
        # An enrolled edge needs no separate edge_id: it is the bundle's identity.
        if isinstance(data, dict) and not data.get("edge_id") and data.get("enrollment_file"):
            identity = identity_in_bundle(Path(data["enrollment_file"]))
            if identity is not None:
                return {**data, "edge_id": identity}
        return data

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.model.manifest is not None and self.model.path is None:
            raise ValueError("model.manifest needs model.path")
        return self

    @property
    def process_count(self) -> int:
        """``processes`` resolved: ``auto`` is the number of CPUs this process may run on (at least 1)."""
        if self.processes != "auto":
            return self.processes
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # not Linux
            return max(1, os.cpu_count() or 1)

    @property
    def worker_share_group(self) -> str:
        """The shared-subscription group of this edge's worker processes: ``share_group``, else
        ``edgefleet-<edge_id>`` (so the workers split the site's telemetry between themselves)."""
        return self.share_group or f"edgefleet-{self.edge_id}"

    @property
    def cloud(self) -> MqttSettings:
        """The cloud link's broker: ``cloud_broker``, or the site broker when unset."""
        return self.cloud_broker if self.cloud_broker is not None else self.site_broker
