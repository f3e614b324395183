"""Upper bounds of command arguments and runtime settings: refused wherever a ``Command`` is built or
decoded, with a message naming the argument and its limit."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from shared.errors import SchemaError
from shared.schemas import (
    MAX_ARG_DEPTH,
    MAX_ARG_ITEMS,
    MAX_ARG_NAME,
    MAX_ARG_STRING,
    MAX_ARGS_BYTES,
    MAX_HEARTBEAT_INTERVAL_S,
    MAX_HOP_SAMPLES,
    MAX_IN_FLIGHT,
    MAX_INT16_SCALE,
    MAX_OUTBOX_AGE_S,
    MAX_OUTBOX_WINDOWS,
    MAX_RATE_HZ,
    MAX_WINDOW_SAMPLES,
    Command,
    SetConfigArgs,
    bound_errors,
    decode_message,
)
from shared.settings.agent import RUNTIME_SETTINGS


def _nested(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = {"k": value}
    return value


def _limit(value: float) -> str:
    """A limit as pydantic writes it (1000000, not 1e+06)."""
    return str(int(value)) if float(value).is_integer() else str(value)


# (command, args beyond a bound, the field the refusal must name, the limit it must name)
BEYOND: list[tuple[str, dict[str, Any], str, str]] = [
    ("set_rate", {"rate_hz": MAX_RATE_HZ * 10}, "args.rate_hz", _limit(MAX_RATE_HZ)),
    ("set_window", {"window": MAX_WINDOW_SAMPLES + 1}, "args.window", str(MAX_WINDOW_SAMPLES)),
    ("set_window", {"window": 10, "hop": MAX_HOP_SAMPLES + 1}, "args.hop", str(MAX_HOP_SAMPLES)),
    ("set_config", {"rate_hz": 1e9}, "args.rate_hz", _limit(MAX_RATE_HZ)),
    ("set_config", {"window": 10**9}, "args.window", str(MAX_WINDOW_SAMPLES)),
    ("set_config", {"hop": 10**12}, "args.hop", str(MAX_HOP_SAMPLES)),
    ("set_config", {"int16_scale": 1e12}, "args.int16_scale", _limit(MAX_INT16_SCALE)),
    (
        "set_config",
        {"heartbeat_interval_s": 1e9},
        "args.heartbeat_interval_s",
        _limit(MAX_HEARTBEAT_INTERVAL_S),
    ),
    ("set_config", {"outbox_max_windows": 10**12}, "args.outbox_max_windows", str(MAX_OUTBOX_WINDOWS)),
    ("set_config", {"outbox_max_age_s": 1e12}, "args.outbox_max_age_s", _limit(MAX_OUTBOX_AGE_S)),
    ("set_config", {"max_in_flight": 10**6}, "args.max_in_flight", str(MAX_IN_FLIGHT)),
    (
        "set_config",
        {"sensor": {"options": {f"k{i}": i for i in range(MAX_ARG_ITEMS + 1)}}},
        "args.sensor.options",
        str(MAX_ARG_ITEMS),
    ),
    (
        "set_config",
        {"sensor": {"options": {"path": "x" * (MAX_ARG_STRING + 1)}}},
        "args.sensor.options.path",
        str(MAX_ARG_STRING),
    ),
    (
        "set_config",
        {"sensor": {"options": {"l": list(range(1000))}}},
        "args.sensor.options.l",
        str(MAX_ARG_ITEMS),
    ),
    (
        "set_config",
        {"sensor": {"options": _nested(MAX_ARG_DEPTH)}},
        "args.sensor.options.k.k",
        str(MAX_ARG_DEPTH),
    ),
    ("inject_fault", {"fault": "f" * (MAX_ARG_NAME + 1)}, "args.fault", str(MAX_ARG_NAME)),
    ("actuate", {"action": "a" * (MAX_ARG_NAME + 1)}, "args.action", str(MAX_ARG_NAME)),
    (
        "actuate",
        {"action": "set", "target": "t" * (MAX_ARG_NAME + 1), "state": "on"},
        "args.target",
        str(MAX_ARG_NAME),
    ),
    ("actuate", {"action": "set", "target": "fan", "state": "s" * 500}, "args.state", str(MAX_ARG_NAME)),
    (
        "actuate",  # every piece within its bound, the whole too large
        {"action": "x", **{f"p{i}": "v" * MAX_ARG_STRING for i in range(40)}},
        "args",
        str(MAX_ARGS_BYTES),
    ),
    ("ping", {"junk": "j" * (MAX_ARG_STRING + 1)}, "args.junk", str(MAX_ARG_STRING)),
]


@pytest.mark.parametrize(("name", "args", "field", "limit"), BEYOND, ids=[f"{b[0]}-{b[2]}" for b in BEYOND])
def test_arguments_beyond_a_bound_are_refused_naming_field_and_limit(
    name: str, args: dict[str, Any], field: str, limit: str
) -> None:
    with pytest.raises(SchemaError) as built:  # the cloud's API/CLI and the edge build commands so
        Command.create(device_id="pump-1", name=name, args=args, sender="ops")
    assert f"{field}:" in str(built.value)
    assert limit in str(built.value)
    now = time.time()
    raw = {
        "type": "command",
        "command_id": "c-1",
        "device_id": "pump-1",
        "name": name,
        "args": args,
        "issued_at": now,
        "expires_at": now + 60,
    }
    with pytest.raises(SchemaError) as received:  # a device decodes them so
        decode_message(json.dumps(raw).encode(), Command)
    assert f"{field}:" in str(received.value)
    assert limit in str(received.value)


def test_the_limits_themselves_are_accepted() -> None:
    at_limits = {
        "set_rate": {"rate_hz": MAX_RATE_HZ},
        "set_window": {"window": MAX_WINDOW_SAMPLES, "hop": MAX_HOP_SAMPLES},
        "set_config": {
            "rate_hz": MAX_RATE_HZ,
            "window": MAX_WINDOW_SAMPLES,
            "int16_scale": MAX_INT16_SCALE,
            "heartbeat_interval_s": MAX_HEARTBEAT_INTERVAL_S,
            "outbox_max_windows": MAX_OUTBOX_WINDOWS,
            "outbox_max_age_s": MAX_OUTBOX_AGE_S,
            "max_in_flight": MAX_IN_FLIGHT,
            "sensor": {"options": {f"k{i}": "v" * 100 for i in range(MAX_ARG_ITEMS)}},
        },
        "inject_fault": {"fault": "f" * MAX_ARG_NAME, "severity": 1.0},
        "actuate": {"action": "set", "target": "t" * MAX_ARG_NAME, "state": "s" * MAX_ARG_NAME},
    }
    for name, args in at_limits.items():
        command = Command.create(device_id="pump-1", name=name, args=args)
        assert decode_message(command.model_dump_json().encode(), Command) == command


def test_meaning_is_the_devices_to_judge_not_the_contracts() -> None:
    # Lower bounds, types and unknown names pass the contract: the device refuses them in its ack.
    for name, args in [
        ("set_config", {"rate_hz": -5}),
        ("set_config", {"no_such_setting": 1}),
        ("set_rate", {"hz": 3}),
        ("set_rate", {"rate_hz": "fast"}),
        ("actuate", {"action": "launch"}),
    ]:
        Command.create(device_id="pump-1", name=name, args=args)


def test_set_config_args_cover_exactly_the_runtime_settings() -> None:
    assert set(SetConfigArgs.model_fields) == set(RUNTIME_SETTINGS)


def test_bound_errors_name_each_field_beyond_its_limit() -> None:
    problems = bound_errors(
        SetConfigArgs, {"rate_hz": 1e9, "max_in_flight": 10**6, "window": 0}, where="config"
    )
    assert len(problems) == 2  # window=0 is below a lower bound: not this function's business
    assert any(p.startswith("config.rate_hz:") and _limit(MAX_RATE_HZ) in p for p in problems)
    assert any(p.startswith("config.max_in_flight:") and str(MAX_IN_FLIGHT) in p for p in problems)
