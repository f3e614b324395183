"""Helpers and fixtures for the edge node tests: real .tflite models, a fake device, collectors."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_node import synthetic
from edge_node.node import EdgeNode
from shared.codec import encode_window
from shared.mqtt import MqttLink
from shared.schemas import (
    AckStatus,
    Command,
    CommandAck,
    DesiredAction,
    DesiredState,
    ModelManifest,
    Quantization,
    decode_message,
    encode_message,
)
from shared.settings import EdgeSettings, MqttSettings
from shared.signing import generate_keypair, load_private_key, sign_desired, sign_manifest
from shared.topics import Topics

CLASS_NAMES = list(synthetic.CLASS_NAMES)
CHANNELS = list(synthetic.CHANNELS)
WAIT_S = 60.0


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = WAIT_S) -> Any:
    """Poll until ``predicate()`` is truthy (a bounded wait for an outcome, not a speed assertion)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"gave up waiting for {what}")


@pytest.fixture(scope="session", name="edge_models")
def edge_models_fixture() -> dict[str, Path]:
    """The reference models, built once (TensorFlow in a subprocess) and cached by their sources' hash."""
    return synthetic.ensure_reference_models()


@dataclass
class Keys:
    private: Path
    public: Path
    key_id: str


@pytest.fixture(name="signing_keys")
def signing_keys_fixture(tmp_path: Path) -> Keys:
    priv, pub = tmp_path / "keys" / "cloud.key", tmp_path / "keys" / "cloud.pub"
    kid = generate_keypair(priv, pub)
    return Keys(priv, pub, kid)


def manifest_for(
    path: Path,
    version: str,
    *,
    keys: Keys | None = None,
    name: str = "vib",
    input_shape: list[int] | None = None,
    input_dtype: str = "float32",
    url: str | None = None,
    sha256: str | None = None,
    size_bytes: int | None = None,
) -> ModelManifest:
    content = path.read_bytes()
    manifest = ModelManifest(
        name=name,
        version=version,
        quantization=Quantization.INT8 if input_dtype == "int8" else Quantization.FLOAT32,
        sha256=sha256 or hashlib.sha256(content).hexdigest(),
        size_bytes=size_bytes or len(content),
        url=url or path.resolve().as_uri(),
        input_shape=input_shape or [synthetic.SAMPLES, len(CHANNELS)],
        input_dtype=input_dtype,  # type: ignore[arg-type]
        output_shape=[len(CLASS_NAMES)],
        output_dtype=input_dtype,  # type: ignore[arg-type]
        class_names=CLASS_NAMES,
        channels=CHANNELS,
    )
    if keys is not None:
        manifest = sign_manifest(manifest, load_private_key(keys.private), key_id=keys.key_id)
    return manifest


def signed_desired(
    edge_id: str,
    revision: int,
    manifest: ModelManifest | None,
    action: str = "deploy",
    *,
    keys: Keys,
    rollback_to: str | None = None,
    lifetime_s: float = 3600.0,
    **fields: Any,
) -> DesiredState:
    """A desired-state order signed by ``keys`` (as the cloud's ``signed_order`` makes them)."""
    issued = time.time()
    if action == "rollback" and rollback_to is None and manifest is not None:
        rollback_to = manifest.version
    order = DesiredState(
        edge_id=edge_id,
        revision=revision,
        action=DesiredAction(action),
        model=manifest,
        rollback_to=rollback_to,
        issued_at=fields.pop("issued_at", issued),
        expires_at=fields.pop("expires_at", issued + lifetime_s),
        **fields,
    )
    return sign_desired(order, load_private_key(keys.private), key_id=keys.key_id)


def desired(
    edge_id: str,
    revision: int,
    manifest: ModelManifest | None,
    action: str = "deploy",
    *,
    keys: Keys,
    rollback_to: str | None = None,
) -> bytes:
    """The payload of ``signed_desired``."""
    return encode_message(
        signed_desired(edge_id, revision, manifest, action, keys=keys, rollback_to=rollback_to)
    )


def edge_settings(
    broker_url: str,
    data_dir: Path,
    model: Path | None,
    *,
    cloud_url: str | None = None,
    public_key: Path | None = None,
    **extra: Any,
) -> EdgeSettings:
    model_section: dict[str, Any] = {"path": model, "class_names": CLASS_NAMES, "public_key": public_key}
    model_section.update(extra.pop("model", {}))
    data: dict[str, Any] = {
        "edge_id": "edge-1",
        "site_broker": MqttSettings(url=broker_url, reconnect_min_s=0.5, reconnect_max_s=1.0),
        "cloud_broker": MqttSettings(url=cloud_url, reconnect_min_s=0.5, reconnect_max_s=1.0)
        if cloud_url
        else None,
        "data_dir": data_dir,
        "model": model_section,
        "metrics": {"port": 0, "publish_interval_s": 0.5},
        "batching": {"max_batch": 16, "max_wait_ms": 1.0, "workers": 2},
        "uplink": {"random_fraction": 0.0, "low_confidence": 0.0, "min_margin": 0.0},
    }
    data.update(extra)
    return EdgeSettings(**data)


