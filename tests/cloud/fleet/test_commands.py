"""``edgefleet command send``: fan-out to a group / an edge's devices over a real mosquitto, every
ack shown and recorded in the registry, the sender in the audit log; missing acks time out."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner
from sqlalchemy import select

from cloud.registry import crud
from cloud.registry.db import session_scope, upgrade
from cloud.registry.models import CommandRecord
from shared.cli import cli as edgefleet
from tests.support.brokers import Mosquitto
from tests.support.edge_fixtures import FakeDevice


def _env(tmp_path: Path, broker: Mosquitto) -> dict[str, str]:
    return {
        "EDGEFLEET_DATABASE_URL": f"sqlite:///{tmp_path / 'registry.db'}",
        "EDGEFLEET_DATA_DIR": str(tmp_path / "cloud"),
        "EDGEFLEET_BROKER__URL": broker.url,
    }


def test_group_command_gets_every_ack_and_is_audited(tmp_path: Path, mosquitto: Mosquitto) -> None:
    env = _env(tmp_path, mosquitto)
    url = env["EDGEFLEET_DATABASE_URL"]
    upgrade(url)
    runner = CliRunner()
    for device in ("pump-1", "pump-2", "pump-3"):
        result = runner.invoke(
            edgefleet,
            ["fleet", "assign", "--device", device, "--group", "line-a", "--behind", "edge-1"],
            env=env,
        )
        assert result.exit_code == 0, result.output
    with session_scope(url) as session:
        crud.assign(session, device_id="fan-9", tags=["hall-2"])  # registered, but never online
    devices = [FakeDevice(mosquitto.url, d) for d in ("pump-1", "pump-2", "pump-3")]
    try:
        result = runner.invoke(
            edgefleet,
            [
                "command",
                "send",
                "--group",
                "line-a",
                "set_rate",
                "--arg",
                "rate_hz=50",
                "--wait",
                "30",
                "--json",
            ],
            env=env,
        )
        assert result.exit_code == 0, result.output
        report = json.loads(result.output)
        assert report["summary"] == {"targets": 3, "acked": 3, "failed": 0, "timed_out": 0}
        assert sorted(o["device_id"] for o in report["outcomes"]) == ["pump-1", "pump-2", "pump-3"]
        for device in devices:
            assert [(c.name.value, c.args) for c in device.commands] == [("set_rate", {"rate_hz": 50})]

        # --edge: every device behind the edge, human-readable output with per-target lines.
        result = runner.invoke(
            edgefleet, ["command", "send", "--edge", "edge-1", "ping", "--wait", "30"], env=env
        )
        assert result.exit_code == 0, result.output
        assert "3 acked, 0 failed, 0 timed out of 3" in result.output
        assert "pump-2: ok" in result.output

        # A device that never answers: counted as timed out, the exit code says not everything acked.
        result = runner.invoke(
            edgefleet, ["command", "send", "--group", "hall-2", "ping", "--wait", "0.5"], env=env
        )
        assert result.exit_code == 1
        assert "fan-9: no ack" in result.output
        assert "0 acked, 0 failed, 1 timed out of 1" in result.output
    finally:
        for device in devices:
            device.close()
    with session_scope(url) as session:
        records = list(session.scalars(select(CommandRecord).order_by(CommandRecord.id)))
        assert len(records) == 7
        assert all(r.ack_status == "ok" for r in records[:6])
        assert records[6].ack_status is None
        assert all(r.sender.startswith("cli") for r in records)
        sends = [a for a in crud.list_audit(session) if a.action == "command_send"]
        assert len(sends) == 3
        assert all(a.actor.startswith("cli") for a in sends)
        assert sends[-1].detail["devices"] == ["pump-1", "pump-2", "pump-3"]


def test_command_send_refuses_bad_input(tmp_path: Path, mosquitto: Mosquitto) -> None:
    env = _env(tmp_path, mosquitto)
    upgrade(env["EDGEFLEET_DATABASE_URL"])
    runner = CliRunner()
    result = runner.invoke(edgefleet, ["command", "send", "dev-1", "explode"], env=env)
    assert result.exit_code != 0
    assert "unknown command 'explode'" in result.output
    result = runner.invoke(edgefleet, ["command", "send", "--group", "nobody", "ping"], env=env)
    assert result.exit_code != 0
    assert "no device in the registry" in result.output
    result = runner.invoke(edgefleet, ["command", "send", "dev-1", "ping", "--arg", "novalue"], env=env)
    assert result.exit_code != 0
    assert "KEY=VALUE" in result.output


def test_late_ack_is_recorded_by_the_ingest(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """The sender stops waiting at once; the ingest (subscribed to device acks) records the ack."""
    import threading  # noqa: PLC0415

    from cloud.fleet.commands import send_commands  # noqa: PLC0415
    from cloud.ingest import Ingest  # noqa: PLC0415
    from shared.settings import MqttSettings  # noqa: PLC0415
    from shared.settings.cloud import CloudSettings  # noqa: PLC0415
    from tests.support.edge_fixtures import wait_for  # noqa: PLC0415

    settings = CloudSettings(
        data_dir=tmp_path / "cloud",
        database_url=f"sqlite:///{tmp_path / 'registry.db'}",
        broker=MqttSettings(url=mosquitto.url),
    )
    ingest = Ingest(settings)
    thread = threading.Thread(target=ingest.run, daemon=True)
    thread.start()
    device = FakeDevice(mosquitto.url, "valve-1")
    try:
        wait_for(lambda: ingest.link.connected, "the ingest connected")
        assert ingest.link.wait_subscribed()
        result = send_commands(settings=settings, device_ids=["valve-1"], name="ping", wait_s=0, sender="ops")
        assert result.summary()["timed_out"] == 1
        command_id = result.outcomes[0].command_id

        def acked() -> bool:
            with session_scope(settings.resolved_database_url) as session:
                record = session.scalar(select(CommandRecord).where(CommandRecord.command_id == command_id))
                return record is not None and record.ack_status == "ok"

        wait_for(acked, "the ingest to record the late ack")
        assert ingest.stats.by_kind["ack"] == 1
    finally:
        device.close()
        ingest.stop_event.set()
        thread.join(10)
        ingest.close()
