"""``edgefleet bench edge``: the edge pipeline against the raw broker path and a naive pipeline.

All in one run on one machine, with a private mosquitto (free port, ``set_tcp_nodelay true``):

- throughput phases drain a backlog: N windows are queued on the broker for a persistent session
  while its subscriber is away, then the subscriber comes back and the rate between 10% and 90%
  of N is measured. The publisher's speed therefore does not enter the measurement:
  ``raw_broker_windows_per_s`` (a subscriber that does nothing), ``edge_windows_per_s`` (the real
  ``edgefleet edge run`` as shipped: a supervisor and ``--processes auto`` workers; decode,
  validate, dedup, batch, infer, rules), ``edge_1proc_windows_per_s`` (the same with
  ``processes: 1``) and ``naive_windows_per_s`` (JSON payloads, one ``tf.lite.Interpreter`` invoke
  per message);
- ``latency_ms``: device publish -> edge decision -> command received by the device, at a fixed
  1,000 windows/s, with a rule that fires on every window, against the edge as shipped
  (``latency_1proc_ms``: with one process);
- ``rss_mb``: the edge's peak resident memory (all its processes) over its phases.

Each subscriber runs in its own process so that none shares a GIL with the publisher.

``--security auth|tls|all`` adds ``security``: the same workload against brokers with per-identity
passwords and ACLs (``auth``: the files ``edgefleet broker run`` renders, ``shared.broker_auth``, every
client logging in with its own 210,000-iteration ``$7$`` hash) and with TLS on top (``tls``), next to
an anonymous one (``none``), in the same run. Per variant: the raw and edge drains, the latency as
shipped and the cost of one login (``connect_ms``). The drains there keep the subscriber connected
and paused (SIGSTOP) while the backlog is queued, so that no login (~0.2-0.5 s of the broker's one
thread each at 210,000 iterations) falls inside the measured window; logins are ``connect_ms``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import queue
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import click
import numpy as np
from pydantic import SecretStr

from edge_node import synthetic
from edge_node.synthetic import ensure_reference_models
from shared.broker_auth import (
    SITE,
    AuthSnapshot,
    BrokerLayout,
    IdentityEntry,
    InternalUsers,
    TlsFiles,
    render_auth_files,
    render_listener,
)
from shared.codec import encode_window, with_ts
from shared.errors import BrokerError, EdgefleetError
from shared.identity import HASH_ITERATIONS, IdentityKind, OperatorRole, broker_hash, new_secret
from shared.mqtt import MqttLink
from shared.mqtt_packets import DISCONNECT, connack_accepted, connect_packet, read_connack
from shared.mqtt_packets import packet as packet_of
from shared.pki import make_pki, write_private
from shared.private_broker import (
    MosquittoOptions,
    PrivateMosquitto,
    free_port,
    log_tail,
    mosquitto_binary,
    render_config,
    wait_port,
)
from shared.schemas import Command, Decision, EdgeMetrics, EdgeStatus, OnlineState, decode_message
from shared.settings import EdgeSettings, MqttSettings
from shared.topics import DeviceTopic, EdgeTopic, Topics

logger = logging.getLogger(__name__)

DEVICES: Final = 100
LATENCY_RATE_HZ: Final = 1000.0
# Per-client QoS1 messages in flight (mosquitto's default is 20). It is the edge's flow control:
# with PUBACK after decision the broker sends only as far ahead as the edge keeps up.
BROKER_MAX_INFLIGHT: Final = 256
EDGE_ID: Final = "bench-edge"
START_TIMEOUT_S: Final = 120.0

# --security: ``none`` is today's benchmark alone; the others add the variants, measured next to ``none``.
SECURITY_CHOICES: Final = ("none", "auth", "tls", "all")
SECURED: Final = ("auth", "tls")  # tls = auth + TLS on the listener
CONNECT_PROBES: Final = 20  # logins timed per variant (connect_ms)
# Who logs in on the secured brokers (each its own secret and 210,000-iteration hash):
MATRIX_EDGE: Final = f"{EDGE_ID}-sec"  # the edge of the paused drains
LATENCY_EDGE: Final = f"{EDGE_ID}-latency-auto"  # the edge of the latency phase (as shipped)
RAW_SUBSCRIBER: Final = "bench-raw"  # an edge identity: the raw path reads what an edge reads
PUBLISHER: Final = "bench-pub"  # admin operators: one connection publishes for all 100 devices
WATCHER: Final = "bench-ready"
PROBE_CLIENT: Final = "bench-device"
PROBE_DEVICE: Final = "probe"  # probe-00 ...: devices whose logins connect_ms times

# The subscriber process of the raw and naive phases (run with ``python -c``).
_SUBSCRIBER = r"""
import json, sys, time
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
mode, port, client_id, topic = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
total = int(sys.argv[5])
state = {"n": 0, "t10": None, "t90": None}
lo, hi = max(1, total // 10), max(2, total * 9 // 10)
if mode == "naive":
    import os
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import warnings
    warnings.simplefilter("ignore")
    import numpy as np
    import tensorflow as tf
    interpreter = tf.lite.Interpreter(model_path=sys.argv[6])
    interpreter.allocate_tensors()
    inp = interpreter.get_input_details()[0]
    out = interpreter.get_output_details()[0]
    in_scale, in_zero = inp["quantization"]
def on_message(client, userdata, msg):
    if mode == "naive":  # as a tutorial would: JSON, one invoke per message, no batching
        doc = json.loads(msg.payload)
        x = np.array(doc["values"], dtype=np.float32)[None, ...]
        if in_scale:
            x = np.clip(np.round(x / in_scale + in_zero), -128, 127).astype(np.int8)
        interpreter.set_tensor(inp["index"], x)
        interpreter.invoke()
        int(np.argmax(interpreter.get_tensor(out["index"])[0]))
    state["n"] += 1
    n = state["n"]
    if n == lo:
        state["t10"] = time.perf_counter()
    if n == hi:
        state["t90"] = time.perf_counter()
        client.disconnect()
def on_socket_open(client, userdata, sock):
    import socket
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
def on_connect(client, userdata, flags, reason, props):
    client.subscribe(topic, 1)
    if mode == "subscribe":
        client.disconnect()
client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
import os
if os.environ.get("BENCH_MQTT_USERNAME"):
    client.username_pw_set(os.environ["BENCH_MQTT_USERNAME"], os.environ["BENCH_MQTT_PASSWORD"])
if os.environ.get("BENCH_MQTT_CA"):
    client.tls_set(ca_certs=os.environ["BENCH_MQTT_CA"])
client.on_socket_open = on_socket_open
client.on_connect = on_connect
client.on_message = on_message
client.on_subscribe = lambda *a: print("subscribed", flush=True)
client.connect("127.0.0.1", port)
client.loop_forever()
if mode != "subscribe":
    print(json.dumps({"rate": (hi - lo) / (state["t90"] - state["t10"])}))
"""


# The edge bench's broker: flow control by in-flight messages (see BROKER_MAX_INFLIGHT), nothing
# queued beyond them, errors only in its log.
def broker_options(max_inflight: int = BROKER_MAX_INFLIGHT) -> MosquittoOptions:
    """The private mosquitto's settings for edge benchmarks (also used by ``edgefleet bench rollout``)."""
    return MosquittoOptions(
        max_inflight_messages=max_inflight, max_queued_messages=0, max_queued_bytes=0, log_types=("error",)
    )


@contextlib.contextmanager
def private_mosquitto(workdir: Path, max_inflight: int = BROKER_MAX_INFLIGHT) -> Iterator[int]:
    """A private mosquitto with the edge bench's settings; yields its port."""
    with PrivateMosquitto(workdir, broker_options(max_inflight)) as broker:
        yield broker.port


@dataclass(frozen=True, slots=True)
class BrokerAccess:
    """How the bench's clients reach one broker variant and log in (``none``: anonymously)."""

    port: int
    variant: str = "none"
    ca: Path | None = None  # TLS: the CA the clients trust
    secrets: Mapping[str, str] = field(default_factory=dict)  # identity -> secret (auth, tls)

    @property
    def secured(self) -> bool:
        """Whether clients log in (per-identity passwords and ACLs)."""
        return self.variant != "none"

    @property
    def url(self) -> str:
        """The URL clients connect to."""
        return f"{'mqtts' if self.ca is not None else 'mqtt'}://127.0.0.1:{self.port}"

    def settings(self, identity: str | None = None, **extra: Any) -> MqttSettings:
        """A client's settings, logging in as ``identity`` when the broker is secured."""
        if not self.secured or identity is None:
            return MqttSettings(url=self.url, **extra)
        return MqttSettings(
            url=self.url,
            username=identity,
            password=SecretStr(self.secrets[identity]),
            tls_ca=self.ca,
            **extra,
        )

    def broker_config(self, identity: str, **extra: Any) -> dict[str, Any]:
        """``settings(identity)`` as an edge config's ``site_broker`` section."""
        config: dict[str, Any] = {"url": self.url, **extra}
        if self.secured:
            config.update(username=identity, password=self.secrets[identity])
        if self.ca is not None:
            config["tls_ca"] = str(self.ca)
        return config

    def subscriber_env(self, username: str) -> dict[str, str]:
        """The environment of a ``_SUBSCRIBER`` process logging in as ``username``."""
        env = dict(os.environ)
        if self.secured:
            env.update(
                BENCH_MQTT_USERNAME=username,
                BENCH_MQTT_PASSWORD=self.secrets[username.split("/", 1)[0]],
            )
        if self.ca is not None:
            env["BENCH_MQTT_CA"] = str(self.ca)
        return env


@dataclass(frozen=True, slots=True)
class Enrollment:
    """The secured brokers' identities: secrets of those that log in, and the broker's view of all."""

    secrets: dict[str, str]
    snapshot: AuthSnapshot
    seconds: float  # hashing them (210,000 PBKDF2-SHA512 iterations each)
    logins: int  # identities with their own secret and hash


def enroll(devices: int = DEVICES) -> Enrollment:
    """Every identity the secured variants need, as ``fleet enroll`` would store it: edges (the paused
    drain's, the latency phase's and the raw subscriber), admin operators (the bench's publishing and
    watching clients) and ``CONNECT_PROBES`` probe devices, each with its own secret and a
    ``HASH_ITERATIONS`` hash. The simulated devices (``dev-*``, ``lat-*``) are in the files too, with
    their own ACL blocks, but never log in (one operator connection publishes for them, as one
    connection does in variant none): they share one hash, to spare ~0.3 s of hashing each."""
    started = time.perf_counter()
    kinds = dict.fromkeys((MATRIX_EDGE, LATENCY_EDGE, RAW_SUBSCRIBER), IdentityKind.EDGE)
    kinds |= dict.fromkeys((PUBLISHER, WATCHER, PROBE_CLIENT), IdentityKind.OPERATOR)
    kinds |= {f"{PROBE_DEVICE}-{k:02d}": IdentityKind.DEVICE for k in range(CONNECT_PROBES)}
    secrets = {identity: new_secret() for identity in kinds}
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # PBKDF2 releases the GIL
        hashes = dict(zip(secrets, pool.map(broker_hash, secrets.values()), strict=True))
    fleet_hash = broker_hash(new_secret())
    admin = str(OperatorRole.ADMIN)
    entries = [
        IdentityEntry(identity, str(kind), hashes[identity], admin if kind is IdentityKind.OPERATOR else None)
        for identity, kind in kinds.items()
    ]
    entries += [
        IdentityEntry(f"{prefix}-{i:04d}", str(IdentityKind.DEVICE), fleet_hash)
        for prefix in ("dev", "lat")
        for i in range(devices)
    ]
    return Enrollment(
        secrets=secrets,
        snapshot=AuthSnapshot(revision=1, identities=tuple(entries)),
        seconds=time.perf_counter() - started,
        logins=len(secrets),
    )


def secured_config(layout: BrokerLayout, options: MosquittoOptions) -> str:
    """mosquitto.conf of a secured variant: the global settings of ``options`` exactly as the anonymous
    variant has them (``shared.private_broker.render_config`` without its anonymous listener), then
    ``per_listener_settings true`` and the site listener of ``edgefleet broker run``
    (``shared.broker_auth.render_listener``: password file, ACL file, client id = username, TLS)."""
    anonymous = render_config(options, port=layout.port, workdir=layout.data_dir.resolve())
    common = [
        line for line in anonymous.splitlines() if not line.startswith(("listener ", "allow_anonymous "))
    ]
    return "\n".join(["per_listener_settings true", *common, "", *render_listener(layout, SITE)]) + "\n"


@contextlib.contextmanager
def secured_mosquitto(
    workdir: Path, enrollment: Enrollment, *, tls: bool, max_inflight: int = BROKER_MAX_INFLIGHT
) -> Iterator[BrokerAccess]:
    """A private mosquitto with the bench's settings, per-identity passwords and ACLs (and TLS):
    yields how to reach it."""
    binary = mosquitto_binary()
    if binary is None:
        raise BrokerError("mosquitto is not installed: install it, e.g. apt-get install mosquitto")
    workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
    tls_files = None
    if tls:
        pki = make_pki(workdir / "pki")
        tls_files = TlsFiles(cert=pki["server"], key=pki["server_key"], ca=pki["ca"])
    layout = BrokerLayout(data_dir=workdir, port=free_port(), tls=tls_files)
    for name, text in render_auth_files(layout, enrollment.snapshot, Topics(), InternalUsers()).items():
        write_private(workdir / name, text)
    conf = workdir / "mosquitto.conf"
    write_private(conf, secured_config(layout, broker_options(max_inflight)))
    log_path = workdir / "mosquitto.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen([binary, "-c", str(conf)], stdout=log, stderr=log)
    try:
        if not (wait_port(layout.port, alive=lambda: proc.poll() is None) and proc.poll() is None):
            raise BrokerError(f"the secured mosquitto did not come up; {log_path}:\n{log_tail(log_path)}")
        yield BrokerAccess(
            layout.port, "tls" if tls else "auth", tls_files.ca if tls_files else None, enrollment.secrets
        )
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _payloads(count: int, *, as_json: bool, prefix: str = "dev") -> list[tuple[str, bytes]]:
    topics = Topics()
    rng = np.random.default_rng(0)
    base = [synthetic.synthetic_window(c % 4, rng) for c in range(64)]
    out = []
    for i in range(count):
        device = f"{prefix}-{i % DEVICES:04d}"
        seq = i // DEVICES
        values = base[i % 64] + np.float32(i * 1e-6)  # distinct windows: the cache must not help
        if as_json:
            doc = {"device_id": device, "seq": seq, "ts": time.time(), "values": values.tolist()}
            payload = json.dumps(doc).encode()
        else:
            payload = encode_window(
                device_id=device,
                seq=seq,
                ts=time.time(),
                sample_rate_hz=100.0,
                channels=synthetic.CHANNELS,
                values=values,
            )
        out.append((topics.telemetry(device), payload))
    return out


def _publish_all(access: BrokerAccess, payloads: list[tuple[str, bytes]]) -> None:
    link = MqttLink(access.settings(PUBLISHER, max_inflight=1000), client_id="bench-pub")
    link.connect()
    try:
        handles = [link.publish(topic, payload, qos=1) for topic, payload in payloads]
        deadline = time.monotonic() + 300
        for handle in handles:  # all queued on the broker before the subscriber comes back
            if not handle.wait(max(0.0, deadline - time.monotonic())):
                break
    finally:
        link.stop()


def _subscriber_args(
    mode: str, access: BrokerAccess, client_id: str, total: int, model: Path | None
) -> list[str]:
    args = [
        sys.executable,
        "-c",
        _SUBSCRIBER,
        mode,
        str(access.port),
        client_id,
        Topics().all_devices(DeviceTopic.TELEMETRY),
    ]
    return args + [str(total)] + ([str(model)] if model else [])


def _subscriber(
    mode: str, access: BrokerAccess, client_id: str, total: int, model: Path | None = None
) -> dict[str, Any]:
    proc = subprocess.run(
        _subscriber_args(mode, access, client_id, total, model),
        capture_output=True,
        check=True,
        timeout=600,
        env=access.subscriber_env(f"{RAW_SUBSCRIBER}/site"),
    )
    lines = proc.stdout.decode().strip().splitlines()
    return json.loads(lines[-1]) if mode != "subscribe" else {}


def _drop_session(
    access: BrokerAccess, client_id: str, identity: str | None = None, connection: str | None = None
) -> None:
    """Forget a persistent session: later phases must not pay for queuing to an absent subscriber.
    On a secured broker the session is the username's (``identity/connection``): log in as it."""
    link = MqttLink(
        access.settings(identity),
        client_id=client_id,
        clean_session=True,
        connection=connection if access.secured else None,
    )
    link.connect()
    link.stop()


def _drain_phase(
    mode: str, access: BrokerAccess, payloads: list[tuple[str, bytes]], model: Path | None = None
) -> float:
    client_id = f"bench-{mode}"
    _subscriber("subscribe", access, client_id, 1)
    _publish_all(access, payloads)
    rate = float(_subscriber(mode, access, client_id, len(payloads), model)["rate"])
    _drop_session(access, client_id, RAW_SUBSCRIBER, "site")
    return rate


def _paused_raw_drain(workdir: Path, access: BrokerAccess, payloads: list[tuple[str, bytes]]) -> float:
    """The raw subscriber's drain rate, logged in before the backlog and paused (SIGSTOP) while it is
    queued: no login inside the measurement."""
    client_id = "bench-raw-paused"
    log = workdir / f"raw-{access.variant}.log"
    with log.open("ab") as err:
        proc = subprocess.Popen(
            _subscriber_args("raw", access, client_id, len(payloads), None),
            stdout=subprocess.PIPE,
            stderr=err,
            env=access.subscriber_env(f"{RAW_SUBSCRIBER}/site"),
        )
    assert proc.stdout is not None
    try:
        if proc.stdout.readline().strip() != b"subscribed":
            raise click.ClickException(f"the raw subscriber did not subscribe; see {log}")
        proc.send_signal(signal.SIGSTOP)
        try:
            _publish_all(access, payloads)
        finally:
            proc.send_signal(signal.SIGCONT)
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    _drop_session(access, client_id, RAW_SUBSCRIBER, "site")
    return float(json.loads(out.decode().strip().splitlines()[-1])["rate"])


def _auto_processes() -> int:
    """What ``processes: auto`` (the edge's default) gives on this machine."""
    return EdgeSettings(edge_id=EDGE_ID).process_count


class EdgeProcess:
    """``edgefleet edge run`` in a subprocess; reads its Prometheus endpoint; tracks its peak RSS."""

    def __init__(
        self,
        workdir: Path,
        port: int,
        model: Path,
        rules: Path | None,
        *,
        edge_id: str = EDGE_ID,
        share_group: str | None = None,
        overrides: dict[str, Any] | None = None,
        processes: int | None = None,
        access: BrokerAccess | None = None,
    ) -> None:
        metrics_port = free_port()
        self.access = access if access is not None else BrokerAccess(port)
        config: dict[str, Any] = {
            "edge_id": edge_id,
            "share_group": share_group,
            "site_broker": self.access.broker_config(edge_id, max_inflight=1000),
            "data_dir": str(workdir / edge_id),
            "model": {"path": str(model), "class_names": list(synthetic.CLASS_NAMES)},
            "metrics": {"port": metrics_port, "publish_interval_s": 1.0},
            "batching": {"max_batch": 64, "max_wait_ms": 0.5, "workers": 1},
            "uplink": {"random_fraction": 0.0, "low_confidence": 0.0, "min_margin": 0.0},
            "cache": {"enabled": False},
        }
        if processes is not None:  # else the default: auto
            config["processes"] = processes
        self.processes = processes if processes is not None else _auto_processes()
        if rules is not None:
            config["rules_file"] = str(rules)
        for key, value in (overrides or {}).items():
            config[key] = {**config[key], **value} if isinstance(value, dict) else value
        self.config = workdir / f"{edge_id}.yaml"  # JSON is YAML
        self.config.write_text(json.dumps(config))
        self.metrics_port = metrics_port
        self.broker_port = port
        self.workdir = workdir
        self.log = workdir / f"{edge_id}.log"
        self.edge_id = edge_id
        self.proc: subprocess.Popen[bytes] | None = None
        self.peak_rss = 0

    def start(self) -> None:
        """Launch the edge and wait until its metrics endpoint answers."""
        self.launch()
        self.wait_ready()

    def launch(self) -> None:
        """Start ``edgefleet edge run`` with this config, its output to the log file."""
        log = self.log.open("ab")
        with log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "shared.cli",
                    "--log-level",
                    "WARNING",
                    "edge",
                    "run",
                    "--config",
                    str(self.config),
                ],
                stdout=log,
                stderr=log,
            )

    def wait_ready(self) -> None:
        """Wait until the edge serves: its retained status says online (published once its telemetry
        subscription is in place, every worker's included) and its metrics endpoint answers;
        ``ClickException`` after the timeout."""
        deadline = time.monotonic() + START_TIMEOUT_S
        watcher = MqttLink(self.access.settings(WATCHER), client_id=f"bench-ready-{self.edge_id}")
        watcher.subscribe(Topics().edge(self.edge_id, EdgeTopic.STATUS), qos=1)
        watcher.connect()
        try:
            online = False
            while not online and time.monotonic() < deadline:
                try:
                    msg = watcher.inbox.get(timeout=0.1)
                except queue.Empty:
                    continue
                with contextlib.suppress(EdgefleetError):
                    online = decode_message(msg.payload, EdgeStatus).state is OnlineState.ONLINE
        finally:
            watcher.stop()
        while online and time.monotonic() < deadline:
            if self.scrape().get("edge_windows_total") is not None:
                return
            time.sleep(0.02)
        raise click.ClickException(f"the edge process did not come up; see {self.log}")

    def scrape(self) -> dict[str, float]:
        """The edge's Prometheus metrics by name ({} when it does not answer); samples RSS too."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2) as resp:
                text = resp.read().decode()
        except OSError:
            return {}
        self.sample_rss()
        values: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name.split("{")[0]] = float(value)
        return values

    def sample_rss(self) -> None:
        """Update the edge's peak resident memory: its process and every worker process under it."""
        import psutil  # noqa: PLC0415  (the agent extra; only RSS sampling needs it)

        if self.proc is None:
            return
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(self.proc.pid)
            total = 0
            for proc in (root, *root.children(recursive=True)):
                with contextlib.suppress(psutil.Error):
                    total += proc.memory_info().rss
            self.peak_rss = max(self.peak_rss, total)

    def site_sessions(self) -> list[tuple[str, str]]:
        """The edge's persistent site sessions (one per worker process, or one): ``(client id,
        connection name)``; on a secured broker the session is ``EDGE/connection``'s."""
        base = f"edgefleet-edge-{self.edge_id}-site"
        if self.processes == 1:
            return [(base, "site")]
        return [(f"{base}-{k}", f"site-{k}") for k in range(self.processes)]

    def drop_sessions(self) -> None:
        """Forget the edge's persistent site sessions (the edge stopped)."""
        for client_id, connection in self.site_sessions():
            _drop_session(self.access, client_id, self.edge_id, connection)

    def _tree(self) -> list[Any]:
        import psutil  # noqa: PLC0415  (the agent extra; only the paused drain needs it)

        if self.proc is None:
            return []
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.Error:
            return []

    def pause(self) -> None:
        """SIGSTOP the edge and its workers: connected, they read nothing until ``resume``."""
        for proc in self._tree():
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT what ``pause`` stopped."""
        for proc in self._tree():
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        """Stop the edge (SIGTERM, then SIGKILL after 30 s)."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


