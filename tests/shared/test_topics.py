"""Topic builders and the parser: the only place topic strings are made."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.errors import TopicError
from shared.topics import DEFAULT_PREFIX, ID_PATTERN, DeviceTopic, EdgeTopic, Topics, validate_id

ids = st.from_regex(ID_PATTERN, fullmatch=True)
prefixes = st.from_regex(r"[A-Za-z0-9_.-]{1,10}(/[A-Za-z0-9_.-]{1,10}){0,3}", fullmatch=True)


def test_default_layout_matches_the_contract_table():
    t = Topics()
    assert t.prefix == DEFAULT_PREFIX == "ef/v1"
    assert t.telemetry("pump-1") == "ef/v1/dev/pump-1/telemetry"
    assert t.device_status("pump-1") == "ef/v1/dev/pump-1/status"
    assert t.health("pump-1") == "ef/v1/dev/pump-1/health"
    assert t.command("pump-1") == "ef/v1/dev/pump-1/cmd"
    assert t.ack("pump-1") == "ef/v1/dev/pump-1/ack"
    assert t.device_desired("pump-1") == "ef/v1/dev/pump-1/desired"
    assert [t.edge("e1", k) for k in EdgeTopic] == [
        f"ef/v1/edge/e1/{k}"
        for k in ("status", "decision", "samples", "metrics", "desired", "deploy", "dead", "devices")
    ]


def test_filters():
    t = Topics("site")
    assert t.all_devices() == "site/dev/+/+"
    assert t.all_devices(DeviceTopic.TELEMETRY) == "site/dev/+/telemetry"
    assert t.all_edges(EdgeTopic.DESIRED) == "site/edge/+/desired"
    assert t.device_filter("d1", None) == "site/dev/d1/+"
    assert t.device_filter(None, DeviceTopic.ACK) == "site/dev/+/ack"
    assert t.edge_filter("e1", EdgeTopic.DEAD) == "site/edge/e1/dead"
    assert t.edge_filter(None, None) == "site/edge/+/+"
    assert Topics.shared("edges", t.all_devices(DeviceTopic.TELEMETRY)) == "$share/edges/site/dev/+/telemetry"


@settings(max_examples=200, deadline=None)
@given(prefixes, ids, st.sampled_from(list(DeviceTopic)), st.sampled_from(list(EdgeTopic)))
def test_build_then_parse_round_trips(prefix, entity, dev_kind, edge_kind):
    t = Topics(prefix)
    parsed = t.parse(t.device(entity, dev_kind))
    assert (parsed.tier, parsed.entity_id, parsed.kind, parsed.device_id, parsed.edge_id) == (
        "dev",
        entity,
        dev_kind,
        entity,
        None,
    )
    parsed = t.parse(t.edge(entity, edge_kind))
    assert (parsed.tier, parsed.entity_id, parsed.kind, parsed.edge_id) == ("edge", entity, edge_kind, entity)


@pytest.mark.parametrize("bad", ["", "a/b", "a+", "#", "-x", "_x", "x y", "é", "x" * 65, "a\x00"])
def test_bad_ids_are_rejected_naming_what(bad):
    t = Topics()
    with pytest.raises(TopicError, match="device id"):
        t.telemetry(bad)
    with pytest.raises(TopicError, match="edge id"):
        t.edge(bad, EdgeTopic.STATUS)
    with pytest.raises(TopicError):
        validate_id(bad)


def test_good_ids_edge_cases():
    for good in ("a", "A9", "pump_1.site:x-2", "x" * 64):
        assert validate_id(good) == good


@pytest.mark.parametrize("prefix", ["", "/ef", "ef/", "ef//v1", "ef/+", "ef/#", "ef v1"])
def test_bad_prefix_is_rejected(prefix):
    with pytest.raises(TopicError, match="prefix"):
        Topics(prefix)


@pytest.mark.parametrize(
    ("topic", "reason"),
    [
        ("other/dev/d1/telemetry", "not under prefix"),
        ("ef/v1/dev/d1", "3 levels"),
        ("ef/v1/dev/d1/telemetry/x", "3 levels"),
        ("ef/v1/cloud/d1/status", "unknown tier"),
        ("ef/v1/dev/d1/decision", "decision"),
        ("ef/v1/edge/e1/telemetry", "telemetry"),
        ("ef/v1/dev/bad+id/telemetry", "device id"),
        ("ef/v1/edge/-e/status", "edge id"),
    ],
)
def test_parse_rejects_foreign_topics_saying_why(topic, reason):
    with pytest.raises(TopicError, match=reason):
        Topics().parse(topic)


def test_shared_subscription_group_is_validated():
    with pytest.raises(TopicError, match="group"):
        Topics.shared("bad/group", "ef/v1/dev/+/telemetry")


def test_kind_must_be_a_known_kind():
    with pytest.raises(ValueError):
        Topics().device("d1", "nope")  # type: ignore[arg-type]
