"""Which samples' labels may train (migration 0007, ``crud.training_samples_clause``), on SQLite and
PostgreSQL: teachers' and operators' labels, and a device's only from a trusted labeller, then and now."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import column, insert, select, table

from cloud.registry import crud, identities
from cloud.registry.db import downgrade, engine_for, session_scope, upgrade
from cloud.registry.models import Sample
from tests.support.identities import enroll_fleet


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    url = (
        f"sqlite:///{tmp_path / 'registry.db'}"
        if request.param == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    yield url
    engine_for(url).dispose()
    if request.param == "postgresql":
        downgrade(url, "base")


def _row(sample_id: str, device: str, label: str | None, source: str) -> dict[str, object]:
    return {
        "sample_id": sample_id,
        "edge_id": "e1",
        "device_id": device,
        "seq": 1,
        "ts": 1.0,
        "predicted": "normal",
        "confidence": 0.5,
        "reason": "random",
        "privacy": "none",
        "label": label,
        "label_source": source,
        "received_at": time.time(),
    }


def test_migration_keeps_teacher_and_operator_labels_training_and_device_labels_evaluating(
    db_url: str,
) -> None:
    upgrade(db_url, "0006")
    samples_0006 = table(
        "samples", *(column(name) for name in _row("x", "d", None, "none"))
    )  # no label_trusted
    with engine_for(db_url).begin() as conn:
        conn.execute(
            insert(samples_0006),
            [
                _row("teacher", "d1", "normal", "teacher"),
                _row("human", "d1", "imbalance", "human"),
                _row("device", "d1", "normal", "device"),
                _row("none", "d1", None, "none"),
            ],
        )
    engine_for(db_url).dispose()
    upgrade(db_url)
    enroll_fleet(db_url, label_trusted=["d1"], migrate=False)
    with session_scope(db_url) as session:
        trusted = {
            sid: bool(flag) for sid, flag in session.execute(select(Sample.sample_id, Sample.label_trusted))
        }
        assert trusted == {"teacher": True, "human": True, "device": False, "none": False}
        # Nobody marked d1 trusted when its label arrived: trusting it now does not bring it in.
        assert {s.sample_id for s in crud.list_samples(session, training=True)} == {"teacher", "human"}


def test_only_trusted_labellers_labels_train(db_url: str) -> None:
    upgrade(db_url)
    enroll_fleet(
        db_url, devices=["d-untrusted"], label_trusted=["d-trusted", "d-later-untrusted"], migrate=False
    )
    with session_scope(db_url) as session:
        crud.add_sample(session, **_row("teacher", "d-untrusted", "normal", "teacher"))
        crud.add_sample(session, **_row("operator", "d-untrusted", "normal", "human"))
        crud.add_sample(session, **_row("untrusted", "d-untrusted", "normal", "device"))
        crud.add_sample(session, **_row("unknown", "d-unknown", "normal", "device"), label_trusted=True)
        crud.add_sample(session, **_row("trusted", "d-trusted", "normal", "device"), label_trusted=True)
        crud.add_sample(session, **_row("later", "d-later-untrusted", "normal", "device"), label_trusted=True)
        crud.add_sample(session, **_row("none", "d-trusted", None, "none"))
    with session_scope(db_url) as session:
        assert crud.count_samples(session, labelled=True) == 6  # every label is kept (evaluation)
        assert {s.sample_id for s in crud.list_samples(session, training=True)} == {
            "teacher",
            "operator",
            "trusted",
            "later",
        }
        identities.set_label_trust(session, identity_id="d-later-untrusted", trusted=False)
    with session_scope(db_url) as session:
        assert crud.count_samples(session, labelled=True, training=True) == 3
        identities.revoke(session, identity_id="d-trusted")
    with session_scope(db_url) as session:
        assert crud.count_samples(session, labelled=True, training=True, since=0.0) == 2
        # An operator relabelling a device's sample makes it train.
        crud.set_label(session, sample_id="untrusted", label="imbalance")
    with session_scope(db_url) as session:
        assert crud.count_samples(session, training=True) == 3