def _edge_drain(
    workdir: Path, access: BrokerAccess, model: Path, payloads: list[tuple[str, bytes]], processes: int | None
) -> tuple[float, int]:
    """Drain rate of one edge with ``processes`` worker processes (``None``: the default, auto)."""
    name = f"{EDGE_ID}-{processes or 'auto'}"
    edges = [EdgeProcess(workdir, access.port, model, None, edge_id=name, processes=processes, access=access)]
    for edge in edges:
        edge.start()  # creates the persistent session and subscribes
    for edge in edges:
        edge.stop()
    _publish_all(access, payloads)
    total = len(payloads)
    lo, hi = total // 10, total * 9 // 10
    for edge in edges:
        edge.launch()  # all at once; counting starts with the first endpoint that answers
    samples: list[tuple[float, float]] = []
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline:
            count = sum(edge.scrape().get("edge_windows_total", 0.0) for edge in edges)
            samples.append((time.perf_counter(), count))
            if count >= total:  # drained completely: nothing left over for the next phase
                break
            time.sleep(0.02)
    finally:
        for edge in edges:
            edge.stop()
            edge.drop_sessions()
    rate = (hi - lo) / (_crossing(samples, hi) - _crossing(samples, lo))
    return rate, max(edge.peak_rss for edge in edges)


