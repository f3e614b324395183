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
  the rollout (a swap that stalled a batch shows here).

``--security auth|tls|all`` runs the same rollout again on ``edgefleet broker run`` (``BrokerRunner``:
users and ACLs from the registry), the edges enrolled with their own secrets (210,000-iteration
hashes) and logging in as ``EDGE/site`` and ``EDGE/cloud``, the cloud side as the ``cloud`` service
on the cloud listener (``tls``: TLS on both listeners), and adds ``security``: per variant the figures
above and ratios against the anonymous run (``none``) of the same invocation."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import click
import numpy as np

from edge_node import synthetic
from edge_node.synthetic import ensure_reference_models
from shared.topics import DEFAULT_PREFIX, Topics

logger = logging.getLogger(__name__)

FEED_HZ_PER_DEVICE = 10.0
DRAIN_S = 5.0
SETTLE_S = 1.0
SECURITY_CHOICES: Final = ("none", "auth", "tls", "all")
SECURED: Final = ("auth", "tls")  # tls = auth + TLS on every listener
SERVICE: Final = "cloud"  # the ingest's and the rollout engine's identity (cloud listener)
FEEDER: Final = "feeder"  # an admin operator: one connection publishes every device's windows


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


def enroll_for_ingest(database_url: str, *, edge_ids: list[str], device_ids: list[str]) -> None:
    """Enroll the bench's edges and devices (the ingest stores only enrolled edges' uplink), each with a
    random secret nobody keeps: the bench's private broker does not authenticate."""
    from cloud.registry import identities  # noqa: PLC0415  (SQLAlchemy: not for --help)
    from cloud.registry.db import session_scope  # noqa: PLC0415  (SQLAlchemy: not for --help)
    from shared.identity import IdentityKind, broker_hash, new_secret  # noqa: PLC0415  (not for --help)

    with session_scope(database_url) as session:
        for kind, ids in ((IdentityKind.EDGE, edge_ids), (IdentityKind.DEVICE, device_ids)):
            for identity_id in ids:
                if identities.active_identity(session, identity_id=identity_id, kind=kind) is None:
                    identities.enroll(
                        session,
                        identity_id=identity_id,
                        kind=kind,
                        secret_hash=broker_hash(new_secret(), iterations=1000),
                        enrolled_via="bench",
                        actor="bench",
                    )


@dataclass
class Logins:
    """Secrets and their 210,000-iteration hashes of everything that logs in on a secured broker."""

    secrets: dict[str, str] = field(default_factory=dict)
    hashes: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


def make_logins(edge_ids: list[str]) -> Logins:
    """A secret and a ``HASH_ITERATIONS`` hash per edge, for the ``cloud`` service and the feeder
    (computed once for every secured variant; PBKDF2 releases the GIL: one thread per core)."""
    from shared.identity import broker_hash, new_secret  # noqa: PLC0415  (not for --help)

    started = time.perf_counter()
    secrets = {identity: new_secret() for identity in [*edge_ids, SERVICE, FEEDER]}
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        hashes = dict(zip(secrets, pool.map(broker_hash, secrets.values()), strict=True))
    return Logins(secrets, hashes, time.perf_counter() - started)


@dataclass
class Wiring:
    """Where each client of one run connects and as whom (``none``: anonymous, one broker)."""

    site_url: str  # devices and edges
    cloud_url: str  # the ingest and the rollout engine
    ca: Path | None = None
    logins: Logins | None = None
    layout: Any = None  # the secured broker's BrokerLayout

    def mqtt(
        self, identity: str | None, *, url: str | None = None, topic_prefix: str = DEFAULT_PREFIX
    ) -> Any:
        """``MqttSettings`` for ``identity`` (anonymous on the plain broker)."""
        from pydantic import SecretStr  # noqa: PLC0415  (pydantic: not for --help)

        from shared.settings import MqttSettings  # noqa: PLC0415  (pydantic: not for --help)

        if self.logins is None or identity is None:
            return MqttSettings(url=url or self.site_url, topic_prefix=topic_prefix)
        return MqttSettings(
            url=url or self.site_url,
            username=identity,
            password=SecretStr(self.logins.secrets[identity]),
            tls_ca=self.ca,
            topic_prefix=topic_prefix,
        )


def _site_prefix(edge_id: str) -> str:
    return f"site-{edge_id}/v1"


