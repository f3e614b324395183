"""The cloud refuses a desired device config beyond the settings' upper bounds before recording it."""

from __future__ import annotations

import pytest

from cloud.errors import DeviceConfigError
from cloud.fleet.device_config import validate_config
from shared.schemas import MAX_OUTBOX_WINDOWS, MAX_RATE_HZ


def test_desired_config_beyond_a_limit_is_refused_naming_the_setting_and_the_limit() -> None:
    with pytest.raises(DeviceConfigError) as refused:
        validate_config({"rate_hz": 1e9, "outbox_max_windows": 10**12})
    message = str(refused.value)
    assert "config.rate_hz:" in message
    assert str(int(MAX_RATE_HZ)) in message
    assert "config.outbox_max_windows:" in message
    assert str(MAX_OUTBOX_WINDOWS) in message
    with pytest.raises(DeviceConfigError, match=r"config\.sensor\.options\.path: string of"):
        validate_config({"sensor": {"options": {"path": "p" * 5000}}})


def test_values_within_the_limits_are_left_to_the_device() -> None:
    validate_config({"rate_hz": MAX_RATE_HZ, "outbox_max_windows": MAX_OUTBOX_WINDOWS})
    validate_config({"window": 0})  # below a lower bound: the device refuses it (config_error)
