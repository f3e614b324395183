"""The cloud ingest trusts identities, not topics (issue 11): a real mosquitto, a real registry (SQLite).

- Uplink from an edge id that is not an enrolled, active ``edge`` identity is dead-lettered with its
  reason (``unknown_edge``, ``not_an_edge``, ``revoked_edge``) and counted; nothing of it is written.
- Revoking an edge refuses its messages within seconds (the ingest polls ``auth_revision``).
- A device report touches only the devices the reporting edge serves (``not_served`` otherwise).
- An oversized payload (``too_large``, never decoded) and a flood (``rate_limited``) are counted; only
  a bounded number of them per edge and minute are stored as dead letters.
- Label poisoning: an untrusted device's labels are kept to evaluate models but reach neither the
  training set nor the retrain trigger; a trusted labeller's do, and only through an edge serving it.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from cloud.errors import DatasetError
from cloud.ingest import Ingest
from cloud.learning import steps
from cloud.learning.pipeline import PipelineConfig
from cloud.registry import crud, fleet, identities
from cloud.registry.db import session_scope
from cloud.registry.models import DeadLetterRecord
from cloud.worker.triggers import evaluate_triggers
from shared.codec import encode_window
from shared.mqtt import MqttLink, Received
from shared.schemas import (
    Decision,
    DeviceReport,
    DeviceSeen,
    EdgeMetrics,
    EdgeStatus,
    HardExample,
    OnlineState,
    Privacy,
    ReportedState,
    SampleReason,
    Severity,
    encode_message,
)
from shared.settings import CloudSettings, MqttSettings
from shared.settings.cloud import Thresholds
from shared.topics import EdgeTopic
from tests.support.brokers import Mosquitto
from tests.support.edge_fixtures import wait_for
from tests.support.identities import enroll_fleet

CLASSES = ["normal", "imbalance", "misalignment", "bearing_fault"]
WAIT_S = 30.0


# -- helpers -----------------------------------------------------------------------------------------


def _settings(tmp_path: Path, broker: Mosquitto, **ingest: object) -> CloudSettings:
    return CloudSettings(
        data_dir=tmp_path,
        broker=MqttSettings(url=broker.url),
        ingest_batch=20,
        ingest_flush_s=0.1,
        ingest=ingest,
    )


def _window(device: str, seq: int, size: int = 100) -> bytes:
    values = np.random.default_rng(seq).normal(size=(size, 3)).astype(np.float32)
    return encode_window(
        device_id=device,
        seq=seq,
        ts=1000.0 + seq,
        sample_rate_hz=100.0,
        channels=("x", "y", "z"),
        values=values,
    )


def _sample(edge: str, device: str, seq: int, *, label: str | None = "imbalance", size: int = 100) -> bytes:
    return encode_message(
        HardExample(
            sample_id=f"{edge}-{device}-{seq}-{uuid.uuid4().hex[:6]}",
            edge_id=edge,
            device_id=device,
            seq=seq,
            ts=1000.0 + seq,
            model_name="vib",
            model_version="r1-int8",
            predicted="normal",
            probabilities=[0.4, 0.3, 0.2, 0.1],
            class_names=CLASSES,
            reason=SampleReason.LOW_CONFIDENCE,
            label=label,
            privacy=Privacy.FULL,
            window_b64=base64.b64encode(_window(device, seq, size)).decode(),
        )
    )


def _status(edge: str) -> bytes:
    return encode_message(
        EdgeStatus(edge_id=edge, state=OnlineState.ONLINE, reported=ReportedState(model_version="r1-int8"))
    )


def _metrics(edge: str, windows: int = 100) -> bytes:
    return encode_message(
        EdgeMetrics(edge_id=edge, ts=time.time(), interval_s=1.0, windows_total=windows, windows_per_s=1.0)
    )


def _decision(edge: str, device: str) -> bytes:
    return encode_message(
        Decision(
            decision_id=uuid.uuid4().hex,
            edge_id=edge,
            device_id=device,
            rule="fault",
            class_name="imbalance",
            probability=0.97,
            severity=Severity.HIGH,
            window_seq=3,
        )
    )


def _report(edge: str, *devices: str, state: OnlineState = OnlineState.ONLINE) -> bytes:
    return encode_message(
        DeviceReport(
            edge_id=edge,
            full=True,
            devices=[
                DeviceSeen(device_id=d, state=state, reason="birth", last_seen=time.time()) for d in devices
            ],
        )
    )


def _publish_all(broker: Mosquitto, messages: list[tuple[str, bytes]]) -> None:
    link = MqttLink(MqttSettings(url=broker.url), client_id=f"pub-{uuid.uuid4().hex[:8]}")
    link.connect()
    handles = [link.publish(topic, payload, qos=1) for topic, payload in messages]
    deadline = time.monotonic() + WAIT_S
    acked = all(h.wait(max(0.0, deadline - time.monotonic())) for h in handles)
    link.stop()
    assert acked


def _ingest_once(settings: CloudSettings, broker: Mosquitto, messages: list[tuple[str, bytes]]) -> Ingest:
    """Publish ``messages`` to a subscribed ingest and store every one of them; the ingest's stats."""
    ingest = Ingest(settings, client_id=f"ingest-{uuid.uuid4().hex[:8]}")
    ingest.link.connect()
    assert ingest.link.wait_subscribed()
    try:
        _publish_all(broker, messages)
        ingest.run(max_messages=len(messages), idle_exit_s=WAIT_S)
    finally:
        ingest.close()
    assert ingest.stats.received == len(messages)
    return ingest


