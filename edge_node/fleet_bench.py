"""``edgefleet bench fleet``: one site at fleet scale, every device on its own MQTT connection.

One private mosquitto (``max_connections -1``, ``$SYS`` every second), one edge node as shipped
(``edgefleet edge run`` with its default processes, a rule that commands the device on every
window) and loadgen worker processes (``python -m edge_node.loadgen``, one per
``DEVICES_PER_WORKER`` devices by default), each running thousands of devices in one asyncio loop.
Every device sends one window per ``--period`` for ``--seconds``; the run then waits up to
``--drain`` seconds for what is outstanding.

Reported (one JSON object):

- ``windows``: ``sent``; ``acked`` (PUBACK came); ``decided`` (the edge's command for it reached the
  device); ``lost`` (no PUBACK or no command, after the drain); ``duplicated`` (more than one
  command for one window); ``edge_windows_total`` is the edge's own count (its Prometheus endpoint);
- ``latency_ms``: device publish -> command received by that device; ``edge_e2e_ms`` is the edge's
  own view (device timestamp -> decision taken, its last metrics message) and
  ``loadgen_loop_lag_ms`` how late the loadgen's event loops woke up: together they say where a
  tail comes from (the edge, or a loadgen starved of CPU on a busy machine);
- ``edge_rss_mb``: peak of the RSS summed over the edge process and all its children
  (``edge_pss_mb``: the same with shared pages split between them, which is what they really cost);
  ``edge_process_peaks`` per process (supervisor, workers; with the cores each used);
  ``edge_rss_mb_series`` the sum every ``SERIES_STEP_S`` from the start of the send phase
  (per-device state that grows shows here);
- ``broker_connections``: peak of ``$SYS/broker/clients/connected``;
- ``cpu``: cores used by the broker, the edge (all its processes) and the loadgen during the send
  phase; ``load_avg_1m`` before and after, since other work on the machine shares the cores.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import queue
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import IO, Any, Final

import click
import psutil

from edge_node.bench import EdgeProcess, broker_options
from edge_node.loadgen import latency_summary, merge_results
from edge_node.synthetic import ensure_reference_models
from shared.errors import SchemaError
from shared.mqtt import MqttLink
from shared.private_broker import MosquittoOptions, PrivateMosquitto, log_tail
from shared.schemas import EdgeMetrics, decode_message
from shared.settings import MqttSettings
from shared.topics import EdgeTopic, Topics

logger = logging.getLogger(__name__)

EDGE_ID: Final = "fleet-edge"
# design.md, "Targets": one site, 10,000 devices, one edge node.
TARGETS: Final = {"lost": 0, "edge_rss_mb": 300}
DEVICES_PER_WORKER: Final = 5_000
SAMPLE_INTERVAL_S: Final = 0.5
SERIES_STEP_S: Final = 5.0  # the edge RSS series: one value per this many seconds of the run
GO_DELAY_S: Final = 1.0  # between "all connected" and the fleet's start, for every worker to hear it
CONNECT_TIMEOUT_BASE_S: Final = 120.0
RESULT_MARGIN_S: Final = 120.0
MB: Final = 1e6
# What the edge's endpoint says at the end (counters summed over their labels).
EDGE_FIGURES: Final = (
    "decisions_total",
    "commands_sent_total",
    "command_acks_total",
    "duplicates_total",
    "dropped_windows_total",
    "dead_letters_total",
    "errors_total",
    "devices_seen",
    "work_queue_depth",
)
# The broker's own count of its clients (not a contract topic: mosquitto's $SYS tree).
SYS_CLIENTS_TOPIC: Final = "$SYS/broker/clients/connected"
# A rule that fires on every window: every window comes back to its device as a command.
RULES_YAML: Final = (
    "rules:\n  - name: every-window\n    class: normal\n    min_probability: 0.0\n"
    "    command: {name: ping}\n    severity: info\n"
)


def fleet_broker_options() -> MosquittoOptions:
    """The edge bench's broker settings, with no cap on connections and ``$SYS`` every second."""
    return dataclasses.replace(broker_options(), max_connections=-1, sys_interval_s=1)


