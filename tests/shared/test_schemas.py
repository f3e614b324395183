"""Every control message of the contract: JSON round trips, fuzzing, and strict rejection."""

from __future__ import annotations

import base64
import contextlib
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from shared.codec import encode_window
from shared.errors import SchemaError
from shared.schemas import (
    CONTROL_TYPES,
    AckStatus,
    Command,
    CommandAck,
    CommandName,
    DeadLetter,
    Decision,
    DeploymentProgress,
    DeployStage,
    DesiredAction,
    DesiredState,
    DeviceDesired,
    DeviceReport,
    DeviceSeen,
    DeviceStatus,
    EdgeMetrics,
    EdgeStatus,
    HardExample,
    Heartbeat,
    KeyAction,
    KeyAnnouncement,
    KeyRing,
    LatencySummary,
    Message,
    ModelManifest,
    Normalization,
    OnlineState,
    Privacy,
    Quantization,
    ReportedState,
    SampleReason,
    Severity,
    TelemetryWindow,
    decode_message,
    encode_message,
)
from shared.topics import DeviceTopic, EdgeTopic

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

WINDOW_B64 = base64.b64encode(
    encode_window(device_id="pump-1", seq=3, ts=1.0, sample_rate_hz=100.0, channels=("x",), values=[1.0])
).decode()
MANIFEST = ModelManifest(
    name="vibration",
    version="v3",
    quantization=Quantization.INT8,
    sha256="ab" * 32,
    size_bytes=12_345,
    url="http://127.0.0.1:8000/models/vibration/v3.tflite",
    input_shape=[100, 3],
    input_dtype="float32",
    output_shape=[4],
    output_dtype="float32",
    class_names=["normal", "imbalance", "misalignment", "bearing_fault"],
    normalization=Normalization(mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 2.0]),
    sample_rate_hz=100.0,
    channels=["x", "y", "z"],
    metrics={"accuracy": 0.97},
    parent_version="v2",
    dataset_id="ds-1",
    signature=base64.b64encode(b"s" * 64).decode(),
    key_id="0123456789abcdef",
)
EXAMPLES: dict[type[Message], Message] = {
    Heartbeat: Heartbeat(
        device_id="pump-1",
        uptime_s=12.5,
        sensor="simulated",
        rate_hz=100.0,
        window=100,
        hop=50,
        next_seq=42,
        outbox_depth=3,
        published_windows=41,
        acked_windows=38,
        dropped_windows=1,
        dropped_by_reason={"outbox_full": 1},
        publish_rate_hz=2.0,
        cpu_core_fraction=0.01,
        rss_mb=31.5,
        fault="imbalance",
        actuators={"motor": "stopped"},
    ),
    DeviceStatus: DeviceStatus(
        device_id="pump-1",
        state=OnlineState.ONLINE,
        agent_version="0.1.0",
        sensor="simulated",
        rate_hz=100.0,
        window=100,
        hop=100,
        channels=("x", "y", "z"),
    ),
    Command: Command.create(
        device_id="pump-1", name=CommandName.SET_RATE, args={"rate_hz": 50}, sender="ops"
    ),
    CommandAck: CommandAck(
        command_id="c-1",
        device_id="pump-1",
        status=AckStatus.OK,
        ok=True,
        result={"rate_hz": 50},
        duplicate=True,
    ),
    Decision: Decision(
        edge_id="edge-a",
        device_id="pump-1",
        rule="stop-on-bearing-fault",
        class_name="bearing_fault",
        probability=0.93,
        severity=Severity.CRITICAL,
        window_seq=41,
        model_version="v3",
        command_id="c-2",
        command_name=CommandName.ACTUATE,
        command_args={"action": "stop_motor"},
        window_ts=1_700_000_000.0,
    ),
    HardExample: HardExample(
        sample_id="s-1",
        edge_id="edge-a",
        device_id="pump-1",
        seq=3,
        ts=1.0,
        model_version="v3",
        predicted="normal",
        probabilities=[0.4, 0.35, 0.15, 0.1],
        class_names=["normal", "imbalance", "misalignment", "bearing_fault"],
        reason=SampleReason.SMALL_MARGIN,
        label="imbalance",
        privacy=Privacy.FULL,
        window_b64=WINDOW_B64,
    ),
    EdgeMetrics: EdgeMetrics(
        edge_id="edge-a",
        interval_s=10.0,
        model_version="v3",
        windows_total=1000,
        windows_per_s=100.0,
        decisions_total=3,
        cache_hit_rate=0.5,
        inference_latency=LatencySummary(p50_ms=0.1, p95_ms=0.2, p99_ms=0.3),
        confidence_mean=0.9,
        confidence_histogram=[0] * 9 + [10],
        class_counts={"normal": 990, "bearing_fault": 10},
        devices_seen=10,
    ),
    DeadLetter: DeadLetter(
        edge_id="edge-a",
        topic="ef/v1/dev/pump-1/telemetry",
        reason="values: contains NaN or infinity",
        payload_b64=base64.b64encode(b"\x00\x01").decode(),
        payload_size=2,
    ),
    ModelManifest: MANIFEST,
    DesiredState: DesiredState(
        edge_id="edge-a",
        revision=7,
        model=MANIFEST,
        rollout_id="r-1",
        config={"batch": 32, "rules": ["a"]},
        issued_at=1_700_000_000.0,
        expires_at=1_700_086_400.0,
        model_digest="c" * 64,
        key_id="0123456789abcdef",
        signature="c2lnbmF0dXJl",
    ),
    DeploymentProgress: DeploymentProgress(
        edge_id="edge-a", revision=7, rollout_id="r-1", model_version="v3", stage=DeployStage.SWAPPED, ok=True
    ),
    EdgeStatus: EdgeStatus(
        edge_id="edge-a",
        state=OnlineState.ONLINE,
        version="0.1.0",
        reported=ReportedState(
            model_name="vibration", model_version="v3", desired_revision=7, last_deploy_ok=True
        ),
    ),
    DeviceDesired: DeviceDesired(
        device_id="pump-1", revision=3, config={"rate_hz": 50, "send_labels": False}
    ),
    DeviceReport: DeviceReport(
        edge_id="edge-a",
        full=True,
        devices=[
            DeviceSeen(
                device_id="pump-1",
                state=OnlineState.ONLINE,
                since=1_700_000_000.0,
                last_seen=1_700_000_010.0,
                rate_hz=50.0,
                config={"rate_hz": 50.0},
                config_revision=3,
                fault="imbalance",
                outbox_depth=0,
                dropped_windows=0,
            ),
            DeviceSeen(device_id="pump-2", state=OnlineState.OFFLINE, reason="lwt"),
        ],
    ),
    KeyRing: KeyRing(
        announcements=[
            KeyAnnouncement(
                seq=1,
                action=KeyAction.ADD,
                key_id="fedcba9876543210",
                public_key="-----BEGIN PUBLIC KEY-----\n...\n-----END PUBLIC KEY-----\n",
                signer_key_id="0123456789abcdef",
                signature="c2lnbmF0dXJl",
            ),
            KeyAnnouncement(
                seq=2,
                action=KeyAction.REVOKE,
                key_id="0123456789abcdef",
                signer_key_id="fedcba9876543210",
                signature="c2lnbmF0dXJl",
            ),
        ]
    ),
}

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=80),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=8,
)