def _dead_letters(url: str) -> list[tuple[str, str]]:
    """(topic, reason code) of the ingest's dead letters, oldest first."""
    with session_scope(url) as session:
        rows = session.execute(
            select(DeadLetterRecord.topic, DeadLetterRecord.reason)
            .where(DeadLetterRecord.source == "ingest")
            .order_by(DeadLetterRecord.id)
        )
        return [(topic, reason.split(":", 1)[0]) for topic, reason in rows]


class RunningIngest:
    """The ingest consuming in a thread, as ``edgefleet cloud ingest`` does."""

    def __init__(self, settings: CloudSettings) -> None:
        self.ingest = Ingest(settings, client_id=f"ingest-{uuid.uuid4().hex[:8]}")
        self.thread = threading.Thread(target=self.ingest.run, daemon=True)
        self.thread.start()
        wait_for(lambda: self.ingest.link.connected, "the ingest connected", WAIT_S)
        assert self.ingest.link.wait_subscribed()

    def settle(self, received: int) -> None:
        """Wait until the ingest has stored (or refused) ``received`` messages in all, committed."""
        wait_for(lambda: self.ingest.stats.acknowledged >= received, f"{received} messages ingested", WAIT_S)

    def close(self) -> None:
        self.ingest.stop_event.set()
        self.thread.join(10)
        self.ingest.close()


@pytest.fixture
def settings(tmp_path: Path, mosquitto: Mosquitto) -> CloudSettings:
    settings = _settings(tmp_path, mosquitto)
    enroll_fleet(
        settings.resolved_database_url,
        edges=["e1", "e2"],
        devices=["d1", "d2", "d-evil"],
        label_trusted=["d-good"],
    )
    return settings


@pytest.fixture
def running(settings: CloudSettings) -> Iterator[RunningIngest]:
    state = RunningIngest(settings)
    try:
        yield state
    finally:
        state.close()


# -- unknown, foreign and revoked edges --------------------------------------------------------------


def test_unenrolled_edge_is_dead_lettered_counted_and_writes_nothing(
    settings: CloudSettings, mosquitto: Mosquitto
) -> None:
    topics = settings.broker.topics
    rogue = [
        (topics.edge("rogue", EdgeTopic.SAMPLES), _sample("rogue", "d1", 1)),
        (topics.edge("rogue", EdgeTopic.STATUS), _status("rogue")),
        (topics.edge("rogue", EdgeTopic.METRICS), _metrics("rogue")),
        (topics.edge("rogue", EdgeTopic.DECISION), _decision("rogue", "d1")),
        (topics.edge("rogue", EdgeTopic.DEVICES), _report("rogue", "d1")),
        # A device's identity is not an edge's: it may not speak on an edge topic.
        (topics.edge("d1", EdgeTopic.SAMPLES), _sample("d1", "d1", 2)),
        (topics.edge("d1", EdgeTopic.STATUS), _status("d1")),
    ]
    ingest = _ingest_once(settings, mosquitto, rogue)
    assert ingest.stats.stored == 0
    assert ingest.stats.malformed == 0
    assert ingest.stats.rejected == len(rogue)
    assert ingest.stats.rejected_by_reason == {"unknown_edge": 5, "not_an_edge": 2}
    assert ingest.stats.as_dict()["rejected_by_reason"] == {"unknown_edge": 5, "not_an_edge": 2}
    url = settings.resolved_database_url
    assert sorted(_dead_letters(url)) == sorted(
        (topic, reason)
        for (topic, _), reason in zip(rogue, ["unknown_edge"] * 5 + ["not_an_edge"] * 2, strict=True)
    )
    with session_scope(url) as session:
        assert crud.count_samples(session) == 0
        assert crud.list_edges(session) == []
        assert crud.recent_metrics(session, since=0) == []
        assert fleet.get_device(session, device_id="d1") is None
        # The refusals are visible where operators look: the registry's dead letters.
        assert crud.count_dead_letters(session, source="ingest") == len(rogue)