def _paused_edge_drain(
    workdir: Path, access: BrokerAccess, model: Path, payloads: list[tuple[str, bytes]]
) -> float:
    """Drain rate of the edge as shipped, connected (every login done) and paused while the backlog
    is queued, then resumed."""
    edge = EdgeProcess(workdir, access.port, model, None, edge_id=MATRIX_EDGE, access=access)
    edge.start()
    total = len(payloads)
    lo, hi = total // 10, total * 9 // 10
    try:
        base = edge.scrape().get("edge_windows_total", 0.0)
        edge.pause()
        try:
            _publish_all(access, payloads)
        finally:
            edge.resume()
        # Workers report their counters every 0.5 s: only the scrapes where the count moved are
        # points of the curve (a scrape that sees an old count says nothing about now).
        steps = [(time.perf_counter(), 0.0)]
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and steps[-1][1] < total:
            count = edge.scrape().get("edge_windows_total", 0.0) - base
            if count != steps[-1][1]:
                steps.append((time.perf_counter(), count))
            time.sleep(0.01)
    finally:
        edge.resume()
        edge.stop()
        edge.drop_sessions()
    return (hi - lo) / (_crossing(steps, hi) - _crossing(steps, lo))


def _crossing(samples: list[tuple[float, float]], level: float) -> float:
    """The time the counter reached ``level``, interpolated between two scrapes."""
    for (t0, c0), (t1, c1) in itertools.pairwise(samples):
        if c0 < level <= c1:
            return t0 + (t1 - t0) * (level - c0) / (c1 - c0)
    last = samples[-1][1] if samples else 0
    raise click.ClickException(f"the edge never reached {level} windows (last count {last})")