def make_window(
    device_id: str, seq: int, *, cls: int = 0, label: str | None = None, seed: int | None = None
) -> bytes:
    rng = np.random.default_rng(seq if seed is None else seed)
    values = synthetic.synthetic_window(cls, rng)
    return encode_window(
        device_id=device_id,
        seq=seq,
        ts=time.time(),
        sample_rate_hz=synthetic.SAMPLE_RATE_HZ,
        channels=CHANNELS,
        values=values,
        label=label,
    )


@contextlib.contextmanager
def running_node(
    settings: EdgeSettings, rules: list[Any] | None = None, observer: Any = None, *, wait_cloud: bool = True
) -> Iterator[EdgeNode]:
    node = EdgeNode(settings, rules=rules)
    node.observer = observer  # before start: redelivered windows arrive right on connect
    node.start()  # returns once the site link serves; the cloud link connects in the background
    try:
        if wait_cloud:  # QoS0 dead letters and metrics published before that would be dropped
            wait_for(lambda: node.cloud_link.connected, "the cloud link")
        yield node
    except BaseException:
        print(  # shown by pytest for a failing test
            "edge state:",
            node.snapshot(),
            "windows",
            node.stats.windows_total,
            "accepted",  # more accepted than classified: windows held inside the node
            node.ingest.accepted,
            "site connected",
            node.site_link.connected,
            node.site_link.connects,
            "cloud connected",
            node.cloud_link.connected,
            node.cloud_link.connects,
        )
        raise
    finally:
        node.stop()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def artifact_server(directory: Path) -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 serving ``directory``; yields its base URL."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


class Wire:
    """A test MQTT client (a real connection): publishes, and collects what arrives per topic filter."""

    def __init__(self, url: str, name: str, subscriptions: list[str] | None = None) -> None:
        self.link = MqttLink(MqttSettings(url=url, reconnect_min_s=0.5, reconnect_max_s=1.0), client_id=name)
        for topic in subscriptions or []:
            self.link.subscribe(topic, 1)  # sent in one SUBSCRIBE on connect
        self.link.connect()
        if subscriptions:
            assert self.link.wait_subscribed(), f"{name}: no SUBACK"
        self.messages: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.handlers: list[Callable[[str, bytes], None]] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self.link.inbox.get(timeout=0.05)
            except queue.Empty:
                continue
            with self._lock:
                self.messages.append((msg.topic, msg.payload))
            for handler in self.handlers:
                handler(msg.topic, msg.payload)

    def on(self, topic_suffix: str) -> list[bytes]:
        with self._lock:
            return [p for t, p in self.messages if t.endswith(topic_suffix)]

    def decoded(self, topic_suffix: str, cls: type[Any]) -> list[Any]:
        return [decode_message(p, cls) for p in self.on(topic_suffix)]

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self.link.publish(topic, payload, qos=qos, retain=retain)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.link.stop()


class FakeDevice(Wire):
    """A device that answers every command on its cmd topic with an ack (over the real broker)."""

    def __init__(self, url: str, device_id: str, status: AckStatus = AckStatus.OK) -> None:
        self.topics = Topics()
        super().__init__(url, f"fake-{device_id}", [self.topics.command(device_id)])
        self.device_id = device_id
        self.commands: list[Command] = []
        self.status = status
        self.handlers.append(self._answer)

    def _answer(self, topic: str, payload: bytes) -> None:
        if topic != self.topics.command(self.device_id):
            return
        command = decode_message(payload, Command)
        self.commands.append(command)
        ack = CommandAck(
            command_id=command.command_id,
            device_id=self.device_id,
            status=self.status,
            ok=self.status is AckStatus.OK,
        )
        self.link.publish(self.topics.ack(self.device_id), encode_message(ack), qos=1)

    def send(self, seq: int, **kwargs: Any) -> None:
        self.link.publish(
            self.topics.telemetry(self.device_id), make_window(self.device_id, seq, **kwargs), qos=1
        )


@dataclass
class Seen:
    """Records every window the node classified, with the model version that did it."""

    windows: list[tuple[str, int, str]] = field(default_factory=list)

    def __call__(self, items: list[Any], version: str) -> None:
        self.windows.extend((it.window.device_id, it.window.seq, version) for it in items)