def test_every_control_type_has_an_example():
    assert set(EXAMPLES) == set(CONTROL_TYPES)


@pytest.mark.parametrize("cls", CONTROL_TYPES, ids=lambda c: c.__name__)
def test_round_trip_with_and_without_expected_type(cls):
    message = EXAMPLES[cls]
    payload = encode_message(message)
    json.loads(payload)  # plain JSON
    assert decode_message(payload) == message
    assert decode_message(payload, cls) == message
    assert decode_message(payload.decode(), cls) == message
    assert type(decode_message(payload)) is cls


@pytest.mark.parametrize("cls", CONTROL_TYPES, ids=lambda c: c.__name__)
def test_unknown_field_is_rejected_naming_it(cls):
    data = EXAMPLES[cls].model_dump(mode="json")
    data["surprise"] = 1
    for expected in (cls, None):
        with pytest.raises(SchemaError, match="surprise"):
            decode_message(json.dumps(data), expected)


@pytest.mark.parametrize("cls", CONTROL_TYPES, ids=lambda c: c.__name__)
def test_wrong_or_missing_type_tag_is_rejected(cls):
    data = EXAMPLES[cls].model_dump(mode="json")
    other = next(c for c in CONTROL_TYPES if c is not cls)
    data["type"] = other.model_fields["type"].default
    with pytest.raises(SchemaError, match="type"):
        decode_message(json.dumps(data), cls)
    data["type"] = "no_such_type"
    with pytest.raises(SchemaError):
        decode_message(json.dumps(data))
    del data["type"]
    with pytest.raises(SchemaError):
        decode_message(json.dumps(data))


