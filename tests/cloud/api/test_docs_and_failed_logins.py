"""The API's description (/openapi.json, /docs, /redoc) needs a viewer (token or console session);
failed sign-ins (unknown or revoked API tokens, console passwords, tokens and links) are audited without
the secret and limited per client address (429). Real API server and registry on 127.0.0.1."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import httpx
import pytest

from cloud.api import ratelimit
from cloud.api.auth import create_token
from cloud.console import auth as console_auth
from cloud.registry import fleet
from cloud.registry.db import session_scope, upgrade
from shared.settings import MqttSettings
from shared.settings.cloud import CloudSettings
from tests.support.api_server import running_api

PASSWORD = "correct horse battery"
DOC_PATHS = ("/openapi.json", "/docs", "/redoc")


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, dict[str, str]]]:
    """The API's URL, its registry URL and the tokens of a viewer and an edge."""
    root = tmp_path_factory.mktemp("docs")
    settings = CloudSettings(
        data_dir=root / "cloud",
        database_url=f"sqlite:///{root / 'registry.db'}",
        broker=MqttSettings(url="mqtt://127.0.0.1:1"),
    )
    db = settings.resolved_database_url
    upgrade(db)
    console_auth.create_user(database_url=db, username="vera", role="viewer", password=PASSWORD)
    tokens = {role: create_token(database_url=db, name=f"t-{role}", role=role) for role in ("viewer", "edge")}
    with running_api(settings) as url:
        yield url, db, tokens


@pytest.fixture(autouse=True)
def _fresh_limiters(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ratelimit, "API_TOKENS", ratelimit.FailureLimiter(max_failures=3))
    monkeypatch.setattr(ratelimit, "CONSOLE_SIGNIN", ratelimit.FailureLimiter(max_failures=3))


def _failed_logins(db: str, action: str) -> list[dict[str, object]]:
    with session_scope(db) as session:
        return [fleet.audit_row(e) for e in fleet.audit_entries(session, limit=500, action=action)]


@pytest.mark.parametrize("path", DOC_PATHS)
def test_the_api_description_needs_a_viewer(api: tuple[str, str, dict[str, str]], path: str) -> None:
    url, _, tokens = api
    with httpx.Client(base_url=url, timeout=30) as client:
        anonymous = client.get(path)
        if path == "/openapi.json":
            assert anonymous.status_code == 401
            assert anonymous.json() == {"detail": "missing bearer token (or console session)"}
        else:  # a browser page: sent to sign in first
            assert anonymous.status_code == 303
            assert anonymous.headers["location"] == f"/signin?next={path}"
        wrong = client.get(path, headers={"Authorization": "Bearer eft_wrong"})
        assert wrong.status_code == 401
        assert wrong.json() == {"detail": "unknown token"}
        edge = client.get(path, headers={"Authorization": f"Bearer {tokens['edge']}"})
        assert edge.status_code == 403  # an edge token only downloads artifacts
        viewer = client.get(path, headers={"Authorization": f"Bearer {tokens['viewer']}"})
        assert viewer.status_code == 200
    if path == "/openapi.json":
        assert "/v1/fleet/edges" in viewer.json()["paths"]
    else:
        assert "/openapi.json" in viewer.text


def test_a_console_session_reads_the_docs_and_a_browser_without_one_is_sent_to_sign_in(
    api: tuple[str, str, dict[str, str]],
) -> None:
    url, _, _ = api
    with httpx.Client(base_url=url, timeout=30) as browser:
        away = browser.get("/docs")
        assert away.status_code == 303
        assert away.headers["location"] == "/signin?next=/docs"
        signed = browser.post(
            "/signin", data={"csrf_token": _csrf(browser), "username": "vera", "password": PASSWORD}
        )
        assert signed.status_code == 303
        for path in DOC_PATHS:
            assert browser.get(path).status_code == 200, path