def raise_fd_limit() -> int:
    """Raise this process's soft open-files limit to the hard one (children inherit it); return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


class ResourceSampler:
    """Samples, in a thread, the memory of the edge (its process tree), the broker and the loadgen."""

    def __init__(self, broker_pid: int, edge_pid: int) -> None:
        self.broker = psutil.Process(broker_pid)
        self.edge = psutil.Process(edge_pid)
        self.loadgen: list[psutil.Process] = []
        self.peak: dict[str, float] = {"edge_rss": 0, "edge_pss": 0, "broker_rss": 0, "loadgen_rss": 0}
        self.edge_processes = 0
        self.series: list[tuple[float, float]] = []  # (monotonic, edge RSS summed)
        self.per_edge_process: dict[int, tuple[float, float, str]] = {}  # pid -> peak RSS, PSS, role
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fleet-sampler", daemon=True)

    def edge_tree(self) -> list[psutil.Process]:
        """The edge process and all its descendants now."""
        with contextlib.suppress(psutil.Error):
            return [self.edge, *self.edge.children(recursive=True)]
        return []

    @staticmethod
    def _memory(procs: list[psutil.Process], *, pss: bool = False) -> dict[int, tuple[float, float]]:
        """pid -> (RSS, PSS) of each process still there (PSS only when asked: it reads smaps)."""
        out: dict[int, tuple[float, float]] = {}
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                info = proc.memory_full_info() if pss else proc.memory_info()
                out[proc.pid] = (float(info.rss), float(getattr(info, "pss", 0.0)))
        return out

    def sample(self) -> None:
        """One sample of every figure; keeps the peaks (sums, and per edge process)."""
        tree = self.edge_tree()
        self.edge_processes = max(self.edge_processes, len(tree))
        edge = self._memory(tree, pss=True)
        for pid, (rss, pss) in edge.items():
            root_role = "supervisor" if len(tree) > 1 else "edge"
            role = root_role if pid == self.edge.pid else "worker"
            peak_rss, peak_pss, _ = self.per_edge_process.get(pid, (0.0, 0.0, role))
            self.per_edge_process[pid] = (max(peak_rss, rss), max(peak_pss, pss), role)
        values = {
            "edge_rss": sum(rss for rss, _ in edge.values()),
            "edge_pss": sum(pss for _, pss in edge.values()),
            "broker_rss": sum(rss for rss, _ in self._memory([self.broker]).values()),
            "loadgen_rss": sum(rss for rss, _ in self._memory(self.loadgen).values()),
        }
        for key, value in values.items():
            self.peak[key] = max(self.peak[key], value)
        self.series.append((time.monotonic(), values["edge_rss"]))

    def edge_rss_series(self, since: float, step_s: float = SERIES_STEP_S) -> list[float]:
        """The edge's summed RSS (MB) every ``step_s`` from ``since`` (monotonic): growth shows here."""
        out: list[float] = []
        due = since
        for at, rss in self.series:
            if at >= due:
                out.append(round(rss / MB, 1))
                due = at + step_s
        return out

    def edge_breakdown(self, cores: dict[int, float]) -> list[dict[str, Any]]:
        """Peak RSS and PSS (MB) of each edge process that ran, the root first; with its ``cores``."""
        rows = sorted(self.per_edge_process.items(), key=lambda item: (item[0] != self.edge.pid, item[0]))
        return [
            {"role": role, "rss_mb": round(rss / MB, 1), "pss_mb": round(pss / MB, 1), "cpu": cores.get(pid)}
            for pid, (rss, pss, role) in rows
        ]

    def cpu(self) -> dict[str, dict[int, float]]:
        """Cumulative CPU seconds (user + system) per process, by role."""
        out: dict[str, dict[int, float]] = {}
        for role, procs in (("broker", [self.broker]), ("edge", self.edge_tree()), ("loadgen", self.loadgen)):
            out[role] = {}
            for proc in procs:
                with contextlib.suppress(psutil.Error):
                    times = proc.cpu_times()
                    out[role][proc.pid] = times.user + times.system
        return out

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL_S):
            self.sample()

    def start(self) -> None:
        """Sample every ``SAMPLE_INTERVAL_S`` until ``stop``."""
        self.sample()
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling (after one last sample)."""
        self._stop.set()
        self._thread.join(10)
        self.sample()


def cores_used(
    before: dict[str, dict[int, float]], after: dict[str, dict[int, float]], wall_s: float
) -> dict[str, float]:
    """CPU used per role between two ``ResourceSampler.cpu`` snapshots, in cores (a process that
    appeared meanwhile counts from zero)."""
    out = {}
    for role, now in after.items():
        used = sum(t - before.get(role, {}).get(pid, 0.0) for pid, t in now.items())
        out[role] = round(used / wall_s, 3) if wall_s > 0 else 0.0
    return out


class BrokerWatch:
    """Follows ``$SYS/broker/clients/connected`` (keeps the peak) and the edge's metrics messages
    (keeps the last ``e2e_latency``: the edge's own view, device timestamp -> decision taken)."""

    def __init__(self, port: int, edge_id: str) -> None:
        self.link = MqttLink(MqttSettings(url=f"mqtt://127.0.0.1:{port}"), client_id="fleet-bench-watch")
        self.link.subscribe(SYS_CLIENTS_TOPIC, qos=0)
        self.metrics_topic = Topics().edge(edge_id, EdgeTopic.METRICS)
        self.link.subscribe(self.metrics_topic, qos=0)
        self.peak = 0
        self.last = 0
        self.edge_e2e: dict[str, float] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fleet-sys", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self.link.inbox.get(timeout=0.2)
            except queue.Empty:
                continue
            if msg.topic == self.metrics_topic:
                with contextlib.suppress(SchemaError):
                    e2e = decode_message(msg.payload, EdgeMetrics).e2e_latency
                    self.edge_e2e = {"p50": round(e2e.p50_ms, 3), "p99": round(e2e.p99_ms, 3)}
                continue
            with contextlib.suppress(ValueError):
                self.last = int(msg.payload.decode().strip())
                self.peak = max(self.peak, self.last)

    def start(self) -> None:
        """Connect and follow the count."""
        self.link.connect()
        self._thread.start()

    def stop(self) -> None:
        """Disconnect (a no-op when never started)."""
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(5)
            self.link.stop()


class Worker:
    """One loadgen process; its stdout lines read by a thread into a queue."""

    def __init__(
        self,
        workdir: Path,
        port: int,
        *,
        index: int,
        count: int,
        devices: int,
        period: float,
        seconds: float,
        drain: float,
    ) -> None:
        self.log = workdir / f"loadgen-{index}.log"
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "edge_node.loadgen",
                    "--port",
                    str(port),
                    "--devices",
                    str(devices),
                    "--worker",
                    str(index),
                    "--workers",
                    str(count),
                    "--period",
                    str(period),
                    "--seconds",
                    str(seconds),
                    "--drain",
                    str(drain),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True).start()

    def _read(self, stream: IO[str] | None) -> None:
        if stream is not None:
            for line in stream:
                self.lines.put(line)
        self.lines.put(None)

    def event(self, name: str, timeout: float) -> dict[str, Any]:
        """The next JSON line whose ``event`` is ``name``; ``ClickException`` on exit or timeout."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise click.ClickException(
                    f"loadgen worker: no {name!r} after {timeout:.0f} s; {self.log}"
                ) from None
            if line is None:
                raise click.ClickException(
                    f"loadgen worker exited before {name!r}; {self.log}:\n{log_tail(self.log)}"
                )
            with contextlib.suppress(ValueError):
                doc = json.loads(line)
                if isinstance(doc, dict) and doc.get("event") == name:
                    return doc

    def go(self, start_wall: float) -> None:
        """Tell the worker when the fleet starts."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"go {start_wall!r}\n")
        self.proc.stdin.flush()

    def stop(self) -> None:
        """Kill the worker if it still runs."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def edge_counters(metrics_port: int) -> dict[str, float]:
    """The edge's Prometheus figures by name, each summed over its labels ({} when it does not answer)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            key = name.split("{")[0]
            values[key] = values.get(key, 0.0) + float(value)
    return values