def test_enrolled_edge_is_stored_and_a_revoked_one_refused_within_seconds(
    settings: CloudSettings, mosquitto: Mosquitto, running: RunningIngest
) -> None:
    topics = settings.broker.topics
    url = settings.resolved_database_url
    _publish_all(
        mosquitto,
        [
            (topics.edge("e1", EdgeTopic.STATUS), _status("e1")),
            (topics.edge("e1", EdgeTopic.SAMPLES), _sample("e1", "d1", 1)),
            (topics.edge("e1", EdgeTopic.DEVICES), _report("e1", "d1")),
        ],
    )
    running.settle(3)
    stats = running.ingest.stats
    assert (stats.stored, stats.rejected) == (3, 0)
    with session_scope(url) as session:
        assert crud.count_samples(session) == 1
        assert [(e.edge_id, e.state) for e in crud.list_edges(session)] == [("e1", "online")]
        d1 = fleet.get_device(session, device_id="d1")
        assert d1 is not None
        assert (d1.edge_id, d1.state) == ("e1", "online")

    with session_scope(url) as session:
        identities.revoke(session, identity_id="e1", actor="tests")

    # Within seconds (the ingest polls the identities' revision): every new message of e1 is refused.
    sent = 3
    seq = 10

    def refused() -> bool:
        nonlocal sent, seq
        seq += 1
        _publish_all(mosquitto, [(topics.edge("e1", EdgeTopic.SAMPLES), _sample("e1", "d1", seq))])
        sent += 1
        running.settle(sent)
        return stats.rejected_by_reason["revoked_edge"] > 0

    wait_for(refused, "e1's messages refused after its revocation", WAIT_S)
    samples_before = stats.stored
    with session_scope(url) as session:
        stored_samples = crud.count_samples(session)
    _publish_all(
        mosquitto,
        [
            (topics.edge("e1", EdgeTopic.SAMPLES), _sample("e1", "d1", 99)),
            (topics.edge("e1", EdgeTopic.METRICS), _metrics("e1")),
            (topics.edge("e1", EdgeTopic.DEVICES), _report("e1", "d1", state=OnlineState.OFFLINE)),
        ],
    )
    running.settle(sent + 3)
    assert stats.stored == samples_before
    with session_scope(url) as session:
        assert crud.count_samples(session) == stored_samples
        assert crud.recent_metrics(session, since=0) == []
        d1 = fleet.get_device(session, device_id="d1")
        assert d1 is not None
        assert d1.state == "online"
    assert "revoked_edge" in {reason for _, reason in _dead_letters(url)}

    # Enrolled again (a new secret): trusted again, as fast.
    enroll_fleet(url, edges=["e1"], migrate=False)
    before = stats.stored

    def stored_again() -> bool:
        nonlocal sent, seq
        seq += 1
        _publish_all(mosquitto, [(topics.edge("e1", EdgeTopic.SAMPLES), _sample("e1", "d1", seq))])
        sent += 1
        running.settle(sent)
        return stats.stored > before

    wait_for(stored_again, "e1's messages stored after its re-enrollment", WAIT_S)


# -- device reports: only the devices the edge serves -----------------------------------------------