def enroll_logins(database_url: str, logins: Logins, edge_ids: list[str]) -> None:
    """Enroll the edges, the ``cloud`` service and the feeder (an admin operator) with their hashes."""
    from cloud.registry import identities  # noqa: PLC0415  (SQLAlchemy: not for --help)
    from cloud.registry.db import session_scope  # noqa: PLC0415  (SQLAlchemy: not for --help)
    from shared.identity import IdentityKind, OperatorRole  # noqa: PLC0415  (not for --help)

    kinds = dict.fromkeys(edge_ids, IdentityKind.EDGE) | {
        SERVICE: IdentityKind.SERVICE,
        FEEDER: IdentityKind.OPERATOR,
    }
    with session_scope(database_url) as session:
        for identity_id, kind in kinds.items():
            identities.enroll(
                session,
                identity_id=identity_id,
                kind=kind,
                role=OperatorRole.ADMIN if kind is IdentityKind.OPERATOR else None,
                secret_hash=logins.hashes[identity_id],
                enrolled_via="bench",
                actor="bench",
            )


def add_site_rules(runner: Any, edge_ids: list[str]) -> str:
    """Each bench edge serves its devices under its own site prefix (``site-EDGE/v1``: one broker
    stands for 50 sites). The registry's ACLs are for one prefix, so the site rules are appended to
    the site listener's ACL file and mosquitto reloaded: each edge's connections get ``edge_rules``
    under its site prefix (what it would have on its own site's broker), the feeder may write every
    site's telemetry. Returns the text appended (checked again at the end of the run)."""
    from shared.broker_auth import SITE, acl_name, edge_rules, render_acl  # noqa: PLC0415
    from shared.identity import connection_username  # noqa: PLC0415
    from shared.topics import DeviceTopic  # noqa: PLC0415

    blocks: list[tuple[str, list[tuple[str, str]]]] = []
    for edge_id in edge_ids:
        rules = edge_rules(Topics(_site_prefix(edge_id)), edge_id)
        blocks += [(connection_username(edge_id, name), rules) for name in ("site", "cloud")]
    blocks.append((FEEDER, [("write", f"+/v1/dev/+/{DeviceTopic.TELEMETRY.value}")]))
    extra = render_acl(blocks).replace(
        "# Generated by edgefleet broker run", "# Appended by bench rollout", 1
    )
    path = runner.data_dir / acl_name(SITE)
    with path.open("a") as acl:
        acl.write(extra)
    runner.reload()
    time.sleep(0.5)  # mosquitto reads the files on SIGHUP in its main loop
    return extra


@contextlib.contextmanager
def secured_broker(settings: Any, wiring: Wiring) -> Iterator[Any]:
    """``edgefleet broker run`` (``BrokerRunner``, no claim handler) on ``wiring``'s layout, its users
    and ACLs from the registry of ``settings``."""
    from cloud.broker.run import BrokerRunner  # noqa: PLC0415  (SQLAlchemy: not for --help)

    runner = BrokerRunner(
        settings=settings,
        database_url=settings.resolved_database_url,
        layout=wiring.layout,
        claim_handler=None,
    )
    runner.start()
    try:
        yield runner
    finally:
        runner.stop()


def secured_wiring(workdir: Path, logins: Logins, *, tls: bool) -> Wiring:
    """Choose the secured broker's ports (and make its test PKI with ``tls``)."""
    from shared.broker_auth import BrokerLayout, TlsFiles  # noqa: PLC0415
    from shared.pki import make_pki  # noqa: PLC0415  (cryptography: only with TLS)
    from shared.private_broker import free_port  # noqa: PLC0415

    tls_files = None
    if tls:
        pki = make_pki(workdir / "pki")
        tls_files = TlsFiles(cert=pki["server"], key=pki["server_key"], ca=pki["ca"])
    layout = BrokerLayout(
        data_dir=workdir / "broker", port=free_port(), cloud_port=free_port(), tls=tls_files
    )
    scheme = "mqtts" if tls else "mqtt"
    return Wiring(
        site_url=f"{scheme}://127.0.0.1:{layout.port}",
        cloud_url=f"{scheme}://127.0.0.1:{layout.cloud_port}",
        ca=tls_files.ca if tls_files else None,
        logins=logins,
        layout=layout,
    )