def _sleep_until(wall: float) -> None:
    delay = wall - time.time()
    if delay > 0:
        time.sleep(delay)


def run_fleet(
    workdir: Path,
    *,
    devices: int,
    period: float,
    seconds: float,
    processes: int,
    drain: float,
    edge_processes: int | None = None,
) -> dict[str, Any]:
    """The whole run (broker, edge, loadgen); the result document without the load averages."""
    model = ensure_reference_models()["int8"]
    rules = workdir / "rules.yaml"
    rules.write_text(RULES_YAML)
    with PrivateMosquitto(workdir / "broker", fleet_broker_options()) as broker:
        assert broker.proc is not None
        # processes None: the edge's default, as shipped
        edge = EdgeProcess(workdir, broker.port, model, rules, edge_id=EDGE_ID, processes=edge_processes)
        clients = BrokerWatch(broker.port, EDGE_ID)
        sampler: ResourceSampler | None = None
        workers: list[Worker] = []
        try:
            edge.start()
            assert edge.proc is not None
            sampler = ResourceSampler(broker.proc.pid, edge.proc.pid)
            clients.start()
            sampler.start()
            started = time.monotonic()
            workers = [
                Worker(
                    workdir,
                    broker.port,
                    index=k,
                    count=processes,
                    devices=devices,
                    period=period,
                    seconds=seconds,
                    drain=drain,
                )
                for k in range(processes)
            ]
            sampler.loadgen = [psutil.Process(w.proc.pid) for w in workers]
            timeout = CONNECT_TIMEOUT_BASE_S + devices / 100
            connected = [w.event("connected", timeout) for w in workers]
            connect_s = time.monotonic() - started
            start_wall = time.time() + GO_DELAY_S
            for worker in workers:
                worker.go(start_wall)
            _sleep_until(start_wall)
            cpu_before, send_started = sampler.cpu(), time.monotonic()
            _sleep_until(start_wall + seconds)
            cpu_after, send_s = sampler.cpu(), time.monotonic() - send_started
            cpu = cores_used(cpu_before, cpu_after, send_s)
            edge_cores = {
                pid: round((t - cpu_before["edge"].get(pid, 0.0)) / send_s, 3)
                for pid, t in cpu_after["edge"].items()
            }
            results = [w.event("result", drain + RESULT_MARGIN_S) for w in workers]
            edge_view = edge_counters(edge.metrics_port)
            edge_alive = edge.proc is not None and edge.proc.poll() is None
        finally:
            for worker in workers:
                worker.stop()
            if sampler is not None:
                sampler.stop()
            clients.stop()
            edge.stop()
    merged = merge_results([{k: v for k, v in r.items() if k != "event"} for r in results])
    sent, decided = merged["sent"], merged["decided"]
    return {
        "devices": devices,
        "period_s": period,
        "seconds": seconds,
        "loadgen_processes": processes,
        "connected": sum(c["connected"] for c in connected),
        "connect_s": round(connect_s, 3),
        "connect_failures": merged["connect_failures"],
        "disconnects": merged["disconnects"],
        "windows": {
            "sent": sent,
            "acked": merged["acked"],
            "decided": decided,
            "lost": merged["lost"],
            "duplicated": merged["duplicated"],
            "unmatched_commands": merged["unmatched_commands"],
            "edge_windows_total": int(edge_view.get("edge_windows_total", -1)),
        },
        "windows_per_s": round(sent / seconds, 1) if seconds else 0.0,
        "drain_s": merged["drain_s"],
        "latency_ms": latency_summary(merged["latencies_ms"]),
        # The edge's own view (its last metrics message, recent windows): device ts -> decision.
        "edge_e2e_ms": clients.edge_e2e,
        # How late the loadgen's event loops woke up (probe every 0.1 s): its share of the latency.
        "loadgen_loop_lag_ms": latency_summary(merged["loop_lags_ms"]),
        "loadgen_gc_max_ms": merged["gc_max_ms"],
        "edge_rss_mb": round(sampler.peak["edge_rss"] / MB, 1),
        "edge_pss_mb": round(sampler.peak["edge_pss"] / MB, 1),
        "edge_processes": sampler.edge_processes,
        "edge_alive_at_end": edge_alive,
        "edge_process_peaks": sampler.edge_breakdown(edge_cores),
        "edge_rss_mb_series": sampler.edge_rss_series(send_started),
        "edge": {
            name: int(edge_view[f"edge_{name}"]) for name in EDGE_FIGURES if f"edge_{name}" in edge_view
        },
        "broker_connections": clients.peak,
        "broker_rss_mb": round(sampler.peak["broker_rss"] / MB, 1),
        "loadgen_rss_mb": round(sampler.peak["loadgen_rss"] / MB, 1),
        "cpu": cpu,
        "targets": TARGETS,
    }


