"""``edgefleet broker run`` and ``make-certs`` as an operator runs them: real processes, a SQLite
registry, ``fleet enroll`` / ``fleet revoke`` from the CLI."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509

from shared.cli import cli
from shared.mqtt import MqttLink
from shared.private_broker import free_port, mosquitto_binary, wait_port
from shared.settings.base import MqttSettings

EDGEFLEET = [sys.executable, "-m", "shared.cli"]
DEADLINE_S = 20.0
REVOKE_BOUND_S = 5.0


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    if mosquitto_binary() is None:
        pytest.fail("mosquitto is not installed: scripts/setup installs it with apt-get")
    return {
        **os.environ,
        "EDGEFLEET_DATABASE_URL": f"sqlite:///{tmp_path / 'registry.db'}",
        "EDGEFLEET_DATA_DIR": str(tmp_path / "cloud"),
        "EDGEFLEET_LOG_LEVEL": "INFO",
    }


class BrokerProcess:
    def __init__(self, tmp_path: Path, env: dict[str, str], *extra: str) -> None:
        self.port = free_port()
        self.cloud_port = free_port()  # not --port + 1 (the default): something else may hold it
        self.data_dir = tmp_path / "broker"
        tmp_path.mkdir(parents=True, exist_ok=True)
        self.stderr_path = tmp_path / "broker-run.err"
        self.stderr = self.stderr_path.open("wb")
        self.proc = subprocess.Popen(
            [
                *EDGEFLEET,
                "broker",
                "run",
                "--port",
                str(self.port),
                "--cloud-port",
                str(self.cloud_port),
                "--data-dir",
                str(self.data_dir),
                *extra,
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=self.stderr,
        )

    def wait_listening(self) -> None:
        assert wait_port(self.port, timeout=DEADLINE_S, alive=lambda: self.proc.poll() is None), self.output()
        assert wait_port(self.cloud_port, timeout=DEADLINE_S, alive=lambda: self.proc.poll() is None), (
            self.output()
        )
        deadline = time.monotonic() + DEADLINE_S  # started: files, mosquitto, sync loop, claim handler
        while "broker running" not in self.output() and time.monotonic() < deadline:
            assert self.proc.poll() is None, self.output()
            time.sleep(0.05)
        assert "broker running" in self.output()

    def output(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def mosquitto_pid(self) -> int:
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        assert len(children) == 1, children
        return int(children[0])

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(DEADLINE_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.stderr.close()
        return code


@pytest.fixture
def broker_process(tmp_path: Path, env: dict[str, str]) -> Iterator[BrokerProcess]:
    broker = BrokerProcess(tmp_path, env)
    yield broker
    broker.stop()


def edgefleet(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [*EDGEFLEET, *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, f"edgefleet {' '.join(args)}: {done.stderr}"
    return done.stdout


def test_run_enroll_revoke_then_sigterm(broker_process: BrokerProcess, env: dict[str, str]) -> None:
    broker_process.wait_listening()
    bundle = json.loads(edgefleet(env, "fleet", "enroll", "dev-1", "--kind", "device", "--json"))
    settings = MqttSettings(
        url=f"mqtt://127.0.0.1:{broker_process.port}",
        username=bundle["username"],
        password=bundle["password"],
        reconnect_min_s=0.5,
        reconnect_max_s=1.0,
    )
    link = MqttLink(settings, client_id="dev-1")
    link.start()
    try:
        deadline = time.monotonic() + DEADLINE_S  # enrolled: let in once the broker has synced
        while not link.connected and time.monotonic() < deadline:
            time.sleep(0.05)
        assert link.connected, broker_process.output()
        edgefleet(env, "fleet", "revoke", "dev-1")
        deadline = time.monotonic() + REVOKE_BOUND_S
        while link.connected and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not link.connected, "dev-1 still connected 5 s after `fleet revoke`"
        deadline = time.monotonic() + DEADLINE_S  # paho retries: each attempt is refused
        reasons: list[str] = []
        while not any("connect refused" in r for r in reasons) and time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                reasons.append(link.events.get(timeout=0.1).reason)
        assert any("connect refused" in r for r in reasons), reasons
        assert not link.connected
    finally:
        link.stop()
    for name in ("mosquitto.conf", "passwd-site", "acl-site", "passwd-cloud", "acl-cloud", "claims.secret"):
        path = broker_process.data_dir / name
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, name
    assert broker_process.stop() == 0


def test_run_exits_non_zero_with_the_log_when_mosquitto_dies(broker_process: BrokerProcess) -> None:
    broker_process.wait_listening()
    os.kill(broker_process.mosquitto_pid(), signal.SIGKILL)
    code = broker_process.proc.wait(DEADLINE_S)
    assert code != 0
    out = broker_process.output()
    assert "mosquitto exited with code" in out
    assert "mosquitto.log" in out


def test_run_refuses_a_port_in_use_with_mosquittos_words(tmp_path: Path, env: dict[str, str]) -> None:
    first = BrokerProcess(tmp_path / "a", env)
    try:
        first.wait_listening()
        second = subprocess.run(
            [*EDGEFLEET, "broker", "run", "--port", str(first.port), "--data-dir", str(tmp_path / "b")],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert second.returncode != 0
        assert "Address already in use" in second.stderr
    finally:
        first.stop()


def test_run_needs_all_three_tls_files(tmp_path: Path, env: dict[str, str]) -> None:
    cert = tmp_path / "x.crt"
    cert.write_text("x")
    result = CliRunner().invoke(
        cli,
        ["broker", "run", "--port", "1883", "--data-dir", str(tmp_path / "d"), "--tls-cert", str(cert)],
        env=env,
    )
    assert result.exit_code == 2
    assert "--tls-cert, --tls-key and --tls-ca go together" in result.output


def test_run_refuses_an_expired_server_certificate(tmp_path: Path, env: dict[str, str]) -> None:
    CliRunner().invoke(cli, ["broker", "make-certs", "--dir", str(tmp_path / "pki")], catch_exceptions=False)
    pki = tmp_path / "pki"
    result = CliRunner().invoke(
        cli,
        [
            "broker", "run", "--port", str(free_port()), "--data-dir", str(tmp_path / "d"),
            "--tls-cert", str(pki / "server-expired.crt"), "--tls-key", str(pki / "server-expired.key"),
            "--tls-ca", str(pki / "ca.crt"),
        ],
        env=env,
    )  # fmt: skip
    assert result.exit_code == 1
    assert "server-expired.crt" in result.output
    assert "expired" in result.output


def test_make_certs(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli,
        ["broker", "make-certs", "--dir", str(tmp_path), "--hostname", "broker.example", "--client", "dev-1"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    server = x509.load_pem_x509_certificate((tmp_path / "server.crt").read_bytes())
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(map(str, sans.get_values_for_type(x509.IPAddress))) == {"127.0.0.1"}
    assert set(sans.get_values_for_type(x509.DNSName)) == {"localhost", "broker.example"}
    client = x509.load_pem_x509_certificate((tmp_path / "client-dev-1.crt").read_bytes())
    assert client.subject.rfc4514_string() == "CN=dev-1"
    expired = x509.load_pem_x509_certificate((tmp_path / "client-expired.crt").read_bytes())
    assert expired.not_valid_after_utc.timestamp() < time.time()
    for key in tmp_path.glob("*.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key


def test_sigint_stops_mosquitto_too(broker_process: BrokerProcess) -> None:
    broker_process.wait_listening()
    mosquitto = broker_process.mosquitto_pid()
    broker_process.proc.send_signal(signal.SIGINT)
    assert broker_process.proc.wait(DEADLINE_S) == 0
    assert not Path(f"/proc/{mosquitto}").exists()  # stopped and reaped, not left behind
    assert (broker_process.data_dir / "mosquitto.db").exists()  # saved on the way out
