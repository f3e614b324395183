"""``edgefleet demo`` end to end: the whole topology as real processes (mosquitto, redis-server,
Celery worker and beat, ingest, 2 edge nodes, 20 simulated devices), the first model trained, drift
injected half-way, and the loop retraining and rolling out by itself. Also: an interrupted demo
leaves no process behind."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from shared.private_broker import mosquitto_binary

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed"),
]

DEMO_TIMEOUT_S = 900
CONSOLE_LINE = re.compile(r"^console: (http://127\.0\.0\.1:\d+/)signin/link/\S+$", re.MULTILINE)


def _demo_argv(data_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "shared.cli", "demo", "--headless", "--data-dir", str(data_dir), *extra]


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
