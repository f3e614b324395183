"""``edgefleet bench rollout --edges 50 [--devices-per-edge K] --json``: a model rollout to N edges
with no canary wait, under continuous telemetry, measured end to end.

One private mosquitto; N edge nodes run IN THIS PROCESS (threads: each a real ``EdgeNode`` with its
own MqttLinks and LiteRT interpreter, its own site topic prefix), because 50 edge processes each
importing LiteRT do not fit 2 cores; the real ingest (registry on SQLite) and the real rollout engine
(ticked in-process, as ``rollout start`` does) drive it. Prints one JSON object:

- ``seconds_to_all_serving``: from the rollout's start to the registry showing every edge reporting
  the new version (what an operator sees in ``fleet ls``);
- ``windows_lost`` / ``windows_duplicated``: windows sent that no edge classified / classified twice;
- ``max_stall_ms``: the worst device-timestamp -> classification delay of any window sent during
  the rollout (a swap that stalled a batch shows here)."""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import click
import numpy as np

from edge_node import synthetic
from edge_node.synthetic import ensure_reference_models
from shared.topics import Topics

logger = logging.getLogger(__name__)

FEED_HZ_PER_DEVICE = 10.0
DRAIN_S = 5.0
SETTLE_S = 1.0


def register(settings: Any, source: Path, version: str, *, name: str = "vib") -> str:
    """Store, sign and register ``source`` as ``name@version`` (what the pipeline's publish step does)."""
    from cloud.artifacts import store_for  # noqa: PLC0415  (pydantic: not for --help)
    from cloud.fleet.desired_state import sign  # noqa: PLC0415  (pydantic: not for --help)
    from cloud.registry import crud  # noqa: PLC0415  (SQLAlchemy: not for --help)
    from cloud.registry.db import session_scope  # noqa: PLC0415  (SQLAlchemy: not for --help)
    from shared.schemas import ModelManifest, Quantization  # noqa: PLC0415  (pydantic: not for --help)

    store = store_for(settings)
    content = source.read_bytes()
    sha = hashlib.sha256(content).hexdigest()
    path = store.put(source, name=name, version=version, sha256=sha)
    manifest = ModelManifest(
        name=name,
        version=version,
        quantization=Quantization.FLOAT32,
        sha256=sha,
        size_bytes=len(content),
        url=store.url(name, version),
        input_shape=[synthetic.SAMPLES, len(synthetic.CHANNELS)],
        input_dtype="float32",
        output_shape=[len(synthetic.CLASS_NAMES)],
        output_dtype="float32",
        class_names=list(synthetic.CLASS_NAMES),
        channels=list(synthetic.CHANNELS),
    )
    manifest = sign(manifest, settings)
    with session_scope(settings.resolved_database_url) as session:
        model = crud.create_model_version(
            session,
            name=name,
            version=version,
            variant="float32",
            artifact_path=str(path),
            quantization="float32",
        )
        model.manifest = manifest.model_dump(mode="json")
        model.signature = manifest.signature
        model.key_id = manifest.key_id
        model.artifact_sha256 = sha
        model.artifact_size = len(content)
    return f"{name}@{version}"


