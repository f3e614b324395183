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
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import click
import numpy as np

from edge_node import synthetic
from edge_node.synthetic import ensure_reference_models
from shared.codec import encode_window, with_ts
from shared.errors import EdgefleetError
from shared.mqtt import MqttLink
from shared.private_broker import MosquittoOptions, PrivateMosquitto, free_port
from shared.schemas import Command, Decision, EdgeMetrics, EdgeStatus, OnlineState, decode_message
from shared.settings import EdgeSettings, MqttSettings
from shared.topics import DeviceTopic, EdgeTopic, Topics

DEVICES: Final = 100
LATENCY_RATE_HZ: Final = 1000.0
# Per-client QoS1 messages in flight (mosquitto's default is 20). It is the edge's flow control:
# with PUBACK after decision the broker sends only as far ahead as the edge keeps up.
BROKER_MAX_INFLIGHT: Final = 256
EDGE_ID: Final = "bench-edge"
START_TIMEOUT_S: Final = 120.0

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


def _publish_all(port: int, payloads: list[tuple[str, bytes]]) -> None:
    link = MqttLink(
        MqttSettings(url=f"mqtt://127.0.0.1:{port}", max_inflight=1000),
        client_id="bench-pub",
    )
    link.connect()
    try:
        handles = [link.publish(topic, payload, qos=1) for topic, payload in payloads]
        deadline = time.monotonic() + 300
        for handle in handles:  # all queued on the broker before the subscriber comes back
            if not handle.wait(max(0.0, deadline - time.monotonic())):
                break
    finally:
        link.stop()


def _subscriber(
    mode: str, port: int, client_id: str, total: int, model: Path | None = None
) -> dict[str, Any]:
    args = [
        sys.executable,
        "-c",
        _SUBSCRIBER,
        mode,
        str(port),
        client_id,
        Topics().all_devices(DeviceTopic.TELEMETRY),
    ]
    args += [str(total)] + ([str(model)] if model else [])
    proc = subprocess.run(args, capture_output=True, check=True, timeout=600)
    lines = proc.stdout.decode().strip().splitlines()
    return json.loads(lines[-1]) if mode != "subscribe" else {}


def _drop_session(port: int, client_id: str) -> None:
    """Forget a persistent session: later phases must not pay for queuing to an absent subscriber."""
    link = MqttLink(MqttSettings(url=f"mqtt://127.0.0.1:{port}"), client_id=client_id, clean_session=True)
    link.connect()
    link.stop()


def _drain_phase(mode: str, port: int, payloads: list[tuple[str, bytes]], model: Path | None = None) -> float:
    client_id = f"bench-{mode}"
    _subscriber("subscribe", port, client_id, 1)
    _publish_all(port, payloads)
    rate = float(_subscriber(mode, port, client_id, len(payloads), model)["rate"])
    _drop_session(port, client_id)
    return rate


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
    ) -> None:
        metrics_port = free_port()
        config: dict[str, Any] = {
            "edge_id": edge_id,
            "share_group": share_group,
            "site_broker": {"url": f"mqtt://127.0.0.1:{port}", "max_inflight": 1000},
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
        watcher = MqttLink(
            MqttSettings(url=f"mqtt://127.0.0.1:{self.broker_port}"), client_id=f"bench-ready-{self.edge_id}"
        )
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

    def site_sessions(self) -> list[str]:
        """The client ids of the edge's persistent site sessions (one per worker process, or one)."""
        base = f"edgefleet-edge-{self.edge_id}-site"
        if self.processes == 1:
            return [base]
        return [f"{base}-{k}" for k in range(self.processes)]

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
    workdir: Path, port: int, model: Path, payloads: list[tuple[str, bytes]], processes: int | None
) -> tuple[float, int]:
    """Drain rate of one edge with ``processes`` worker processes (``None``: the default, auto)."""
    name = f"{EDGE_ID}-{processes or 'auto'}"
    edges = [EdgeProcess(workdir, port, model, None, edge_id=name, processes=processes)]
    for edge in edges:
        edge.start()  # creates the persistent session and subscribes
    for edge in edges:
        edge.stop()
    _publish_all(port, payloads)
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
            for client_id in edge.site_sessions():
                _drop_session(port, client_id)
    rate = (hi - lo) / (_crossing(samples, hi) - _crossing(samples, lo))
    return rate, max(edge.peak_rss for edge in edges)


def _crossing(samples: list[tuple[float, float]], level: float) -> float:
    """The time the counter reached ``level``, interpolated between two scrapes."""
    for (t0, c0), (t1, c1) in itertools.pairwise(samples):
        if c0 < level <= c1:
            return t0 + (t1 - t0) * (level - c0) / (c1 - c0)
    last = samples[-1][1] if samples else 0
    raise click.ClickException(f"the edge never reached {level} windows (last count {last})")


def _latency(
    workdir: Path, port: int, model: Path, seconds: float, processes: int | None = None
) -> tuple[dict[str, Any], int, int]:
    rules = workdir / "rules.yaml"
    rules.write_text(
        "rules:\n  - name: every-window\n    class: normal\n    min_probability: 0.0\n"
        "    command: {name: ping}\n    severity: info\n"
    )
    topics = Topics()
    edge_id = f"{EDGE_ID}-latency-{processes or 'auto'}"
    edge = EdgeProcess(workdir, port, model, rules, edge_id=edge_id, processes=processes)
    edge.start()
    # The measuring client runs its network loop on the thread that publishes: no thread of its own
    # competes for its GIL, so what it measures is the edge (and the broker), not itself.
    device = MqttLink(
        MqttSettings(url=f"mqtt://127.0.0.1:{port}", max_inflight=1000),
        client_id="bench-device",
        own_loop=True,
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
        for client_id in edge.site_sessions():
            _drop_session(port, client_id)
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


@click.command("edge")
@click.option("--seconds", type=float, default=10.0, show_default=True, help="length of the latency phase")
@click.option(
    "--windows", type=int, default=0, help="backlog per throughput phase (default: 3,000 x seconds)"
)
@click.option("--json", "as_json", is_flag=True, help="print JSON only (the default output is JSON too)")
def bench_edge(seconds: float, windows: int, as_json: bool) -> None:  # noqa: ARG001
    """Edge throughput vs the raw broker and a naive pipeline; decision latency; RSS."""
    models = ensure_reference_models()
    model = models["int8"]
    load_before = os.getloadavg()[0]
    total = windows or int(3000 * seconds)
    workdir = Path(tempfile.mkdtemp(prefix="edgefleet-bench-edge-"))
    try:
        with private_mosquitto(workdir) as port:
            binary = _payloads(total, as_json=False)
            raw = _drain_phase("raw", port, binary)
            edge_rate, rss_a = _edge_drain(workdir, port, model, binary, None)
            one_rate, rss_b = _edge_drain(
                workdir, port, model, _payloads(total, as_json=False, prefix="p1"), 1
            )
            naive = _drain_phase("naive", port, _payloads(max(1000, total // 4), as_json=True), model)
            latency, samples, rss_c = _latency(workdir, port, model, seconds)
            latency_1proc, _, _ = _latency(workdir, port, model, seconds, processes=1)
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
    click.echo(json.dumps(result))
