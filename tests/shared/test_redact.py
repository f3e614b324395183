"""shared.redact: passwords never reach a log line, whatever kind of URL carries them."""

from __future__ import annotations

import logging

import pytest

from shared.redact import MASK, redact_text, redact_url

SECRET = "s3cr3t-Pa55"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (f"mqtt://edge-1:{SECRET}@mosquitto:1883", f"mqtt://edge-1:{MASK}@mosquitto:1883"),
        (f"mqtts://edge-1%2Fsite:{SECRET}@broker:8883", f"mqtts://edge-1%2Fsite:{MASK}@broker:8883"),
        (f"redis://:{SECRET}@redis:6379/0", f"redis://:{MASK}@redis:6379/0"),
        (
            f"postgresql+psycopg2://edgefleet:{SECRET}@postgres:5432/edgefleet",
            f"postgresql+psycopg2://edgefleet:{MASK}@postgres:5432/edgefleet",
        ),
        (f"postgresql://db/x?user=u&password={SECRET}", f"postgresql://db/x?user=u&password={MASK}"),
        (f"http://h/v1/a?token={SECRET}&x=1", f"http://h/v1/a?token={MASK}&x=1"),
        ("mqtt://mosquitto:1883", "mqtt://mosquitto:1883"),  # nothing to hide: unchanged
        ("mqtt://device-1@mosquitto:1883", "mqtt://device-1@mosquitto:1883"),  # a user, no password
        ("sqlite:////var/lib/registry.db", "sqlite:////var/lib/registry.db"),
        (None, ""),
        ("", ""),
    ],
)
def test_redact_url_masks_the_password_and_keeps_where(url: str | None, expected: str) -> None:
    assert redact_url(url) == expected


def test_a_password_with_url_special_characters_is_masked_whole() -> None:
    redacted = redact_url("redis://:a:b/c@redis:6379/0")
    assert "a:b/c" not in redacted
    assert redacted.endswith("@redis:6379/0")


def test_a_malformed_url_still_loses_its_password() -> None:
    redacted = redact_url(f"mqtt://u:{SECRET}@host:notaport")
    assert SECRET not in redacted
    assert "host:notaport" in redacted


def test_redact_text_masks_every_url_in_free_text() -> None:
    text = (
        f"Error 111 connecting to redis://:{SECRET}@redis:6379/0; fallback "
        f"postgresql://ef:{SECRET}2@db/ef?password={SECRET}3 failed too (see http://docs/x:y)"
    )
    redacted = redact_text(text)
    assert SECRET not in redacted
    assert redacted.count(MASK) == 3
    assert "redis:6379/0" in redacted
    assert "http://docs/x:y" in redacted  # no credentials there: untouched


def test_a_log_line_of_a_redacted_url_carries_no_secret(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("test_redact")
    with caplog.at_level(logging.INFO, logger="test_redact"):
        logger.info("broker %s", redact_url(f"mqtt://cloud:{SECRET}@mosquitto:1884"))
    assert SECRET not in caplog.text
    assert f"mqtt://cloud:{MASK}@mosquitto:1884" in caplog.text