def test_device_report_touches_only_devices_the_edge_serves(
    settings: CloudSettings, mosquitto: Mosquitto, running: RunningIngest
) -> None:
    topics = settings.broker.topics
    url = settings.resolved_database_url

    def device(device_id: str) -> tuple[str | None, str] | None:
        with session_scope(url) as session:
            found = fleet.get_device(session, device_id=device_id)
            return None if found is None else (found.edge_id, found.state)

    sent = 0

    def send(*messages: tuple[str, bytes]) -> None:
        nonlocal sent
        _publish_all(mosquitto, list(messages))
        sent += len(messages)
        running.settle(sent)

    send(
        (topics.edge("e1", EdgeTopic.STATUS), _status("e1")),
        (topics.edge("e2", EdgeTopic.STATUS), _status("e2")),
        (topics.edge("e1", EdgeTopic.DEVICES), _report("e1", "d1", "ghost")),
    )
    assert device("d1") == ("e1", "online")
    assert device("ghost") is None  # not an enrolled device: not created
    assert _dead_letters(url) == [(topics.edge("e1", EdgeTopic.DEVICES), "not_served")]

    # e2 (another site: no common registry group) reports e1's live device offline: refused.
    send((topics.edge("e2", EdgeTopic.DEVICES), _report("e2", "d1", "d2", state=OnlineState.OFFLINE)))
    assert device("d1") == ("e1", "online")
    assert device("d2") == ("e2", "offline")  # a device behind no edge yet: e2 serves it
    assert _dead_letters(url)[-1] == (topics.edge("e2", EdgeTopic.DEVICES), "not_served")
    assert running.ingest.stats.rejected_by_reason["not_served"] == 2

    # Edges of one site (the same registry group) hear the same devices: the report counts, the
    # device stays behind its edge.
    enroll_fleet(url, edges=["e1", "e2"], group="site-a", migrate=False)
    send((topics.edge("e2", EdgeTopic.DEVICES), _report("e2", "d1", state=OnlineState.OFFLINE)))
    assert device("d1") == ("e1", "offline")

    # A revoked edge's devices go to the edge that reports them next, whatever its group.
    with session_scope(url) as session:
        crud.assign(session, edge_id="e2", group="site-b")
        identities.revoke(session, identity_id="e1", actor="tests")

    def taken_over() -> bool:
        send((topics.edge("e2", EdgeTopic.DEVICES), _report("e2", "d1")))
        return device("d1") == ("e2", "online")

    wait_for(taken_over, "d1 taken over by e2 once e1 is revoked", WAIT_S)


# -- size and rate limits -------------------------------------------------------------------------


