"""``edgefleet bench agent``: what the device agent costs at 100 Hz x 3 axes with 1 s windows.

Runs the real agent as a subprocess (``python -m device_agent run``) against a real broker (a
private mosquitto on a free port when the binary exists, else ``--broker``), waits for steady
state, then measures the agent process over ``--seconds``: CPU fraction of one core from
``/proc/PID/stat`` (utime + stime delta over the wall-clock delta, all threads), peak RSS
(``VmHWM``) and, for context, its private memory (USS) and the RSS of a bare Python process that
only imports the agent's required libraries (the floor no agent code can go below). A subscriber
counts the windows that arrive.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Final

import click

from shared.codec import decode_window
from shared.errors import BrokerError, CodecError
from shared.mqtt import MqttLink
from shared.private_broker import PrivateMosquitto
from shared.settings import MqttSettings
from shared.topics import Topics

RATE_HZ: Final = 100.0
WINDOW: Final = 100
TARGET_CPU: Final = 0.03
TARGET_RSS_MB: Final = 40.0
WARMUP_S: Final = 3.0
START_TIMEOUT_S: Final = 30.0
_TICK: Final = os.sysconf("SC_CLK_TCK")
FLOOR_IMPORTS: Final = "import click, yaml, sqlite3, paho.mqtt.client, pydantic, pydantic_settings"


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", "rb") as handle:
        fields = handle.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime (fields 14, 15)


def _status_kb(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def _uss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            private = sum(
                int(line.split()[1]) for line in handle if line.startswith(("Private_Clean", "Private_Dirty"))
            )
    except OSError:
        return None
    return private * 1024 / 1e6


def _floor_rss_mb() -> float:
    page = os.sysconf("SC_PAGE_SIZE")
    code = f"{FLOOR_IMPORTS}\nprint(int(open('/proc/self/statm').read().split()[1]) * {page})"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    return int(out.stdout.strip()) / 1e6


class _Counter:
    """Counts distinct windows of one device as they arrive."""

    def __init__(self, url: str, device_id: str) -> None:
        self.link = MqttLink(MqttSettings(url=url), client_id=f"bench-sub-{os.getpid()}")
        self.link.subscribe(Topics().telemetry(device_id), qos=1)
        self.link.connect()
        self.seqs: set[int] = set()
        self.bad = 0

    def poll(self) -> int:
        while not self.link.inbox.empty():
            msg = self.link.inbox.get()
            try:
                self.seqs.add(decode_window(msg.payload).seq)
            except CodecError:
                self.bad += 1
        return len(self.seqs)

    def stop(self) -> None:
        self.link.stop()


def _measure(url: str, seconds: float, workdir: Path) -> dict[str, Any]:
    device_id = f"bench-{os.getpid()}"
    counter = _Counter(url, device_id)
    log_path = workdir / "agent.log"
    argv = [
        sys.executable, "-m", "device_agent", "run",
        "--device-id", device_id, "--broker", url, "--sensor", "simulated",
        "--rate", str(RATE_HZ), "--window", str(WINDOW), "--data-dir", str(workdir / "agent"),
    ]  # fmt: skip
    with log_path.open("ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while counter.poll() == 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise click.ClickException(f"agent produced no window; log:\n{log_path.read_text()[-2000:]}")
            time.sleep(0.05)
        time.sleep(WARMUP_S)
        start_windows = counter.poll()
        cpu0, t0 = _cpu_seconds(proc.pid), time.monotonic()
        rss_peak_kb = 0
        end = t0 + seconds
        while time.monotonic() < end:
            rss_peak_kb = max(rss_peak_kb, _status_kb(proc.pid, "VmRSS"))
            counter.poll()
            time.sleep(0.25)
        cpu1, t1 = _cpu_seconds(proc.pid), time.monotonic()
        time.sleep(0.3)  # let the last window of the period arrive
        windows = counter.poll() - start_windows
        hwm_kb = _status_kb(proc.pid, "VmHWM")  # kernel's peak RSS over the whole life
        uss = _uss_mb(proc.pid)
        proc.send_signal(signal.SIGTERM)
        exit_code = proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        counter.stop()
    elapsed = t1 - t0
    return {
        "cpu_core_fraction": round((cpu1 - cpu0) / elapsed, 5),
        "rss_mb": round(max(hwm_kb, rss_peak_kb) * 1024 / 1e6, 2),
        "windows": windows,
        "windows_expected": round(elapsed * RATE_HZ / WINDOW),
        "seconds": round(elapsed, 2),
        "uss_mb": round(uss, 2) if uss is not None else None,
        "rss_floor_mb": round(_floor_rss_mb(), 2),
        "rss_floor_imports": FLOOR_IMPORTS,
        "rate_hz": RATE_HZ,
        "window": WINDOW,
        "channels": 3,
        "agent_exit_code": exit_code,
        "bad_payloads": counter.bad,
    }


@click.command("agent")
@click.option("--seconds", type=float, default=30.0, show_default=True, help="measured steady-state period")
@click.option("--broker", help="use this broker instead of a private mosquitto")
@click.option("--json", "as_json", is_flag=True, help="one compact JSON object (default: indented)")
def bench_agent(seconds: float, broker: str | None, as_json: bool) -> None:
    """Device agent CPU and RSS at 100 Hz x 3 axes, 1 s windows, against a real broker."""
    with tempfile.TemporaryDirectory(prefix="ef-bench-agent-") as tmp:
        workdir = Path(tmp)
        with contextlib.ExitStack() as stack:
            if broker is None:
                try:
                    url = stack.enter_context(PrivateMosquitto(workdir)).url
                except BrokerError as exc:
                    raise click.ClickException(f"{exc}\nor pass --broker mqtt://HOST:PORT") from exc
            else:
                url = broker
            result = _measure(url, seconds, workdir)
    result["broker"] = "private mosquitto" if broker is None else broker
    result["targets"] = {
        "cpu_core_fraction": TARGET_CPU,
        "rss_mb": TARGET_RSS_MB,
        "cpu_met": result["cpu_core_fraction"] <= TARGET_CPU,
        "rss_met": result["rss_mb"] <= TARGET_RSS_MB,
    }
    click.echo(json.dumps(result) if as_json else json.dumps(result, indent=2))