def test_wrong_api_tokens_are_audited_without_the_token_and_rate_limited(
    api: tuple[str, str, dict[str, str]],
) -> None:
    url, db, tokens = api
    before = len(_failed_logins(db, "api_auth_failed"))
    wrong = "eft_this-is-not-a-token-0123456789"
    with httpx.Client(base_url=url, timeout=30) as client:
        # A missing token is not a failed sign-in: it neither counts nor is audited.
        assert [client.get("/v1/fleet/edges").status_code for _ in range(5)] == [401] * 5
        codes = [
            client.get("/v1/fleet/edges", headers={"Authorization": f"Bearer {wrong}"}).status_code
            for _ in range(4)
        ]
        assert codes == [401, 401, 401, 429]
        # The address now waits, even with a good token, and on the docs too.
        good = client.get("/v1/fleet/edges", headers={"Authorization": f"Bearer {tokens['viewer']}"})
        assert good.status_code == 429
        assert int(good.headers["retry-after"]) > 0
        assert "too many failed sign-ins" in good.json()["detail"]
        assert client.get("/docs", headers={"Authorization": f"Bearer {tokens['viewer']}"}).status_code == 429
    rows = _failed_logins(db, "api_auth_failed")
    assert len(rows) - before == 3  # refused (429) requests are not looked up, so not audited again
    newest = rows[0]
    assert newest["actor"] == "client:127.0.0.1"
    assert newest["target"] == "GET /v1/fleet/edges"
    assert newest["detail"] == {"client": "127.0.0.1", "reason": "unknown token"}
    assert wrong not in json.dumps(rows)
    assert wrong[:10] not in json.dumps(rows)


def _csrf(browser: httpx.Client) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', browser.get("/signin").text)
    assert found
    return found.group(1)


def test_failed_console_sign_ins_are_audited_without_the_secret(api: tuple[str, str, dict[str, str]]) -> None:
    url, db, _ = api
    guessed = "guess-guess-guess"
    with httpx.Client(base_url=url, timeout=30) as browser:
        wrong_password = browser.post(
            "/signin", data={"csrf_token": _csrf(browser), "username": "vera", "password": guessed}
        )
        assert wrong_password.status_code == 401
        wrong_token = browser.post("/signin", data={"csrf_token": _csrf(browser), "token": f"eft_{guessed}"})
        assert wrong_token.status_code == 401
        assert browser.get(f"/signin/link/{guessed}").status_code == 401
        # Three failures: the next attempt waits, even with the right password.
        right = browser.post(
            "/signin", data={"csrf_token": _csrf(browser), "username": "vera", "password": PASSWORD}
        )
        assert right.status_code == 429
    rows = _failed_logins(db, "console_auth_failed")[:3]
    assert [r["target"] for r in rows] == ["signin-link", "token", "user:vera"]
    assert {r["actor"] for r in rows} == {"client:127.0.0.1"}
    assert rows[2]["detail"] == {"client": "127.0.0.1", "reason": "wrong username or password"}
    assert guessed not in json.dumps(rows)


def test_the_limiter_forgets_old_failures_and_bounds_its_memory() -> None:
    limiter = ratelimit.FailureLimiter(max_failures=2, window_s=0.0, max_clients=4)
    limiter.record("a")
    limiter.record("a")
    assert not limiter.blocked("a")  # a zero window forgets at once (no clock needed)
    strict = ratelimit.FailureLimiter(max_failures=2, window_s=3600, max_clients=4)
    for client in ("a", "b", "c", "d", "e", "f"):
        strict.record(client)
    assert len(strict._failures) <= 4
    strict.record("f")
    assert strict.blocked("f")


def test_the_access_log_never_shows_a_signin_link_secret_or_a_password() -> None:
    import logging  # noqa: PLC0415

    from cloud.console.app import RedactAccessLog  # noqa: PLC0415

    record = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5000", "GET", "/signin/link/Zm9vYmFyLXNlY3JldA?next=/x&token=abc", "1.1", 303),
        None,
    )
    assert RedactAccessLog().filter(record)
    line = record.getMessage()
    assert "Zm9vYmFyLXNlY3JldA" not in line
    assert "abc" not in line
    assert "/signin/link/***" in line
