"""Console sign-in against a real API server and registry: passwords (scrypt), API tokens, one-time
links, sessions that end on sign-out, disabling or revocation, the CSRF token on every form, the
sign-in rate limit, and the API's viewer/operator/admin roles."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import httpx
import pytest

from cloud.api import ratelimit
from cloud.api.auth import create_token, role_allows
from cloud.console import auth
from cloud.registry import accounts
from cloud.registry.db import session_scope, upgrade
from shared.settings import MqttSettings
from shared.settings.cloud import CloudSettings
from tests.support.api_server import run_cli, running_api

PASSWORD = "correct horse battery"


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[CloudSettings, str]]:
    root = tmp_path_factory.mktemp("console")
    settings = CloudSettings(
        data_dir=root / "cloud",
        database_url=f"sqlite:///{root / 'registry.db'}",
        broker=MqttSettings(url="mqtt://127.0.0.1:1"),
    )
    upgrade(settings.resolved_database_url)
    for name, role in (("vera", "viewer"), ("otto", "operator"), ("ada", "admin")):
        auth.create_user(
            database_url=settings.resolved_database_url, username=name, role=role, password=PASSWORD
        )
    with running_api(settings) as url:
        yield settings, url


_open_clients: list[httpx.Client] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    # Closed even when an assertion fails first (an unclosed socket is an error under filterwarnings).
    yield
    while _open_clients:
        _open_clients.pop().close()


def new_client(url: str) -> httpx.Client:
    client = httpx.Client(base_url=url, timeout=30)
    _open_clients.append(client)
    return client


def _form_csrf(client: httpx.Client, path: str = "/signin") -> str:
    page = client.get(path)
    assert page.status_code == 200, page.text
    found = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert found, "the form carries a CSRF token"
    return found.group(1)


def sign_in(url: str, username: str, password: str = PASSWORD) -> httpx.Client:
    client = new_client(url)
    answer = client.post(
        "/signin",
        data={"csrf_token": _form_csrf(client), "username": username, "password": password},
    )
    assert answer.status_code == 303, answer.text
    return client


def test_passwords_are_stored_as_salted_scrypt_and_verified_in_constant_form() -> None:
    first, second = auth.hash_password(PASSWORD), auth.hash_password(PASSWORD)
    assert first != second, "a fresh salt each time"
    assert first.startswith(f"scrypt${auth.SCRYPT_N}${auth.SCRYPT_R}${auth.SCRYPT_P}$")
    assert PASSWORD not in first
    assert auth.verify_password(PASSWORD, first)
    assert not auth.verify_password("wrong password", first)
    assert not auth.verify_password(PASSWORD, "md5$abc"), "a malformed hash never matches"


def test_roles_are_ordered_and_edge_tokens_are_not_people() -> None:
    assert role_allows("admin", "operator")
    assert role_allows("operator", "viewer")
    assert not role_allows("viewer", "operator")
    assert not role_allows("operator", "admin")
    assert not role_allows("edge", "viewer")
    assert role_allows("admin", "edge")


def test_new_users_are_checked_with_clear_errors(console: tuple[CloudSettings, str]) -> None:
    settings, _ = console
    url = settings.resolved_database_url
    with pytest.raises(Exception, match="at least 10 characters"):
        auth.create_user(database_url=url, username="short", role="viewer", password="abc")
    with pytest.raises(Exception, match="role 'root'"):
        auth.create_user(database_url=url, username="x", role="root", password=PASSWORD)
    with pytest.raises(Exception, match="username"):
        auth.create_user(database_url=url, username="has space", role="viewer", password=PASSWORD)
    with pytest.raises(ValueError, match="exists already"):
        auth.create_user(database_url=url, username="vera", role="viewer", password=PASSWORD)


def test_pages_need_a_session_and_sign_in_sets_a_hardened_cookie(console: tuple[CloudSettings, str]) -> None:
    _, url = console
    with httpx.Client(base_url=url, timeout=30) as anonymous:
        answer = anonymous.get("/audit")
        assert answer.status_code == 303
        assert answer.headers["location"] == "/signin?next=/audit"
        page = anonymous.get("/signin")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert page.headers["x-frame-options"] == "DENY"
    client = new_client(url)
    answer = client.post(
        "/signin",
        data={"csrf_token": _form_csrf(client), "username": "vera", "password": PASSWORD, "next": "/audit"},
    )
    assert answer.status_code == 303
    assert answer.headers["location"] == "/audit"
    cookie = answer.headers["set-cookie"]
    assert "ef_session=" in cookie
    assert "httponly" in cookie.lower()
    assert "samesite=lax" in cookie.lower()


def test_wrong_passwords_and_unknown_users_get_one_answer(console: tuple[CloudSettings, str]) -> None:
    _, url = console
    client = new_client(url)
    for username, password in (("vera", "not the password"), ("nobody", PASSWORD)):
        answer = client.post(
            "/signin", data={"csrf_token": _form_csrf(client), "username": username, "password": password}
        )
        assert answer.status_code == 401
        assert "wrong username or password" in answer.text
        assert "ef_session" not in answer.headers.get("set-cookie", "")


def test_the_signin_form_refuses_a_post_without_its_csrf_cookie(console: tuple[CloudSettings, str]) -> None:
    _, url = console
    with httpx.Client(base_url=url, timeout=30) as client:
        answer = client.post(
            "/signin", data={"csrf_token": "forged", "username": "vera", "password": PASSWORD}
        )
        assert answer.status_code == 403
        assert "ef_session" not in answer.headers.get("set-cookie", "")


def test_next_never_redirects_off_site(console: tuple[CloudSettings, str]) -> None:
    _, url = console
    for target in ("//evil.example/x", "https://evil.example/", "/\\evil.example"):
        client = new_client(url)
        answer = client.post(
            "/signin",
            data={"csrf_token": _form_csrf(client), "username": "vera", "password": PASSWORD, "next": target},
        )
        assert answer.headers["location"] == "/", target


def test_sign_out_needs_the_csrf_token_and_ends_the_session(console: tuple[CloudSettings, str]) -> None:
    _, url = console
    client = sign_in(url, "vera")
    forged = client.post("/signout", data={"csrf_token": "forged"})
    assert forged.status_code == 403
    session_cookie = client.cookies["ef_session"]
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/signin").text)
    assert csrf is not None
    # The real token is in every signed-in page's sign-out form; read it from the session itself.
    identity = auth.session_of(database_url=_db(console), cookie=session_cookie)
    assert identity is not None
    answer = client.post("/signout", data={"csrf_token": identity.csrf_token})
    assert answer.status_code == 303
    assert answer.headers["location"] == "/signin"
    assert auth.session_of(database_url=_db(console), cookie=session_cookie) is None
    replay = httpx.get(f"{url}/audit", cookies={"ef_session": session_cookie})
    assert replay.status_code == 303, "a signed-out cookie signs nobody in"


def test_a_post_from_another_origin_is_refused_even_with_the_token(
    console: tuple[CloudSettings, str],
) -> None:
    _, url = console
    client = sign_in(url, "vera")
    identity = auth.session_of(database_url=_db(console), cookie=client.cookies["ef_session"])
    assert identity is not None
    answer = client.post(
        "/signout", data={"csrf_token": identity.csrf_token}, headers={"Origin": "http://evil.example"}
    )
    assert answer.status_code == 403
    assert "another site" in answer.text


def test_disabling_a_user_ends_its_sessions_at_once(console: tuple[CloudSettings, str]) -> None:
    settings, url = console
    auth.create_user(database_url=_db(console), username="temp", role="operator", password=PASSWORD)
    client = sign_in(url, "temp")
    cookie = client.cookies["ef_session"]
    assert auth.session_of(database_url=_db(console), cookie=cookie) is not None
    run_cli(settings, "admin", "user", "set", "temp", "--disable")
    assert auth.session_of(database_url=_db(console), cookie=cookie) is None
    fresh = new_client(url)
    answer = fresh.post(
        "/signin", data={"csrf_token": _form_csrf(fresh), "username": "temp", "password": PASSWORD}
    )
    assert answer.status_code == 401


def test_api_tokens_of_people_sign_in_and_edge_tokens_do_not(console: tuple[CloudSettings, str]) -> None:
    _, url = console
    operator = create_token(database_url=_db(console), name="console-operator", role="operator")
    edge = create_token(database_url=_db(console), name="console-edge", role="edge")
    client = new_client(url)
    answer = client.post("/signin", data={"csrf_token": _form_csrf(client), "token": operator})
    assert answer.status_code == 303
    identity = auth.session_of(database_url=_db(console), cookie=client.cookies["ef_session"])
    assert identity is not None
    assert identity.role == "operator"
    assert identity.principal == "token:console-operator"
    other = new_client(url)
    refused = other.post("/signin", data={"csrf_token": _form_csrf(other), "token": edge})
    assert refused.status_code == 401
    assert "may not sign in" in refused.text
    # Revoking the token ends the session it opened.
    with session_scope(_db(console)) as session:
        from cloud.registry import fleet  # noqa: PLC0415

        fleet.revoke_token(session, name="console-operator")
    assert auth.session_of(database_url=_db(console), cookie=client.cookies["ef_session"]) is None


def test_a_signin_link_works_once_and_not_after_it_expires(console: tuple[CloudSettings, str]) -> None:
    _, url = console
    secret = auth.create_signin_link(database_url=_db(console), name="demo", role="admin")
    with httpx.Client(base_url=url, timeout=30) as first:
        answer = first.get(f"/signin/link/{secret}")
        assert answer.status_code == 303
        assert "ef_session=" in answer.headers["set-cookie"]
        identity = auth.session_of(database_url=_db(console), cookie=first.cookies["ef_session"])
        assert identity is not None
        assert identity.role == "admin"
        assert identity.name == "demo"
        assert answer.headers["referrer-policy"] == "no-referrer"
    again = httpx.get(f"{url}/signin/link/{secret}")
    assert again.status_code == 401
    assert "used already" in again.text
    expired = auth.create_signin_link(database_url=_db(console), name="late", ttl_s=-1)
    assert httpx.get(f"{url}/signin/link/{expired}").status_code == 401


def test_cli_prints_a_working_signin_link(console: tuple[CloudSettings, str]) -> None:
    settings, url = console
    link = run_cli(settings, "admin", "signin-link", "--role", "viewer", "--base-url", url).strip()
    assert link.startswith(f"{url}/signin/link/")
    answer = httpx.get(link)
    assert answer.status_code == 303


def test_repeated_failures_are_rate_limited(
    console: tuple[CloudSettings, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, url = console
    monkeypatch.setattr(ratelimit, "CONSOLE_SIGNIN", ratelimit.FailureLimiter(max_failures=3))
    client = new_client(url)
    codes = [
        client.post(
            "/signin", data={"csrf_token": _form_csrf(client), "username": "vera", "password": "guess guess"}
        ).status_code
        for _ in range(4)
    ]
    assert codes == [401, 401, 401, 429]
    # Even the right password waits now.
    right = client.post(
        "/signin", data={"csrf_token": _form_csrf(client), "username": "vera", "password": PASSWORD}
    )
    assert right.status_code == 429


def test_api_roles_viewer_reads_operator_acts_admin_manages(console: tuple[CloudSettings, str]) -> None:
    _, url = console
    tokens = {
        role: create_token(database_url=_db(console), name=f"api-{role}", role=role)
        for role in ("viewer", "operator")
    }
    viewer = {"Authorization": f"Bearer {tokens['viewer']}"}
    operator = {"Authorization": f"Bearer {tokens['operator']}"}
    assert httpx.get(f"{url}/v1/fleet/edges", headers=viewer).status_code == 200
    assert httpx.get(f"{url}/v1/audit", headers=viewer).status_code == 200
    refused = httpx.post(f"{url}/v1/rollouts/r-none/pause", headers=viewer)
    assert refused.status_code == 403
    # The operator gets past the role check (and finds no such rollout).
    assert httpx.post(f"{url}/v1/rollouts/r-none/pause", headers=operator).status_code == 404


def test_expired_sessions_are_refused_and_purged(console: tuple[CloudSettings, str]) -> None:
    _, url = console
    client = sign_in(url, "vera")
    cookie = client.cookies["ef_session"]
    with session_scope(_db(console)) as session:
        row = accounts.session_by_hash(session, session_hash=auth._sha256(cookie))
        assert row is not None
        row.expires_at = time.time() - 1
    assert httpx.get(f"{url}/audit", cookies={"ef_session": cookie}).status_code == 303
    with session_scope(_db(console)) as session:
        assert accounts.purge_expired_sessions(session, now=time.time()) >= 1


def _db(console: tuple[CloudSettings, str]) -> str:
    return console[0].resolved_database_url


def test_user_cli_creates_lists_and_never_shows_hashes(console: tuple[CloudSettings, str]) -> None:
    settings, url = console
    created = run_cli(
        settings,
        "admin",
        "user",
        "create",
        "cli-made",
        "--role",
        "operator",
        "--password-stdin",
        stdin=PASSWORD + "\n",
    )
    assert "created (role operator)" in created
    listing = run_cli(settings, "admin", "user", "list", "--json")
    assert '"cli-made"' in listing
    assert "scrypt" not in listing
    sign_in(url, "cli-made")
    audit = run_cli(settings, "admin", "audit", "--action", "user_create", "--json")
    assert '"cli-made"' in audit
