"""Registry models, Alembic migrations and CRUD functions on SQLite AND PostgreSQL.

PostgreSQL runs at 127.0.0.1:5432 (trust auth, user postgres); each test session creates its own
database and drops it afterwards. If PostgreSQL is unreachable these tests fail: .ci/run starts it."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.exc import IntegrityError

from cloud.errors import NotFoundError
from cloud.registry import crud
from cloud.registry.db import engine_for, session_scope
from cloud.registry.models import Base, ModelVersion
from shared.schemas import AckStatus, Command, CommandAck, CommandName

PG_ADMIN_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    name = f"edgefleet_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:
        admin.dispose()
        pytest.fail(f"PostgreSQL at 127.0.0.1:5432 is not reachable ({exc}); .ci/run must start it")
    try:
        yield f"postgresql+psycopg2://postgres@127.0.0.1:5432/{name}"
    finally:
        engine_for.cache_clear()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def test_migration_creates_every_model_table(db_url: str) -> None:
    engine = create_engine(db_url)
    try:
        tables = set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert set(Base.metadata.tables) <= tables
    assert "alembic_version" in tables


def test_model_lineage_promote_and_resolve(db_url: str) -> None:
    with session_scope(db_url) as s:
        ds = crud.get_or_create_dataset(
            s,
            name="digits",
            source="builtin:digits",
            sha256="a" * 64,
            n_samples=10,
            input_shape=[8, 8, 1],
            class_names=["0", "1"],
        )
        again = crud.get_or_create_dataset(
            s,
            name="digits",
            source="builtin:digits",
            sha256="a" * 64,
            n_samples=10,
            input_shape=[8, 8, 1],
            class_names=["0", "1"],
        )
        assert again.id == ds.id
        run = crud.create_run(s, model_name="m", config={"x": 1}, dataset_id=ds.id)
        base = crud.create_model_version(
            s, name="m", version="r1-float32", variant="float32", dataset_id=ds.id, run_id=run.id
        )
        v1 = crud.create_model_version(
            s,
            name="m",
            version="r1-int8",
            variant="int8",
            dataset_id=ds.id,
            parent_id=base.id,
            run_id=run.id,
            metrics={"accuracy": 0.9},
        )
        crud.record_step(s, run_id=run.id, step="train", detail={"a": 1}, model_version_id=base.id)
        crud.record_step(
            s, run_id=run.id, step="train", detail={"a": 2}, model_version_id=base.id
        )  # idempotent
        crud.promote(s, model_id=v1.id)
        v2 = crud.create_model_version(s, name="m", version="r2-int8", variant="int8", parent_id=v1.id)
        crud.promote(s, model_id=v2.id)
    with session_scope(db_url) as s:
        assert crud.get_model_version(s, ref="m@production").version == "r2-int8"
        assert crud.get_model_version(s, ref="m@r1-int8").status == "retired"
        assert crud.get_model_version(s, ref="m@latest").version == "r2-int8"
        got = crud.get_model_version(s, ref="m@r1-int8")
        assert got.parent is not None
        assert got.parent.variant == "float32"
        assert got.dataset is not None
        assert got.dataset.sha256 == "a" * 64
        run = crud.get_run(s, run_id=got.run_id or 0)
        assert [(e.step, e.detail) for e in run.steps] == [("train", {"a": 2})]
        assert [a.action for a in crud.list_audit(s)] == ["promote", "promote"]
        with pytest.raises(NotFoundError):
            crud.get_model_version(s, ref="m@nope")
        with pytest.raises(NotFoundError):
            crud.get_model_version(s, ref="no-at-sign")


def test_unique_model_version_is_enforced(db_url: str) -> None:
    with session_scope(db_url) as s:
        s.add(ModelVersion(name="m", version="v1", variant="int8"))
    with session_scope(db_url) as s:
        s.add(ModelVersion(name="m", version="v1", variant="int8"))
        with pytest.raises(IntegrityError):
            s.flush()
        s.rollback()


def test_samples_labels_dedup_and_deployments(db_url: str) -> None:
    with session_scope(db_url) as s:
        for i, (label, source) in enumerate([("normal", "device"), (None, "none"), ("imbalance", "teacher")]):
            crud.add_sample(
                s,
                sample_id=f"s{i}",
                edge_id="e1",
                device_id="d1",
                seq=i,
                ts=1.0,
                predicted="normal",
                confidence=0.5,
                reason="low_confidence",
                privacy="full",
                window=b"\x00\x01",
                label=label,
                label_source=source,
            )
        crud.mark_processed(s, message_key="sample:s0")
    with session_scope(db_url) as s:
        assert crud.already_processed(s, message_key="sample:s0")
        assert not crud.already_processed(s, message_key="sample:s1")
        assert crud.count_samples(s, labelled=True) == 2
        assert crud.count_samples(s, labelled=False) == 1
        crud.set_label(s, sample_id="s1", label="bearing_fault")
        model = crud.create_model_version(s, name="m", version="v1", variant="int8")
        assert crud.next_desired_revision(s, edge_id="e1") == 1
        crud.record_desired(s, edge_id="e1", revision=1, model_version_id=model.id, payload={"r": 1})
        assert crud.next_desired_revision(s, edge_id="e1") == 2
        deployment = crud.create_deployment(s, model_version_id=model.id, targets={"e1": 1, "e2": 1})
        assert {t.edge_id for t in deployment.targets} == {"e1", "e2"}
        target = crud.update_deployment_target(
            s, edge_id="e1", revision=1, stage="swapped", ok=True, reason=None
        )
        assert target is not None
        assert target.stage == "swapped"
        assert (
            crud.update_deployment_target(s, edge_id="e9", revision=1, stage="failed", ok=False, reason="x")
            is None
        )
    with session_scope(db_url) as s:
        assert crud.count_samples(s, labelled=False) == 0
        edge = crud.upsert_edge(s, edge_id="e1", state="online")
        edge2 = crud.upsert_edge(s, edge_id="e1", model_version="v1")
        assert edge.id == edge2.id
        assert edge2.state == "online"
        crud.upsert_device(s, device_id="d1", edge_id="e1")
        crud.add_dead_letter(s, source="ingest", topic="t", reason="bad", payload=b"x" * 10_000)
    with session_scope(db_url) as s:
        assert crud.count_dead_letters(s, source="ingest") == 1


def test_groups_tags_commands_and_acks(db_url: str) -> None:
    command = Command.create(device_id="d1", name=CommandName.SET_RATE, args={"rate_hz": 50}, sender="ops")
    with session_scope(db_url) as s:
        edge = crud.assign(s, edge_id="e1", group="plant-a", tags=["line2", "line1", "line1"])
        assert edge.tags == ["line1", "line2"]
        device = crud.assign(s, device_id="d1", group="plant-a")
        assert device.group_id == edge.group_id
        assert crud.create_group(s, name="plant-a").id == edge.group_id
        crud.record_command(s, command=command)
        crud.record_command(s, command=command)  # once only
    with session_scope(db_url) as s:
        ack = CommandAck(
            command_id=command.command_id,
            device_id="d1",
            status=AckStatus.OK,
            ok=True,
            result={"rate_hz": 50},
        )
        record = crud.record_ack(s, ack=ack)
        assert record is not None
        assert record.ack_status == "ok"
        assert record.ack_result == {"rate_hz": 50}
        unknown = CommandAck(command_id="nope", device_id="d1", status=AckStatus.ERROR, ok=False)
        assert crud.record_ack(s, ack=unknown) is None
        with pytest.raises(ValueError, match="exactly one"):
            crud.assign(s, group="x")


def test_device_reports_edge_failover_and_desired_config(db_url: str) -> None:
    """Devices as edges report them (migration 0003 for the desired config): created when unknown,
    behind the first edge that reports them, moved to another edge only when theirs is not online,
    "unreachable" when their edge goes offline; desired config revisions merge and unset keys."""
    from cloud.registry import fleet  # noqa: PLC0415

    seen = {"device_id": "d1", "state": "online", "last_seen": 100.0, "config_revision": None}
    with session_scope(db_url) as s:
        crud.upsert_edge(s, edge_id="e1", state="online")
        crud.upsert_edge(s, edge_id="e2", state="online")
        device = fleet.record_device_seen(s, edge_id="e1", seen=seen)
        assert (device.state, device.edge_id, device.last_seen) == ("online", "e1", 100.0)
        # Another online edge of the site hears it too: the device stays behind e1.
        device = fleet.record_device_seen(s, edge_id="e2", seen={**seen, "last_seen": 90.0})
        assert (device.edge_id, device.last_seen) == ("e1", 100.0)  # last_seen never goes back
    with session_scope(db_url) as s:
        crud.upsert_edge(s, edge_id="e1", state="offline")
        assert fleet.mark_edge_devices_unreachable(s, edge_id="e1") == 1
        assert fleet.fleet_devices(s)[0]["state"] == "unreachable"
        device = fleet.record_device_seen(s, edge_id="e2", seen={**seen, "last_seen": 120.0})
        assert (device.state, device.edge_id) == ("online", "e2")  # failover
        assert fleet.mark_edge_devices_unreachable(s, edge_id="e1") == 0
    with session_scope(db_url) as s:
        first = fleet.set_device_config(s, device_id="d1", changes={"rate_hz": 50, "window": 64}, actor="ops")
        assert (first.revision, first.config) == (1, {"rate_hz": 50, "window": 64})
        again = fleet.set_device_config(s, device_id="d1", changes={"rate_hz": 25}, unset=["window"])
        assert (again.revision, again.config) == (2, {"rate_hz": 25})
        fleet.mark_device_config_published(s, device_id="d1", revision=2)
        fresh = fleet.set_device_config(s, device_id="new-1", changes={"send_labels": False})
        assert fresh.revision == 1
    with session_scope(db_url) as s:
        row = fleet.fleet_device(s, device_id="d1")
        assert (row["desired_config_revision"], row["config_in_sync"]) == (2, False)
        assert row["desired_config_published_at"] is not None
        fleet.record_device_seen(
            s,
            edge_id="e2",
            seen={**seen, "config_revision": 2, "config": {"rate_hz": 25.0}, "last_seen": 130.0},
        )
    with session_scope(db_url) as s:
        row = fleet.fleet_device(s, device_id="d1")
        assert row["config_in_sync"] is True
        assert row["config_diff"] == {"rate_hz": {"desired": 25, "reported": 25.0}}
        rows = {r["device_id"]: r for r in fleet.fleet_devices(s)}
        assert rows["new-1"]["state"] == "unknown"
        assert rows["new-1"]["config_in_sync"] is False
        with pytest.raises(NotFoundError):
            fleet.fleet_device(s, device_id="nobody")


def test_a_bare_postgresql_url_uses_the_installed_psycopg2() -> None:
    # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3, which the cloud extra does not install.
    from cloud.registry.db import make_engine, with_installed_driver  # noqa: PLC0415

    assert with_installed_driver("postgresql://u@h:5432/d") == "postgresql+psycopg2://u@h:5432/d"
    assert with_installed_driver("postgresql+psycopg2://u@h/d") == "postgresql+psycopg2://u@h/d"
    assert with_installed_driver("sqlite:///x.db") == "sqlite:///x.db"
    engine = make_engine("postgresql://postgres@127.0.0.1:5432/postgres")
    assert engine.dialect.driver == "psycopg2"
    engine.dispose()