def test_oversized_and_over_rate_payloads_are_counted_and_dead_letters_bounded(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    settings = _settings(
        tmp_path,
        mosquitto,
        max_payload_bytes=8192,
        edge_rate_per_s=0.001,  # nothing refills while the test runs
        edge_burst=5,
        rejected_dead_letters_per_minute=3,
    )
    url = settings.resolved_database_url
    enroll_fleet(url, edges=["e1"], devices=["d1"])
    topics = settings.broker.topics
    big = _sample("e1", "d1", 1, size=2000)  # ~32 KiB of JSON
    assert len(big) > 8192
    messages = [(topics.edge("e1", EdgeTopic.SAMPLES), big)]
    messages += [(topics.edge("e1", EdgeTopic.METRICS), _metrics("e1", windows=i)) for i in range(20)]
    ingest = Ingest(settings, client_id="ingest-limits")
    ingest.edge_limits.window_s = 1e9  # one dead-letter budget window for the whole test
    ingest.link.connect()
    assert ingest.link.wait_subscribed()
    try:
        _publish_all(mosquitto, messages)
        stats = ingest.run(max_messages=len(messages), idle_exit_s=WAIT_S)
    finally:
        ingest.close()
    # The big one is refused before decoding and takes no token; 5 metrics fit the burst.
    assert stats.rejected_by_reason == {"too_large": 1, "rate_limited": 15}
    assert stats.stored == 5
    assert stats.dead_letters_not_stored == 16 - 3
    assert [reason for _, reason in _dead_letters(url)] == ["too_large", "rate_limited", "rate_limited"]
    with session_scope(url) as session:
        assert crud.count_samples(session) == 0
        assert len(crud.recent_metrics(session, since=0)) == 5
        # The too_large dead letter keeps only the head of the payload, never decoded.
        first = session.scalars(select(DeadLetterRecord).order_by(DeadLetterRecord.id)).first()
        assert first is not None
        assert first.payload_size == len(big)
        assert len(first.payload) <= 4096


# -- training-data poisoning ------------------------------------------------------------------------


def test_untrusted_device_labels_reach_neither_training_nor_the_retrain_trigger(
    settings: CloudSettings, mosquitto: Mosquitto
) -> None:
    url = settings.resolved_database_url
    topics = settings.broker.topics
    with session_scope(url) as session:
        production = crud.create_model_version(session, name="vib", version="r0-int8", variant="int8")
        production.manifest = {"class_names": CLASSES}
        crud.promote(session, model_id=production.id)
    thresholds = Thresholds(new_labelled_samples=3)

    def training_set() -> int:
        """How many samples the learning pipeline's dataset step takes from the uplink."""
        run_id = steps.create_run(settings, config=PipelineConfig(model_name="vib", dataset="samples"))
        try:
            dataset_id = steps.prepare_dataset(settings, run_id)
        finally:  # a run in progress would hold back the triggers
            with session_scope(url) as session:
                crud.finish_run(session, run_id=run_id, state="succeeded")
        with session_scope(url) as session:
            return crud.get_dataset(session, dataset_id=dataset_id).n_samples

    def firings() -> list[str]:
        with session_scope(url) as session:
            return [f.kind for f in evaluate_triggers(session, model_name="vib", thresholds=thresholds)]

    # The attack: an enrolled but untrusted device sends (wrong) labels, more than the trigger needs.
    evil = [
        (topics.edge("e1", EdgeTopic.SAMPLES), _sample("e1", "d-evil", i, label="bearing_fault"))
        for i in range(6)
    ]
    ingest = _ingest_once(settings, mosquitto, evil)
    assert ingest.stats.labels_by_source == {"device": 6}
    assert ingest.stats.labels_untrusted == 6
    with session_scope(url) as session:
        assert crud.count_samples(session, labelled=True) == 6  # kept: they evaluate models
        assert crud.count_samples(session, labelled=True, training=True) == 0
    assert firings() == []
    with pytest.raises(DatasetError):
        training_set()

    # A forged device id: e2 claims the trusted labeller's samples while e1 (another site) serves it.
    _ingest_once(
        settings,
        mosquitto,
        [
            (topics.edge("e1", EdgeTopic.STATUS), _status("e1")),
            (topics.edge("e1", EdgeTopic.DEVICES), _report("e1", "d-good")),
        ],
    )
    forged = [
        (topics.edge("e2", EdgeTopic.SAMPLES), _sample("e2", "d-good", 50 + i, label="normal"))
        for i in range(3)
    ]
    assert _ingest_once(settings, mosquitto, forged).stats.labels_untrusted == 3
    assert firings() == []

    # The trusted labeller through its own edge: its labels train and count for the trigger.
    good = [
        (topics.edge("e1", EdgeTopic.SAMPLES), _sample("e1", "d-good", 100 + i, label="normal"))
        for i in range(3)
    ]
    ingest = _ingest_once(settings, mosquitto, good)
    assert ingest.stats.labels_untrusted == 0
    assert firings() == ["new_samples"]
    assert training_set() == 3

    # Trusting the attacker later does not bring in what it sent while untrusted; untrusting the
    # labeller takes its labels out of training.
    with session_scope(url) as session:
        identities.set_label_trust(session, identity_id="d-evil", trusted=True, actor="tests")
        identities.set_label_trust(session, identity_id="d-good", trusted=False, actor="tests")
    with session_scope(url) as session:
        assert crud.count_samples(session, labelled=True, training=True) == 0
    assert firings() == []


def test_turning_enrollment_off_warns_and_stores_any_edge(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The migration switch: ``ingest.require_enrolled_edges: false`` trusts every edge id (said loudly)."""
    settings = CloudSettings(
        data_dir=tmp_path,
        broker=MqttSettings(url="mqtt://127.0.0.1:1"),  # never connected: batches are stored directly
        ingest={"require_enrolled_edges": False},
    )
    with caplog.at_level(logging.WARNING, logger="cloud.ingest"):
        ingest = Ingest(settings)
    assert any("require_enrolled_edges is off" in r.getMessage() for r in caplog.records)
    topics = settings.broker.topics
    try:
        ingest.store_batch(
            [
                Received(
                    topic=topics.edge("rogue", EdgeTopic.STATUS),
                    payload=_status("rogue"),
                    qos=1,
                    retain=False,
                ),
                Received(
                    topic=topics.edge("rogue", EdgeTopic.SAMPLES),
                    payload=_sample("rogue", "d9", 1),
                    qos=1,
                    retain=False,
                ),
            ]
        )
    finally:
        ingest.close()
    assert (ingest.stats.stored, ingest.stats.rejected) == (2, 0)
    assert ingest.stats.labels_untrusted == 1  # label trust does not depend on the switch
    with session_scope(settings.resolved_database_url) as session:
        assert crud.count_samples(session, labelled=True) == 1
        assert crud.count_samples(session, training=True) == 0