@click.command("fleet")
@click.option("--devices", type=click.IntRange(min=1), default=10_000, show_default=True)
@click.option(
    "--period",
    type=click.FloatRange(min=0.01),
    default=10.0,
    show_default=True,
    help="seconds between a device's windows",
)
@click.option(
    "--seconds",
    type=click.FloatRange(min=0.1, max=3600),
    default=60.0,
    show_default=True,
    help="length of the send phase",
)
@click.option(
    "--processes",
    type=click.IntRange(min=0),
    default=0,
    help=f"loadgen processes (0: one per {DEVICES_PER_WORKER:,} devices)",
)
@click.option(
    "--edge-processes",
    type=click.IntRange(min=1),
    default=None,
    help="the edge's processes setting (default: the edge's own default, as shipped)",
)
@click.option(
    "--drain",
    type=click.FloatRange(min=0),
    default=15.0,
    show_default=True,
    help="wait for outstanding windows",
)
@click.option("--json", "as_json", is_flag=True, help="print JSON only (the default output is JSON too)")
def bench_fleet(
    *,
    devices: int,
    period: float,
    seconds: float,
    processes: int,
    edge_processes: int | None,
    drain: float,
    as_json: bool,  # noqa: ARG001  (the output is JSON either way)
) -> None:
    """One site: N devices on their own MQTT connections, one edge node; lost windows, latency, RSS, CPU."""
    raise_fd_limit()
    processes = processes or max(1, math.ceil(devices / DEVICES_PER_WORKER))
    load_before = os.getloadavg()[0]
    workdir = Path(tempfile.mkdtemp(prefix="edgefleet-bench-fleet-"))
    try:
        result = run_fleet(
            workdir,
            devices=devices,
            period=period,
            seconds=seconds,
            processes=processes,
            drain=drain,
            edge_processes=edge_processes,
        )
    except BaseException:
        logger.error("bench fleet failed: its logs are kept in %s", workdir)  # noqa: TRY400
        raise
    shutil.rmtree(workdir, ignore_errors=True)
    result["cpu_count"] = os.cpu_count()
    result["load_avg_1m"] = {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)}
    click.echo(json.dumps(result))