def run(
    edges: int,
    devices_per_edge: int,
    workdir: Path,
    *,
    security: str = "none",
    logins: Logins | None = None,
    startup: bool = False,
) -> dict[str, Any]:
    """Start the whole topology in ``workdir``, move every edge to v1, then measure the rollout of
    v2 under telemetry: the JSON object ``edgefleet bench rollout`` prints. ``security`` ``auth`` /
    ``tls``: on ``edgefleet broker run``, everything logging in with ``logins`` (then the object also
    has ``edges_started_s``, the start of every edge, logins included, and ``acl_site_rules_intact``;
    ``startup``: ``edges_started_s`` on the anonymous broker too)."""
    from cloud.fleet import rollouts  # noqa: PLC0415  (SQLAlchemy: not for --help)
    from cloud.ingest import Ingest  # noqa: PLC0415  (SQLAlchemy: not for --help)
    from cloud.registry import fleet  # noqa: PLC0415  (SQLAlchemy: not for --help)
    from cloud.registry.db import session_scope, upgrade  # noqa: PLC0415  (SQLAlchemy: not for --help)
    from edge_node.bench import private_mosquitto  # noqa: PLC0415  (the edge tier: not for --help)
    from edge_node.node import EdgeNode  # noqa: PLC0415  (the edge tier: not for --help)
    from shared.codec import encode_window  # noqa: PLC0415  (pydantic: not for --help)
    from shared.mqtt import MqttLink  # noqa: PLC0415  (pydantic, paho: not for --help)
    from shared.settings import EdgeSettings  # noqa: PLC0415  (pydantic: not for --help)
    from shared.settings.cloud import CloudSettings  # noqa: PLC0415  (pydantic: not for --help)

    models = ensure_reference_models()
    edge_ids = [f"edge-{i:03d}" for i in range(edges)]
    secured = security != "none"
    if secured and logins is None:
        logins = make_logins(edge_ids)
    workdir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        if secured:
            assert logins is not None
            wiring = secured_wiring(workdir, logins, tls=security == "tls")
        else:
            port = stack.enter_context(private_mosquitto(workdir))
            url = f"mqtt://127.0.0.1:{port}"
            wiring = Wiring(site_url=url, cloud_url=url)
        settings = CloudSettings(
            data_dir=workdir / "cloud",
            database_url=f"sqlite:///{workdir / 'registry.db'}",
            broker=wiring.mqtt(SERVICE, url=wiring.cloud_url),
            dev_mode=True,
        )
        upgrade(settings.resolved_database_url)
        old_ref = register(settings, models["float32"], "1.0.0")
        new_ref = register(settings, models["float32_v2"], "2.0.0")
        _, public_key = settings.key_paths()
        if secured:  # before enroll_for_ingest, which skips identities already enrolled
            assert logins is not None
            enroll_logins(settings.resolved_database_url, logins, edge_ids)
        enroll_for_ingest(
            settings.resolved_database_url,
            edge_ids=edge_ids,
            device_ids=[f"{edge_id}-d{k}" for edge_id in edge_ids for k in range(devices_per_edge)],
        )
        site_rules = ""
        if secured:  # enrolled first: the broker starts with every identity (no re-render later)
            assert logins is not None
            runner = stack.enter_context(secured_broker(settings, wiring))
            site_rules = add_site_rules(runner, edge_ids)
        recorder = Recorder()
        nodes = []
        ingest = Ingest(settings)
        ingest_thread = threading.Thread(target=ingest.run, daemon=True)
        ingest_thread.start()
        feeder = MqttLink(wiring.mqtt(FEEDER), client_id="bench-feeder")
        stop_feed = threading.Event()
        sent: list[tuple[str, int]] = []
        try:
            # Every edge starts on v1 through the same engine (one wave), then v2 is measured.
            edges_started = time.monotonic()
            for edge_id in edge_ids:
                node = EdgeNode(
                    EdgeSettings(
                        edge_id=edge_id,
                        site_broker=wiring.mqtt(edge_id, topic_prefix=_site_prefix(edge_id)),
                        cloud_broker=wiring.mqtt(edge_id),
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
            edges_started_s = time.monotonic() - edges_started
            _converge(settings, rollouts, fleet, session_scope, old_ref, edge_ids, "1.0.0", timeout=300)
            feeder.connect()
            devices = [
                (Topics(_site_prefix(edge_id)).telemetry(f"{edge_id}-d{k}"), f"{edge_id}-d{k}")
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
            result: dict[str, Any] = {
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
            if secured or startup:
                result["edges_started_s"] = round(edges_started_s, 2)
            if secured:
                acl = (workdir / "broker" / "acl-site").read_text()
                result["acl_site_rules_intact"] = site_rules in acl
            return result
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


def _security_figures(result: dict[str, Any]) -> dict[str, Any]:
    keys = ("seconds_to_all_serving", "windows_lost", "windows_duplicated", "max_stall_ms", "windows_sent")
    return {key: result[key] for key in keys if key in result} | {
        key: result[key] for key in ("edges_started_s", "acl_site_rules_intact") if key in result
    }


def _ratio(value: float, base: float) -> float | None:
    return round(value / base, 3) if base else None


def security_section(results: dict[str, dict[str, Any]], logins: Logins) -> dict[str, Any]:
    """The ``security`` object: each variant's figures and, per secured variant, ratios against none."""
    from shared.identity import HASH_ITERATIONS  # noqa: PLC0415  (not for --help)

    none = results["none"]
    section: dict[str, Any] = {
        "variants": {
            "none": "anonymous, plaintext: the bench's private mosquitto (the figures above)",
            "auth": "edgefleet broker run (BrokerRunner: users and ACLs from the registry, its own "
            "mosquitto settings); edges log in as EDGE/site and EDGE/cloud on the site listener, the "
            "ingest and the rollout engine as the cloud service on the cloud listener",
            "tls": "auth + TLS 1.2 on both listeners (test CA)",
        },
        "site_acl": "each edge's devices sit under its own site prefix (site-EDGE/v1): the registry's "
        "ACLs are appended with each edge's edge_rules under its site prefix and a wildcard telemetry "
        "write for the feeder (one admin operator connection publishes every device's windows)",
        "order": "one run per variant, one after another (none first)",
        "logins_measured": "edges_started_s covers every edge's two logins (EDGE/site, EDGE/cloud); the "
        "rollout engine's link logs in (as cloud) at the start of each rollout, inside "
        "seconds_to_all_serving, as in the anonymous run",
        **{name: _security_figures(result) for name, result in results.items()},
    }
    for name, result in results.items():
        if name == "none":
            continue
        section[f"{name}_vs_none"] = {
            "seconds_to_all_serving": _ratio(
                result["seconds_to_all_serving"], none["seconds_to_all_serving"]
            ),
            "max_stall_ms": _ratio(result["max_stall_ms"], none["max_stall_ms"]),
            "windows_lost_added": result["windows_lost"] - none["windows_lost"],
            "edges_started_s": _ratio(result["edges_started_s"], none["edges_started_s"]),
        }
    section["hash_iterations"] = HASH_ITERATIONS
    section["enroll_s"] = round(logins.seconds, 2)
    return section


@click.command("rollout")
@click.option("--edges", type=int, default=50, show_default=True)
@click.option("--devices-per-edge", type=int, default=1, show_default=True)
@click.option(
    "--security",
    type=click.Choice(SECURITY_CHOICES),
    default="none",
    show_default=True,
    help="also run it on edgefleet broker run with per-identity logins and ACLs (auth), and TLS on top "
    "(tls), or both (all), after the anonymous run: the 'security' key",
)
@click.option("--json", "as_json", is_flag=True, help="print the JSON object only")
def bench_rollout(edges: int, devices_per_edge: int, security: str, as_json: bool) -> None:
    """Rollout to N in-process edges under load: time to all serving, windows lost/duplicated, stall."""
    logging.getLogger().setLevel(logging.WARNING)
    variants = SECURED if security == "all" else tuple(v for v in SECURED if v == security)
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-rollout-") as tmp:
        if not variants:
            result = run(edges, devices_per_edge, Path(tmp))
        else:
            logins = make_logins([f"edge-{i:03d}" for i in range(edges)])
            results = {"none": run(edges, devices_per_edge, Path(tmp) / "none", startup=True)}
            for variant in variants:
                results[variant] = run(
                    edges, devices_per_edge, Path(tmp) / variant, security=variant, logins=logins
                )
            result = {**results["none"], "security": security_section(results, logins)}
    click.echo(json.dumps(result) if as_json else json.dumps(result, indent=2))