def _latency(
    workdir: Path, access: BrokerAccess, model: Path, seconds: float, processes: int | None = None
) -> tuple[dict[str, Any], int, int]:
    rules = workdir / "rules.yaml"
    rules.write_text(
        "rules:\n  - name: every-window\n    class: normal\n    min_probability: 0.0\n"
        "    command: {name: ping}\n    severity: info\n"
    )
    topics = Topics()
    edge_id = f"{EDGE_ID}-latency-{processes or 'auto'}"
    edge = EdgeProcess(
        workdir, access.port, model, rules, edge_id=edge_id, processes=processes, access=access
    )
    edge.start()
    # The measuring client runs its network loop on the thread that publishes: no thread of its own
    # competes for its GIL, so what it measures is the edge (and the broker), not itself.
    device = MqttLink(
        access.settings(PROBE_CLIENT, max_inflight=1000), client_id="bench-device", own_loop=True
    )
    device.subscribe(topics.all_devices(DeviceTopic.CMD), qos=1)
    device.subscribe(topics.edge(edge_id, EdgeTopic.DECISION), qos=1)
    device.subscribe(topics.edge(edge_id, EdgeTopic.METRICS), qos=0)
    device.start()
    ready_by = time.monotonic() + START_TIMEOUT_S
    while not (device.connected and device.wait_subscribed(0)) and time.monotonic() < ready_by:
        device.poll(0.05)
    payloads = _payloads(int(LATENCY_RATE_HZ * seconds), as_json=False, prefix="lat")
    sent: dict[tuple[str, int], float] = {}
    sent_wall: dict[tuple[str, int], float] = {}
    wall_offset = time.time() - time.monotonic()  # monotonic -> wall clock, for the split below
    issued: dict[str, float] = {}  # command id -> the edge's issued_at (wall clock)
    try:
        settle_until = time.monotonic() + 0.5
        while time.monotonic() < settle_until:
            device.poll(0.05)
        start = time.monotonic()
        next_rss = start
        for i, (topic, payload) in enumerate(payloads):
            due = start + i / LATENCY_RATE_HZ
            while (delay := due - time.monotonic()) > 0:
                device.poll(delay)  # commands are stamped as they are read
            if time.monotonic() >= next_rss:
                edge.sample_rss()
                next_rss += 0.5
            device_id = topic.split("/")[-2]
            sent[(device_id, i // DEVICES)] = time.monotonic()
            stamp = time.time()
            sent_wall[(device_id, i // DEVICES)] = stamp
            device.publish(topic, with_ts(payload, stamp), qos=1)  # stamped at send time
            device.flush()
        drain_until = time.monotonic() + 1.5  # what is still on its way (and one metrics message)
        while time.monotonic() < drain_until:
            device.poll(0.05)
        commands: dict[str, float] = {}
        decisions: dict[str, tuple[str, int]] = {}
        edge_view = None
        while not device.inbox.empty():
            msg = device.inbox.get_nowait()
            if msg.topic.endswith("/metrics"):
                edge_view = decode_message(msg.payload, EdgeMetrics).e2e_latency
            elif msg.topic.endswith("/cmd"):
                command = decode_message(msg.payload, Command)
                commands[command.command_id] = msg.received_at
                issued[command.command_id] = command.issued_at
            else:
                d = decode_message(msg.payload, Decision)
                if d.command_id is not None:
                    decisions[d.command_id] = (d.device_id, d.window_seq)
    finally:
        device.stop()
        edge.stop()
        edge.drop_sessions()
    # (publish time, latency) per window whose command came back, in publish order.
    pairs = sorted(
        (sent[decisions[cid]], (received - sent[decisions[cid]]) * 1000.0)
        for cid, received in commands.items()
        if cid in decisions and decisions[cid] in sent
    )
    skip = len(pairs) // 10  # the first windows warm caches and connections
    measured = np.array([lat for _, lat in pairs[skip:]], dtype=np.float64)
    if not len(measured):
        raise click.ClickException("no command came back during the latency phase")
    p50, p90, p99 = (round(float(v), 3) for v in np.percentile(measured, [50, 90, 99]))
    summary: dict[str, Any] = {"p50": p50, "p90": p90, "p99": p99, "max": round(float(measured.max()), 3)}
    # Where the time goes (same machine, one clock): device send -> the edge issues the command, and
    # command issued -> received by the device.
    legs = [
        ((issued[cid] - sent_wall[key]) * 1000.0, (received + wall_offset - issued[cid]) * 1000.0)
        for cid, received in commands.items()
        if (key := decisions.get(cid)) is not None and key in sent_wall
    ][skip:]
    if legs:
        to_edge, back = np.array(legs).T
        summary["send_to_command_issued"] = {
            "p50": round(float(np.percentile(to_edge, 50)), 3),
            "p99": round(float(np.percentile(to_edge, 99)), 3),
        }
        summary["command_issued_to_received"] = {
            "p50": round(float(np.percentile(back, 50)), 3),
            "p99": round(float(np.percentile(back, 99)), 3),
        }
    if edge_view is not None:  # the edge's own view: device timestamp -> decision taken
        summary["edge_e2e"] = {"p50": round(edge_view.p50_ms, 3), "p99": round(edge_view.p99_ms, 3)}
    return summary, len(measured), edge.peak_rss


def _login_ms(access: BrokerAccess, index: int, context: ssl.SSLContext | None) -> float:
    """One login, timed from the TCP connect (and TLS handshake) to the CONNACK, in ms."""
    identity = f"{PROBE_DEVICE}-{index:02d}"
    username, password = (identity, access.secrets[identity]) if access.secured else (None, None)
    packet = connect_packet(f"bench-probe-{index}", username=username, password=password)
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", access.port), timeout=30) as raw:
        sock = context.wrap_socket(raw, server_hostname="127.0.0.1") if context is not None else raw
        try:
            sock.sendall(packet)
            reply = read_connack(sock)
            elapsed = (time.perf_counter() - started) * 1000.0
            if not connack_accepted(reply):
                raise click.ClickException(
                    f"{access.variant}: the broker refused {identity}'s login ({reply!r})"
                )
            sock.sendall(packet_of(DISCONNECT, b""))
        finally:
            if sock is not raw:
                sock.close()
    return elapsed


def _connect_cost(access: BrokerAccess, probes: int = CONNECT_PROBES) -> dict[str, Any]:
    """``probes`` logins one after the other (probe devices with their own 210,000-iteration hashes on
    a secured broker, anonymous otherwise): p50, p90, max in ms."""
    context = ssl.create_default_context(cafile=str(access.ca)) if access.ca is not None else None
    times = []
    for index in range(probes):
        times.append(_login_ms(access, index, context))
        time.sleep(0.02)
    p50, p90 = (round(float(v), 3) for v in np.percentile(times, [50, 90]))
    return {"p50": p50, "p90": p90, "max": round(max(times), 3), "count": len(times)}


def _ratio(value: float, base: float) -> float | None:
    return round(value / base, 3) if base else None


def security_matrix(
    workdir: Path,
    base: BrokerAccess,
    variants: tuple[str, ...],
    *,
    model: Path,
    payloads: list[tuple[str, bytes]],
    seconds: float,
    rounds: int = 3,
) -> dict[str, Any]:
    """The ``security`` object: per variant (``none`` on ``base``, then ``variants`` on their own
    brokers, all up at once) the login cost, the paused raw and edge drains and the latency as
    shipped; each phase runs for every variant back to back (the drains ``rounds`` times, taking
    turns, median reported), so that the machine's load moves the variants together. Ratios are
    variant / none."""
    load_before = os.getloadavg()[0]
    enrollment = enroll()
    with contextlib.ExitStack() as stack:
        accesses = {"none": base}
        for variant in variants:
            accesses[variant] = stack.enter_context(
                secured_mosquitto(workdir / f"broker-{variant}", enrollment, tls=variant == "tls")
            )
        dirs = {name: workdir / f"security-{name}" for name in accesses}
        for path in dirs.values():
            path.mkdir(parents=True, exist_ok=True)
        figures: dict[str, dict[str, Any]] = {name: {} for name in accesses}
        for name, access in accesses.items():
            figures[name]["connect_ms"] = _connect_cost(access)
        # Drains: ``rounds`` of each, the variants taking turns; the median is the figure.
        raws: dict[str, list[float]] = {name: [] for name in accesses}
        edges: dict[str, list[float]] = {name: [] for name in accesses}
        for _ in range(rounds):
            for name, access in accesses.items():
                raws[name].append(_paused_raw_drain(dirs[name], access, payloads))
        for _ in range(rounds):
            for name, access in accesses.items():
                edges[name].append(_paused_edge_drain(dirs[name], access, model, payloads))
        for name in accesses:
            figures[name]["raw_broker_windows_per_s"] = round(float(np.median(raws[name])), 1)
            figures[name]["edge_windows_per_s"] = round(float(np.median(edges[name])), 1)
            figures[name]["drain_rounds"] = {
                "raw": [round(rate, 1) for rate in raws[name]],
                "edge": [round(rate, 1) for rate in edges[name]],
            }
        for name, access in accesses.items():
            latency, samples, _ = _latency(dirs[name], access, model, seconds)
            figures[name]["latency_ms"] = latency
            figures[name]["latency_samples"] = samples
    for values in figures.values():
        values["ratio_vs_raw"] = _ratio(values["edge_windows_per_s"], values["raw_broker_windows_per_s"])
    none = figures["none"]
    result: dict[str, Any] = {
        "variants": {
            "none": "anonymous, plaintext (the broker of the figures above)",
            "auth": "per-identity passwords ($7$, 210,000 PBKDF2-SHA512 iterations) and generated ACLs "
            "(shared.broker_auth, as edgefleet broker run renders them); client id = username",
            "tls": "auth + TLS 1.2 on the listener (EC P-256 server certificate of a test CA)",
        },
        "phases": "per variant: connect_ms (logins, one after another), raw and edge drains with the "
        "subscriber connected and paused (SIGSTOP) while the backlog is queued (no login inside the "
        "measurement; drain_rounds rounds, the variants taking turns, median reported), latency as "
        "shipped at 1,000 windows/s; the 1-process and naive phases run on none only (above)",
        "clients": "edges log in as EDGE/site, EDGE/cloud, EDGE/site-K, EDGE/cloud-K; one admin operator "
        "connection publishes for the 100 devices (as one connection does in none); probe devices log "
        "in for connect_ms",
        **figures,
    }
    for variant in variants:
        other = figures[variant]
        result[f"{variant}_vs_none"] = {
            key: _ratio(other[key], none[key]) for key in ("raw_broker_windows_per_s", "edge_windows_per_s")
        } | {
            "latency_p50": _ratio(other["latency_ms"]["p50"], none["latency_ms"]["p50"]),
            "latency_p99": _ratio(other["latency_ms"]["p99"], none["latency_ms"]["p99"]),
            "connect_ms_p50_added": round(other["connect_ms"]["p50"] - none["connect_ms"]["p50"], 3),
        }
    result["hash_iterations"] = HASH_ITERATIONS
    result["identities_logging_in"] = enrollment.logins
    result["enroll_s"] = round(enrollment.seconds, 2)
    result["load_avg_1m"] = {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)}
    return result


@click.command("edge")
@click.option("--seconds", type=float, default=10.0, show_default=True, help="length of the latency phase")
@click.option(
    "--windows", type=int, default=0, help="backlog per throughput phase (default: 3,000 x seconds)"
)
@click.option(
    "--security",
    type=click.Choice(SECURITY_CHOICES),
    default="none",
    show_default=True,
    help="also measure with per-identity passwords and ACLs (auth), and TLS on top (tls), or both "
    "(all), next to an anonymous broker in the same run: the 'security' key",
)
@click.option(
    "--rounds",
    type=click.IntRange(1, 20),
    default=3,
    show_default=True,
    help="with --security: drains per variant (the variants take turns; the median is reported)",
)
@click.option("--json", "as_json", is_flag=True, help="print JSON only (the default output is JSON too)")
def bench_edge(seconds: float, windows: int, security: str, rounds: int, as_json: bool) -> None:  # noqa: ARG001
    """Edge throughput vs the raw broker and a naive pipeline; decision latency; RSS."""
    models = ensure_reference_models()
    model = models["int8"]
    load_before = os.getloadavg()[0]
    total = windows or int(3000 * seconds)
    workdir = Path(tempfile.mkdtemp(prefix="edgefleet-bench-edge-"))
    try:
        with private_mosquitto(workdir) as port:
            access = BrokerAccess(port)
            binary = _payloads(total, as_json=False)
            raw = _drain_phase("raw", access, binary)
            edge_rate, rss_a = _edge_drain(workdir, access, model, binary, None)
            one_rate, rss_b = _edge_drain(
                workdir, access, model, _payloads(total, as_json=False, prefix="p1"), 1
            )
            naive = _drain_phase("naive", access, _payloads(max(1000, total // 4), as_json=True), model)
            latency, samples, rss_c = _latency(workdir, access, model, seconds)
            latency_1proc, _, _ = _latency(workdir, access, model, seconds, processes=1)
            variants = SECURED if security == "all" else tuple(v for v in SECURED if v == security)
            secured = (
                security_matrix(
                    workdir, access, variants, model=model, payloads=binary, seconds=seconds, rounds=rounds
                )
                if variants
                else None
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result = {
        "raw_broker_windows_per_s": round(raw, 1),
        "edge_windows_per_s": round(edge_rate, 1),
        "edge_1proc_windows_per_s": round(one_rate, 1),
        "naive_windows_per_s": round(naive, 1),
        "ratio_vs_raw": round(edge_rate / raw, 3),
        "ratio_1proc_vs_raw": round(one_rate / raw, 3),
        "ratio_vs_naive": round(edge_rate / naive, 3),
        "edge_processes": _auto_processes(),
        "latency_ms": latency,
        "latency_1proc_ms": latency_1proc,
        "latency_samples": samples,
        "latency_rate_hz": LATENCY_RATE_HZ,
        "rss_mb": round(max(rss_a, rss_c) / 1e6, 1),
        "rss_1proc_mb": round(rss_b / 1e6, 1),
        "windows_per_phase": total,
        "devices": DEVICES,
        "model": "int8 1D-CNN, 100x3 windows, 4 classes",
        "cpu_count": os.cpu_count(),
        # Other work on the machine shares the cores: read every number against these.
        "load_avg_1m": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
    }
    if secured is not None:
        result["security"] = secured
    click.echo(json.dumps(result))