@pytest.mark.parametrize("cls", CONTROL_TYPES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("version", [0, 2, "1", None])
def test_wrong_schema_version_is_rejected(cls, version):
    data = EXAMPLES[cls].model_dump(mode="json")
    data["schema_version"] = version
    for expected in (cls, None):
        with pytest.raises(SchemaError, match="schema_version"):
            decode_message(json.dumps(data), expected)


@pytest.mark.parametrize("cls", CONTROL_TYPES, ids=lambda c: c.__name__)
@FUZZ
@given(data=st.data())
def test_fuzzed_fields_round_trip_or_raise_schema_error(cls, data):
    """Replace one field with arbitrary JSON: the result either validates and round-trips, or
    ``decode_message`` raises SchemaError naming that field; never anything else."""
    base = EXAMPLES[cls].model_dump(mode="json")
    field = data.draw(st.sampled_from(sorted(set(cls.model_fields) - {"type", "schema_version"})))
    value = data.draw(json_values)
    candidate = {**base, field: value}
    payload = json.dumps(candidate).encode()
    try:
        expected = cls.model_validate_json(payload)
    except ValidationError:
        expected = None
    if expected is None:
        with pytest.raises(SchemaError) as info:
            decode_message(payload, cls)
        assert field in str(info.value) or "<message>" in str(info.value)
        with pytest.raises(SchemaError):
            decode_message(payload)
    else:
        assert decode_message(payload, cls) == expected
        assert decode_message(encode_message(expected)) == expected


@FUZZ
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_arbitrary_payloads_raise_only_schema_error(payload):
    with contextlib.suppress(SchemaError):
        decode_message(payload)


@FUZZ
@given(json_values)
def test_arbitrary_json_raises_only_schema_error(value):
    payload = json.dumps(value)
    for expected in (None, Command, HardExample):
        with contextlib.suppress(SchemaError):
            decode_message(payload, expected)


def test_oversized_payload_is_rejected_before_parsing():
    with pytest.raises(SchemaError, match="payload"):
        decode_message(b" " * 1_048_577)


def test_non_finite_numbers_are_refused_when_built_not_sent_as_null():
    with pytest.raises(ValidationError):
        Heartbeat.model_validate({**EXAMPLES[Heartbeat].model_dump(), "rss_mb": float("inf")})
    with pytest.raises(ValidationError):
        Decision.model_validate({**EXAMPLES[Decision].model_dump(), "command_args": {"x": float("nan")}})
    with pytest.raises(SchemaError):
        decode_message(encode_message(EXAMPLES[Heartbeat]).replace(b'"rss_mb":31.5', b'"rss_mb":NaN'))


def test_cross_field_rules():
    sample = EXAMPLES[HardExample].model_dump()
    with pytest.raises(ValidationError, match="window_b64"):
        HardExample.model_validate({**sample, "window_b64": None})
    with pytest.raises(ValidationError, match="forbids window_b64"):
        HardExample.model_validate({**sample, "privacy": "summary"})
    with pytest.raises(ValidationError, match="length"):
        HardExample.model_validate({**sample, "probabilities": [1.0]})
    assert EXAMPLES[HardExample].window_bytes() == base64.b64decode(WINDOW_B64)
    with pytest.raises(ValidationError, match="expires_at"):
        Command(device_id="d", name=CommandName.PING, issued_at=10.0, expires_at=5.0)
    with pytest.raises(ValidationError, match="needs a model"):
        DesiredState(edge_id="e", revision=1, action=DesiredAction.DEPLOY)
    assert DesiredState(edge_id="e", revision=1, action=DesiredAction.ROLLBACK).model is None
    with pytest.raises(ValidationError, match="expires_at"):
        DesiredState(edge_id="e", revision=1, action=DesiredAction.ROLLBACK, issued_at=10.0, expires_at=5.0)
    with pytest.raises(ValidationError, match="public_key"):
        KeyAnnouncement(seq=1, action=KeyAction.ADD, key_id="k")
    manifest = MANIFEST.model_dump()
    with pytest.raises(ValidationError, match="class_names"):
        ModelManifest.model_validate({**manifest, "output_shape": [3]})
    with pytest.raises(ValidationError, match="input_shape"):
        ModelManifest.model_validate({**manifest, "input_shape": [0, 3]})
    with pytest.raises(ValidationError, match="std"):
        Normalization(mean=[0.0], std=[0.0])


def test_ids_must_be_usable_as_topic_levels():
    for bad in ("", "a/b", "a+b", "#", "-lead", "x" * 65):
        with pytest.raises(ValidationError):
            DeviceStatus(device_id=bad, state=OnlineState.OFFLINE)


def test_command_create_sets_expiry_from_ttl():
    cmd = Command.create(device_id="pump-1", name="ping", ttl_s=30, sender="ops")
    assert cmd.expires_at - cmd.issued_at == pytest.approx(30)
    assert cmd.name is CommandName.PING
    assert len(cmd.command_id) == 32
    with pytest.raises(ValueError):
        Command.create(device_id="pump-1", name="reboot")


def test_manifest_signing_bytes_exclude_only_the_signature():
    unsigned = MANIFEST.model_copy(update={"signature": None})
    assert unsigned.signing_bytes() == MANIFEST.signing_bytes()
    assert MANIFEST.model_copy(update={"version": "v4"}).signing_bytes() != MANIFEST.signing_bytes()
    assert MANIFEST.ref == "vibration@v3"
    assert b"signature" not in MANIFEST.signing_bytes()


def test_telemetry_windows_are_not_json():
    window = TelemetryWindow(device_id="d", seq=0, ts=0, sample_rate_hz=1, channels=("x",), values=[[1.0]])
    with pytest.raises(SchemaError, match=r"shared\.codec"):
        encode_message(window)


def test_messages_are_immutable():
    with pytest.raises(ValidationError):
        EXAMPLES[CommandAck].status = AckStatus.ERROR  # type: ignore[misc]


def test_example_payload_shapes_are_stable():
    """A few wire names other tiers and other languages rely on."""
    assert json.loads(encode_message(EXAMPLES[Command]))["name"] == "set_rate"
    ack = json.loads(encode_message(EXAMPLES[CommandAck]))
    assert (ack["type"], ack["status"], ack["ok"], ack["duplicate"]) == ("command_ack", "ok", True, True)
    assert json.loads(encode_message(EXAMPLES[DesiredState]))["model"]["type"] == "model_manifest"
    assert {c.model_fields["type"].default for c in CONTROL_TYPES} == {
        "heartbeat",
        "device_status",
        "command",
        "command_ack",
        "decision",
        "sample",
        "edge_metrics",
        "dead_letter",
        "model_manifest",
        "desired_state",
        "deploy_progress",
        "edge_status",
        "device_desired",
        "device_report",
        "key_ring",
    }


def test_docs_contract_lists_every_message_type_and_topic():
    """docs/contract.md is what other implementers read: it must not drift from the code."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "contract.md").read_text()
    for cls in CONTROL_TYPES:
        assert f"| {cls.__name__} | `{cls.model_fields['type'].default}` |" in text, cls.__name__
        for name in cls.model_fields:
            assert name in text, (cls.__name__, name)
    for kind in DeviceTopic:
        assert f"`ef/v1/dev/{{device}}/{kind.value}`" in text
    for kind in EdgeTopic:
        assert f"`ef/v1/edge/{{edge}}/{kind.value}`" in text
