"""``edgefleet demo`` end to end: the whole topology as real processes (mosquitto, redis-server,
Celery worker and beat, ingest, 2 edge nodes, 20 simulated devices), the first model trained, drift
injected half-way, and the loop retraining and rolling out by itself. Also: an interrupted demo
leaves no process behind."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from shared.mqtt_packets import connect_packet, read_connack
from shared.private_broker import mosquitto_binary

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed"),
]

DEMO_TIMEOUT_S = 900
CONSOLE_LINE = re.compile(r"^console: (http://127\.0\.0\.1:\d+/)signin/link/\S+$", re.MULTILINE)
BROKER_LINE = re.compile(
    r"^demo: broker mosquitto \(edgefleet broker run\) at mqtt://127\.0\.0\.1:(\d+),", re.MULTILINE
)
# mosquitto's connection_messages: "New client connected from HOST:PORT as CLIENT_ID (p2, c1, k30, u'USER')."
CONNECTED = re.compile(r"New client connected from \S+ as (\S+) \(.*u'([^']+)'\)")


def _demo_argv(data_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "shared.cli", "demo", "--headless", "--data-dir", str(data_dir), *extra]


def _connack_code(port: int, username: str | None = None, password: str | None = None) -> int:
    """The CONNACK return code the broker on ``port`` gives an MQTT 3.1.1 CONNECT (0: accepted, 5: not
    authorized), without a username when ``username`` is None."""
    packet = connect_packet("anonymous-probe", username=username, password=password)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(packet)
        reply = read_connack(sock)
    assert reply[:2] == b"\x20\x02", reply
    return reply[3]


def _logins(data_dir: Path) -> list[tuple[str, str]]:
    """(client id, username) of every connection the demo's broker accepted (its log)."""
    text = (data_dir / "broker" / "mosquitto.log").read_text()
    return [(m.group(1), m.group(2)) for m in CONNECTED.finditer(text)]


def _leftovers(data_dir: Path) -> list[str]:
    """Processes still running whose command line or environment names the demo's data dir."""
    found = []
    marker = str(data_dir)
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
            environ = " ".join(proc.environ().values()) if marker not in cmdline else ""
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if (marker in cmdline or marker in environ) and proc.pid != os.getpid():
            found.append(f"{proc.pid}: {cmdline[:200]}")
    return found


@pytest.mark.timeout(DEMO_TIMEOUT_S)
def test_demo_headless_recovers_from_drift_without_losing_windows(tmp_path: Path) -> None:
    data_dir = tmp_path / "demo"
    done = subprocess.run(
        _demo_argv(
            data_dir,
            "--json",
            "--devices",
            "20",
            "--edges",
            "2",
            "--duration",
            "90",
            "--wait-recovery",
            "300",
        ),
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT_S - 30,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads(done.stdout)
    # The console's one-time sign-in link goes to stderr, once (stdout stays pure JSON).
    links = CONSOLE_LINE.findall(done.stderr)
    assert links == [summary["console_url"]], done.stderr[-4000:]
    windows, accuracy = summary["windows"], summary["accuracy"]
    assert windows["lost"] == 0, summary
    assert windows["sent"] > 0
    assert (
        windows["processed"] + windows["pending_on_devices"] + windows["dropped_counted_on_devices"]
        == (windows["sent"])
    )
    # Drift hurt the first model, the loop published a newer one, and accuracy came back.
    assert accuracy["before_drift"] is not None
    assert accuracy["after_drift"] is not None
    assert accuracy["after_drift"] < accuracy["before_drift"] - 0.05, summary
    assert len(summary["models"]["published"]) >= 2, summary
    assert summary["triggers"], summary
    assert summary["seconds_to_recover"] is not None, summary
    assert accuracy["after_recovery"] is not None, summary
    assert accuracy["after_recovery"] > accuracy["after_drift"], summary
    assert set(summary["models"]["final_per_edge"].values()) != {summary["models"]["first"]}
    # Per-identity credentials: one bundle (0600) per identity, and every edge connection and device
    # logged in under its own username (the broker forces client id = username on the site listener).
    assert summary["broker_auth"] == "per-identity", summary
    devices = {f"dev-{i:03d}" for i in range(20)}
    bundles = sorted((data_dir / "identities").glob("*.json"))
    assert {b.stem for b in bundles} == {"cloud", "edge-1", "edge-2", *devices}
    assert all(b.stat().st_mode & 0o777 == 0o600 for b in bundles)
    logins = _logins(data_dir)
    assert all(client == user for client, user in logins if not user.startswith(("cloud", "broker-"))), logins
    users = {user for _, user in logins}
    assert devices <= users, sorted(users)
    edge_users = {u for u in users if u.split("/")[0] in ("edge-1", "edge-2")}
    for edge in ("edge-1", "edge-2"):
        assert {f"{edge}/site", f"{edge}/cloud"} <= edge_users, sorted(users)
    assert users - devices - edge_users <= {"cloud", "broker-claims", "broker-sync"}, sorted(users)
    assert _leftovers(data_dir) == []


@pytest.mark.timeout(DEMO_TIMEOUT_S)
def test_interrupted_demo_stops_every_process(tmp_path: Path) -> None:
    data_dir = tmp_path / "demo"
    log = (tmp_path / "demo.log").open("w")
    try:
        proc = subprocess.Popen(
            _demo_argv(
                data_dir, "--devices", "4", "--edges", "2", "--duration", "600", "--devices-in-one-process"
            ),
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            # Wait until the whole topology streams (or the demo fails).
            deadline = time.monotonic() + DEMO_TIMEOUT_S / 2
            while "[streaming]" not in (tmp_path / "demo.log").read_text():
                assert proc.poll() is None, (tmp_path / "demo.log").read_text()[-4000:]
                assert time.monotonic() < deadline, "the demo never started streaming"
                time.sleep(1)
            # broker, redis, worker, beat, ingest, console, 2 edges, devices
            assert len(_leftovers(data_dir)) >= 9
            # The broker logs in identities only: an anonymous client and a wrong password are refused.
            broker = BROKER_LINE.search((tmp_path / "demo.log").read_text())
            assert broker is not None, (tmp_path / "demo.log").read_text()[-4000:]
            port = int(broker.group(1))
            assert _connack_code(port) == 5
            assert _connack_code(port, "dev-000", "not-its-secret") in (4, 5)
            bundle = json.loads((data_dir / "identities" / "dev-000.json").read_text())
            assert bundle["broker_url"] == f"mqtt://127.0.0.1:{port}"
            # The printed link signs in once: a session cookie and off to the fleet page.
            link = CONSOLE_LINE.search((tmp_path / "demo.log").read_text())
            assert link is not None
            answer = httpx.get(link.group(0).removeprefix("console: "), follow_redirects=False)
            assert answer.status_code == 303
            assert "ef_session=" in answer.headers["set-cookie"]
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=120) == 130
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    finally:
        log.close()
    assert _leftovers(data_dir) == []