class Recorder:
    """Every window any edge classified: (device, seq) -> count, and the worst delay."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: Counter[tuple[str, int]] = Counter()
        self.delays: list[tuple[float, float]] = []  # (window ts, delay s)

    def __call__(self, items: list[Any], _version: str) -> None:
        """Count one batch an edge classified and the delay of each window (``EdgeNode.observer``)."""
        now = time.time()
        with self.lock:
            for item in items:
                self.seen[(item.window.device_id, item.window.seq)] += 1
                self.delays.append((item.window.ts, now - item.window.ts))


def run(edges: int, devices_per_edge: int, workdir: Path) -> dict[str, Any]:
    """Start the whole topology in ``workdir``, move every edge to v1, then measure the rollout of
    v2 under telemetry: the JSON object ``edgefleet bench rollout`` prints."""
    from cloud.fleet import rollouts  # noqa: PLC0415  (SQLAlchemy: not for --help)
    from cloud.ingest import Ingest  # noqa: PLC0415  (SQLAlchemy: not for --help)
    from cloud.registry import fleet  # noqa: PLC0415  (SQLAlchemy: not for --help)
    from cloud.registry.db import session_scope, upgrade  # noqa: PLC0415  (SQLAlchemy: not for --help)
    from edge_node.bench import private_mosquitto  # noqa: PLC0415  (the edge tier: not for --help)
    from edge_node.node import EdgeNode  # noqa: PLC0415  (the edge tier: not for --help)
    from shared.codec import encode_window  # noqa: PLC0415  (pydantic: not for --help)
    from shared.mqtt import MqttLink  # noqa: PLC0415  (pydantic, paho: not for --help)
    from shared.settings import EdgeSettings, MqttSettings  # noqa: PLC0415  (pydantic: not for --help)
    from shared.settings.cloud import CloudSettings  # noqa: PLC0415  (pydantic: not for --help)

    models = ensure_reference_models()
    with private_mosquitto(workdir) as port:
        url = f"mqtt://127.0.0.1:{port}"
        settings = CloudSettings(
            data_dir=workdir / "cloud",
            database_url=f"sqlite:///{workdir / 'registry.db'}",
            broker=MqttSettings(url=url),
            dev_mode=True,
        )
        upgrade(settings.resolved_database_url)
        old_ref = register(settings, models["float32"], "1.0.0")
        new_ref = register(settings, models["float32_v2"], "2.0.0")
        _, public_key = settings.key_paths()
        edge_ids = [f"edge-{i:03d}" for i in range(edges)]
        recorder = Recorder()
        nodes = []
        ingest = Ingest(settings)
        ingest_thread = threading.Thread(target=ingest.run, daemon=True)
        ingest_thread.start()
        feeder = MqttLink(MqttSettings(url=url), client_id="bench-feeder")
        stop_feed = threading.Event()
        sent: list[tuple[str, int]] = []
        try:
            # Every edge starts on v1 through the same engine (one wave), then v2 is measured.
            for edge_id in edge_ids:
                node = EdgeNode(
                    EdgeSettings(
                        edge_id=edge_id,
                        site_broker=MqttSettings(url=url, topic_prefix=f"site-{edge_id}/v1"),
                        cloud_broker=MqttSettings(url=url),
                        data_dir=workdir / edge_id,
                        model={"class_names": list(synthetic.CLASS_NAMES), "public_key": public_key},
                        metrics={"port": 0, "publish_interval_s": 1.0},
                        batching={"max_batch": 16, "max_wait_ms": 2.0, "workers": 1},
                        uplink={"enabled": False},
                    )
                )
                node.observer = recorder
                node.start()
                nodes.append(node)
            _converge(settings, rollouts, fleet, session_scope, old_ref, edge_ids, "1.0.0", timeout=300)
            feeder.connect()
            devices = [
                (Topics(f"site-{edge_id}/v1").telemetry(f"{edge_id}-d{k}"), f"{edge_id}-d{k}")
                for edge_id in edge_ids
                for k in range(devices_per_edge)
            ]
            rng = np.random.default_rng(0)
            samples = [synthetic.synthetic_window(i % 4, rng) for i in range(16)]

            def feed() -> None:
                seq = 0
                period = 1.0 / FEED_HZ_PER_DEVICE
                while not stop_feed.is_set():
                    seq += 1
                    for topic, device in devices:
                        payload = encode_window(
                            device_id=device,
                            seq=seq,
                            ts=time.time(),
                            sample_rate_hz=synthetic.SAMPLE_RATE_HZ,
                            channels=list(synthetic.CHANNELS),
                            values=samples[seq % len(samples)],
                        )
                        feeder.publish(topic, payload, qos=1)
                        sent.append((device, seq))
                    stop_feed.wait(period)

            feed_thread = threading.Thread(target=feed, daemon=True)
            feed_thread.start()
            time.sleep(SETTLE_S)
            started_wall = time.time()
            started = time.monotonic()
            seconds = _converge(
                settings, rollouts, fleet, session_scope, new_ref, edge_ids, "2.0.0", timeout=300
            )
            time.sleep(SETTLE_S)
            stop_feed.set()
            feed_thread.join(10)
            deadline = time.monotonic() + DRAIN_S * 6
            expected = set(sent)
            while time.monotonic() < deadline:
                with recorder.lock:
                    if expected <= set(recorder.seen):
                        break
                time.sleep(0.1)
            time.sleep(0.5)
            with recorder.lock:
                seen = dict(recorder.seen)
                stall = max((d for ts, d in recorder.delays if ts >= started_wall), default=0.0)
            lost = sum(1 for key in expected if key not in seen)
            duplicated = sum(count - 1 for key, count in seen.items() if key in expected and count > 1)
            return {
                "edges": edges,
                "devices_per_edge": devices_per_edge,
                "edge_mode": "in-process threads (real EdgeNode, MqttLinks, LiteRT), one mosquitto",
                "feed_windows_per_s": round(FEED_HZ_PER_DEVICE * len(devices), 1),
                "windows_sent": len(expected),
                "seconds_to_all_serving": round(seconds, 3),
                "windows_lost": lost,
                "windows_duplicated": duplicated,
                "max_stall_ms": round(stall * 1000, 1),
                "rollout": "canary 0, one wave, gates min_windows=1 soak=0 (no canary wait)",
                "measured_from": f"rollout start to the registry showing all {edges} edges on 2.0.0",
                "elapsed_s": round(time.monotonic() - started, 1),
            }
        finally:
            stop_feed.set()
            feeder.stop()
            for node in nodes:
                node.stop()
            ingest.stop_event.set()
            ingest_thread.join(10)
            ingest.close()


def _converge(  # noqa: PLR0917 - private helper called twice
    settings: Any,
    rollouts: Any,
    fleet: Any,
    session_scope: Any,
    ref: str,
    edge_ids: list[str],
    version: str,
    timeout: float,
) -> float:
    """Start a one-wave rollout of ``ref`` and tick it until every edge reports ``version``."""
    start = time.monotonic()
    rollout_id = rollouts.start_rollout(
        settings=settings,
        model_ref=ref,
        edge_ids=edge_ids,
        canary=0,
        waves=1,
        params={"min_windows": 1, "soak_s": 0},
        actor="bench",
    )
    from shared.mqtt import MqttLink  # noqa: PLC0415  (pydantic, paho: not for --help)

    link = MqttLink(settings.broker, client_id="bench-rollouts")
    link.connect()
    try:
        while time.monotonic() - start < timeout:
            rollouts.tick(settings=settings, rollout_ids=[rollout_id], link=link, lease=False)
            with session_scope(settings.resolved_database_url) as session:
                rows = {r["edge_id"]: r for r in fleet.fleet_edges(session)}
            if all(rows.get(e, {}).get("reported_version") == version for e in edge_ids):
                return time.monotonic() - start
            time.sleep(0.05)
    finally:
        link.stop()
    raise click.ClickException(f"not every edge reported {version} within {timeout:.0f} s")


@click.command("rollout")
@click.option("--edges", type=int, default=50, show_default=True)
@click.option("--devices-per-edge", type=int, default=1, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print the JSON object only")
def bench_rollout(edges: int, devices_per_edge: int, as_json: bool) -> None:
    """Rollout to N in-process edges under load: time to all serving, windows lost/duplicated, stall."""
    logging.getLogger().setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-rollout-") as tmp:
        result = run(edges, devices_per_edge, Path(tmp))
    click.echo(json.dumps(result) if as_json else json.dumps(result, indent=2))
