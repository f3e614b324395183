"""The compose helper scripts outside a container: the device agent's token pool (each device takes one
claim token, atomically, and only one), the cloud services' identity wrapper and the broker health
probe (against a real mosquitto on 127.0.0.1)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from shared.identity import broker_hash

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / "deploy" / "bin"


def _device(pool: Path, state: Path, device_id: str, *command: str) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": os.environ["PATH"],
        "EDGEFLEET_DEVICE_ID": device_id,
        "EDGEFLEET_DATA_DIR": str(state),
        "EDGEFLEET_TOKEN_POOL": str(pool),
        "EDGEFLEET_TOKEN_WAIT_S": "0",
    }
    return subprocess.run(
        ["sh", str(BIN / "agent-entrypoint"), *command],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def _pool(tmp_path: Path, tokens: dict[str, str]) -> Path:
    pool = tmp_path / "pool"
    (pool / "available").mkdir(parents=True)
    (pool / "claimed").mkdir()
    for token_id, secret in tokens.items():
        (pool / "available" / token_id).write_text(f"{token_id}.{secret}\n")
    return pool


SHOW_ENV = ("sh", "-c", 'echo "token=${EDGEFLEET_CLAIM_TOKEN_FILE:-none} bundle=$EDGEFLEET_ENROLLMENT_FILE"')


def test_each_device_takes_exactly_one_token_and_the_pool_runs_dry(tmp_path: Path) -> None:
    pool = _pool(tmp_path, {"aaaaaa01": "s" * 43, "aaaaaa02": "t" * 43})
    taken = []
    for device in ("dev-1", "dev-2"):
        state = tmp_path / device
        result = _device(pool, state, device, *SHOW_ENV)
        assert result.returncode == 0, result.stderr
        token_file = state / "claim.token"
        assert f"token={token_file} bundle={state / 'enrollment.json'}" in result.stdout
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        taken.append(token_file.read_text())
    assert len(set(taken)) == 2  # one token each, never the same one
    assert not list((pool / "available").iterdir())
    assert not list((pool / "claimed").iterdir())  # moved out of the pool once copied
    # A third device finds none (after its wait) and says what to do.
    third = _device(pool, tmp_path / "dev-3", "dev-3", "true")
    assert third.returncode == 1
    assert "no claim token" in third.stderr
    assert "refill the pool" in third.stderr


def test_a_device_with_a_token_or_an_identity_takes_no_other(tmp_path: Path) -> None:
    pool = _pool(tmp_path, {"bbbbbb01": "u" * 43})
    enrolled = tmp_path / "dev-enrolled"
    enrolled.mkdir()
    (enrolled / "enrollment.json").write_text("{}")
    result = _device(pool, enrolled, "dev-enrolled", *SHOW_ENV)
    assert result.returncode == 0, result.stderr
    assert "token=none" in result.stdout  # enrolled: no claim
    assert (pool / "available" / "bbbbbb01").exists()  # and the pool is untouched
    # A device restarted mid-claim finds the token it had taken in claimed/<its id>.
    (pool / "available" / "bbbbbb01").rename(pool / "claimed" / "dev-restarted")
    again = _device(pool, tmp_path / "dev-restarted", "dev-restarted", *SHOW_ENV)
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "dev-restarted" / "claim.token").read_text().startswith("bbbbbb01.")


def test_with_identity_passes_the_bundles_login_to_the_command_only(tmp_path: Path) -> None:
    bundle = tmp_path / "cloud.json"
    bundle.write_text('{"username": "cloud", "password": "the-secret"}')
    show = (
        "import os; print(os.environ['EDGEFLEET_BROKER__USERNAME'], os.environ['EDGEFLEET_BROKER__PASSWORD'])"
    )
    result = subprocess.run(
        [sys.executable, str(BIN / "with-identity"), str(bundle), "--", sys.executable, "-c", show],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["cloud", "the-secret"]
    broken = tmp_path / "broken.json"
    broken.write_text('{"username": "cloud"}')
    refused = subprocess.run(
        [sys.executable, str(BIN / "with-identity"), str(broken), "--", "true"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert refused.returncode == 1
    assert "no enrollment bundle with a password" in refused.stderr


def test_broker_health_logs_in_as_the_health_user(tmp_path: Path) -> None:
    from shared.private_broker import mosquitto_binary  # noqa: PLC0415

    binary = mosquitto_binary()
    if binary is None:
        pytest.skip("mosquitto is not installed")
    probe = BIN / "broker-health"
    source = probe.read_text().replace('HOST, PORT, USER = "127.0.0.1", 1883, "health"', "")
    data = tmp_path / "broker"
    data.mkdir()
    (data / "health.secret").write_text("health-secret\n")
    (data / "passwd").write_text(f"health:{broker_hash('health-secret', iterations=1000)}\n")
    port = _free_port()
    (data / "mosquitto.conf").write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {data / 'passwd'}\nuser root\n"
    )
    proc = subprocess.Popen([binary, "-c", str(data / "mosquitto.conf")], stderr=subprocess.DEVNULL)
    try:
        from shared.private_broker import wait_port  # noqa: PLC0415

        assert wait_port(port, timeout=10, alive=lambda: proc.poll() is None), "mosquitto did not start"
        script = f'HOST, PORT, USER = "127.0.0.1", {port}, "health"\n' + source
        ok = subprocess.run(
            [sys.executable, "-c", script, str(data)], capture_output=True, text=True, timeout=30, check=False
        )
        assert ok.returncode == 0, ok.stderr
        (data / "health.secret").write_text("wrong\n")
        refused = subprocess.run(
            [sys.executable, "-c", script, str(data)], capture_output=True, text=True, timeout=30, check=False
        )
        assert refused.returncode == 1
        assert "login refused" in refused.stderr
        assert "wrong" not in refused.stderr
    finally:
        proc.terminate()
        proc.wait(10)


def _free_port() -> int:
    from shared.private_broker import free_port  # noqa: PLC0415

    return free_port()
